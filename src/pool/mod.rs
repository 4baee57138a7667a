//! A coalescing pool of disjoint free address ranges with first-fit allocation.
//!
//! This is V8's `DisjointAllocationPool` (the free list behind wasm code space): free ranges are
//! kept sorted and coalesced, `allocate` takes bytes from the start of the lowest free range that
//! is large enough, and `allocate_in_region` does the same restricted to a region.
//!
//! V8 walks a `std::set` linearly for first fit. Here every operation is O(log n) in the number of
//! free ranges: the ranges live in a treap keyed by start address, and every node also records the
//! largest free-range size in its subtree, so a first-fit descent can skip whole subtrees that
//! cannot satisfy the request.
//!
//! ```
//! use codespace::pool::DisjointAllocationPool;
//! use codespace::AddressRange;
//!
//! let mut pool = DisjointAllocationPool::from_range(AddressRange::new(0x1000, 0x5000));
//! let a = pool.allocate(0x1000).unwrap();
//! assert_eq!(a, AddressRange::new(0x1000, 0x2000));
//! // Freeing coalesces with the free neighbour.
//! assert_eq!(pool.merge(a), Ok(AddressRange::new(0x1000, 0x5000)));
//! assert_eq!(pool.len(), 1);
//! // Allocate inside a region: the free range is split around the result.
//! let b = pool.allocate_in_region(0x1000, AddressRange::new(0x2800, 0x4000)).unwrap();
//! assert_eq!(b, AddressRange::new(0x2800, 0x3800));
//! assert_eq!(pool.ranges().collect::<Vec<_>>(),
//!            [AddressRange::new(0x1000, 0x2800), AddressRange::new(0x3800, 0x5000)]);
//! ```

use alloc::vec::Vec;
use core::fmt;

use crate::range::AddressRange;

/// "No node": the null link of the arena.
const NIL: u32 = u32::MAX;

/// One free range in the treap arena.
#[derive(Clone, Debug)]
struct Node {
    /// The free range; `range.start()` is the search key.
    range: AddressRange,
    /// Largest `range.size()` in the subtree rooted here: lets first fit skip subtrees that are
    /// too small without visiting them.
    max: usize,
    /// Heap priority (parents have priorities >= their children), which keeps the expected depth
    /// logarithmic whatever order ranges arrive in.
    prio: u32,
    /// Lower addresses; for a slot on the free list, the next free slot.
    left: u32,
    /// Higher addresses.
    right: u32,
}

/// A set of disjoint, non-adjacent free address ranges with coalescing and first-fit allocation.
///
/// Every operation other than [`ranges`](Self::ranges) costs O(log n) (expected) in the number of
/// free ranges. Nodes live in one `Vec` addressed by `u32`, and freed slots are reused, so the
/// pool does not allocate per operation once it has reached its peak number of ranges.
#[derive(Clone)]
pub struct DisjointAllocationPool {
    nodes: Vec<Node>,
    /// Head of the list of unused slots in `nodes`, linked through `Node::left`.
    free_slot: u32,
    root: u32,
    /// Number of free ranges (live nodes).
    len: usize,
    /// Sum of the sizes of all free ranges. It cannot overflow: the ranges are disjoint subsets
    /// of `[0, usize::MAX)`.
    total: usize,
    /// Counter behind the node priorities. Deterministic, so a pool (and a clone of it) always
    /// builds the same tree from the same operations.
    prio_counter: u32,
}

/// Why [`DisjointAllocationPool::merge`] refused a range.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// Part of the range is already free in the pool.
    Overlap {
        /// The range that was being merged.
        range: AddressRange,
        /// The lowest free range of the pool that it overlaps.
        existing: AddressRange,
    },
    /// The range holds no address.
    EmptyRange,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Overlap { range, existing } => {
                write!(f, "range {range:?} overlaps free range {existing:?}")
            }
            PoolError::EmptyRange => f.write_str("cannot merge an empty range"),
        }
    }
}

impl core::error::Error for PoolError {}

