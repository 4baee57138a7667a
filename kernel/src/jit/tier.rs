//! Tier-up: recompiling a running function at another optimisation level and switching its slot
//! while calls are in flight.
//!
//! # Why callers never see a broken slot
//!
//! `JitModule::install` publishes the new code (W^X, registered for traps and PC lookup) before
//! touching any slot, then codespace repoints each jump-table slot with one aligned 8-byte store
//! through the writable alias. A call that reads the slot before the store runs the old code,
//! after it the new code; there is no third state. Calls already inside the old code (including
//! frames of a recursion, and code interrupted by the interrupt that tiers up) keep running the
//! old version, whose calls go through the slot and so reach the new one.
//!
//! # When the old code is freed
//!
//! The module retires the replaced code: it stays registered (calls in it finish, protected
//! faults in it land) until every CPU passed a quiescent state. `JitModule::reclaim` reports one
//! for the calling CPU when no `enter` is active on it, and idle CPUs report from their idle
//! loop; then the code's trap and PC entries go, and its memory.
//!
//! # From another CPU
//!
//! Any CPU may tier up a function that others are calling: `JitModule` is shared by reference
//! and installing is `CodeModule::add_code`, which patches the slot with one aligned store
//! through the patching CPU's private alias and then makes every other CPU execute a serializing
//! instruction before it returns (Intel SDM vol. 3, "cross-modifying code"). A CPU that is
//! in the middle of the old code keeps running it — it has not reported a quiescent state, so
//! the old code stays mapped and registered — and its next call through the slot reaches the new
//! code. The tiering CPU compiles on its own compile stack; a [`TierUp`] (which owns a compiler)
//! belongs to one CPU at a time (`&mut self`).
//!
//! # From an interrupt handler
//!
//! Compiling allocates from the kernel heap and installing takes codespace's locks, so an
//! interrupt handler may tier up only when the code it interrupted holds neither: callers of
//! generated code that run with interrupts on must not hold the module or heap lock across the
//! call (the tier-up test's calling loop allocates nothing). A real kernel compiles on a worker
//! and installs from task context; the library's IRQ-safe locks (returning `Busy` in interrupt
//! context) make the contended case an error instead of a deadlock.

use codespace::mmu::Mmu;
use cranelift_codegen::ir::Function;

use super::compile::Compiler;
use super::isa::OptLevel;
use super::module::JitModule;
use super::stack::on_compile_stack;
use super::JitError;

/// One function that can be compiled at either level; each [`step`](TierUp::step) installs the
/// other level's code over the running one.
pub struct TierUp {
    index: u32,
    name: &'static str,
    build: fn(OptLevel) -> Result<Function, JitError>,
    compiler: Compiler,
    level: Option<OptLevel>,
    installs: u64,
}

impl core::fmt::Debug for TierUp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TierUp")
            .field("index", &self.index)
            .field("level", &self.level)
            .field("installs", &self.installs)
            .finish_non_exhaustive()
    }
}

impl TierUp {
    /// Function `index` (named `name`), whose IR for a level `build` makes.
    #[must_use]
    pub fn new(
        index: u32,
        name: &'static str,
        build: fn(OptLevel) -> Result<Function, JitError>,
    ) -> Self {
        TierUp {
            index,
            name,
            build,
            compiler: Compiler::new(),
            level: None,
            installs: 0,
        }
    }

    /// Compiles at `level` and installs over whatever runs now; the replaced code is retired.
    ///
    /// # Errors
    /// Compilation or installation failures; the running code stays installed then.
    pub fn install<M: Mmu + Send + 'static>(
        &mut self,
        module: &JitModule<M>,
        level: OptLevel,
    ) -> Result<usize, JitError> {
        // All of it on the compile stack: from an interrupt handler the interrupted stack may
        // have little left, and building IR and installing are not shallow either.
        let object = on_compile_stack(|| {
            let func = (self.build)(level)?;
            let code = self.compiler.compile(func, level, &module.linkage())?;
            module.install(self.index, &code, Some(self.name))
        })??;
        self.level = Some(level);
        self.installs += 1;
        Ok(object.instruction_start())
    }

    /// Switches to the other level: up to `Speed` from `None` (or nothing), back down otherwise
    /// (a deoptimisation, which exercises the same switch).
    ///
    /// # Errors
    /// As [`install`](Self::install).
    pub fn step<M: Mmu + Send + 'static>(
        &mut self,
        module: &JitModule<M>,
    ) -> Result<OptLevel, JitError> {
        let next = match self.level {
            Some(OptLevel::Speed) => OptLevel::None,
            _ => OptLevel::Speed,
        };
        self.install(module, next)?;
        Ok(next)
    }

    /// The level installed last.
    #[must_use]
    pub fn level(&self) -> Option<OptLevel> {
        self.level
    }

    /// How many versions were installed.
    #[must_use]
    pub fn installs(&self) -> u64 {
        self.installs
    }
}
