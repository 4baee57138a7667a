//! Trap table: which faulting instructions of generated code resume at a landing pad.
//!
//! Generated code (JIT or wasm compiled into ring 0) skips explicit bounds checks: a load past
//! the end of a linear memory hits a guard page, and the page-fault handler asks
//! [`TrapTable::lookup`] whether the faulting PC is one of the *protected* instructions of some
//! registered code range. On a hit the handler resumes at the range's landing pad (V8's trap
//! handler, Linux exception tables).
//!
//! [`TrapTable::lookup`] runs inside the page-fault handler, so it is lock-free,
//! allocation-free, panic-free and O(log n + log k): a binary search over the code ranges sorted
//! by start, then a binary search over that range's sorted protected offsets. It stays correct
//! when the fault interrupts [`TrapTable::register`] or [`TrapTable::release`] on the same CPU;
//! see "Concurrency" below.
//!
//! # Concurrency
//!
//! The table is a [`Latch`] (the idea behind Linux's latch tree) over immutable snapshots; the
//! latch module documents the protocol and why it is correct. A snapshot is a heap-allocated
//! sorted array of entries, shared through an [`Arc`]; each entry shares its sorted offsets
//! through an `Arc<[u32]>`, so a rebuild copies O(n) small entries and never the offsets
//! themselves. Writers serialize on a [`spin::Mutex`] that also holds the authoritative current
//! snapshot; readers never touch it.
//!
//! Same CPU: a page fault may interrupt the writer anywhere; the lookup in the handler sees
//! either the old or the new table, never a torn one, and finishes without waiting for the
//! writer. The reverse direction is not supported: a writer must not run in interrupt context.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::latch::Latch;
use crate::range::AddressRange;

/// Identifies one registration in a [`TrapTable`]; pass it to [`TrapTable::release`].
///
/// Handles are never reused, even after release: a stale handle is always rejected.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TrapHandle(u64);

/// A successful [`TrapTable::lookup`]: the faulting PC is a protected instruction.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TrapHit {
    code: AddressRange,
    landing_pad: usize,
    offset: u32,
}

impl TrapHit {
    /// Address at which the faulting code resumes.
    #[must_use]
    pub const fn landing_pad(&self) -> usize {
        self.landing_pad
    }

    /// Start of the registered code range that holds the PC.
    #[must_use]
    pub const fn code_start(&self) -> usize {
        self.code.start()
    }

    /// The registered code range that holds the PC.
    #[must_use]
    pub const fn code(&self) -> AddressRange {
        self.code
    }

    /// Offset of the PC from [`code_start`](Self::code_start): one of the protected offsets.
    #[must_use]
    pub const fn offset(&self) -> u32 {
        self.offset
    }

    /// The faulting PC itself (`code_start() + offset()`).
    #[must_use]
    pub const fn pc(&self) -> usize {
        self.code.start() + self.offset as usize
    }
}

/// Why [`TrapTable::register`] or [`TrapTable::release`] refused; the table is unchanged.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TrapError {
    /// The code range holds no byte.
    EmptyCode,
    /// A protected offset is not below the code size (the first such offset, in input order).
    OffsetOutOfRange {
        /// The offending offset.
        offset: u32,
    },
    /// A protected offset was given twice (the smallest such offset).
    DuplicateOffset {
        /// The repeated offset.
        offset: u32,
    },
    /// The code range overlaps a registered one; release that one first.
    Overlap {
        /// The registered range that overlaps (the lowest one if several do).
        existing: AddressRange,
    },
    /// The handle does not name a live registration (never issued, or already released).
    UnknownHandle,
}

impl fmt::Display for TrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrapError::EmptyCode => f.write_str("empty code range"),
            TrapError::OffsetOutOfRange { offset } => {
                write!(
                    f,
                    "protected offset {offset:#x} lies outside the code range"
                )
            }
            TrapError::DuplicateOffset { offset } => {
                write!(f, "protected offset {offset:#x} given twice")
            }
            TrapError::Overlap { existing } => {
                write!(f, "code range overlaps registered range {existing:?}")
            }
            TrapError::UnknownHandle => f.write_str("unknown or already released trap handle"),
        }
    }
}

impl core::error::Error for TrapError {}

/// One registered code range.
#[derive(Clone)]
struct Entry {
    code: AddressRange,
    landing_pad: usize,
    handle: TrapHandle,
    /// Sorted, distinct, each below `code.size()`; shared between snapshots.
    offsets: Arc<[u32]>,
}

