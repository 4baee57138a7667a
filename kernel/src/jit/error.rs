//! Why a JIT operation failed. Every failure leaves the module as it was: nothing is installed,
//! no slot changes.

use alloc::string::String;
use core::fmt;

use codespace::module::ModuleError;
use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::ir::TrapCode;

use super::enter::Trap;

/// Why compiling, installing or calling a function failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JitError {
    /// The IR failed Cranelift's verifier (the verifier's report).
    Verifier(String),
    /// Cranelift refused the function for another reason (implementation limit, unsupported
    /// feature, register-allocation checker).
    Codegen(String),
    /// A value of a type this kernel cannot run: it leaves SSE off, so float and vector values
    /// would fault with #UD.
    UnsupportedType {
        /// The type, as Cranelift prints it.
        ty: String,
    },
    /// A relocation the glue cannot map onto codespace (a libcall, a GOT reference, a function
    /// address taken rather than called, ...).
    UnsupportedRelocation {
        /// Cranelift's relocation kind.
        kind: Reloc,
        /// Offset of the relocated field in the function's code.
        offset: u32,
    },
    /// A call to a function that does not exist: a module index past the module's functions, a
    /// host index past the host table, or an unknown namespace.
    UnknownFunction {
        /// `UserExternalName::namespace` (0: module function, 1: host function).
        namespace: u32,
        /// `UserExternalName::index`.
        index: u32,
    },
    /// A trap record whose fault is not a page fault on the linear memory's guard (an explicit
    /// `trap`, a division by zero, ...): no landing pad can catch it here.
    UnsupportedTrap {
        /// Cranelift's trap code.
        code: TrapCode,
        /// Offset of the trapping instruction.
        offset: u32,
    },
    /// The code does not fit in one code space of the manager.
    CodeTooLarge {
        /// Bytes of the function (landing pad included).
        size: usize,
        /// The manager's largest code space.
        max: usize,
    },
    /// Function index past the module's functions.
    BadIndex {
        /// The index given.
        index: u32,
    },
    /// A call with the wrong number of arguments, or more than six (all go in registers).
    ArgumentCount {
        /// Parameters of the function.
        expected: usize,
        /// Arguments given.
        given: usize,
    },
    /// The function has no code yet (and no lazy slot to compile it).
    NotCompiled {
        /// The function index.
        index: u32,
    },
    /// codespace refused the code (allocation, commit limit, publish, trap registration).
    Install(ModuleError),
    /// The call trapped; the landing pad returned here.
    Trapped(Trap),
    /// No linear-memory slot is free, the size is zero or too large, or mapping failed.
    LinearMemory(&'static str),
    /// The compile stack could not be mapped (no free frames).
    CompileStack(&'static str),
    /// No lazy module is active, or one is already (lazy `start`).
    Busy,
}

impl fmt::Display for JitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JitError::Verifier(report) => write!(f, "IR failed verification: {report}"),
            JitError::Codegen(why) => write!(f, "Cranelift: {why}"),
            JitError::UnsupportedType { ty } => {
                write!(f, "type {ty} needs SSE, which this kernel leaves off")
            }
            JitError::UnsupportedRelocation { kind, offset } => {
                write!(
                    f,
                    "relocation {kind} at {offset:#x} has no codespace equivalent"
                )
            }
            JitError::UnknownFunction { namespace, index } => {
                write!(f, "call to unknown function u{namespace}:{index}")
            }
            JitError::UnsupportedTrap { code, offset } => {
                write!(f, "trap {code} at {offset:#x} is not a guard-page fault")
            }
            JitError::CodeTooLarge { size, max } => {
                write!(f, "{size} bytes of code exceed a code space ({max} bytes)")
            }
            JitError::BadIndex { index } => write!(f, "no function {index}"),
            JitError::ArgumentCount { expected, given } => {
                write!(
                    f,
                    "{given} arguments given, {expected} expected (at most 6)"
                )
            }
            JitError::NotCompiled { index } => write!(f, "function {index} has no code"),
            JitError::Install(e) => write!(f, "codespace: {e}"),
            JitError::Trapped(trap) => write!(f, "{trap}"),
            JitError::LinearMemory(why) => write!(f, "linear memory: {why}"),
            JitError::CompileStack(why) => write!(f, "compile stack: {why}"),
            JitError::Busy => f.write_str("no lazy module active, or one already"),
        }
    }
}

impl core::error::Error for JitError {}
