//! A two-slot latch over immutable, reference-counted snapshots: lock-free, allocation-free
//! reads that stay correct when they interrupt a writer on the same CPU.
//!
//! [`Latch<T>`] publishes values of `T` (typically an immutable sorted table) behind an [`Arc`].
//! [`Latch::read`] hands the current value to a closure without locking, waiting or allocating,
//! so it may run in a page-fault handler; [`Latch::publish`] replaces the value. This is the idea
//! behind Linux's latch tree; [`TrapTable`](crate::trap::TrapTable) and
//! [`CodeMap`](crate::code_map::CodeMap) are built on it.
//!
//! # Protocol
//!
//! State: two slots `slots[0..2]` (each a raw pointer obtained from `Arc::into_raw`, owning one
//! strong count, or null for "no snapshot yet"), a sequence number `seq` whose low bit names the
//! slot readers use, and a reader count per slot `readers[0..2]`. Writers serialize on a
//! [`spin::Mutex`] inside the latch; readers never touch it.
//!
//! Reader ([`Latch::read`]):
//! ```text
//! R1 s = seq            ; i = s & 1
//! R2 readers[i] += 1
//! R3 if seq != s { readers[i] -= 1; retry }
//! R4 p = slots[i]; use *p
//! R5 readers[i] -= 1
//! ```
//! Writer ([`Latch::publish`], holding the writer mutex; `seq == s` on entry, `a = s & 1`,
//! `b = a ^ 1`):
//! ```text
//! W1 seq = s + 1                  ; new readers go to slot b (still the old snapshot)
//! W2 wait until readers[a] == 0
//! W3 slots[a] = new; drop the slot's count on the old snapshot
//! W4 seq = s + 2                  ; new readers go to slot a (the new snapshot)
//!    writer hook (tests only)
//! W5 wait until readers[b] == 0
//! W6 slots[b] = new; drop the slot's count on the old snapshot
//! ```
//! All accesses to `seq` and `readers` are `SeqCst`, so they sit in one total order. Why no
//! reader dereferences a snapshot after W3 (or W6) released the slot's count on it:
//! * A reader that reaches R4 on slot `a` read `seq == s` at R1 and at R3. If its increment R2
//!   precedes the load W2 in the total order, W2 (and every later poll) sees the count until R5,
//!   so the writer waits; R5 is a release RMW read by the writer's acquire load, so everything
//!   the reader did happens-before W3. If R2 follows W2, then W1 precedes R3, so R3 reads
//!   `seq != s` and the reader retries without loading the pointer. The same argument with
//!   W4/W5/W6 covers slot `b`. (`seq` would have to wrap around the whole `usize` range while a
//!   reader sits between R1 and R3 to fool the check.)
//! * A reader that loads a slot after W3/W6 read a `seq` written at or after that store, so it
//!   sees the new pointer (release/acquire through `seq`) and the fully built snapshot.
//! * Snapshots are reference counted: the slot counts plus whatever `Arc`s the caller keeps. A
//!   snapshot is freed exactly once, by the last `Arc` drop, and only after both slots stopped
//!   naming it. That drop may happen inside [`Latch::publish`] (never inside a reader).
//!
//! The argument needs a single writer between W1 and W6: a second writer moving `seq` back to a
//! slot the first one is draining would let readers in behind its check. [`Latch::publish`]
//! therefore takes the latch's own writer lock, so the API is sound whatever the caller does.
//! Callers that compute the next snapshot from the current one (read-modify-write) still need
//! their own lock around "read current, build next, publish", or two updates would lose one.
//!
//! Same CPU: a page fault may interrupt the writer anywhere. The writer is suspended, so `seq`
//! cannot change while the handler runs: the reader passes R3 on its first try and uses the slot
//! named by `seq`, which is never the slot the writer is waiting on or replacing (the writer only
//! touches a slot after moving `seq` away from it). Every step of the writer is a single atomic
//! instruction, so the reader sees either the old or the new snapshot, never a torn one, and it
//! finishes without waiting for the writer. The reverse direction is not supported: a writer
//! must not run in interrupt context (it could spin forever on a reader it interrupted, and the
//! writer mutex is not reentrant).
//!
//! Readers on other CPUs never block either: a reader retries only when `seq` moved between R1
//! and R3, which takes writer progress, so the protocol is lock-free for readers.

use alloc::sync::Arc;
use core::fmt;
use core::marker::PhantomData;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// A value alone on its cache line, so reader counts and `seq` do not false-share.
#[repr(align(64))]
struct CacheLine<T>(T);

/// Writer-only state, behind the writer mutex.
struct WriterState {
    /// Test hook run in the middle of every publish (between W4 and W5).
    hook: Option<fn()>,
}

