//! [`IrqLock`]: a spin lock that refuses instead of deadlocking when the caller cannot wait.
//!
//! Codespace's locks can be taken from interrupt handlers (a timer patching a jump slot, a
//! lazy-compile path). These rules make that safe on SMP:
//! - **Waited for with interrupts as the caller had them.** A CPU spinning for the lock keeps
//!   taking interrupts, so it still answers the TLB-shootdown and serialization IPIs the holder
//!   may be waiting for. A caller that already runs with interrupts off (an interrupt handler,
//!   or a critical section of its own) could not answer them, so it does not spin: a contended
//!   lock answers [`Busy`] at once. An interrupt handler that finds the lock held by the code it
//!   interrupted gets [`Busy`] the same way, never a deadlock.
//! - **Held with interrupts off** ([`lock`](IrqLock::lock)) for the innermost lock, whose holder
//!   waits for other CPUs (the manager's: shootdowns, serialization); or **held with interrupts
//!   as they were** ([`lock_interruptible`](IrqLock::lock_interruptible)) for an outer lock (a
//!   module's), so that the inner lock taken under it still knows whether the real caller can
//!   wait: were the outer lock to turn interrupts off, every contended inner lock would answer
//!   [`Busy`] to callers that could have waited.
//! - **Or waited for whatever the interrupt state** ([`lock_spinning`](IrqLock::lock_spinning)),
//!   held with interrupts off, for a lock whose holders wait for nothing (the registries' writer
//!   locks, a code pointer table's, the grace domain's deferred list): the wait is bounded, so
//!   callers need not handle [`Busy`].
//!
//! Under `cfg(loom)` the lock is loom's modelled mutex, so the loom models check these rules
//! (the models at the end of this file) and every lock built on `IrqLock`.

use core::ops::{Deref, DerefMut};

use super::{spin_wait, Mutex, MutexGuard};
use crate::mmu::InterruptControl;

/// The lock was held and the caller runs with interrupts disabled, so it may not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// A spin lock over `T`; see the module docs.
#[derive(Debug, Default)]
pub struct IrqLock<T> {
    inner: Mutex<T>,
}

/// Access to the locked value; interrupts are off until it drops.
pub struct IrqGuard<'a, T> {
    guard: core::mem::ManuallyDrop<MutexGuard<'a, T>>,
    irq: InterruptControl,
    enabled: bool,
    /// Whether this guard disabled interrupts (and so restores them on drop).
    disabled: bool,
}

impl<T> IrqLock<T> {
    /// A lock over `value`.
    #[cfg(not(loom))]
    pub const fn new(value: T) -> Self {
        IrqLock {
            inner: Mutex::new(value),
        }
    }

    /// A lock over `value` (loom's modelled lock is not `const`).
    #[cfg(loom)]
    pub fn new(value: T) -> Self {
        IrqLock {
            inner: Mutex::new(value),
        }
    }

    /// Takes the lock with interrupts off (through `irq`).
    ///
    /// # Errors
    /// [`Busy`] when the lock is held and interrupts were already off on entry.
    pub fn lock(&self, irq: InterruptControl) -> Result<IrqGuard<'_, T>, Busy> {
        self.acquire_with_interrupts_off(irq, true)
    }

    /// Takes the lock, leaving interrupts as the caller has them while it is held.
    ///
    /// # Errors
    /// [`Busy`] when the lock is held and interrupts are off on entry.
    pub fn lock_interruptible(&self, irq: InterruptControl) -> Result<IrqGuard<'_, T>, Busy> {
        loop {
            let enabled = interrupts_enabled(irq);
            if let Some(guard) = self.inner.try_lock() {
                return Ok(IrqGuard::new(guard, irq, enabled, false));
            }
            if !enabled {
                return Err(Busy);
            }
            spin_wait();
        }
    }

    /// Takes the lock with interrupts off (through `irq`), waiting however interrupts were on
    /// entry: for a lock whose holders never wait for another CPU (no IPI, no other lock), so
    /// a waiter with interrupts off is never waiting for itself. While it waits, interrupts are
    /// as the caller had them.
    pub fn lock_spinning(&self, irq: InterruptControl) -> IrqGuard<'_, T> {
        loop {
            // Never refused (`refuse_when_off` is false); the loop only makes that total.
            if let Ok(guard) = self.acquire_with_interrupts_off(irq, false) {
                return guard;
            }
        }
    }

    /// Spins for the lock, trying it with interrupts off and waiting with them as on entry;
    /// answers [`Busy`] instead of waiting when they were off on entry and `refuse_when_off`.
    fn acquire_with_interrupts_off(
        &self,
        irq: InterruptControl,
        refuse_when_off: bool,
    ) -> Result<IrqGuard<'_, T>, Busy> {
        loop {
            if let Some(guard) = self.try_lock(irq) {
                return Ok(guard);
            }
            // Interrupts are as on entry again (`try_lock` restored them).
            if refuse_when_off && !interrupts_enabled(irq) {
                return Err(Busy);
            }
            spin_wait();
        }
    }

    /// Takes the lock with interrupts off (through `irq`) if it is free now; never waits. On
    /// `None` interrupts are as they were.
    pub fn try_lock(&self, irq: InterruptControl) -> Option<IrqGuard<'_, T>> {
        let enabled = (irq.disable)();
        match self.inner.try_lock() {
            Some(guard) => Some(IrqGuard::new(guard, irq, enabled, true)),
            None => {
                (irq.restore)(enabled);
                None
            }
        }
    }

    /// The value, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

