//! [`IrqSpin`]: a `lock_api` raw spin lock for the kernel state codespace's backend borrows and
//! an interrupt handler may also lock (the page table, the frame allocator): held with
//! interrupts off, so a handler on the same CPU never finds it held by the code it interrupted.
//! Hand it to [`X86Mmu::new`](super::X86Mmu::new) as `lock_api::Mutex<IrqSpin, _>`
//! ([`IrqMutex`]).
//!
//! `spin::lock_api::Mutex` would not do: it leaves interrupts on while held, so a timer handler
//! that patches a slot could spin forever on the lock the code it interrupted holds.

use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::instructions::interrupts;

/// A spin lock that disables interrupts while held and restores them on unlock.
///
/// A waiter keeps the interrupt state it came with while it spins, so a waiting CPU with
/// interrupts on still answers IPIs; codespace never holds these locks across a cross-CPU wait.
pub struct IrqSpin {
    locked: AtomicBool,
    /// Whether interrupts were on when the holder took the lock (read by the holder only).
    enabled: AtomicBool,
}

impl IrqSpin {
    fn acquire(&self, enabled: bool) -> bool {
        if self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            self.enabled.store(enabled, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

// SAFETY: `locked` is taken with an acquire CAS and released with a release store, so at most one
// holder exists and its accesses happen-before the next holder's.
unsafe impl lock_api::RawMutex for IrqSpin {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = IrqSpin {
        locked: AtomicBool::new(false),
        enabled: AtomicBool::new(false),
    };

    // The saved interrupt state belongs to the CPU that locked: the guard must not move.
    type GuardMarker = lock_api::GuardNoSend;

    fn lock(&self) {
        loop {
            let enabled = interrupts::are_enabled();
            interrupts::disable();
            if self.acquire(enabled) {
                return;
            }
            if enabled {
                interrupts::enable();
            }
            core::hint::spin_loop();
        }
    }

    fn try_lock(&self) -> bool {
        let enabled = interrupts::are_enabled();
        interrupts::disable();
        let got = self.acquire(enabled);
        if !got && enabled {
            interrupts::enable();
        }
        got
    }

    unsafe fn unlock(&self) {
        let enabled = self.enabled.load(Ordering::Relaxed);
        self.locked.store(false, Ordering::Release);
        if enabled {
            interrupts::enable();
        }
    }
}

/// A mutex over `T` locked with [`IrqSpin`].
pub type IrqMutex<T> = lock_api::Mutex<IrqSpin, T>;
/// Its guard.
pub type IrqMutexGuard<'a, T> = lock_api::MutexGuard<'a, IrqSpin, T>;
