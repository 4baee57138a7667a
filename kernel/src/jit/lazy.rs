//! Lazy compilation: every function starts as a lazy slot (`push index; jmp` to the code
//! space's trampoline to `code::lazy_compile_entry`). The first call of a function enters the
//! kernel's lazy-compile entry, which calls [`compile_on_first_call`]: it builds the function's
//! IR, compiles it with Cranelift, installs it (the slot now jumps to the code) and returns the
//! code's address, and the entry resumes the call there with the original arguments. Calls after
//! that go straight to the code.
//!
//! When compilation fails the lazy compiler returns `enter::abort_address()`: the pending call
//! returns [`Trap::LazyCompileFailed`](super::Trap::LazyCompileFailed) to the kernel code that
//! made it, the slot stays lazy, and [`last_error`] (on that CPU) says why.
//!
//! # Concurrency
//!
//! Any CPU may call a lazy function, and several may hit the same lazy slot at once. Each
//! compiles on its own compile stack with its own compiler, holding no lock while Cranelift runs,
//! and installs with `JitModule::install_if_absent`: the first to install wins, the others get
//! the winner's code back and resume their calls there; their own compiled bytes are dropped
//! without ever having been copied into the code window. So a function is installed exactly
//! once, and no call ever runs code that is replaced under it by a racing first call.
//!
//! The kernel's lazy entry passes only the function index, so one lazy module is active at a
//! time. It lives in an `Arc` behind a lock that is held only to clone or swap that `Arc` (with
//! interrupts off, so an interrupt handler on the same CPU never finds it held): never while
//! compiling, and never while generated code runs. A pending compilation holds its own clone, so
//! [`stop`] while another CPU compiles leaves the module alive until that compilation is done.
//!
//! Compilers are per CPU and reused. An interrupt handler that lazily compiles over an
//! interrupted compilation on the same CPU finds that CPU's compiler taken and uses a fresh one.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use codespace::module::{Installed, Registries};
use codespace::CodeManager;
use cranelift_codegen::ir::Function;
use lock_api::RawMutex as _;

use super::compile::{Compiler, HostFunction};
use super::enter::{self, abort_address};
use super::isa::OptLevel;
use super::module::{JitConfig, JitModule};
use super::stack::on_compile_stack;
use super::JitError;
use crate::code::{self, KernelMmu};
use crate::cpu::percpu::PerCpu;
use codespace::mmu::x86::IrqSpin;

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
    module: Arc<JitModule<KernelMmu>>,
    sources: &'static [FunctionSource],
    opt: OptLevel,
    /// Each CPU's compiler, kept between compilations (only that CPU locks its own).
    compilers: PerCpu<spin::Mutex<Option<Compiler>>>,
}

type IrqMutex<T> = lock_api::Mutex<IrqSpin, T>;

/// The active lazy module. Held only to clone or swap the `Arc` (see the module docs).
static ACTIVE: IrqMutex<Option<Arc<Lazy>>> = IrqMutex::const_new(IrqSpin::INIT, None);
/// Why the last failed lazy compilation on each CPU failed.
static LAST_ERROR: PerCpu<IrqMutex<Option<JitError>>> =
    crate::per_cpu!(IrqMutex::const_new(IrqSpin::INIT, None));

static COMPILED: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// What first calls did since boot, on every CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LazyStats {
    /// Functions Cranelift compiled for a first call.
    pub compiled: u64,
    /// Compiled functions installed (each function at most once per module).
    pub installed: u64,
    /// Compiled functions not installed: another CPU installed the function first, and the call
    /// resumed in that code.
    pub lost_races: u64,
    /// First calls that returned `LazyCompileFailed`.
    pub failed: u64,
}

/// Counters of lazy compilation since boot.
#[must_use]
pub fn stats() -> LazyStats {
    LazyStats {
        compiled: COMPILED.load(Ordering::SeqCst),
        installed: INSTALLED.load(Ordering::SeqCst),
        lost_races: LOST.load(Ordering::SeqCst),
        failed: FAILED.load(Ordering::SeqCst),
    }
}