/// An immutable table: entries sorted by start, disjoint.
struct Snapshot {
    /// `entries[i].code.start()`, kept apart so the binary search touches one dense array.
    starts: Vec<usize>,
    entries: Vec<Entry>,
}

impl Snapshot {
    fn with_capacity(n: usize) -> Self {
        Snapshot {
            starts: Vec::with_capacity(n),
            entries: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, entry: Entry) {
        self.starts.push(entry.code.start());
        self.entries.push(entry);
    }

    fn extend(&mut self, entry: Option<Entry>) {
        if let Some(entry) = entry {
            self.push(entry);
        }
    }

    /// Copy of `self` without `entries[skip]` and with `insert` placed before index `at`
    /// (indices into `self`). Clones `Arc`s, never offsets.
    fn rebuilt(&self, skip: Option<usize>, insert: Option<(usize, Entry)>) -> Self {
        let mut out = Snapshot::with_capacity(self.entries.len() + 1);
        let (at, mut insert) = match insert {
            Some((at, entry)) => (at, Some(entry)),
            None => (usize::MAX, None),
        };
        for (i, entry) in self.entries.iter().enumerate() {
            if i == at {
                out.extend(insert.take());
            }
            if skip != Some(i) {
                out.push(entry.clone());
            }
        }
        out.extend(insert);
        out
    }

    /// The entry whose code range holds `pc`. Allocation- and panic-free.
    fn find(&self, pc: usize) -> Option<&Entry> {
        let idx = self.starts.partition_point(|&s| s <= pc);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        if entry.code.contains(pc) {
            Some(entry)
        } else {
            None
        }
    }

    /// Allocation- and panic-free.
    fn lookup(&self, pc: usize) -> Option<TrapHit> {
        let entry = self.find(pc)?;
        let offset = u32::try_from(pc - entry.code.start()).ok()?;
        entry.offsets.binary_search(&offset).ok()?;
        Some(TrapHit {
            code: entry.code,
            landing_pad: entry.landing_pad,
            offset,
        })
    }

    /// Index of the lowest entry overlapping `code`, or `Err(insertion index)`.
    fn overlap(&self, code: AddressRange) -> Result<usize, usize> {
        // Disjoint and sorted by start, so ends are sorted too.
        let first_ending_after = self
            .entries
            .partition_point(|e| e.code.end() <= code.start());
        let first_starting_after = self.starts.partition_point(|&s| s < code.end());
        if first_ending_after < first_starting_after {
            Ok(first_ending_after)
        } else {
            Err(first_starting_after)
        }
    }
}

/// The latch shares snapshots between threads (and with fault handlers); it is `Sync` only when
/// they are `Send + Sync`, which this assertion keeps honest.
const fn assert_send_sync<T: Send + Sync>() {}
const _: () = assert_send_sync::<Latch<Snapshot>>();

/// Writer-only state, behind the writer mutex.
struct WriterState {
    /// The newest snapshot (also referenced by both slots once an update completes).
    current: Option<Arc<Snapshot>>,
    /// Next handle to hand out; never reused.
    next_handle: u64,
}

/// Lock-free table from protected instruction addresses of generated code to landing pads.
///
/// Usable as a `static` ([`TrapTable::new`] is `const`). [`lookup`](Self::lookup) never locks,
/// waits or allocates and may run in a page-fault handler that interrupted a
/// [`register`](Self::register) or [`release`](Self::release) on the same CPU. Writers allocate,
/// serialize on a spin lock and must not run in interrupt context. See the module docs for the
/// protocol.
pub struct TrapTable {
    /// What readers see; `None` (nothing published yet) is the empty table.
    latch: Latch<Snapshot>,
    /// Lookups performed (statistics only).
    lookups: AtomicU64,
    writer: spin::Mutex<WriterState>,
}

impl Default for TrapTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TrapTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrapTable")
            .field("len", &self.len())
            .field("lookups", &self.lookups())
            .finish_non_exhaustive()
    }
}

impl TrapTable {
    /// An empty table.
    #[must_use]
    pub const fn new() -> Self {
        TrapTable {
            latch: Latch::new(),
            lookups: AtomicU64::new(0),
            writer: spin::Mutex::new(WriterState {
                current: None,
                next_handle: 1,
            }),
        }
    }

