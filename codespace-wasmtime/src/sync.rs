//! The lock hooks: a mutex and a reader-writer lock, each in the one `usize` wasmtime gives
//! (zero = unlocked and never used, so a lock needs no initialization and no freeing).
//!
//! Interrupt-safe without risking a deadlock: a waiter spins with interrupts as they were (so
//! it keeps serving IPIs such as TLB shootdowns that a holder may be waiting for) and disables
//! them only around each attempt; a CPU keeps them disabled from its first acquisition to its
//! last release (a per-CPU nesting count in [`CpuSlots`], like xv6's `push_off`), so no
//! interrupt handler on that CPU can spin on a lock its own CPU holds, and the CPU cannot move
//! while it holds one. Contention never panics: it waits.
//!
//! Memory ordering: acquisition is an `Acquire` compare-exchange, release a `Release` store or
//! subtraction, so everything written under the lock is visible to the next holder.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{CpuSlots, Platform};

/// Rwlock word: a writer holds it (a mutex word is 0 or this).
const WRITER: usize = 1;
/// Rwlock word: one reader (the bits above the writer bit count readers).
const READER: usize = 2;

/// Spins until `attempt` succeeds with interrupts disabled, then counts the CPU's held locks
/// one up, leaving interrupts disabled.
fn acquire(p: &dyn Platform, mut attempt: impl FnMut() -> bool) {
    let irq = p.interrupts();
    loop {
        let enabled = (irq.disable)();
        if attempt() {
            // Interrupts are off: the slots are this CPU's until the release.
            push_off(p.cpu(), enabled);
            return;
        }
        (irq.restore)(enabled);
        core::hint::spin_loop();
    }
}

/// One more lock held by this CPU (interrupts off); the first records the interrupt state.
fn push_off(cpu: &CpuSlots, enabled: bool) {
    // Only this CPU touches its slots, with interrupts off: Relaxed suffices.
    if cpu.locks_held.fetch_add(1, Ordering::Relaxed) == 0 {
        cpu.irq_was_enabled
            .store(usize::from(enabled), Ordering::Relaxed);
    }
}

/// One lock fewer held by this CPU; the last release restores the recorded interrupt state.
fn pop_off(p: &dyn Platform) {
    let cpu = p.cpu();
    let held = cpu.locks_held.fetch_sub(1, Ordering::Relaxed);
    debug_assert!(held > 0, "wasmtime released more locks than this CPU holds");
    if held == 1 {
        (p.interrupts().restore)(cpu.irq_was_enabled.load(Ordering::Relaxed) != 0);
    }
}