/// Lock-free, allocation-free reads of an immutable snapshot that writers replace.
///
/// Usable as a `static` ([`Latch::new`] is `const`). [`read`](Self::read) never locks, waits
/// or allocates and may run in a page-fault handler that interrupted a
/// [`publish`](Self::publish) on the same CPU. Writers serialize on a spin lock inside the
/// latch and must not run in interrupt context. See the module docs for the protocol.
///
/// `Latch<T>` is `Send + Sync` when `T` is: readers on any thread borrow the snapshot and the
/// last reference may be dropped on any thread.
pub struct Latch<T> {
    /// Low bit: the slot new readers use.
    seq: CacheLine<AtomicUsize>,
    /// Readers currently inside each slot.
    readers: [CacheLine<AtomicUsize>; 2],
    /// `Arc::into_raw` of a snapshot (one strong count each), or null for "no snapshot".
    slots: [AtomicPtr<T>; 2],
    writer: spin::Mutex<WriterState>,
    /// The slots own `Arc<T>`s: auto traits and drop check follow `Arc<T>`.
    _owns: PhantomData<Arc<T>>,
}

impl<T> Default for Latch<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Latch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Latch")
            .field("seq", &self.seq.0.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Keeps `readers[i]` raised while a reader uses slot `i`.
struct ReadGuard<'a>(&'a AtomicUsize);

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<T> Latch<T> {
    /// A latch holding no snapshot: [`read`](Self::read) passes `None` until the first
    /// [`publish`](Self::publish).
    #[must_use]
    pub const fn new() -> Self {
        Latch {
            seq: CacheLine(AtomicUsize::new(0)),
            readers: [
                CacheLine(AtomicUsize::new(0)),
                CacheLine(AtomicUsize::new(0)),
            ],
            slots: [
                AtomicPtr::new(ptr::null_mut()),
                AtomicPtr::new(ptr::null_mut()),
            ],
            writer: spin::Mutex::new(WriterState { hook: None }),
            _owns: PhantomData,
        }
    }

    /// Runs `f` on the snapshot readers currently use (`None` before the first publish); steps
    /// R1-R5 in the module docs.
    ///
    /// Lock-free and allocation-free; safe to call from an interrupt or fault handler that
    /// interrupted a [`publish`](Self::publish) on the same CPU. It retries only when a writer on
    /// another CPU moved on between two loads. `f` must not call `publish` on the same latch: a
    /// writer waits for readers of the slot it replaces, here itself.
    pub fn read<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
        loop {
            let s = self.seq.0.load(Ordering::SeqCst);
            let i = s & 1;
            let count = &self.readers[i].0;
            count.fetch_add(1, Ordering::SeqCst);
            let guard = ReadGuard(count);
            if self.seq.0.load(Ordering::SeqCst) != s {
                // A writer moved on; it may be replacing slot `i`. Do not touch the pointer.
                drop(guard);
                core::hint::spin_loop();
                continue;
            }
            let p = self.slots[i].load(Ordering::Acquire);
            // SAFETY: `p` is null or came from `Arc::into_raw` and the slot still owns a strong
            // count on it: a writer drops that count only after moving `seq` away from `s` and
            // then seeing `readers[i] == 0`. Our increment of `readers[i]` came before our second
            // read of `seq` returned `s` (all SeqCst), so that writer either sees our count and
            // waits until the guard drops, or moved `seq` before our re-check, which would have
            // failed. The snapshot is immutable (only shared borrows of an `Arc` exist), so a
            // shared borrow for the guard's lifetime is sound; `f` cannot keep it longer.
            let snapshot = unsafe { p.as_ref() };
            let r = f(snapshot);
            drop(guard);
            return r;
        }
    }

    /// Makes `new` the snapshot every later [`read`](Self::read) sees (steps W1-W6 in the module
    /// docs). Once this returns, no reader sees the previous snapshot any more and the latch
    /// holds no count on it.
    ///
    /// Publishers serialize on a spin lock inside the latch, so concurrent calls are sound, but
    /// a caller that derives `new` from the current snapshot must hold its own lock across
    /// "read, build, publish" to not lose updates. Not for interrupt context: it waits for
    /// readers to leave the slot it replaces, and it may drop the last `Arc` on the previous
    /// snapshot (deallocation).
    pub fn publish(&self, new: Arc<T>) {
        let state = self.writer.lock();
        // Only publishers change `seq` and we hold the writer lock.
        let s = self.seq.0.load(Ordering::Relaxed);
        let first = s & 1;
        // W1: new readers use the other slot, which still holds the current snapshot.
        self.seq.0.fetch_add(1, Ordering::SeqCst);
        // W2-W3
        self.replace_slot(first, &new);
        // W4: new readers use `first`, which now holds `new`.
        self.seq.0.fetch_add(1, Ordering::SeqCst);
        if let Some(hook) = state.hook {
            hook();
        }
        // W5-W6
        self.replace_slot(first ^ 1, &new);
        drop(state);
    }

    /// Test hook: `hook` runs inside every later [`publish`](Self::publish), in the middle of
    /// the update (between W4 and W5).
    ///
    /// When it runs, readers already see the new snapshot through one slot while the other slot
    /// still holds the previous snapshot and is about to be replaced, with the writer lock held.
    /// A kernel test raises a page fault from the hook to check that a read resolves while an
    /// update is half done. The hook must not call `publish` or `set_writer_hook` on the same
    /// latch (the writer lock is held). `None` removes it.
    #[doc(hidden)]
    pub fn set_writer_hook(&self, hook: Option<fn()>) {
        self.writer.lock().hook = hook;
    }

    /// Waits for slot `i` to drain, then points it at `next`. `seq` must already name the other
    /// slot and the caller holds the writer lock.
    fn replace_slot(&self, i: usize, next: &Arc<T>) {
        while self.readers[i].0.load(Ordering::SeqCst) != 0 {
            core::hint::spin_loop();
        }
        let new = Arc::into_raw(Arc::clone(next)).cast_mut();
        let old = self.slots[i].swap(new, Ordering::SeqCst);
        if !old.is_null() {
            // SAFETY: `old` came from `Arc::into_raw` in an earlier `replace_slot` and the slot
            // owned that strong count; the swap took it out of the slot, so it is dropped once.
            // No reader holds it: `seq` no longer names slot `i` and `readers[i]` was seen at 0
            // afterwards, so every reader of `old` has finished (its decrement synchronizes with
            // our SeqCst load) and every later reader of slot `i` fails its `seq` re-check or
            // loads `new`. The writer lock keeps any other publisher from moving `seq` back to
            // slot `i` meanwhile.
            drop(unsafe { Arc::from_raw(old) });
        }
    }
}

