//! The lookups shared by every module of a kernel, and the grace domain that frees their memory.

use alloc::sync::Arc;

use crate::code_map::CodeMap;
use crate::code_object::CodeObject;
use crate::mmu::InterruptControl;
use crate::sync::grace::GraceDomain;
use crate::trap::TrapTable;

/// The lookups the fault handler and profilers need, shared by all modules; keep one in a
/// `static` so a page-fault handler reaches it without locks:
///
/// ```
/// use codespace::module::Registries;
/// use codespace::sync::grace::GraceDomain;
///
/// static GRACE: GraceDomain = GraceDomain::new();
/// static CODE: Registries = Registries::new(&GRACE);
///
/// assert!(CODE.lookup_code(0x1000).is_none());
/// assert_eq!(CODE.traps.len(), 0);
/// ```
#[derive(Debug)]
pub struct Registries {
    /// Protected instructions of all published code. Looking up and releasing are safe;
    /// registering is `unsafe` (a registration decides where a faulting CPU resumes): modules
    /// register their own code through [`CodeModule::add_code`](super::CodeModule::add_code).
    pub traps: TrapTable,
    /// PC → code object for all published code.
    pub code: CodeMap,
}

impl Registries {
    /// Empty registries whose freed code and replaced memory wait for grace periods of `grace`
    /// (the domain the kernel reports quiescent states to).
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new(grace: &'static GraceDomain) -> Self {
        Registries {
            traps: TrapTable::new(grace),
            code: CodeMap::new(grace),
        }
    }

    /// Empty registries (loom atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new(grace: &'static GraceDomain) -> Self {
        Registries {
            traps: TrapTable::new(grace),
            code: CodeMap::new(grace),
        }
    }

    /// The registries, their writer locks held with interrupts disabled through `irq` (for
    /// example [`X86_INTERRUPTS`](crate::mmu::x86::X86_INTERRUPTS)): then a module may add code
    /// from an interrupt handler (a JIT tiering up from a timer tick) even when the handler
    /// interrupted another module's registration on the same CPU, which would otherwise spin
    /// forever on a lock its own CPU holds.
    ///
    /// The price is interrupt latency: a registry update, and the freeing of retired memory at
    /// its end, run with interrupts off whole, and both scale with the update — one function
    /// added is a few node copies, a module of 10^4 functions torn down is one update removing
    /// them all. Without interrupt control, add code only with interrupts on.
    ///
    /// ```
    /// # use codespace::{module::Registries, sync::grace::GraceDomain};
    /// # fn disable() -> bool { true }
    /// # fn restore(_: bool) {}
    /// use codespace::mmu::InterruptControl;
    /// static GRACE: GraceDomain = GraceDomain::new();
    /// static CODE: Registries =
    ///     Registries::new(&GRACE).with_interrupt_control(InterruptControl { disable, restore });
    /// # assert!(CODE.traps.is_empty());
    /// ```
    #[must_use]
    pub const fn with_interrupt_control(mut self, irq: InterruptControl) -> Self {
        self.traps.set_interrupt_control(irq);
        self.code.set_interrupt_control(irq);
        self
    }

    /// The grace domain: the kernel reports quiescent states to it.
    #[must_use]
    pub fn grace(&self) -> &'static GraceDomain {
        self.traps.grace()
    }

    /// Everything whose grace period is over goes, in one call for an idle loop: the grace
    /// domain's deferred drops (dropped modules' teardown, whose code spaces the manager
    /// releases next), then the trap table's and the PC map's replaced memory. Returns how many
    /// deferred drops ran. Never waits. Retired code of a live module is freed by that module's
    /// [`CodeModule::reclaim`](super::CodeModule::reclaim) (or its next update).
    ///
    /// A grace period needs every online CPU to report a quiescent state *after* it began, and
    /// what a retirement waits for is the period that begins after it: with one CPU, two rounds
    /// of `quiescent` and `try_advance`, then `reclaim`.
    pub fn reclaim(&self) -> usize {
        let drops = self.grace().reclaim();
        self.traps.reclaim();
        self.code.reclaim();
        drops
    }

    /// The code object holding `pc`: lock-free, O(log n).
    #[must_use]
    pub fn lookup_code(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.code.lookup(pc)
    }
}
