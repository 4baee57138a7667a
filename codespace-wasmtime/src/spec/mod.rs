//! The WebAssembly spec-suite harness shared by the host tool and a kernel.
//!
//! The host tool (`codespace-wasm-precompile spec`) turns `.wast` files into a [`bundle`]: per
//! file, the precompiled modules and a list of [`Step`]s, each with the outcome the host's own
//! wasmtime produced when it ran the same step ([`run`], the reference). A kernel runs every step
//! with the same [`run`] code on its wasmtime and [`check`]s its outcome against the host's,
//! command by command: values bit for bit (NaN results by their pattern), trap kinds by name.
//!
//! Both sides compile this module from the same source (the host tool includes it with
//! `#[path]`), so the runner, the `spectest` imports and the format cannot drift apart.

pub mod bundle;
pub mod run;

use alloc::string::String;
use alloc::vec::Vec;

/// A wasm value as the bundle carries it (floats and vectors as bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// `i32`.
    I32(u32),
    /// `i64`.
    I64(u64),
    /// `f32` bits.
    F32(u32),
    /// `f64` bits.
    F64(u64),
    /// `v128` bits.
    V128(u128),
    /// A `funcref`: whether it is non-null.
    FuncRef(bool),
    /// An `externref`: whether it is non-null.
    ExternRef(bool),
}

/// What one step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Instantiates module `module` of the file; on success it becomes the current instance,
    /// also known by `id` when given.
    Instantiate {
        /// Index into the file's modules.
        module: u32,
        /// The module's `$id`.
        id: Option<String>,
    },
    /// Makes the instance `id` (or the current one) importable as `name`.
    Register {
        /// The import module name.
        name: String,
        /// The instance's `$id`, or the current instance.
        id: Option<String>,
    },
    /// Calls export `func` of instance `id` (or the current one).
    Invoke {
        /// The instance's `$id`, or the current instance.
        id: Option<String>,
        /// The export's name.
        func: String,
        /// The arguments.
        args: Vec<Value>,
    },
    /// Reads global export `global` of instance `id` (or the current one).
    Get {
        /// The instance's `$id`, or the current instance.
        id: Option<String>,
        /// The export's name.
        global: String,
    },
    /// Not run, for the reason given (printed by the kernel next to the skip).
    Skip(String),
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It completed with these results (none for instantiation and `register`).
    Values(Vec<Value>),
    /// It trapped with this wasmtime trap code (`Debug` name, e.g. `MemoryOutOfBounds`).
    Trap(String),
    /// Instantiation failed with an error that is not a trap (a link error).
    Unlinkable,
    /// Something else failed (a missing export, a bad argument): never a passing outcome.
    Failed(String),
    /// The step was skipped.
    Skipped,
}

/// How a result value is compared with the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Bit for bit.
    Exact,
    /// Any canonical NaN (an `f32`/`f64` result).
    CanonicalNan,
    /// Any arithmetic NaN.
    ArithmeticNan,
    /// A `v128` compared per `f32` lane with the lane rules (0 exact, 1 canonical, 2 arithmetic).
    LanesF32([u8; 4]),
    /// A `v128` compared per `f64` lane.
    LanesF64([u8; 2]),
}

/// Which wast command a step came from (for the per-file table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// `module`.
    Module = 0,
    /// `register`.
    Register = 1,
    /// `invoke`.
    Invoke = 2,
    /// `assert_return`.
    AssertReturn = 3,
    /// `assert_trap`.
    AssertTrap = 4,
    /// `assert_exhaustion`.
    AssertExhaustion = 5,
    /// `assert_unlinkable`.
    AssertUnlinkable = 6,
    /// A command this harness does not run (threads, exceptions, module definitions).
    Other = 7,
}

impl Kind {
    /// Every kind, in tag order.
    pub const ALL: [Kind; 8] = [
        Kind::Module,
        Kind::Register,
        Kind::Invoke,
        Kind::AssertReturn,
        Kind::AssertTrap,
        Kind::AssertExhaustion,
        Kind::AssertUnlinkable,
        Kind::Other,
    ];

