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