/// Whether interrupts are enabled on this CPU (learnt by disabling and restoring them).
fn interrupts_enabled(irq: InterruptControl) -> bool {
    let enabled = (irq.disable)();
    (irq.restore)(enabled);
    enabled
}

impl<'a, T> IrqGuard<'a, T> {
    fn new(guard: MutexGuard<'a, T>, irq: InterruptControl, enabled: bool, disabled: bool) -> Self {
        #[cfg(all(test, not(loom)))]
        test_hook::held();
        IrqGuard {
            guard: core::mem::ManuallyDrop::new(guard),
            irq,
            enabled,
            disabled,
        }
    }
}

impl<T> IrqGuard<'_, T> {
    /// Whether interrupts were enabled when the lock was taken (false: interrupt context, or a
    /// caller's own critical section).
    #[must_use]
    pub fn interrupts_were_enabled(&self) -> bool {
        self.enabled
    }
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> Drop for IrqGuard<'_, T> {
    fn drop(&mut self) {
        // Unlock before interrupts come back: an interrupt arriving right after must find the
        // lock free.
        // SAFETY: dropped exactly once, here.
        unsafe { core::mem::ManuallyDrop::drop(&mut self.guard) };
        if self.disabled {
            (self.irq.restore)(self.enabled);
        }
    }
}

/// Unit tests' view into held locks: a simulated interrupt flag per thread (a simulated CPU)
/// and a count of acquisitions made with it clear or set, taken while the lock is held. The
/// tests of the locks built on `IrqLock` use it to check that an interrupt can never arrive on
/// a CPU holding their lock (as `tests/interrupt_context.rs` does for the registries).
#[cfg(all(test, not(loom)))]
pub(crate) mod test_hook {
    use core::cell::Cell;

    use crate::mmu::InterruptControl;

    std::thread_local! {
        /// This simulated CPU's interrupt flag (true: enabled).
        static ENABLED: Cell<bool> = const { Cell::new(true) };
        /// Whether acquisitions are counted on this thread.
        static WATCHING: Cell<bool> = const { Cell::new(false) };
        /// Acquisitions seen while watching: (with interrupts off, with them on).
        static HELD: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    }

    fn disable() -> bool {
        ENABLED.with(|e| e.replace(false))
    }

    fn restore(enabled: bool) {
        if enabled {
            ENABLED.with(|e| e.set(true));
        }
    }

    /// Interrupt control of this thread's simulated flag.
    pub(crate) const SIM: InterruptControl = InterruptControl { disable, restore };

    /// Whether this thread's simulated interrupts are enabled.
    pub(crate) fn enabled() -> bool {
        ENABLED.with(Cell::get)
    }

    /// Starts counting this thread's acquisitions from zero.
    pub(crate) fn watch() {
        HELD.with(|h| h.set((0, 0)));
        WATCHING.with(|w| w.set(true));
    }

    /// Stops counting; returns (acquisitions with interrupts off, with interrupts on).
    pub(crate) fn unwatch() -> (usize, usize) {
        WATCHING.with(|w| w.set(false));
        HELD.with(Cell::get)
    }