/// Makes a module of lazy slots for `sources` (function `i` is `sources[i]`) the active lazy
/// module; its functions compile at `opt` when first called, on whichever CPU calls them.
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
    if ACTIVE.lock().is_some() {
        return Err(JitError::Busy);
    }
    let functions =
        u32::try_from(sources.len()).map_err(|_| JitError::BadIndex { index: u32::MAX })?;
    let module = JitModule::new(
        manager,
        registries,
        JitConfig {
            functions,
            host,
            lazy_entry: Some(code::lazy_compile_entry()),
        },
    )?;
    for (i, s) in (0..functions).zip(sources) {
        module.declare_params(i, s.params);
    }
    let lazy = Arc::new(Lazy {
        module: Arc::new(module),
        sources,
        opt,
        compilers: crate::per_cpu!(spin::Mutex::new(None)),
    });
    {
        let mut active = ACTIVE.lock();
        if active.is_some() {
            // Another CPU started one meanwhile; ours drops (its code is freed after a grace
            // period, and no slot of it was ever handed out).
            return Err(JitError::Busy);
        }
        *active = Some(lazy);
    }
    code::set_lazy_compiler(Some(compile_on_first_call));
    Ok(())
}

/// Ends lazy compilation and hands the module back (dropping the last reference frees all its
/// code after a grace period). A compilation still pending on another CPU keeps the module alive
/// and finishes normally.
pub fn stop() -> Option<Arc<JitModule<KernelMmu>>> {
    code::set_lazy_compiler(None);
    ACTIVE.lock().take().map(|l| Arc::clone(&l.module))
}

/// The active lazy module, if any.
fn active() -> Option<Arc<Lazy>> {
    ACTIVE.lock().clone()
}

/// The active lazy module (statistics, looking up code), if any.
#[must_use]
pub fn module() -> Option<Arc<JitModule<KernelMmu>>> {
    active().map(|l| Arc::clone(&l.module))
}

/// Calls function `index` of the lazy module (compiling it first if it never ran), on this CPU.
///
/// # Errors
/// [`JitError::Busy`] without an active lazy module; as `JitModule::call`.
pub fn call(index: u32, args: &[u64]) -> Result<u64, JitError> {
    // Held across the call (a reference, not a lock): the module outlives it even if another
    // CPU stops lazy compilation meanwhile.
    let lazy = active().ok_or(JitError::Busy)?;
    let slot = lazy.module.callable(index, args)?;
    // SAFETY: the slot belongs to the lazy module: it leads to the lazy stub (which compiles
    // code from a `FunctionSource` with `Compiler`) or to such code; the argument count was
    // checked against the source's declaration.
    unsafe { enter::enter(slot, args) }.map_err(JitError::Trapped)
}

/// Why the last failed lazy compilation on this CPU failed.
#[must_use]
pub fn last_error() -> Option<JitError> {
    LAST_ERROR.this().lock().clone()
}

/// The kernel's lazy compiler (`code::set_lazy_compiler`): compiles and installs `index`,
/// returns its code, or the abort stub when that failed. Runs on the stack of the generated code
/// that called the lazy slot, on the calling CPU.
fn compile_on_first_call(index: u32) -> usize {
    let result = match active() {
        None => Err(JitError::Busy),
        // On the compile stack: the calling stack may have little left.
        Some(lazy) => on_compile_stack(|| compile_one(&lazy, index)).and_then(|r| r),
    };
    match result {
        Ok(start) => start,
        Err(e) => {
            FAILED.fetch_add(1, Ordering::SeqCst);
            *LAST_ERROR.this().lock() = Some(e);
            abort_address()
        }
    }
}

fn compile_one(lazy: &Lazy, index: u32) -> Result<usize, JitError> {
    // Installed since this call read the slot (a racing first call finished): use it.
    if let Some(start) = lazy.module.code(index) {
        return Ok(start);
    }
    let source = lazy
        .sources
        .get(index as usize)
        .ok_or(JitError::BadIndex { index })?;
    let func = (source.build)()?;
    let linkage = lazy.module.linkage();
    let compiled = match lazy.compilers.this().try_lock() {
        Some(mut mine) => mine
            .get_or_insert_with(Compiler::new)
            .compile(func, lazy.opt, &linkage),
        // This CPU's compiler is in use by the compilation this interrupt handler interrupted.
        None => Compiler::new().compile(func, lazy.opt, &linkage),
    }?;
    COMPILED.fetch_add(1, Ordering::SeqCst);
    match lazy
        .module
        .install_if_absent(index, &compiled, Some(source.name))?
    {
        Installed::New(object) => {
            INSTALLED.fetch_add(1, Ordering::SeqCst);
            Ok(object.instruction_start())
        }
        Installed::Existing(start) => {
            LOST.fetch_add(1, Ordering::SeqCst);
            Ok(start)
        }
    }
}