impl Default for DisjointAllocationPool {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DisjointAllocationPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The arena layout is an implementation detail; show the free ranges.
        f.write_str("DisjointAllocationPool ")?;
        f.debug_list().entries(self.ranges()).finish()
    }
}

impl DisjointAllocationPool {
    /// An empty pool.
    #[must_use]
    pub const fn new() -> Self {
        DisjointAllocationPool {
            nodes: Vec::new(),
            free_slot: NIL,
            root: NIL,
            len: 0,
            total: 0,
            prio_counter: 0,
        }
    }

    /// A pool holding `range` as its only free range; an empty `range` gives an empty pool.
    #[must_use]
    pub fn from_range(range: AddressRange) -> Self {
        let mut pool = Self::new();
        // On an empty pool the only possible error is `EmptyRange`, which means "empty pool".
        let _ = pool.merge(range);
        pool
    }

    /// Whether the pool holds no free range.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of free ranges (after coalescing).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Total number of free bytes.
    #[must_use]
    pub fn total_size(&self) -> usize {
        self.total
    }

    /// The largest free range; the lowest such range when several have the largest size.
    #[must_use]
    pub fn largest(&self) -> Option<AddressRange> {
        let target = self.max_of(self.root);
        let mut t = self.root;
        // Follow the subtree maxima down, preferring lower addresses: left, then self, then right.
        while t != NIL {
            let n = self.node(t);
            if self.max_of(n.left) == target {
                t = n.left;
            } else if n.range.size() == target {
                return Some(n.range);
            } else {
                t = n.right;
            }
        }
        None
    }

    /// Whether `addr` is free.
    #[must_use]
    pub fn contains(&self, addr: usize) -> bool {
        // No range contains `usize::MAX`: ends are at most `usize::MAX` and exclusive.
        let Some(key) = addr.checked_add(1) else {
            return false;
        };
        let t = self.last_starting_before(key);
        t != NIL && self.node(t).range.contains(addr)
    }

