//! Lazy compilation: every function starts as a lazy slot (`push index; jmp` to the code
//! space's trampoline to `code::lazy_compile_entry`). The first call of a function enters the
//! kernel's lazy-compile entry, which calls [`compile_on_first_call`]: it builds the function's
//! IR, compiles it with Cranelift, installs it (the slot now jumps to the code) and returns the
//! code's address, and the entry resumes the call there with the original arguments. Calls after
//! that go straight to the code.
//!
//! The kernel's lazy entry passes only the function index, so one lazy module is active at a
//! time; it lives here, behind a lock that callers take only to find a slot, never across a
//! call (the lazy compiler takes it while the call is pending).
//!
//! When compilation fails the lazy compiler returns `enter::abort_address()`: the pending call
//! returns [`Trap::LazyCompileFailed`](super::Trap::LazyCompileFailed) to the kernel code that
//! made it, the slot stays lazy, and [`last_error`] says why.

use core::sync::atomic::{AtomicU64, Ordering};

use codespace::module::Registries;
use codespace::CodeManager;
use cranelift_codegen::ir::Function;

use super::compile::{Compiler, HostFunction};
use super::enter::{self, abort_address};
use super::isa::OptLevel;
use super::module::{JitConfig, JitModule};
use super::stack::on_compile_stack;
use super::JitError;
use crate::code::{self, KernelMmu};

/// How to build one function's IR, for compiling it when first called.
#[derive(Debug, Clone, Copy)]
pub struct FunctionSource {
    /// Name, for profilers and reports.
    pub name: &'static str,
    /// Integer parameters (calls are checked against it before the function exists).
    pub params: usize,
    /// Builds the IR.
    pub build: fn() -> Result<Function, JitError>,
}

struct Lazy {
    module: JitModule<KernelMmu>,
    sources: &'static [FunctionSource],
    opt: OptLevel,
    compiler: Compiler,
}

static LAZY: spin::Mutex<Option<Lazy>> = spin::Mutex::new(None);
static LAST_ERROR: spin::Mutex<Option<JitError>> = spin::Mutex::new(None);
static COMPILED: AtomicU64 = AtomicU64::new(0);

/// Makes a module of lazy slots for `sources` (function `i` is `sources[i]`) the active lazy
/// module; its functions compile at `opt` when first called.
///
/// # Errors
/// [`JitError::Busy`] when a lazy module is active already; module creation failures.
pub fn start(
    manager: &CodeManager<KernelMmu>,
    registries: &'static Registries,
    sources: &'static [FunctionSource],
    host: &'static [HostFunction],
    opt: OptLevel,
) -> Result<(), JitError> {
    let mut lazy = LAZY.lock();
    if lazy.is_some() {
        return Err(JitError::Busy);
    }
    let functions =
        u32::try_from(sources.len()).map_err(|_| JitError::BadIndex { index: u32::MAX })?;
    let mut module = JitModule::new(
        manager,
        registries,
        JitConfig {
            fault_range: None,
            functions,
            host,
            lazy_entry: Some(code::lazy_compile_entry()),
        },
    )?;
    for (i, s) in (0..functions).zip(sources) {
        module.declare_params(i, s.params);
    }
    *lazy = Some(Lazy {
        module,
        sources,
        opt,
        compiler: Compiler::new(),
    });
    code::set_lazy_compiler(Some(compile_on_first_call));
    Ok(())
}

/// Ends lazy compilation and hands the module back (dropping it frees all its code).
pub fn stop() -> Option<JitModule<KernelMmu>> {
    code::set_lazy_compiler(None);
    LAZY.lock().take().map(|l| l.module)
}

/// Calls function `index` of the lazy module (compiling it first if it never ran).
///
/// # Errors
/// [`JitError::Busy`] without an active lazy module; as `JitModule::call`.
pub fn call(index: u32, args: &[u64]) -> Result<u64, JitError> {
    let slot = match LAZY.lock().as_ref() {
        Some(lazy) => lazy.module.callable(index, args)?,
        None => return Err(JitError::Busy),
    };
    // SAFETY: the slot belongs to the lazy module: it leads to the lazy stub (which compiles
    // code from a `FunctionSource` with `Compiler`) or to such code; the argument count was
    // checked against the source's declaration.
    unsafe { enter::enter(slot, args) }.map_err(JitError::Trapped)
}

/// Runs `f` on the active lazy module (statistics, looking up code).
pub fn with_module<R>(f: impl FnOnce(&mut JitModule<KernelMmu>) -> R) -> Option<R> {
    LAZY.lock().as_mut().map(|l| f(&mut l.module))
}

/// Functions compiled by first calls since boot.
#[must_use]
pub fn compilations() -> u64 {
    COMPILED.load(Ordering::SeqCst)
}

/// Why the last failed lazy compilation failed.
#[must_use]
pub fn last_error() -> Option<JitError> {
    LAST_ERROR.lock().clone()
}

/// The kernel's lazy compiler (`code::set_lazy_compiler`): compiles and installs `index`,
/// returns its code, or the abort stub when that failed.
fn compile_on_first_call(index: u32) -> usize {
    let result = match LAZY.try_lock() {
        // Held by interrupted code on this CPU: waiting would deadlock.
        None => Err(JitError::Busy),
        Some(mut guard) => match guard.as_mut() {
            None => Err(JitError::Busy),
            // On the compile stack: this runs on the stack of the generated code that called.
            Some(lazy) => on_compile_stack(|| compile_one(lazy, index)).and_then(|r| r),
        },
    };
    match result {
        Ok(start) => start,
        Err(e) => {
            *LAST_ERROR.lock() = Some(e);
            abort_address()
        }
    }
}

fn compile_one(lazy: &mut Lazy, index: u32) -> Result<usize, JitError> {
    // Compiled since the slot was read (by an earlier call that raced this one): use it.
    if let Some(start) = lazy.module.code(index) {
        return Ok(start);
    }
    let source = lazy
        .sources
        .get(index as usize)
        .ok_or(JitError::BadIndex { index })?;
    let func = (source.build)()?;
    let compiled = lazy
        .compiler
        .compile(func, lazy.opt, &lazy.module.linkage())?;
    let object = lazy.module.install(index, &compiled, Some(source.name))?;
    COMPILED.fetch_add(1, Ordering::SeqCst);
    Ok(object.instruction_start())
}
