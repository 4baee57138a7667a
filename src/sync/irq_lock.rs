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

use core::ops::{Deref, DerefMut};

use crate::mmu::InterruptControl;

/// The lock was held and the caller runs with interrupts disabled, so it may not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// A spin lock over `T`; see the module docs.
#[derive(Debug, Default)]
pub struct IrqLock<T> {
    inner: spin::Mutex<T>,
}

/// Access to the locked value; interrupts are off until it drops.
pub struct IrqGuard<'a, T> {
    guard: core::mem::ManuallyDrop<spin::MutexGuard<'a, T>>,
    irq: InterruptControl,
    enabled: bool,
    /// Whether this guard disabled interrupts (and so restores them on drop).
    disabled: bool,
}

impl<T> IrqLock<T> {
    /// A lock over `value`.
    pub const fn new(value: T) -> Self {
        IrqLock {
            inner: spin::Mutex::new(value),
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
            // Only to learn the caller's state: restored at once.
            let enabled = (irq.disable)();
            (irq.restore)(enabled);
            if let Some(guard) = self.inner.try_lock() {
                return Ok(IrqGuard {
                    guard: core::mem::ManuallyDrop::new(guard),
                    irq,
                    enabled,
                    disabled: false,
                });
            }
            if !enabled {
                return Err(Busy);
            }
            core::hint::spin_loop();
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
            let enabled = (irq.disable)();
            if let Some(guard) = self.inner.try_lock() {
                return Ok(IrqGuard {
                    guard: core::mem::ManuallyDrop::new(guard),
                    irq,
                    enabled,
                    disabled: true,
                });
            }
            if !enabled && refuse_when_off {
                return Err(Busy);
            }
            (irq.restore)(enabled);
            core::hint::spin_loop();
        }
    }

    /// The value, through exclusive access (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
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
