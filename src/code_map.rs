//! PC → code object lookup, lock-free for readers.
//!
//! [`CodeMap`] answers "which [`CodeObject`] holds this PC?" for stack walkers, profilers and
//! fault handlers (V8 keeps a `std::map` under a mutex plus a hashed cache; Linux looks modules
//! up through a latch tree). Here the code objects are kept in an immutable array sorted by
//! start address behind a [`Latch`]: a lookup is a binary search over one snapshot, O(log n),
//! without locks, waiting or allocation, and stays correct in a fault handler that interrupted a
//! writer on the same CPU.
//!
//! Writers serialize on a [`spin::Mutex`] and rebuild the snapshot: O(n) time and one
//! allocation per insert or remove (the snapshot copies `Arc` pointers, never code objects).
//! That suits maps that change at compile/free time and are read on every stack walk.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::code_object::CodeObject;
use crate::latch::Latch;
use crate::range::AddressRange;

/// Why [`CodeMap::insert`] refused; the map is unchanged.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CodeMapError {
    /// The code's range overlaps a mapped one; remove that one first.
    Overlap {
        /// The mapped range that overlaps (the lowest one if several do).
        existing: AddressRange,
    },
}

impl fmt::Display for CodeMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeMapError::Overlap { existing } => {
                write!(f, "code range overlaps mapped code {existing:?}")
            }
        }
    }
}

impl core::error::Error for CodeMapError {}

/// An immutable map: code objects sorted by start, disjoint.
struct Snapshot {
    /// `codes[i].instruction_start()`, kept apart so the binary search touches one dense array.
    starts: Vec<usize>,
    codes: Vec<Arc<CodeObject>>,
}

impl Snapshot {
    /// Copy of `codes` with `codes[skip]` left out and `insert` placed before index `at`.
    fn rebuilt(
        codes: &[Arc<CodeObject>],
        skip: Option<usize>,
        insert: Option<(usize, Arc<CodeObject>)>,
    ) -> Self {
        let mut out = Vec::with_capacity(codes.len() + 1);
        let (at, mut insert) = match insert {
            Some((at, code)) => (at, Some(code)),
            None => (usize::MAX, None),
        };
        for (i, code) in codes.iter().enumerate() {
            if i == at {
                out.extend(insert.take());
            }
            if skip != Some(i) {
                out.push(Arc::clone(code));
            }
        }
        out.extend(insert);
        Snapshot {
            starts: out.iter().map(|c| c.instruction_start()).collect(),
            codes: out,
        }
    }

    /// The code object whose instructions hold `pc`. Allocation- and panic-free.
    fn find(&self, pc: usize) -> Option<&Arc<CodeObject>> {
        let idx = self.starts.partition_point(|&s| s <= pc);
        let code = self.codes.get(idx.checked_sub(1)?)?;
        code.contains(pc).then_some(code)
    }

    /// Index of the lowest code object overlapping `range`, or `Err(insertion index)`.
    fn overlap(&self, range: AddressRange) -> Result<usize, usize> {
        // Disjoint and sorted by start, so ends are sorted too.
        let first_ending_after = self
            .codes
            .partition_point(|c| c.instructions().end() <= range.start());
        let first_starting_after = self.starts.partition_point(|&s| s < range.end());
        if first_ending_after < first_starting_after {
            Ok(first_ending_after)
        } else {
            Err(first_starting_after)
        }
    }
}

/// Lock-free map from PCs to the [`CodeObject`]s whose instructions hold them.
///
/// Usable as a `static` ([`CodeMap::new`] is `const`). [`lookup`](Self::lookup),
/// [`lookup_with`](Self::lookup_with) and [`len`](Self::len) never lock or allocate; writers
/// ([`insert`](Self::insert), [`remove`](Self::remove)) serialize on a spin lock, allocate, and
/// must not run in interrupt context.
pub struct CodeMap {
    /// What readers see; `None` (nothing published yet) is the empty map.
    latch: Latch<Snapshot>,
    /// The current snapshot, for writers.
    writer: spin::Mutex<Option<Arc<Snapshot>>>,
}