    /// Registers `code` with its protected instructions at `code.start() + offset` for each of
    /// `protected_offsets` (any order); a fault at one of them resumes at `landing_pad`.
    ///
    /// # Errors
    ///
    /// In this order of precedence, leaving the table unchanged: [`TrapError::EmptyCode`],
    /// [`TrapError::OffsetOutOfRange`] (offset not below `code.size()`),
    /// [`TrapError::DuplicateOffset`], [`TrapError::Overlap`] (a range reused for new code must
    /// be released first).
    pub fn register(
        &self,
        code: AddressRange,
        protected_offsets: &[u32],
        landing_pad: usize,
    ) -> Result<TrapHandle, TrapError> {
        if code.is_empty() {
            return Err(TrapError::EmptyCode);
        }
        if let Some(&offset) = protected_offsets
            .iter()
            .find(|&&o| usize::try_from(o).map_or(true, |o| o >= code.size()))
        {
            return Err(TrapError::OffsetOutOfRange { offset });
        }
        // Sort and allocate before taking the writer lock.
        let mut sorted = protected_offsets.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(TrapError::DuplicateOffset { offset: w[0] });
        }
        let offsets: Arc<[u32]> = sorted.into();

        let mut state = self.writer.lock();
        let handle = TrapHandle(state.next_handle);
        let entry = Entry {
            code,
            landing_pad,
            handle,
            offsets,
        };
        let next = match state.current.as_deref() {
            None => {
                let mut s = Snapshot::with_capacity(1);
                s.push(entry);
                s
            }
            Some(current) => match current.overlap(code) {
                Ok(i) => {
                    return Err(TrapError::Overlap {
                        existing: current.entries[i].code,
                    })
                }
                Err(at) => current.rebuilt(None, Some((at, entry))),
            },
        };
        state.next_handle += 1;
        self.publish(&mut state, next);
        Ok(handle)
    }

    /// Removes a registration; its PCs stop resolving once this returns.
    ///
    /// # Errors
    ///
    /// [`TrapError::UnknownHandle`] if `handle` was never issued by this table or was already
    /// released; the table is unchanged.
    pub fn release(&self, handle: TrapHandle) -> Result<(), TrapError> {
        let mut state = self.writer.lock();
        let current = state.current.as_deref().ok_or(TrapError::UnknownHandle)?;
        let idx = current
            .entries
            .iter()
            .position(|e| e.handle == handle)
            .ok_or(TrapError::UnknownHandle)?;
        let next = current.rebuilt(Some(idx), None);
        self.publish(&mut state, next);
        Ok(())
    }

    /// The protected instruction at `pc`, if any: a hit only when `pc` is exactly
    /// `code.start() + offset` for a registered code range and one of its protected offsets.
    ///
    /// Lock-free, allocation-free, O(log n + log k); safe to call from a page-fault handler that
    /// interrupted a writer on the same CPU.
    #[must_use]
    pub fn lookup(&self, pc: usize) -> Option<TrapHit> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.latch
            .read(|snapshot| snapshot.and_then(|s| s.lookup(pc)))
    }

    /// Whether `pc` is a protected instruction (same as `lookup(pc).is_some()`).
    #[must_use]
    pub fn is_protected(&self, pc: usize) -> bool {
        self.lookup(pc).is_some()
    }

    /// Number of registered code ranges. Lock-free.
    #[must_use]
    pub fn len(&self) -> usize {
        self.latch
            .read(|snapshot| snapshot.map_or(0, |s| s.entries.len()))
    }

    /// Whether no code range is registered. Lock-free.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of lookups performed so far (relaxed counter, for statistics).
    #[must_use]
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Test hook: `hook` runs inside every later [`register`](Self::register) and
    /// [`release`](Self::release) that changes the table, in the middle of the update.
    ///
    /// When it runs, readers already see the new table through one slot while the other slot
    /// still holds the previous table and is about to be replaced, with the writer lock held. A
    /// kernel test raises a page fault from the hook to check that a lookup resolves while an
    /// update is half done. The hook must not call `register`, `release` or `set_writer_hook` on
    /// the same table (the writer lock is held). `None` removes it.
    #[doc(hidden)]
    pub fn set_writer_hook(&self, hook: Option<fn()>) {
        // Same lock order as an update: table writer lock, then the latch's.
        let _state = self.writer.lock();
        self.latch.set_writer_hook(hook);
    }

    /// Makes `next` the table. Caller holds the writer lock.
    fn publish(&self, state: &mut WriterState, next: Snapshot) {
        let next = Arc::new(next);
        self.latch.publish(Arc::clone(&next));
        state.current = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::vec;
    use std::vec::Vec;

    fn r(start: usize, end: usize) -> AddressRange {
        AddressRange::new(start, end)
    }

    #[test]
    fn hits_every_protected_offset_and_nothing_else() {
        let t = TrapTable::new();
        assert!(t.is_empty());
        let code = r(0x1000, 0x1100);
        let offs = [0u32, 4, 0x20, 0xff];
        let h = t.register(code, &offs, 0xdead).unwrap();
        assert_eq!(t.len(), 1);
        for &o in &offs {
            let hit = t.lookup(0x1000 + o as usize).expect("protected pc");
            assert_eq!(hit.landing_pad(), 0xdead);
            assert_eq!(hit.code_start(), 0x1000);
            assert_eq!(hit.code(), code);
            assert_eq!(hit.offset(), o);
            assert_eq!(hit.pc(), 0x1000 + o as usize);
        }
        for pc in [
            0x1001,
            0x1003,
            0x1021,
            0xfe0,
            0xfff,
            0x1100,
            0x1104,
            0,
            usize::MAX,
        ] {
            assert_eq!(t.lookup(pc), None, "pc {pc:#x}");
            assert!(!t.is_protected(pc));
        }
        assert!(t.is_protected(0x1004));
        assert!(t.lookups() >= 14);
        t.release(h).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn unsorted_offsets_and_several_ranges() {
        let t = TrapTable::default();
        let b = t
            .register(r(0x3000, 0x3040), &[0x30, 0x2, 0x10], 2)
            .unwrap();
        let a = t.register(r(0x1000, 0x1040), &[0x3f, 0x0, 0x8], 1).unwrap();
        let c = t.register(r(0x2000, 0x2040), &[0x1], 3).unwrap();
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(0x1000).unwrap().landing_pad(), 1);
        assert_eq!(t.lookup(0x103f).unwrap().landing_pad(), 1);
        assert_eq!(t.lookup(0x1008).unwrap().offset(), 8);
        assert_eq!(t.lookup(0x2001).unwrap().landing_pad(), 3);
        assert_eq!(t.lookup(0x3002).unwrap().landing_pad(), 2);
        assert_eq!(t.lookup(0x3030).unwrap().landing_pad(), 2);
        assert_eq!(t.lookup(0x3031), None);
        assert_eq!(t.lookup(0x2000), None);
    }

    #[test]
    fn invalid_registrations_leave_table_unchanged() {
        let t = TrapTable::new();
        let code = r(0x1000, 0x1010);
        let h = t.register(code, &[0, 4], 7).unwrap();
        let check = |t: &TrapTable| {
            assert_eq!(t.len(), 1);
            assert_eq!(t.lookup(0x1004).unwrap().landing_pad(), 7);
            assert_eq!(t.lookup(0x2000), None);
        };
        assert_eq!(
            t.register(r(0x2000, 0x2000), &[], 1),
            Err(TrapError::EmptyCode)
        );
        assert_eq!(
            t.register(r(0x2000, 0x1000), &[0], 1),
            Err(TrapError::EmptyCode)
        );
        check(&t);
        assert_eq!(
            t.register(r(0x2000, 0x2010), &[1, 0x10, 0x20], 1),
            Err(TrapError::OffsetOutOfRange { offset: 0x10 })
        );
        check(&t);
        assert_eq!(
            t.register(r(0x2000, 0x2010), &[3, 1, 5, 3, 1], 1),
            Err(TrapError::DuplicateOffset { offset: 1 })
        );
        check(&t);
        for bad in [
            r(0x1000, 0x1010),
            r(0xfff, 0x1001),
            r(0x100f, 0x2000),
            r(0x1004, 0x1005),
            r(0, usize::MAX),
        ] {
            assert_eq!(
                t.register(bad, &[0], 1),
                Err(TrapError::Overlap { existing: code }),
                "{bad:?}"
            );
            check(&t);
        }
        // Adjacent is fine; the overlap reports the lowest overlapping range.
        let h2 = t.register(r(0x1010, 0x1020), &[0], 8).unwrap();
        let h3 = t.register(r(0xff0, 0x1000), &[], 9).unwrap();
        assert_eq!(
            t.register(r(0x1008, 0x1018), &[0], 1),
            Err(TrapError::Overlap { existing: code })
        );
        assert_eq!(t.len(), 3);
        t.release(h).unwrap();
        assert_eq!(
            t.register(r(0xf00, 0x1018), &[0], 1),
            Err(TrapError::Overlap {
                existing: r(0xff0, 0x1000)
            })
        );
        // Once released, the range can be reused.
        let h4 = t.register(code, &[0xc], 10).unwrap();
        assert_eq!(t.lookup(0x100c).unwrap().landing_pad(), 10);
        assert_eq!(t.lookup(0x1004), None);
        for h in [h2, h3, h4] {
            t.release(h).unwrap();
        }
        assert!(t.is_empty());
    }

    #[test]
    fn release_then_lookup_misses_and_stale_handles_error() {
        let t = TrapTable::new();
        assert_eq!(t.release(TrapHandle(1)), Err(TrapError::UnknownHandle));
        let a = t.register(r(0x1000, 0x1010), &[2], 1).unwrap();
        let b = t.register(r(0x2000, 0x2010), &[2], 2).unwrap();
        t.release(a).unwrap();
        assert_eq!(t.lookup(0x1002), None);
        assert_eq!(t.lookup(0x2002).unwrap().landing_pad(), 2);
        assert_eq!(t.release(a), Err(TrapError::UnknownHandle));
        assert_eq!(t.release(TrapHandle(999)), Err(TrapError::UnknownHandle));
        // Re-registering the same range gets a fresh handle; the stale one stays dead.
        let a2 = t.register(r(0x1000, 0x1010), &[2], 3).unwrap();
        assert_ne!(a, a2);
        assert_eq!(t.release(a), Err(TrapError::UnknownHandle));
        assert_eq!(t.lookup(0x1002).unwrap().landing_pad(), 3);
        t.release(b).unwrap();
        t.release(a2).unwrap();
        assert!(t.is_empty());
        assert_eq!(t.lookup(0x1002), None);
    }

    #[test]
    fn error_display() {
        use std::string::ToString;
        assert_eq!(TrapError::EmptyCode.to_string(), "empty code range");
        assert!(TrapError::DuplicateOffset { offset: 16 }
            .to_string()
            .contains("0x10"));
        assert!(TrapError::Overlap {
            existing: r(0x1000, 0x2000)
        }
        .to_string()
        .contains("0x1000"));
    }

    #[test]
    fn drop_frees_snapshots_and_offsets() {
        let t = TrapTable::new();
        t.register(r(0x1000, 0x1010), &[1], 1).unwrap();
        let offsets = {
            let state = t.writer.lock();
            Arc::clone(&state.current.as_ref().unwrap().entries[0].offsets)
        };
        // Ours, the entry's in the one live snapshot.
        assert_eq!(Arc::strong_count(&offsets), 2);
        t.register(r(0x2000, 0x2010), &[1], 1).unwrap();
        assert_eq!(
            Arc::strong_count(&offsets),
            2,
            "old snapshot freed after the update"
        );
        drop(t);
        assert_eq!(Arc::strong_count(&offsets), 1);
    }

    // Writer hook: simulates a page fault on the writer's CPU in the middle of an update.

    static HOOK_REGISTER_TABLE: TrapTable = TrapTable::new();
    static HOOK_REGISTER_CALLS: AtomicUsize = AtomicUsize::new(0);
    static HOOK_REGISTER_OK: AtomicUsize = AtomicUsize::new(0);

    fn hook_register() {
        let t = &HOOK_REGISTER_TABLE;
        HOOK_REGISTER_CALLS.fetch_add(1, Ordering::SeqCst);
        // Previously registered range, and the one being registered (already visible).
        let old = t.lookup(0x1004).map(|h| h.landing_pad()) == Some(0xa);
        let new = t.lookup(0x2008).map(|h| h.landing_pad()) == Some(0xb);
        let miss = t.lookup(0x1005).is_none() && t.lookup(0x3000).is_none();
        if old && new && miss && t.len() == 2 {
            HOOK_REGISTER_OK.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn lookup_from_writer_hook_during_register() {
        let t = &HOOK_REGISTER_TABLE;
        t.register(r(0x1000, 0x1010), &[4], 0xa).unwrap();
        t.set_writer_hook(Some(hook_register));
        t.register(r(0x2000, 0x2010), &[8], 0xb).unwrap();
        t.set_writer_hook(None);
        assert_eq!(HOOK_REGISTER_CALLS.load(Ordering::SeqCst), 1);
        assert_eq!(HOOK_REGISTER_OK.load(Ordering::SeqCst), 1);
        // Failed registrations do not run the hook.
        t.set_writer_hook(Some(hook_register));
        assert!(t.register(r(0x2000, 0x2010), &[8], 0xb).is_err());
        t.set_writer_hook(None);
        assert_eq!(HOOK_REGISTER_CALLS.load(Ordering::SeqCst), 1);
    }

    static HOOK_RELEASE_TABLE: TrapTable = TrapTable::new();
    static HOOK_RELEASE_CALLS: AtomicUsize = AtomicUsize::new(0);
    static HOOK_RELEASE_OK: AtomicUsize = AtomicUsize::new(0);

    fn hook_release() {
        let t = &HOOK_RELEASE_TABLE;
        HOOK_RELEASE_CALLS.fetch_add(1, Ordering::SeqCst);
        let kept = t.lookup(0x1004).map(|h| h.landing_pad()) == Some(0xa)
            && t.lookup(0x3000).map(|h| h.landing_pad()) == Some(0xc);
        let gone = t.lookup(0x2008).is_none();
        if kept && gone && t.len() == 2 {
            HOOK_RELEASE_OK.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn lookup_from_writer_hook_during_release() {
        let t = &HOOK_RELEASE_TABLE;
        t.register(r(0x1000, 0x1010), &[4], 0xa).unwrap();
        let b = t.register(r(0x2000, 0x2010), &[8], 0xb).unwrap();
        t.register(r(0x3000, 0x3010), &[0], 0xc).unwrap();
        t.set_writer_hook(Some(hook_release));
        t.release(b).unwrap();
        assert_eq!(t.release(b), Err(TrapError::UnknownHandle));
        t.set_writer_hook(None);
        assert_eq!(HOOK_RELEASE_CALLS.load(Ordering::SeqCst), 1);
        assert_eq!(HOOK_RELEASE_OK.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stress_readers_against_writer() {
        use std::sync::Arc;
        let t = Arc::new(TrapTable::new());
        let perm_offsets: Vec<u32> = (0..64).map(|i| i * 7).collect();
        let perm = r(0x10_0000, 0x10_1000);
        t.register(perm, &perm_offsets, 0xbeef).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|k| {
                let t = Arc::clone(&t);
                let done = Arc::clone(&done);
                let offs = perm_offsets.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let mut i = k;
                    while !done.load(Ordering::Relaxed) || n < 1000 {
                        let o = offs[i % offs.len()];
                        let hit = t
                            .lookup(perm.start() + o as usize)
                            .expect("permanent pc must hit");
                        assert_eq!((hit.landing_pad(), hit.offset()), (0xbeef, o));
                        assert_eq!(t.lookup(perm.start() + o as usize + 1), None);
                        i += 1;
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // Writer: churn ranges on both sides of the permanent one.
        // Bounded by iterations and by time: on a loaded 2-core machine a reader preempted while
        // holding its slot count stalls the writer for a scheduler tick.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(700);
        let mut live: Vec<TrapHandle> = Vec::new();
        for i in 0..3000usize {
            if std::time::Instant::now() > deadline {
                break;
            }
            let base = if i % 2 == 0 { 0x1000 } else { 0x20_0000 } + (i % 64) * 0x100;
            match t.register(r(base, base + 0x100), &[0, 8, 16], i) {
                Ok(h) => live.push(h),
                Err(TrapError::Overlap { .. }) => {
                    let h = live.remove(0);
                    t.release(h).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
            if live.len() > 40 {
                t.release(live.swap_remove(i % live.len())).unwrap();
            }
        }
        done.store(true, Ordering::Relaxed);
        let total: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(total >= 2000);
        for h in live {
            t.release(h).unwrap();
        }
        assert_eq!(t.len(), 1);
        assert!(t.is_protected(perm.start() + 7));
    }

    // Model test: random register/release/lookup sequences against a brute-force linear scan.

    #[derive(Clone, Debug)]
    enum Op {
        Register {
            start: usize,
            size: usize,
            offsets: Vec<u32>,
            landing_pad: usize,
        },
        /// Release the n-th handle ever issued (possibly stale), or a never-issued one.
        Release(usize),
        Lookup(usize),
    }

    const SPACE: usize = 512;

    /// Mostly valid (distinct, in range, shuffled) offsets; sometimes raw ones.
    fn offsets(size: usize) -> impl Strategy<Value = Vec<u32>> {
        let max = size as u32 + 2;
        prop_oneof![
            4 => prop::collection::btree_set(0..max, 0..(max as usize).min(8))
                .prop_map(|s| s.into_iter().collect::<Vec<_>>())
                .prop_shuffle(),
            1 => prop::collection::vec(0..max, 0..8),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let register =
            (0..SPACE, 0..48usize, any::<usize>()).prop_flat_map(|(start, size, landing_pad)| {
                offsets(size).prop_map(move |offsets| Op::Register {
                    start,
                    size,
                    offsets,
                    landing_pad,
                })
            });
        prop_oneof![
            3 => register,
            2 => (0..40usize).prop_map(Op::Release),
            3 => (0..SPACE + 64).prop_map(Op::Lookup),
        ]
    }

    struct ModelEntry {
        handle: TrapHandle,
        code: AddressRange,
        offsets: Vec<u32>,
        landing_pad: usize,
    }

    fn model_register(
        model: &[ModelEntry],
        code: AddressRange,
        offsets: &[u32],
    ) -> Result<(), TrapError> {
        if code.is_empty() {
            return Err(TrapError::EmptyCode);
        }
        for &o in offsets {
            if o as usize >= code.size() {
                return Err(TrapError::OffsetOutOfRange { offset: o });
            }
        }
        let dup = offsets
            .iter()
            .filter(|&&o| offsets.iter().filter(|&&p| p == o).count() > 1)
            .min();
        if let Some(&offset) = dup {
            return Err(TrapError::DuplicateOffset { offset });
        }
        let existing = model
            .iter()
            .filter(|e| !e.code.overlap(&code).is_empty())
            .map(|e| e.code)
            .min();
        match existing {
            Some(existing) => Err(TrapError::Overlap { existing }),
            None => Ok(()),
        }
    }

    fn model_lookup(model: &[ModelEntry], pc: usize) -> Option<TrapHit> {
        for e in model {
            for &o in &e.offsets {
                if e.code.start() + o as usize == pc {
                    return Some(TrapHit {
                        code: e.code,
                        landing_pad: e.landing_pad,
                        offset: o,
                    });
                }
            }
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn model_register_release_lookup(ops in prop::collection::vec(op(), 1..80)) {
            let t = TrapTable::new();
            let mut model: Vec<ModelEntry> = Vec::new();
            let mut issued: Vec<TrapHandle> = Vec::new();
            for op in ops {
                match op {
                    Op::Register { start, size, offsets, landing_pad } => {
                        let code = r(start, start + size);
                        let expected = model_register(&model, code, &offsets);
                        let got = t.register(code, &offsets, landing_pad);
                        match (expected, got) {
                            (Ok(()), Ok(handle)) => {
                                prop_assert!(!issued.contains(&handle), "handle reused");
                                issued.push(handle);
                                model.push(ModelEntry { handle, code, offsets, landing_pad });
                            }
                            (e, g) => prop_assert_eq!(e, g.map(|_| ())),
                        }
                    }
                    Op::Release(n) => {
                        let handle = issued.get(n).copied().unwrap_or(TrapHandle(u64::MAX));
                        let pos = model.iter().position(|e| e.handle == handle);
                        let expected = if pos.is_some() { Ok(()) } else { Err(TrapError::UnknownHandle) };
                        prop_assert_eq!(t.release(handle), expected);
                        if let Some(p) = pos {
                            model.remove(p);
                        }
                    }
                    Op::Lookup(pc) => {
                        prop_assert_eq!(t.lookup(pc), model_lookup(&model, pc), "pc {}", pc);
                    }
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for pc in 0..SPACE + 64 {
                prop_assert_eq!(t.lookup(pc), model_lookup(&model, pc), "pc {}", pc);
                prop_assert_eq!(t.is_protected(pc), model_lookup(&model, pc).is_some());
            }
        }
    }

    #[test]
    fn handles_are_distinct_across_release() {
        let t = TrapTable::new();
        let mut seen = vec![];
        for _ in 0..10 {
            let h = t.register(r(0x1000, 0x1001), &[0], 0).unwrap();
            assert!(!seen.contains(&h));
            seen.push(h);
            t.release(h).unwrap();
        }
    }
}