impl<T> Drop for Latch<T> {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            let p = core::mem::replace(slot.get_mut(), ptr::null_mut());
            if !p.is_null() {
                // SAFETY: `&mut self` excludes readers and writers; `p` came from `Arc::into_raw`
                // and the slot owned one strong count, released here exactly once.
                drop(unsafe { Arc::from_raw(p) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::vec::Vec;

    #[test]
    fn empty_then_published_values() {
        let latch: Latch<u32> = Latch::new();
        assert_eq!(latch.read(|v| v.copied()), None);
        latch.publish(Arc::new(1));
        assert_eq!(latch.read(|v| v.copied()), Some(1));
        latch.publish(Arc::new(2));
        assert_eq!(latch.read(|v| v.copied()), Some(2));
    }

    #[test]
    fn publish_releases_previous_snapshot_and_drop_releases_current() {
        let latch = Latch::default();
        let a = Arc::new(7u64);
        latch.publish(Arc::clone(&a));
        // Ours plus one per slot.
        assert_eq!(Arc::strong_count(&a), 3);
        let b = Arc::new(8u64);
        latch.publish(Arc::clone(&b));
        assert_eq!(Arc::strong_count(&a), 1, "no slot names the old snapshot");
        assert_eq!(Arc::strong_count(&b), 3);
        drop(latch);
        assert_eq!(Arc::strong_count(&b), 1);
    }

    static HOOK_LATCH: Latch<u32> = Latch::new();
    static HOOK_SEEN: AtomicUsize = AtomicUsize::new(0);

    fn hook() {
        HOOK_SEEN.store(
            HOOK_LATCH.read(|v| v.copied()).unwrap_or(0) as usize,
            Ordering::SeqCst,
        );
    }

    #[test]
    fn hook_sees_new_snapshot_mid_publish() {
        HOOK_LATCH.publish(Arc::new(1));
        HOOK_LATCH.set_writer_hook(Some(hook));
        HOOK_LATCH.publish(Arc::new(2));
        HOOK_LATCH.set_writer_hook(None);
        assert_eq!(HOOK_SEEN.load(Ordering::SeqCst), 2);
        HOOK_LATCH.publish(Arc::new(3));
        assert_eq!(HOOK_SEEN.load(Ordering::SeqCst), 2, "hook removed");
    }

    #[test]
    fn concurrent_publishers_and_readers_see_whole_snapshots() {
        // Each snapshot is [k; 16]; a torn or freed snapshot would show mixed values.
        let latch = Arc::new(Latch::<[u64; 16]>::new());
        latch.publish(Arc::new([0; 16]));
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let latch = Arc::clone(&latch);
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !done.load(Ordering::Relaxed) || n < 1000 {
                        latch.read(|v| {
                            let v = v.expect("published");
                            assert!(v.iter().all(|&x| x == v[0]));
                        });
                        n += 1;
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let latch = Arc::clone(&latch);
                std::thread::spawn(move || {
                    for k in 0..300 {
                        latch.publish(Arc::new([w * 1000 + k; 16]));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }
}