impl Default for CodeMap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CodeMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeMap")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl CodeMap {
    /// An empty map.
    #[must_use]
    pub const fn new() -> Self {
        CodeMap {
            latch: Latch::new(),
            writer: spin::Mutex::new(None),
        }
    }

    /// Maps `code`'s instructions to it.
    ///
    /// # Errors
    ///
    /// [`CodeMapError::Overlap`] when the instructions overlap mapped code (adjacent is fine);
    /// the map is unchanged.
    pub fn insert(&self, code: Arc<CodeObject>) -> Result<(), CodeMapError> {
        let range = code.instructions();
        let mut current = self.writer.lock();
        let codes = current.as_deref().map_or(&[][..], |s| &s.codes[..]);
        let at = match current.as_deref().map(|s| s.overlap(range)) {
            Some(Ok(i)) => {
                return Err(CodeMapError::Overlap {
                    existing: codes[i].instructions(),
                })
            }
            Some(Err(at)) => at,
            None => 0,
        };
        let next = Arc::new(Snapshot::rebuilt(codes, None, Some((at, code))));
        self.latch.publish(Arc::clone(&next));
        *current = Some(next);
        Ok(())
    }

    /// Maps a batch of code objects with one snapshot rebuild (V8 publishes code in batches too):
    /// O(n + k log k) for k objects into a map of n, where k separate inserts cost O(n k).
    ///
    /// # Errors
    ///
    /// [`CodeMapError::Overlap`] when two objects of the batch overlap, or one overlaps mapped
    /// code; the map is unchanged.
    pub fn insert_batch(
        &self,
        batch: impl IntoIterator<Item = Arc<CodeObject>>,
    ) -> Result<(), CodeMapError> {
        let mut batch: Vec<Arc<CodeObject>> = batch.into_iter().collect();
        batch.sort_by_key(|c| c.instruction_start());
        for pair in batch.windows(2) {
            if pair[0].instructions().end() > pair[1].instruction_start() {
                return Err(CodeMapError::Overlap {
                    existing: pair[0].instructions(),
                });
            }
        }
        let mut current = self.writer.lock();
        let codes = current.as_deref().map_or(&[][..], |s| &s.codes[..]);
        if let Some(snapshot) = current.as_deref() {
            for code in &batch {
                if let Ok(i) = snapshot.overlap(code.instructions()) {
                    return Err(CodeMapError::Overlap {
                        existing: codes[i].instructions(),
                    });
                }
            }
        }
        // Merge two sorted, mutually disjoint sequences.
        let mut out = Vec::with_capacity(codes.len() + batch.len());
        let (mut i, mut j) = (0, 0);
        while i < codes.len() || j < batch.len() {
            let take_old = j == batch.len()
                || (i < codes.len() && codes[i].instruction_start() < batch[j].instruction_start());
            if take_old {
                out.push(Arc::clone(&codes[i]));
                i += 1;
            } else {
                out.push(Arc::clone(&batch[j]));
                j += 1;
            }
        }
        let next = Arc::new(Snapshot {
            starts: out.iter().map(|c| c.instruction_start()).collect(),
            codes: out,
        });
        self.latch.publish(Arc::clone(&next));
        *current = Some(next);
        Ok(())
    }

    /// Unmaps the code object whose instructions start exactly at `start` and returns it;
    /// `None` if there is none. Its PCs stop resolving once this returns (a reader that looked
    /// it up earlier may still hold a clone).
    pub fn remove(&self, start: usize) -> Option<Arc<CodeObject>> {
        let mut current = self.writer.lock();
        let snapshot = current.as_deref()?;
        let idx = snapshot.starts.binary_search(&start).ok()?;
        let removed = Arc::clone(&snapshot.codes[idx]);
        let next = Arc::new(Snapshot::rebuilt(&snapshot.codes, Some(idx), None));
        self.latch.publish(Arc::clone(&next));
        *current = Some(next);
        Some(removed)
    }

    /// The code object whose instructions hold `pc`.
    ///
    /// Lock-free, O(log n). Cloning the `Arc` is one atomic increment, no allocation; dropping
    /// the clone may free the object if it was removed meanwhile, so a fault handler should use
    /// [`lookup_with`](Self::lookup_with) instead.
    #[must_use]
    pub fn lookup(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.latch
            .read(|snapshot| snapshot.and_then(|s| s.find(pc)).map(Arc::clone))
    }

    /// Runs `f` on the code object whose instructions hold `pc` and returns its result; `None`
    /// when no code holds `pc` (`f` is not called).
    ///
    /// Lock-free, allocation-free, O(log n), no reference-count traffic: usable from a fault
    /// handler that interrupted a writer on the same CPU. `f` must not insert into or remove
    /// from this map.
    pub fn lookup_with<R>(&self, pc: usize, f: impl FnOnce(&CodeObject) -> R) -> Option<R> {
        self.latch
            .read(|snapshot| snapshot.and_then(|s| s.find(pc)).map(|c| f(c)))
    }

    /// Number of mapped code objects. Lock-free.
    #[must_use]
    pub fn len(&self) -> usize {
        self.latch
            .read(|snapshot| snapshot.map_or(0, |s| s.codes.len()))
    }

    /// Whether no code is mapped. Lock-free.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code_object::{CodeDesc, CodeKind};
    use proptest::prelude::*;
    use std::string::ToString;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::vec::Vec;

    fn r(start: usize, end: usize) -> AddressRange {
        AddressRange::new(start, end)
    }

    fn code(start: usize, end: usize, index: u32) -> Arc<CodeObject> {
        Arc::new(
            CodeObject::new(&CodeDesc {
                index: Some(index),
                ..CodeDesc::new(CodeKind::Function, r(start, end))
            })
            .unwrap(),
        )
    }

    fn index_at(map: &CodeMap, pc: usize) -> Option<u32> {
        map.lookup(pc).and_then(|c| c.index())
    }

    #[test]
    fn found_at_start_middle_and_last_byte() {
        let map = CodeMap::new();
        map.insert(code(0x1000, 0x1100, 1)).unwrap();
        map.insert(code(0x3000, 0x3040, 2)).unwrap();
        for pc in [0x1000, 0x1080, 0x10ff] {
            assert_eq!(index_at(&map, pc), Some(1), "pc {pc:#x}");
        }
        for pc in [0x3000, 0x3020, 0x303f] {
            assert_eq!(index_at(&map, pc), Some(2), "pc {pc:#x}");
        }
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn not_found_at_end_or_unrelated_address() {
        let map = CodeMap::new();
        assert_eq!(map.lookup(0x1000).map(|c| c.index()), None);
        map.insert(code(0x1000, 0x1100, 1)).unwrap();
        for pc in [0x1100, 0xfff, 0, 0x2000, usize::MAX] {
            assert!(map.lookup(pc).is_none(), "pc {pc:#x}");
            assert!(map.lookup_with(pc, |_| ()).is_none());
        }
    }

    #[test]
    fn not_found_after_removal() {
        let map = CodeMap::new();
        map.insert(code(0x1000, 0x1100, 1)).unwrap();
        map.insert(code(0x1100, 0x1200, 2)).unwrap();
        assert!(map.remove(0x1080).is_none(), "remove needs the exact start");
        let removed = map.remove(0x1000).unwrap();
        assert_eq!(removed.index(), Some(1));
        assert!(map.lookup(0x1000).is_none());
        assert!(map.lookup(0x10ff).is_none());
        assert_eq!(index_at(&map, 0x1100), Some(2));
        assert!(map.remove(0x1000).is_none());
        assert_eq!(map.len(), 1);
        assert!(map.remove(0x1100).is_some());
        assert!(map.is_empty());
    }

    #[test]
    fn replaced_code_found_at_own_address() {
        // Tier-up: the same function index gets new code at another address.
        let map = CodeMap::new();
        map.insert(code(0x1000, 0x1100, 7)).unwrap();
        let old = map.remove(0x1000).unwrap();
        let new = code(0x5000, 0x5080, 7);
        map.insert(Arc::clone(&new)).unwrap();
        assert!(map.lookup(0x1000).is_none());
        assert!(map.lookup(0x1040).is_none());
        let found = map.lookup(0x5040).unwrap();
        assert!(Arc::ptr_eq(&found, &new));
        assert!(!Arc::ptr_eq(&found, &old));
        assert_eq!(found.index(), Some(7));
    }

    #[test]
    fn overlapping_insert_fails_and_map_is_unchanged() {
        let map = CodeMap::default();
        map.insert(code(0x1000, 0x1100, 1)).unwrap();
        map.insert(code(0x1200, 0x1300, 2)).unwrap();
        for (s, e) in [
            (0x1000, 0x1100),
            (0xf00, 0x1001),
            (0x10ff, 0x1200),
            (0x1040, 0x1050),
            (0, usize::MAX),
        ] {
            assert_eq!(
                map.insert(code(s, e, 9)),
                Err(CodeMapError::Overlap {
                    existing: r(0x1000, 0x1100)
                })
            );
        }
        assert_eq!(
            map.insert(code(0x1250, 0x1400, 9)),
            Err(CodeMapError::Overlap {
                existing: r(0x1200, 0x1300)
            })
        );
        assert_eq!(map.len(), 2);
        // Adjacent on both sides is fine.
        map.insert(code(0x1100, 0x1200, 3)).unwrap();
        map.insert(code(0xf00, 0x1000, 4)).unwrap();
        assert_eq!(index_at(&map, 0x11ff), Some(3));
        assert_eq!(index_at(&map, 0xfff), Some(4));
        assert!(CodeMapError::Overlap {
            existing: r(0x1000, 0x1100)
        }
        .to_string()
        .contains("0x1000"));
    }

    #[test]
    fn lookup_with_has_no_refcount_traffic() {
        let map = CodeMap::new();
        let c = code(0x1000, 0x1100, 1);
        map.insert(Arc::clone(&c)).unwrap();
        // Ours plus the snapshot's (the latch shares the snapshot, not the code).
        let before = Arc::strong_count(&c);
        assert_eq!(before, 2);
        let seen = map.lookup_with(0x1010, |code| {
            (code.index(), code.ref_count(), Arc::strong_count(&c))
        });
        assert_eq!(seen, Some((Some(1), 1, before)));
        let cloned = map.lookup(0x1010).unwrap();
        assert_eq!(Arc::strong_count(&c), before + 1);
        drop(cloned);
        drop(map);
        assert_eq!(
            Arc::strong_count(&c),
            1,
            "dropping the map releases its code"
        );
    }

    static STATIC_MAP: CodeMap = CodeMap::new();

    #[test]
    fn usable_as_static() {
        STATIC_MAP.insert(code(0x7000, 0x7010, 1)).unwrap();
        assert_eq!(index_at(&STATIC_MAP, 0x7008), Some(1));
        assert!(STATIC_MAP.remove(0x7000).is_some());
    }

    #[test]
    fn stress_readers_against_writer() {
        let map = Arc::new(CodeMap::new());
        map.insert(code(0x10_0000, 0x10_1000, 0)).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|k| {
                let map = Arc::clone(&map);
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let mut n = 0usize;
                    while !done.load(Ordering::Relaxed) || n < 1000 {
                        let pc = 0x10_0000 + (n * 61 + k) % 0x1000;
                        assert_eq!(map.lookup_with(pc, |c| c.index()), Some(Some(0)));
                        assert_eq!(index_at(&map, pc), Some(0));
                        n += 1;
                    }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        for i in 0..2000usize {
            if std::time::Instant::now() > deadline {
                break;
            }
            let base = if i % 2 == 0 { 0x1000 } else { 0x20_0000 } + (i % 32) * 0x100;
            if map.insert(code(base, base + 0x100, 1)).is_err() {
                assert!(map.remove(base).is_some());
            }
        }
        done.store(true, Ordering::Relaxed);
        for h in readers {
            h.join().unwrap();
        }
    }

    // Model test: random insert/remove/lookup against a brute-force scan of a Vec.

    #[derive(Clone, Debug)]
    enum Op {
        Insert {
            start: usize,
            size: usize,
        },
        /// Remove at the start of the n-th model entry (if any), else at `addr`.
        Remove {
            nth: usize,
            addr: usize,
        },
        Lookup(usize),
    }

    const SPACE: usize = 512;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..SPACE, 1..48usize).prop_map(|(start, size)| Op::Insert { start, size }),
            2 => (0..8usize, 0..SPACE).prop_map(|(nth, addr)| Op::Remove { nth, addr }),
            3 => (0..SPACE + 64).prop_map(Op::Lookup),
        ]
    }

    fn model_find(model: &[Arc<CodeObject>], pc: usize) -> Option<&Arc<CodeObject>> {
        model.iter().find(|c| c.contains(pc))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn model_insert_remove_lookup(ops in prop::collection::vec(op(), 1..80)) {
            let map = CodeMap::new();
            let mut model: Vec<Arc<CodeObject>> = Vec::new();
            let mut next_index = 0;
            for op in ops {
                match op {
                    Op::Insert { start, size } => {
                        let c = code(start, start + size, next_index);
                        next_index += 1;
                        let range = c.instructions();
                        let expected = model
                            .iter()
                            .map(|m| m.instructions())
                            .filter(|m| !m.overlap(&range).is_empty())
                            .min()
                            .map_or(Ok(()), |existing| Err(CodeMapError::Overlap { existing }));
                        prop_assert_eq!(map.insert(Arc::clone(&c)), expected);
                        if expected.is_ok() {
                            model.push(c);
                        }
                    }
                    Op::Remove { nth, addr } => {
                        let start = model.get(nth).map_or(addr, |c| c.instruction_start());
                        let pos = model.iter().position(|c| c.instruction_start() == start);
                        let got = map.remove(start);
                        match pos {
                            Some(p) => {
                                let expected = model.remove(p);
                                prop_assert!(got.is_some_and(|g| Arc::ptr_eq(&g, &expected)));
                            }
                            None => prop_assert!(got.is_none()),
                        }
                    }
                    Op::Lookup(pc) => {
                        let got = map.lookup(pc);
                        let expected = model_find(&model, pc);
                        prop_assert_eq!(got.is_some(), expected.is_some(), "pc {}", pc);
                        if let (Some(g), Some(e)) = (got, expected) {
                            prop_assert!(Arc::ptr_eq(&g, e));
                        }
                    }
                }
                prop_assert_eq!(map.len(), model.len());
            }
            for pc in 0..SPACE + 64 {
                let expected = model_find(&model, pc).and_then(|c| c.index());
                prop_assert_eq!(map.lookup_with(pc, |c| c.index()).flatten(), expected, "pc {}", pc);
            }
        }
    }
}