    /// Runs on every acquisition, while the lock is held.
    pub(super) fn held() {
        if WATCHING.with(Cell::get) {
            let on = enabled();
            HELD.with(|h| {
                let (off_count, on_count) = h.get();
                h.set(if on {
                    (off_count, on_count + 1)
                } else {
                    (off_count + 1, on_count)
                });
            });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use core::sync::atomic::{AtomicBool, Ordering};

    static OFF: AtomicBool = AtomicBool::new(false);

    fn disable() -> bool {
        !OFF.swap(true, Ordering::SeqCst)
    }

    fn restore(enabled: bool) {
        if enabled {
            OFF.store(false, Ordering::SeqCst);
        }
    }

    const SIM: InterruptControl = InterruptControl { disable, restore };

    #[test]
    fn held_with_interrupts_off_and_busy_instead_of_waiting_when_they_were_off() {
        let lock = IrqLock::new(5);
        {
            let g = lock.lock(SIM).unwrap();
            assert_eq!(*g, 5);
            assert!(OFF.load(Ordering::SeqCst), "interrupts are off while held");
            // An "interrupt handler" on this CPU: interrupts are off, the lock is held.
            assert_eq!(lock.lock(SIM).err(), Some(Busy));
            assert!(
                OFF.load(Ordering::SeqCst),
                "the refused attempt left them off"
            );
        }
        assert!(!OFF.load(Ordering::SeqCst), "restored on unlock");
        // With interrupts off but the lock free, the caller gets it and they stay off after.
        OFF.store(true, Ordering::SeqCst);
        drop(lock.lock(SIM).unwrap());
        assert!(OFF.load(Ordering::SeqCst));
        OFF.store(false, Ordering::SeqCst);
    }

    #[test]
    fn an_outer_interruptible_lock_leaves_the_caller_able_to_wait_for_an_inner_one() {
        let outer = IrqLock::new(());
        let inner = IrqLock::new(());
        let g = outer.lock_interruptible(SIM).unwrap();
        assert!(
            !OFF.load(Ordering::SeqCst),
            "held with interrupts as they were"
        );
        assert!(g.interrupts_were_enabled());
        // The inner lock sees the caller's real state: it could wait, and takes it.
        drop(inner.lock(SIM).unwrap());
        // From "interrupt context" the outer lock refuses at once.
        OFF.store(true, Ordering::SeqCst);
        assert_eq!(outer.lock_interruptible(SIM).err(), Some(Busy));
        assert!(OFF.load(Ordering::SeqCst), "left as they were");
        OFF.store(false, Ordering::SeqCst);
        drop(g);
        assert!(!OFF.load(Ordering::SeqCst));
    }
}

/// Model checks of the lock: mutual exclusion (loom sees the protected data as an
/// `UnsafeCell`, so two holders at once are reported as a race), interrupts off while held and
/// back as they were after, and `Busy` instead of waiting for callers with interrupts off. Each
/// loom thread is a CPU with its own simulated interrupt flag. Run with
/// `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use core::cell::Cell;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    loom::thread_local! {
        /// This simulated CPU's interrupt flag (true: enabled).
        static ENABLED: Cell<bool> = Cell::new(true);
    }

    fn disable() -> bool {
        ENABLED.with(|e| e.replace(false))
    }

    fn restore(enabled: bool) {
        if enabled {
            ENABLED.with(|e| e.set(true));
        }
    }

    fn enabled() -> bool {
        ENABLED.with(Cell::get)
    }

    const SIM: InterruptControl = InterruptControl { disable, restore };

    fn checked(f: impl Fn() + Send + Sync + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(f);
    }

    /// The critical section of one CPU: interrupts off while held (for `lock` and
    /// `lock_spinning`), the counter bumped with a plain read and write loom tracks.
    fn bump(counter: &UnsafeCell<u32>, guard: &IrqGuard<'_, ()>) {
        assert!(!enabled(), "interrupts are off while the lock is held");
        assert!(guard.interrupts_were_enabled());
        // SAFETY: loom tracks the cell; two holders at once would be reported as a race.
        unsafe { counter.with_mut(|c| *c += 1) };
    }

    #[test]
    fn loom_irq_lock_excludes_and_restores_interrupts() {
        checked(|| {
            let lock = Arc::new(IrqLock::new(()));
            let counter = Arc::new(UnsafeCell::new(0u32));
            let other = {
                let (lock, counter) = (Arc::clone(&lock), Arc::clone(&counter));
                loom::thread::spawn(move || {
                    let g = lock.lock(SIM).expect("interrupts on: waits, never Busy");
                    bump(&counter, &g);
                    drop(g);
                    assert!(enabled(), "restored on unlock");
                })
            };
            let g = lock.lock_spinning(SIM);
            bump(&counter, &g);
            drop(g);
            assert!(enabled(), "restored on unlock");
            other.join().unwrap();
            // SAFETY: both CPUs are done.
            assert_eq!(unsafe { counter.with(|c| *c) }, 2);
        });
    }

    /// A CPU already running with interrupts off (an interrupt handler) either gets the lock or
    /// answers `Busy` at once, and leaves its interrupts off either way; the holder on the other
    /// CPU is never disturbed.
    #[test]
    fn loom_irq_lock_refuses_instead_of_waiting_with_interrupts_off() {
        checked(|| {
            let lock = Arc::new(IrqLock::new(()));
            let counter = Arc::new(UnsafeCell::new(0u32));
            let handler = {
                let (lock, counter) = (Arc::clone(&lock), Arc::clone(&counter));
                loom::thread::spawn(move || {
                    let was = disable();
                    let got = match lock.lock(SIM) {
                        Ok(g) => {
                            assert!(!g.interrupts_were_enabled());
                            // SAFETY: as in `bump`.
                            unsafe { counter.with_mut(|c| *c += 1) };
                            1
                        }
                        Err(Busy) => 0,
                    };
                    assert!(!enabled(), "a handler's interrupts stay off");
                    restore(was);
                    got
                })
            };
            let g = lock.lock(SIM).unwrap();
            bump(&counter, &g);
            drop(g);
            let got = handler.join().unwrap();
            // SAFETY: both CPUs are done.
            assert_eq!(unsafe { counter.with(|c| *c) }, 1 + got);
        });
    }
}