    /// The free ranges in address order.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = AddressRange> + '_ {
        let mut iter = Ranges {
            pool: self,
            stack: Vec::new(),
            remaining: self.len,
        };
        iter.push_left_spine(self.root);
        iter
    }

    /// The free range [`merge`](Self::merge) would return for `range`, without changing the
    /// pool.
    ///
    /// # Errors
    ///
    /// As `merge`.
    pub fn merged_extent(&self, range: AddressRange) -> Result<AddressRange, PoolError> {
        if range.is_empty() {
            return Err(PoolError::EmptyRange);
        }
        let prev = self.last_starting_before(range.start());
        let next = self.first_starting_at_or_after(range.start());
        let mut merged = range;
        if prev != NIL {
            let p = self.node(prev).range;
            if p.end() > range.start() {
                return Err(PoolError::Overlap { range, existing: p });
            }
            if p.end() == range.start() {
                merged = AddressRange::new(p.start(), merged.end());
            }
        }
        if next != NIL {
            let n = self.node(next).range;
            if n.start() < range.end() {
                return Err(PoolError::Overlap { range, existing: n });
            }
            if n.start() == range.end() {
                merged = AddressRange::new(merged.start(), n.end());
            }
        }
        Ok(merged)
    }

    /// Adds `range` to the free ranges, coalescing it with free neighbours that touch it on
    /// either side, and returns the free range that now contains it.
    ///
    /// # Errors
    ///
    /// [`PoolError::EmptyRange`] if `range` is empty, [`PoolError::Overlap`] if part of it is
    /// already free. The pool is unchanged on error.
    ///
    /// # Panics
    ///
    /// Only if the pool would hold more than `u32::MAX - 1` free ranges at once (which needs
    /// well over 100 GiB of nodes).
    pub fn merge(&mut self, range: AddressRange) -> Result<AddressRange, PoolError> {
        if range.is_empty() {
            return Err(PoolError::EmptyRange);
        }
        // The free ranges are sorted and disjoint, so only the last one starting before `range`
        // and the first one starting at or after it can overlap or touch it.
        let prev = self.last_starting_before(range.start());
        let next = self.first_starting_at_or_after(range.start());
        let prev_range = (prev != NIL).then(|| self.node(prev).range);
        let next_range = (next != NIL).then(|| self.node(next).range);

        // Check everything before mutating so that an error leaves the pool as it was.
        if let Some(p) = prev_range {
            if p.end() > range.start() {
                return Err(PoolError::Overlap { range, existing: p });
            }
        }
        if let Some(n) = next_range {
            if n.start() < range.end() {
                return Err(PoolError::Overlap { range, existing: n });
            }
        }

        let touching_prev = prev_range.filter(|p| p.end() == range.start());
        let touching_next = next_range.filter(|n| n.start() == range.end());
        let merged = match (touching_prev, touching_next) {
            (Some(p), Some(n)) => {
                // `range` fills the hole between two free ranges: they become one.
                self.root = self.remove(self.root, n.start());
                self.len -= 1;
                let merged = AddressRange::new(p.start(), n.end());
                self.replace(self.root, p.start(), merged);
                merged
            }
            (Some(p), None) => {
                let merged = AddressRange::new(p.start(), range.end());
                self.replace(self.root, p.start(), merged);
                merged
            }
            (None, Some(n)) => {
                // Moving `n`'s start down to `range.start()` keeps address order: nothing free
                // lies in between.
                let merged = AddressRange::new(range.start(), n.end());
                self.replace(self.root, n.start(), merged);
                merged
            }
            (None, None) => {
                let t = self.alloc_node(range);
                self.root = self.insert(self.root, t);
                self.len += 1;
                range
            }
        };
        self.total += range.size();
        Ok(merged)
    }

    /// Takes `size` bytes from the start of the lowest free range that holds at least `size`
    /// bytes. `None` (and no change) if no free range is large enough or `size` is 0.
    pub fn allocate(&mut self, size: usize) -> Option<AddressRange> {
        if size == 0 || self.max_of(self.root) < size {
            return None;
        }
        let t = self.first_fit(self.root, size);
        if t == NIL {
            return None;
        }
        let free = self.node(t).range;
        let result = AddressRange::from_start_size(free.start(), size)?;
        self.carve(free, result);
        Some(result)
    }

    /// Takes `size` bytes inside `region`: walking the free ranges in address order, the first
    /// whose overlap with `region` holds at least `size` bytes gives the result, which starts at
    /// the start of that overlap. The rest of that free range stays free (in front of the result,
    /// behind it, or both). `None` (and no change) if nothing fits or `size` is 0.
    ///
    /// # Panics
    ///
    /// Only if splitting a free range in two would make the pool hold more than `u32::MAX - 1`
    /// free ranges at once.
    pub fn allocate_in_region(
        &mut self,
        size: usize,
        region: AddressRange,
    ) -> Option<AddressRange> {
        if size == 0 || region.size() < size {
            return None;
        }
        let (free, overlap) = self.fit_in_region(size, region)?;
        let result = AddressRange::from_start_size(overlap.start(), size)?;
        self.carve(free, result);
        Some(result)
    }

    /// Takes `size` bytes starting at a multiple of `align` (a power of two) inside `region`:
    /// the lowest such placement in address order. The rest of the free range it comes from
    /// stays free. `None` (and no change) if nothing fits, `size` is 0 or `align` is not a power
    /// of two.
    ///
    /// Each free range examined is found in O(log n); ranges are skipped only when they hold
    /// `size` bytes but no aligned run of them, so a search is O(log n) unless many such ranges
    /// lie in front of the fit.
    ///
    /// # Panics
    ///
    /// As [`allocate_in_region`](Self::allocate_in_region).
    pub fn allocate_aligned_in_region(
        &mut self,
        size: usize,
        align: usize,
        region: AddressRange,
    ) -> Option<AddressRange> {
        if size == 0 || !align.is_power_of_two() || region.size() < size {
            return None;
        }
        let fits = |free: AddressRange| -> Option<AddressRange> {
            let overlap = free.overlap(&region);
            let start = overlap.start().checked_next_multiple_of(align)?;
            let end = start.checked_add(size)?;
            (!overlap.is_empty() && end <= overlap.end()).then(|| AddressRange::new(start, end))
        };
        let straddling = self.last_starting_before(region.start());
        let mut candidate = (straddling != NIL).then(|| self.node(straddling).range);
        let mut lo = region.start();
        loop {
            if let Some(free) = candidate {
                if let Some(taken) = fits(free) {
                    self.carve(free, taken);
                    return Some(taken);
                }
                lo = lo.max(free.end());
            }
            let t = self.first_fit_starting_at_or_after(lo, size);
            if t == NIL || self.node(t).range.start() >= region.end() {
                return None;
            }
            candidate = Some(self.node(t).range);
        }
    }

    /// The free range that V8's linear walk would pick for `allocate_in_region`, and its overlap
    /// with `region`.
    ///
    /// In address order, a free range meets `region` in one of three ways: it straddles
    /// `region.start()`, it lies wholly inside, or it straddles `region.end()`. At most one
    /// range does each of the first and last, so the walk reduces to three O(log n) look-ups,
    /// checked in that address order.
    fn fit_in_region(
        &self,
        size: usize,
        region: AddressRange,
    ) -> Option<(AddressRange, AddressRange)> {
        // (a) The range starting before the region, clipped to it (empty when it ends before).
        let a = self.last_starting_before(region.start());
        if a != NIL {
            let free = self.node(a).range;
            let overlap = free.overlap(&region);
            if overlap.size() >= size {
                return Some((free, overlap));
            }
        }
        // (b) The lowest range starting inside with enough bytes. If it sticks out of the region,
        // no range wholly inside is large enough.
        let b = self.first_fit_starting_at_or_after(region.start(), size);
        if b != NIL {
            let free = self.node(b).range;
            if free.end() <= region.end() {
                return Some((free, free));
            }
        }
        // (c) The range straddling the end of the region, clipped to it. One that also starts
        // before the region was already examined as (a).
        let c = self.last_starting_before(region.end());
        if c != NIL {
            let free = self.node(c).range;
            if free.start() >= region.start() && free.end() > region.end() {
                let overlap = free.overlap(&region);
                if overlap.size() >= size {
                    return Some((free, overlap));
                }
            }
        }
        None
    }

    /// Removes `taken` (which lies inside the free range `free`) from the pool, keeping the parts
    /// of `free` in front of and behind it.
    fn carve(&mut self, free: AddressRange, taken: AddressRange) {
        let front = AddressRange::new(free.start(), taken.start());
        let back = AddressRange::new(taken.end(), free.end());
        match (front.is_empty(), back.is_empty()) {
            (true, true) => {
                self.root = self.remove(self.root, free.start());
                self.len -= 1;
            }
            // Shrinking a range in place keeps address order, so the node can stay where it is.
            (true, false) => self.replace(self.root, free.start(), back),
            (false, true) => self.replace(self.root, free.start(), front),
            (false, false) => {
                self.replace(self.root, free.start(), front);
                let t = self.alloc_node(back);
                self.root = self.insert(self.root, t);
                self.len += 1;
            }
        }
        self.total -= taken.size();
    }
}

#[cfg(test)]
mod tests;
mod treap;

/// In-order iterator over the free ranges, with an explicit stack of pending ancestors.
struct Ranges<'a> {
    pool: &'a DisjointAllocationPool,
    stack: Vec<u32>,
    remaining: usize,
}

impl Ranges<'_> {
    fn push_left_spine(&mut self, mut t: u32) {
        while t != NIL {
            self.stack.push(t);
            t = self.pool.node(t).left;
        }
    }
}

impl Iterator for Ranges<'_> {
    type Item = AddressRange;

    fn next(&mut self) -> Option<AddressRange> {
        let t = self.stack.pop()?;
        let n = self.pool.node(t);
        self.push_left_spine(n.right);
        self.remaining -= 1;
        Some(n.range)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Ranges<'_> {}