/// Acquires the mutex at `word`.
pub fn lock(p: &dyn Platform, word: &AtomicUsize) {
    acquire(p, || {
        word.compare_exchange_weak(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    });
}

/// Releases the mutex at `word` (held by the caller).
pub fn unlock(p: &dyn Platform, word: &AtomicUsize) {
    let old = word.swap(0, Ordering::Release);
    debug_assert_eq!(old, WRITER, "wasmtime released a mutex it does not hold");
    pop_off(p);
}

/// Takes a read lock of the rwlock at `word` (readers share it; a writer excludes them).
pub fn read(p: &dyn Platform, word: &AtomicUsize) {
    acquire(p, || {
        let cur = word.load(Ordering::Relaxed);
        cur & WRITER == 0
            && cur.checked_add(READER).is_some_and(|new| {
                word.compare_exchange_weak(cur, new, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
    });
}

/// Drops a read lock of the rwlock at `word`.
pub fn read_unlock(p: &dyn Platform, word: &AtomicUsize) {
    let old = word.fetch_sub(READER, Ordering::Release);
    debug_assert!(old >= READER, "wasmtime released a read lock nobody holds");
    pop_off(p);
}

/// Takes the write lock of the rwlock at `word`.
pub fn write(p: &dyn Platform, word: &AtomicUsize) {
    acquire(p, || {
        word.compare_exchange_weak(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    });
}

/// Releases the write lock of the rwlock at `word`.
pub fn write_unlock(p: &dyn Platform, word: &AtomicUsize) {
    let old = word.swap(0, Ordering::Release);
    debug_assert_eq!(
        old, WRITER,
        "wasmtime released a write lock it does not hold"
    );
    pop_off(p);
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::{Access, InterruptControl, MemoryError};
    use core::ptr::NonNull;
    use std::boxed::Box;
    use std::cell::Cell;
    use std::sync::atomic::AtomicU64;
    use std::vec::Vec;

    std::thread_local! {
        /// This "CPU"'s slots (one leaked per thread) and its interrupt flag.
        static SLOTS: &'static CpuSlots = Box::leak(Box::new(CpuSlots::new()));
        static IRQ_ON: Cell<bool> = const { Cell::new(true) };
    }

    fn disable() -> bool {
        IRQ_ON.with(|f| f.replace(false))
    }

    fn restore(enabled: bool) {
        IRQ_ON.with(|f| f.set(enabled));
    }

    /// Threads as CPUs: per-thread slots and interrupt flag.
    struct Threads;

    // SAFETY: test platform: per-thread slots; memory is never used by these tests.
    unsafe impl Platform for Threads {
        fn cpu(&self) -> &CpuSlots {
            SLOTS.with(|s| *s)
        }
        fn interrupts(&self) -> InterruptControl {
            InterruptControl { disable, restore }
        }
        fn reserve(&self, _: usize, _: Access) -> Result<NonNull<u8>, MemoryError> {
            Err(MemoryError::OutOfAddressSpace)
        }
        unsafe fn set_access(&self, _: usize, _: usize, _: Access) -> Result<(), MemoryError> {
            Err(MemoryError::NotReserved)
        }
        unsafe fn discard(&self, _: usize, _: usize, _: Access) -> Result<(), MemoryError> {
            Err(MemoryError::NotReserved)
        }
        unsafe fn release(&self, _: usize, _: usize) -> Result<(), MemoryError> {
            Err(MemoryError::NotReserved)
        }
    }

    /// Contended mutex and rwlock: no lost update, no reader sees a half-done write, nobody
    /// panics, and each thread's interrupts are off exactly while it holds a lock (nested too).
    #[test]
    fn contended_locks_exclude_and_restore_interrupts() {
        static MUTEX: AtomicUsize = AtomicUsize::new(0);
        static RW: AtomicUsize = AtomicUsize::new(0);
        static COUNT: AtomicU64 = AtomicU64::new(0);
        static PAIR: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
        const ROUNDS: u64 = 20_000;
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let p = &Threads;
                    for i in 0..ROUNDS {
                        lock(p, &MUTEX);
                        assert!(!IRQ_ON.with(Cell::get), "interrupts off while held");
                        // A non-atomic increment: a second holder would lose updates.
                        let v = COUNT.load(Ordering::Relaxed);
                        COUNT.store(v + 1, Ordering::Relaxed);
                        if t % 2 == 0 {
                            read(p, &RW);
                            let (a, b) = (
                                PAIR[0].load(Ordering::Relaxed),
                                PAIR[1].load(Ordering::Relaxed),
                            );
                            assert_eq!(a, b, "a reader saw a half-done write");
                            read_unlock(p, &RW);
                            assert!(!IRQ_ON.with(Cell::get), "still off: the mutex is held");
                        }
                        unlock(p, &MUTEX);
                        assert!(
                            IRQ_ON.with(Cell::get),
                            "interrupts back on after the last release"
                        );
                        if t % 2 == 1 {
                            write(p, &RW);
                            PAIR[0].store(i, Ordering::Relaxed);
                            PAIR[1].store(i, Ordering::Relaxed);
                            write_unlock(p, &RW);
                        } else {
                            read(p, &RW);
                            assert_eq!(
                                PAIR[0].load(Ordering::Relaxed),
                                PAIR[1].load(Ordering::Relaxed)
                            );
                            read_unlock(p, &RW);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no thread panicked");
        }
        assert_eq!(COUNT.load(Ordering::Relaxed), 4 * ROUNDS);
        assert_eq!(MUTEX.load(Ordering::Relaxed), 0);
        assert_eq!(RW.load(Ordering::Relaxed), 0);
    }

    /// A thread that enters with interrupts off leaves them off after its last release.
    #[test]
    fn interrupts_off_before_stay_off() {
        static M: AtomicUsize = AtomicUsize::new(0);
        let p = &Threads;
        restore(false);
        lock(p, &M);
        unlock(p, &M);
        assert!(!IRQ_ON.with(Cell::get));
        restore(true);
    }
}
