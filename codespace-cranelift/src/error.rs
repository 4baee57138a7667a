//! What the codespace backend refuses ([`BackendError`], inside
//! [`ModuleError::Backend`](crate::ModuleError::Backend)) and why a call failed ([`CallError`]).

use alloc::string::String;
use core::fmt;

use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::ir::TrapCode;

use crate::module::FuncId;
use cranelift_codegen::ir;
use cranelift_codegen::settings::SetError;
use cranelift_codegen::{CodegenError, CompileError};

/// Why a [`Module`](crate::Module) method failed. Mirrors `cranelift_module::ModuleError`; the module is
/// unchanged after any of them.
#[derive(Debug)]
#[non_exhaustive]
pub enum ModuleError {
    /// An identifier was used before it was declared.
    Undeclared(String),
    /// An identifier was declared as data and then as a function, or the other way round.
    IncompatibleDeclaration(String),
    /// A function was declared again with another signature (the name, the first signature,
    /// the new one).
    IncompatibleSignature(String, ir::Signature, ir::Signature),
    /// An identifier was defined more than once.
    DuplicateDefinition(String),
    /// An identifier declared as an import was defined.
    InvalidImportDefinition(String),
    /// Cranelift refused the function.
    Compilation(CodegenError),
    /// Memory could not be allocated.
    Allocation {
        /// What was being allocated.
        message: &'static str,
    },
    /// The codespace backend refused (what `cranelift_module` wraps in `anyhow::Error`).
    Backend(BackendError),
    /// A Cranelift setting could not be applied.
    Flag(SetError),
}

impl<'a> From<CompileError<'a>> for ModuleError {
    fn from(err: CompileError<'a>) -> Self {
        Self::Compilation(err.inner)
    }
}

impl From<CodegenError> for ModuleError {
    fn from(source: CodegenError) -> Self {
        Self::Compilation(source)
    }
}

impl From<SetError> for ModuleError {
    fn from(source: SetError) -> Self {
        Self::Flag(source)
    }
}

impl From<BackendError> for ModuleError {
    fn from(source: BackendError) -> Self {
        Self::Backend(source)
    }
}

impl From<codespace::module::ModuleError> for ModuleError {
    fn from(source: codespace::module::ModuleError) -> Self {
        Self::Backend(BackendError::Codespace(source))
    }
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Undeclared(name) => write!(f, "Undeclared identifier: {name}"),
            Self::IncompatibleDeclaration(name) => {
                write!(f, "Incompatible declaration of identifier: {name}")
            }
            Self::IncompatibleSignature(name, prev, new) => write!(
                f,
                "Function {name} signature {new:?} is incompatible with previous declaration {prev:?}"
            ),
            Self::DuplicateDefinition(name) => write!(f, "Duplicate definition of identifier: {name}"),
            Self::InvalidImportDefinition(name) => {
                write!(f, "Invalid to define identifier declared as an import: {name}")
            }
            Self::Compilation(err) => write!(f, "Compilation error: {err}"),
            Self::Allocation { message } => write!(f, "Allocation error: {message}"),
            Self::Backend(err) => write!(f, "Backend error: {err}"),
            Self::Flag(err) => write!(f, "Flag error: {err}"),
        }
    }
}

impl core::error::Error for ModuleError {}

/// A convenient alias for a `Result` that uses [`ModuleError`] as the error type.
pub type ModuleResult<T> = Result<T, ModuleError>;

/// Why the codespace backend refused an operation; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendError {
    /// codespace refused (allocation, commit limit, publish, trap registration, busy).
    Codespace(codespace::module::ModuleError),
    /// More functions declared than the module has jump-table slots
    /// ([`JITBuilder::max_functions`](crate::JITBuilder::max_functions)).
    TooManyFunctions {
        /// Slots of the module.
        max: u32,
    },
    /// A symbol no lookup resolves (an import, a libcall) or a module function or data object
    /// referenced but not defined at [`finalize_definitions`](crate::JITModule::finalize_definitions).
    UnresolvedSymbol(String),
    /// A relocation with no codespace equivalent: a module function's address taken
    /// PC-relatively (codespace resolves only `call`/`jmp` rel32 to a slot), a PC-relative
    /// reference to data or an import, a GOT entry, TLS, a known symbol.
    UnsupportedRelocation {
        /// Cranelift's relocation kind.
        kind: Reloc,
        /// Offset of the relocated field.
        offset: u32,
        /// What it refers to.
        target: String,
    },
    /// Thread-local data: a kernel has no TLS model Cranelift knows.
    Tls(String),
    /// A data object whose contents were never given.
    Uninitialized(String),
    /// A data alignment that is not a power of two, or larger than a page.
    BadAlignment(u64),
    /// [`prepare_for_function_redefine`](crate::JITModule::prepare_for_function_redefine)
    /// without [`JITBuilder::hotswap`](crate::JITBuilder::hotswap).
    HotswapDisabled,
    /// The kernel could not provide a compile stack (its reason).
    CompileStack(&'static str),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Codespace(e) => write!(f, "codespace: {e}"),
            Self::TooManyFunctions { max } => write!(f, "more than {max} functions"),
            Self::UnresolvedSymbol(name) => write!(f, "can't resolve symbol {name}"),
            Self::UnsupportedRelocation {
                kind,
                offset,
                target,
            } => write!(
                f,
                "relocation {kind} to {target} at {offset:#x} has no codespace equivalent"
            ),
            Self::Tls(name) => write!(f, "{name}: a kernel JIT has no thread-local data"),
            Self::Uninitialized(name) => write!(f, "data object {name} has no contents"),
            Self::BadAlignment(a) => {
                write!(f, "data alignment {a} is not a power of two up to a page")
            }
            Self::HotswapDisabled => f.write_str("hotswap is not enabled"),
            Self::CompileStack(why) => write!(f, "compile stack: {why}"),
        }
    }
}

impl core::error::Error for BackendError {}

/// How generated code stopped other than by returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trap {
    /// PC of the trapping instruction.
    pub pc: usize,
    /// Cranelift's trap code recorded for that instruction (`None`: not an instruction of this
    /// module, e.g. a kernel function it called).
    pub code: Option<TrapCode>,
    /// The faulting address, for a page fault.
    pub fault_address: Option<u64>,
}

/// Why [`JITModule::call`](crate::JITModule::call) did not return a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// The function is not defined and finalized in this module (or is an import).
    NotFinalized(FuncId),
    /// The signature cannot be called with integer registers: more than six parameters, a
    /// parameter or more than one return value that is not an integer of at most 64 bits, or a
    /// calling convention other than System V.
    UnsupportedSignature(FuncId),
    /// As many arguments as parameters are needed.
    ArgumentCount {
        /// Parameters of the function.
        expected: usize,
        /// Arguments given.
        given: usize,
    },
    /// The code trapped; its landing pad unwound to the caller.
    Trap(Trap),
    /// The kernel's entry reported another way out (its own status word).
    Aborted(u64),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFinalized(id) => write!(f, "{id} is not a finalized function"),
            Self::UnsupportedSignature(id) => {
                write!(f, "{id} does not take and return integers in registers")
            }
            Self::ArgumentCount { expected, given } => {
                write!(f, "{given} arguments given, {expected} expected")
            }
            Self::Trap(t) => match t.code {
                Some(code) => write!(f, "trap {code} at {:#x}", t.pc),
                None => write!(f, "trap at {:#x}", t.pc),
            },
            Self::Aborted(status) => write!(f, "the call was aborted ({status:#x})"),
        }
    }
}

impl core::error::Error for CallError {}