    /// The wast keyword.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::Module => "module",
            Kind::Register => "register",
            Kind::Invoke => "invoke",
            Kind::AssertReturn => "assert_return",
            Kind::AssertTrap => "assert_trap",
            Kind::AssertExhaustion => "assert_exhaustion",
            Kind::AssertUnlinkable => "assert_unlinkable",
            Kind::Other => "other",
        }
    }
}

/// One command of a file, with the host's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Line in the `.wast` file (1-based).
    pub line: u32,
    /// The command it came from.
    pub kind: Kind,
    /// What to do.
    pub action: Action,
    /// What the host's wasmtime did (which passed the wast assertion).
    pub host: Outcome,
    /// How each result value is compared (one per value of `host`, when it has values).
    pub rules: Vec<Rule>,
}

/// One `.wast` file: its precompiled modules (`.cwasm` containers) and its steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File<'a> {
    /// The file name.
    pub name: String,
    /// The modules, in the order the steps refer to them.
    pub modules: Vec<&'a [u8]>,
    /// The commands.
    pub steps: Vec<Step>,
}

fn canonical_f32(bits: u32) -> bool {
    bits & 0x7fff_ffff == 0x7fc0_0000
}

fn arithmetic_f32(bits: u32) -> bool {
    bits & 0x7fc0_0000 == 0x7fc0_0000
}

fn canonical_f64(bits: u64) -> bool {
    bits & 0x7fff_ffff_ffff_ffff == 0x7ff8_0000_0000_0000
}

fn arithmetic_f64(bits: u64) -> bool {
    bits & 0x7ff8_0000_0000_0000 == 0x7ff8_0000_0000_0000
}

fn lane_ok32(rule: u8, host: u32, got: u32) -> bool {
    match rule {
        1 => canonical_f32(got),
        2 => arithmetic_f32(got),
        _ => host == got,
    }
}

fn lane_ok64(rule: u8, host: u64, got: u64) -> bool {
    match rule {
        1 => canonical_f64(got),
        2 => arithmetic_f64(got),
        _ => host == got,
    }
}

/// Whether `got` matches the host's `host` value under `rule`.
#[must_use]
pub fn value_matches(rule: Rule, host: Value, got: Value) -> bool {
    match (rule, host, got) {
        (Rule::Exact, h, g) => h == g,
        (Rule::CanonicalNan, Value::F32(_), Value::F32(g)) => canonical_f32(g),
        (Rule::ArithmeticNan, Value::F32(_), Value::F32(g)) => arithmetic_f32(g),
        (Rule::CanonicalNan, Value::F64(_), Value::F64(g)) => canonical_f64(g),
        (Rule::ArithmeticNan, Value::F64(_), Value::F64(g)) => arithmetic_f64(g),
        (Rule::LanesF32(rules), Value::V128(h), Value::V128(g)) => {
            (0..4).all(|i| lane_ok32(rules[i], (h >> (32 * i)) as u32, (g >> (32 * i)) as u32))
        }
        (Rule::LanesF64(rules), Value::V128(h), Value::V128(g)) => {
            (0..2).all(|i| lane_ok64(rules[i], (h >> (64 * i)) as u64, (g >> (64 * i)) as u64))
        }
        _ => false,
    }
}

/// Compares a kernel's outcome of `step` with the host's: the same kind of outcome, the same trap
/// code, every value matching its rule.
///
/// # Errors
/// A one-line description of the difference.
pub fn check(step: &Step, got: &Outcome) -> Result<(), String> {
    let differ = || Err(alloc::format!("host {:?}, here {:?}", step.host, got));
    match (&step.host, got) {
        (Outcome::Values(host), Outcome::Values(here)) => {
            if host.len() != here.len() || step.rules.len() != host.len() {
                return differ();
            }
            for ((rule, h), g) in step.rules.iter().zip(host).zip(here) {
                if !value_matches(*rule, *h, *g) {
                    return differ();
                }
            }
            Ok(())
        }
        (Outcome::Trap(h), Outcome::Trap(g)) if h == g => Ok(()),
        (Outcome::Unlinkable, Outcome::Unlinkable) => Ok(()),
        _ => differ(),
    }
}
