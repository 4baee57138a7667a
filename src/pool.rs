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

    // ---- Read-only searches (iterative; each walks one root-to-leaf path) ----

    /// The node with the greatest start `< key`, or `NIL`.
    fn last_starting_before(&self, key: usize) -> u32 {
        let mut best = NIL;
        let mut t = self.root;
        while t != NIL {
            let n = self.node(t);
            if n.range.start() < key {
                best = t;
                t = n.right;
            } else {
                t = n.left;
            }
        }
        best
    }

    /// The node with the smallest start `>= key`, or `NIL`.
    fn first_starting_at_or_after(&self, key: usize) -> u32 {
        let mut best = NIL;
        let mut t = self.root;
        while t != NIL {
            let n = self.node(t);
            if n.range.start() >= key {
                best = t;
                t = n.left;
            } else {
                t = n.right;
            }
        }
        best
    }

    /// The lowest node in subtree `t` with at least `size` bytes, or `NIL`.
    fn first_fit(&self, mut t: u32, size: usize) -> u32 {
        if self.max_of(t) < size {
            return NIL;
        }
        // Invariant: the subtree at `t` holds a fit, so one of the three branches always does.
        while t != NIL {
            let n = self.node(t);
            if self.max_of(n.left) >= size {
                t = n.left;
            } else if n.range.size() >= size {
                return t;
            } else {
                t = n.right;
            }
        }
        NIL
    }

    /// The lowest node with start `>= lo` and at least `size` bytes, or `NIL`.
    fn first_fit_starting_at_or_after(&self, lo: usize, size: usize) -> u32 {
        // Walk the search path of `lo`. Where it turns left at a node with start >= lo, that
        // node and its right subtree lie wholly past `lo` and are the fallback if nothing in the
        // left subtree fits. Deeper fallbacks have lower addresses, so the deepest one that can
        // fit at all is the answer.
        let mut candidate = NIL;
        let mut t = self.root;
        while t != NIL {
            let n = self.node(t);
            if n.range.start() >= lo {
                if n.range.size() >= size || self.max_of(n.right) >= size {
                    candidate = t;
                }
                t = n.left;
            } else {
                t = n.right;
            }
        }
        if candidate == NIL {
            return NIL;
        }
        let n = self.node(candidate);
        if n.range.size() >= size {
            candidate
        } else {
            self.first_fit(n.right, size)
        }
    }

    // ---- Treap maintenance (recursive; depth is the tree height, O(log n) expected) ----

    fn node(&self, t: u32) -> &Node {
        &self.nodes[t as usize]
    }

    fn node_mut(&mut self, t: u32) -> &mut Node {
        &mut self.nodes[t as usize]
    }

    fn max_of(&self, t: u32) -> usize {
        if t == NIL {
            0
        } else {
            self.node(t).max
        }
    }

    /// Recomputes `t`'s subtree maximum from its own range and its children.
    fn update(&mut self, t: u32) {
        let n = self.node(t);
        let max = n
            .range
            .size()
            .max(self.max_of(n.left))
            .max(self.max_of(n.right));
        self.node_mut(t).max = max;
    }

    /// A fresh priority: a 32-bit finalizer (from MurmurHash3) over a counter. Deterministic,
    /// yet uncorrelated with the order in which addresses arrive.
    fn next_prio(&mut self) -> u32 {
        self.prio_counter = self.prio_counter.wrapping_add(1);
        let mut x = self.prio_counter;
        x ^= x >> 16;
        x = x.wrapping_mul(0x85eb_ca6b);
        x ^= x >> 13;
        x = x.wrapping_mul(0xc2b2_ae35);
        x ^= x >> 16;
        x
    }

    /// A detached node for `range`, reusing a free slot when there is one.
    fn alloc_node(&mut self, range: AddressRange) -> u32 {
        let node = Node {
            range,
            max: range.size(),
            prio: self.next_prio(),
            left: NIL,
            right: NIL,
        };
        if self.free_slot != NIL {
            let t = self.free_slot;
            self.free_slot = self.node(t).left;
            *self.node_mut(t) = node;
            return t;
        }
        // `NIL` itself must never become an index.
        let t = match u32::try_from(self.nodes.len()) {
            Ok(t) if t != NIL => t,
            _ => panic!("DisjointAllocationPool: too many free ranges"),
        };
        self.nodes.push(node);
        t
    }

    /// Returns slot `t` to the free list.
    fn free_node(&mut self, t: u32) {
        let head = self.free_slot;
        let n = self.node_mut(t);
        n.left = head;
        n.right = NIL;
        self.free_slot = t;
    }

    /// Splits subtree `t` into (starts `< key`, starts `>= key`).
    fn split(&mut self, t: u32, key: usize) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.node(t).range.start() < key {
            let (l, r) = self.split(self.node(t).right, key);
            self.node_mut(t).right = l;
            self.update(t);
            (t, r)
        } else {
            let (l, r) = self.split(self.node(t).left, key);
            self.node_mut(t).left = r;
            self.update(t);
            (l, t)
        }
    }

    /// Joins two subtrees where every start in `a` is below every start in `b`.
    fn join(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.node(a).prio >= self.node(b).prio {
            let joined = self.join(self.node(a).right, b);
            self.node_mut(a).right = joined;
            self.update(a);
            a
        } else {
            let joined = self.join(a, self.node(b).left);
            self.node_mut(b).left = joined;
            self.update(b);
            b
        }
    }

    /// Inserts the detached node `n` into subtree `t`; returns the new subtree root.
    fn insert(&mut self, t: u32, n: u32) -> u32 {
        if t == NIL {
            return n;
        }
        let key = self.node(n).range.start();
        if self.node(n).prio > self.node(t).prio {
            // `n` belongs above `t`: it takes `t`'s subtree, split around its key, as children.
            let (l, r) = self.split(t, key);
            let node = self.node_mut(n);
            node.left = l;
            node.right = r;
            self.update(n);
            n
        } else {
            if key < self.node(t).range.start() {
                let child = self.insert(self.node(t).left, n);
                self.node_mut(t).left = child;
            } else {
                let child = self.insert(self.node(t).right, n);
                self.node_mut(t).right = child;
            }
            self.update(t);
            t
        }
    }

    /// Removes the node starting at `key` from subtree `t` and frees its slot; returns the new
    /// subtree root.
    fn remove(&mut self, t: u32, key: usize) -> u32 {
        if t == NIL {
            return NIL;
        }
        let start = self.node(t).range.start();
        if key < start {
            let child = self.remove(self.node(t).left, key);
            self.node_mut(t).left = child;
        } else if key > start {
            let child = self.remove(self.node(t).right, key);
            self.node_mut(t).right = child;
        } else {
            let joined = self.join(self.node(t).left, self.node(t).right);
            self.free_node(t);
            return joined;
        }
        self.update(t);
        t
    }

    /// Replaces the range of the node starting at `key` in subtree `t` by `range`, which must
    /// keep the address order, and refreshes the subtree maxima on the path.
    fn replace(&mut self, t: u32, key: usize, range: AddressRange) {
        if t == NIL {
            return;
        }
        let start = self.node(t).range.start();
        if key < start {
            self.replace(self.node(t).left, key, range);
        } else if key > start {
            self.replace(self.node(t).right, key, range);
        } else {
            self.node_mut(t).range = range;
        }
        self.update(t);
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use proptest::prelude::*;

    fn r(start: usize, end: usize) -> AddressRange {
        AddressRange::new(start, end)
    }

    fn ranges(pool: &DisjointAllocationPool) -> Vec<AddressRange> {
        pool.ranges().collect()
    }

    fn pool_of(rs: &[(usize, usize)]) -> DisjointAllocationPool {
        let mut pool = DisjointAllocationPool::new();
        for &(s, e) in rs {
            pool.merge(r(s, e)).unwrap();
        }
        check_invariants(&pool);
        pool
    }

    /// Checks the treap and the counters against each other; returns the tree height.
    fn check_invariants(pool: &DisjointAllocationPool) -> usize {
        // Returns (count, sum, max, height) of subtree `t`, checking heap order and maxima.
        fn walk(
            pool: &DisjointAllocationPool,
            t: u32,
            out: &mut Vec<AddressRange>,
        ) -> (usize, usize, usize, usize) {
            if t == NIL {
                return (0, 0, 0, 0);
            }
            let n = pool.node(t);
            for child in [n.left, n.right] {
                if child != NIL {
                    assert!(pool.node(child).prio <= n.prio, "heap order");
                }
            }
            let (lc, ls, lm, lh) = walk(pool, n.left, out);
            out.push(n.range);
            let (rc, rs, rm, rh) = walk(pool, n.right, out);
            let max = n.range.size().max(lm).max(rm);
            assert_eq!(n.max, max, "subtree maximum of {:?}", n.range);
            (lc + 1 + rc, ls + n.range.size() + rs, max, 1 + lh.max(rh))
        }
        let mut in_order = Vec::new();
        let (count, sum, _, height) = walk(pool, pool.root, &mut in_order);
        assert_eq!(count, pool.len());
        assert_eq!(sum, pool.total_size());
        assert_eq!(pool.is_empty(), count == 0);
        assert_eq!(in_order, ranges(pool));
        assert_eq!(pool.ranges().len(), count);
        for range in &in_order {
            assert!(!range.is_empty(), "empty free range");
        }
        for w in in_order.windows(2) {
            assert!(
                w[0].end() < w[1].start(),
                "unsorted, overlapping or adjacent: {w:?}"
            );
        }
        // Every arena slot is either in the tree or on the free list.
        let mut free_slots = 0;
        let mut s = pool.free_slot;
        while s != NIL {
            free_slots += 1;
            s = pool.node(s).left;
        }
        assert_eq!(count + free_slots, pool.nodes.len());
        height
    }

    // ---- Construction ----

    #[test]
    fn construct_empty() {
        let pool = DisjointAllocationPool::new();
        assert!(pool.is_empty());
        assert_eq!(pool.len(), 0);
        assert_eq!(pool.total_size(), 0);
        assert_eq!(pool.largest(), None);
        assert_eq!(ranges(&pool), []);
        assert!(DisjointAllocationPool::default().is_empty());
        check_invariants(&pool);
    }

    #[test]
    fn construct_with_range() {
        let pool = DisjointAllocationPool::from_range(r(100, 200));
        assert_eq!(ranges(&pool), [r(100, 200)]);
        assert_eq!(pool.total_size(), 100);
        assert_eq!(pool.largest(), Some(r(100, 200)));
        check_invariants(&pool);
    }

    #[test]
    fn construct_with_empty_range_is_empty() {
        let pool = DisjointAllocationPool::from_range(r(100, 100));
        assert!(pool.is_empty());
        check_invariants(&pool);
    }

    // ---- Merge ----

    #[test]
    fn merge_into_empty_pool() {
        let mut pool = DisjointAllocationPool::new();
        assert_eq!(pool.merge(r(10, 20)), Ok(r(10, 20)));
        assert_eq!(ranges(&pool), [r(10, 20)]);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.total_size(), 10);
        check_invariants(&pool);
    }

    #[test]
    fn merge_coalesces_left() {
        let mut pool = pool_of(&[(10, 20), (40, 50)]);
        assert_eq!(pool.merge(r(20, 30)), Ok(r(10, 30)));
        assert_eq!(ranges(&pool), [r(10, 30), r(40, 50)]);
        assert_eq!(pool.total_size(), 30);
        check_invariants(&pool);
    }

    #[test]
    fn merge_coalesces_right() {
        let mut pool = pool_of(&[(10, 20), (40, 50)]);
        assert_eq!(pool.merge(r(30, 40)), Ok(r(30, 50)));
        assert_eq!(ranges(&pool), [r(10, 20), r(30, 50)]);
        check_invariants(&pool);
    }

    #[test]
    fn merge_coalesces_both() {
        let mut pool = pool_of(&[(10, 20), (30, 40), (50, 60)]);
        assert_eq!(pool.merge(r(20, 30)), Ok(r(10, 40)));
        assert_eq!(ranges(&pool), [r(10, 40), r(50, 60)]);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.total_size(), 40);
        assert_eq!(pool.merge(r(40, 50)), Ok(r(10, 60)));
        assert_eq!(ranges(&pool), [r(10, 60)]);
        check_invariants(&pool);
    }

    #[test]
    fn merge_with_gaps_does_not_coalesce() {
        // V8's MergingSkipLargerSrcWithGap: neighbours that do not touch stay separate.
        let mut pool = pool_of(&[(10, 15), (30, 40)]);
        assert_eq!(pool.merge(r(20, 25)), Ok(r(20, 25)));
        assert_eq!(pool.merge(r(0, 5)), Ok(r(0, 5)));
        assert_eq!(pool.merge(r(45, 50)), Ok(r(45, 50)));
        assert_eq!(
            ranges(&pool),
            [r(0, 5), r(10, 15), r(20, 25), r(30, 40), r(45, 50)]
        );
        check_invariants(&pool);
    }

    #[test]
    fn merge_overlap_leaves_pool_unchanged() {
        let mut pool = pool_of(&[(10, 20), (30, 40)]);
        let before = ranges(&pool);
        for (bad, existing) in [
            (r(15, 25), r(10, 20)),
            (r(5, 12), r(10, 20)),
            (r(25, 35), r(30, 40)),
            (r(0, 100), r(10, 20)),
            (r(12, 18), r(10, 20)),
            (r(10, 20), r(10, 20)),
            (r(39, 41), r(30, 40)),
        ] {
            assert_eq!(
                pool.merge(bad),
                Err(PoolError::Overlap {
                    range: bad,
                    existing
                })
            );
            assert_eq!(ranges(&pool), before);
            assert_eq!(pool.total_size(), 20);
            check_invariants(&pool);
        }
    }

    #[test]
    fn merge_empty_range_is_error() {
        let mut pool = pool_of(&[(10, 20)]);
        assert_eq!(pool.merge(r(5, 5)), Err(PoolError::EmptyRange));
        assert_eq!(pool.merge(r(15, 15)), Err(PoolError::EmptyRange));
        assert_eq!(ranges(&pool), [r(10, 20)]);
    }

    #[test]
    fn error_display() {
        let e = PoolError::Overlap {
            range: r(0x10, 0x20),
            existing: r(0x18, 0x30),
        };
        assert_eq!(
            e.to_string(),
            "range [0x10, 0x20) overlaps free range [0x18, 0x30)"
        );
        assert_eq!(
            PoolError::EmptyRange.to_string(),
            "cannot merge an empty range"
        );
    }

    // ---- Allocate ----

    #[test]
    fn allocate_splits() {
        // V8's SimpleExtract.
        let mut pool = pool_of(&[(1, 101)]);
        assert_eq!(pool.allocate(50), Some(r(1, 51)));
        assert_eq!(ranges(&pool), [r(51, 101)]);
        assert_eq!(pool.total_size(), 50);
        check_invariants(&pool);
        // Giving it back restores the original range.
        assert_eq!(pool.merge(r(1, 51)), Ok(r(1, 101)));
        assert_eq!(ranges(&pool), [r(1, 101)]);
    }

    #[test]
    fn allocate_exact_fit_removes_range() {
        // V8's ExtractAll.
        let mut pool = pool_of(&[(1, 101)]);
        assert_eq!(pool.allocate(100), Some(r(1, 101)));
        assert!(pool.is_empty());
        assert_eq!(pool.total_size(), 0);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_too_big_changes_nothing() {
        // V8's FailToExtract and FailToExtractExact.
        let mut pool = pool_of(&[(1, 101), (200, 250)]);
        assert_eq!(pool.allocate(101), None);
        assert_eq!(pool.allocate(usize::MAX), None);
        assert_eq!(ranges(&pool), [r(1, 101), r(200, 250)]);
        assert_eq!(pool.total_size(), 150);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_zero_is_none() {
        let mut pool = pool_of(&[(1, 101)]);
        assert_eq!(pool.allocate(0), None);
        assert_eq!(pool.allocate_in_region(0, r(0, 200)), None);
        assert_eq!(ranges(&pool), [r(1, 101)]);
    }

    #[test]
    fn allocate_is_first_fit_at_lowest_address() {
        let mut pool = pool_of(&[(0, 10), (20, 50), (60, 70), (100, 200)]);
        assert_eq!(pool.allocate(10), Some(r(0, 10)));
        assert_eq!(pool.allocate(20), Some(r(20, 40)));
        assert_eq!(pool.allocate(20), Some(r(100, 120)));
        assert_eq!(pool.allocate(10), Some(r(40, 50)));
        assert_eq!(ranges(&pool), [r(60, 70), r(120, 200)]);
        check_invariants(&pool);
    }

    #[test]
    fn largest_prefers_lowest_address_on_ties() {
        let pool = pool_of(&[(0, 10), (20, 50), (60, 70), (100, 130), (140, 141)]);
        assert_eq!(pool.largest(), Some(r(20, 50)));
    }

    #[test]
    fn contains_free_addresses_only() {
        let pool = pool_of(&[(10, 20), (30, 40)]);
        for (addr, free) in [
            (9, false),
            (10, true),
            (19, true),
            (20, false),
            (35, true),
            (40, false),
        ] {
            assert_eq!(pool.contains(addr), free, "{addr}");
        }
        assert!(!pool.contains(usize::MAX));
    }

    // ---- Allocate in region ----

    #[test]
    fn allocate_in_region_front_split() {
        // The result sits at the end of the free range; its front stays free.
        let mut pool = pool_of(&[(0, 100)]);
        assert_eq!(pool.allocate_in_region(20, r(80, 200)), Some(r(80, 100)));
        assert_eq!(ranges(&pool), [r(0, 80)]);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_in_region_back_split() {
        // The result sits at the start of the free range; its back stays free.
        let mut pool = pool_of(&[(50, 100)]);
        assert_eq!(pool.allocate_in_region(20, r(0, 200)), Some(r(50, 70)));
        assert_eq!(ranges(&pool), [r(70, 100)]);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_in_region_both_sides_split() {
        let mut pool = pool_of(&[(0, 100)]);
        assert_eq!(pool.allocate_in_region(10, r(40, 60)), Some(r(40, 50)));
        assert_eq!(ranges(&pool), [r(0, 40), r(50, 100)]);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.total_size(), 90);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_in_region_exact_removes_range() {
        let mut pool = pool_of(&[(0, 10), (20, 30), (40, 50)]);
        assert_eq!(pool.allocate_in_region(10, r(15, 35)), Some(r(20, 30)));
        assert_eq!(ranges(&pool), [r(0, 10), r(40, 50)]);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_in_region_straddling_two_ranges_takes_second() {
        // The region meets [0, 100) in [90, 100) (too small) and [120, 200) in [120, 150).
        let mut pool = pool_of(&[(0, 100), (120, 200)]);
        assert_eq!(pool.allocate_in_region(20, r(90, 150)), Some(r(120, 140)));
        assert_eq!(ranges(&pool), [r(0, 100), r(140, 200)]);
        check_invariants(&pool);
    }

    #[test]
    fn allocate_in_region_prefers_inside_range_over_end_straddler() {
        // Address order: [10, 12) is too small, [20, 40) is inside and fits, [60, 100) too.
        let mut pool = pool_of(&[(0, 12), (20, 40), (60, 100)]);
        assert_eq!(pool.allocate_in_region(15, r(10, 80)), Some(r(20, 35)));
        assert_eq!(pool.allocate_in_region(15, r(10, 80)), Some(r(60, 75)));
        assert_eq!(ranges(&pool), [r(0, 12), r(35, 40), r(75, 100)]);
        check_invariants(&pool);
    }

    #[test]
    fn aligned_allocation_finds_the_lowest_aligned_fit() {
        // Free: [0x1040, 0x1100) too small once aligned to 0x100... and [0x2040, 0x4000).
        let mut p = pool_of(&[(0x1040, 0x1100), (0x2040, 0x4000)]);
        let got = p.allocate_aligned_in_region(0x100, 0x1000, r(0, 0x10000));
        assert_eq!(got, Some(r(0x3000, 0x3100)));
        assert_eq!(
            ranges(&p),
            vec![r(0x1040, 0x1100), r(0x2040, 0x3000), r(0x3100, 0x4000)]
        );
        // Region clipping: inside [0x2000, 0x3000) only 64-byte alignment can fit.
        assert_eq!(
            p.allocate_aligned_in_region(0x100, 0x1000, r(0x2000, 0x3000)),
            None
        );
        assert_eq!(
            p.allocate_aligned_in_region(0x40, 0x40, r(0x2003, 0x3000)),
            Some(r(0x2040, 0x2080))
        );
        assert_eq!(
            p.allocate_aligned_in_region(0x40, 3, r(0, 0x10000)),
            None,
            "not a power of two"
        );
        check_invariants(&p);
    }

    #[test]
    fn allocate_in_region_no_fit_changes_nothing() {
        let mut pool = pool_of(&[(0, 100), (120, 200)]);
        let before = ranges(&pool);
        assert_eq!(pool.allocate_in_region(30, r(90, 140)), None);
        assert_eq!(pool.allocate_in_region(10, r(100, 120)), None);
        assert_eq!(pool.allocate_in_region(10, r(300, 400)), None);
        assert_eq!(pool.allocate_in_region(50, r(0, 40)), None);
        assert_eq!(pool.allocate_in_region(1, r(50, 50)), None);
        assert_eq!(ranges(&pool), before);
        check_invariants(&pool);
    }

    #[test]
    fn top_of_address_space_does_not_overflow() {
        let top = r(usize::MAX - 100, usize::MAX);
        let mut pool = DisjointAllocationPool::from_range(top);
        assert_eq!(
            pool.allocate_in_region(10, r(usize::MAX - 5, usize::MAX)),
            None
        );
        assert_eq!(
            pool.allocate_in_region(5, r(usize::MAX - 5, usize::MAX)),
            Some(r(usize::MAX - 5, usize::MAX))
        );
        assert_eq!(pool.allocate(95), Some(r(usize::MAX - 100, usize::MAX - 5)));
        assert!(pool.is_empty());
        assert_eq!(pool.merge(top), Ok(top));
        assert_eq!(pool.merge(r(0, usize::MAX - 100)), Ok(r(0, usize::MAX)));
        assert_eq!(pool.total_size(), usize::MAX);
        assert_eq!(pool.allocate(usize::MAX), Some(r(0, usize::MAX)));
        check_invariants(&pool);
    }

    #[test]
    fn height_stays_logarithmic_for_sorted_input() {
        // Ascending and descending insertions are the worst case for an unbalanced tree.
        let mut pool = DisjointAllocationPool::new();
        for i in 0..10_000 {
            pool.merge(r(i * 4, i * 4 + 2)).unwrap();
        }
        for i in (10_000..20_000).rev() {
            pool.merge(r(i * 4, i * 4 + 2)).unwrap();
        }
        let height = check_invariants(&pool);
        assert!(height < 60, "height {height} for {} nodes", pool.len());
        // Slots freed by coalescing are reused rather than growing the arena.
        let slots = pool.nodes.len();
        for i in 0..20_000 {
            pool.merge(r(i * 4 + 2, i * 4 + 4)).unwrap();
        }
        assert_eq!(ranges(&pool), [r(0, 80_000)]);
        for i in 0..1000 {
            pool.allocate_in_region(1, r(i * 8, i * 8 + 4)).unwrap();
        }
        assert_eq!(pool.nodes.len(), slots);
        check_invariants(&pool);
    }

    #[test]
    fn clone_is_independent() {
        let mut a = pool_of(&[(0, 100)]);
        let b = a.clone();
        a.allocate(10).unwrap();
        assert_eq!(ranges(&b), [r(0, 100)]);
        assert_eq!(ranges(&a), [r(10, 100)]);
        assert_eq!(
            alloc::format!("{b:?}"),
            "DisjointAllocationPool [[0x0, 0x64)]"
        );
    }

    // ---- Property tests against a linear model (a transcription of V8's code) ----

    /// Sorted, disjoint, coalesced free ranges, searched linearly as V8 does.
    #[derive(Default)]
    struct Model {
        ranges: Vec<AddressRange>,
    }

    impl Model {
        fn merge(&mut self, range: AddressRange) -> Result<AddressRange, PoolError> {
            if range.is_empty() {
                return Err(PoolError::EmptyRange);
            }
            if let Some(&existing) = self.ranges.iter().find(|f| !f.overlap(&range).is_empty()) {
                return Err(PoolError::Overlap { range, existing });
            }
            let i = self.ranges.partition_point(|f| f.start() < range.start());
            let mut merged = range;
            if i < self.ranges.len() && self.ranges[i].start() == range.end() {
                merged = r(merged.start(), self.ranges.remove(i).end());
            }
            if i > 0 && self.ranges[i - 1].end() == range.start() {
                merged = r(self.ranges.remove(i - 1).start(), merged.end());
                self.ranges.insert(i - 1, merged);
            } else {
                self.ranges.insert(i, merged);
            }
            Ok(merged)
        }

        fn allocate_in_region(
            &mut self,
            size: usize,
            region: AddressRange,
        ) -> Option<AddressRange> {
            if size == 0 {
                return None;
            }
            for i in 0..self.ranges.len() {
                let old = self.ranges[i];
                let overlap = old.overlap(&region);
                if overlap.size() < size {
                    continue;
                }
                let ret = AddressRange::from_start_size(overlap.start(), size).unwrap();
                self.ranges.remove(i);
                let pieces = [r(old.start(), ret.start()), r(ret.end(), old.end())];
                for piece in pieces.into_iter().rev().filter(|p| !p.is_empty()) {
                    self.ranges.insert(i, piece);
                }
                return Some(ret);
            }
            None
        }

        fn allocate(&mut self, size: usize) -> Option<AddressRange> {
            self.allocate_in_region(size, r(0, usize::MAX))
        }

        fn largest(&self) -> Option<AddressRange> {
            // `max_by_key` keeps the last maximum; scan in reverse so ties pick the lowest.
            self.ranges
                .iter()
                .rev()
                .copied()
                .max_by_key(AddressRange::size)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Merge(usize, usize),
        Allocate(usize),
        AllocateInRegion(usize, usize, usize),
        Contains(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small addresses and sizes so that ranges collide, touch and coalesce often.
        prop_oneof![
            4 => (0usize..256, 0usize..24).prop_map(|(s, n)| Op::Merge(s, n)),
            2 => (0usize..40).prop_map(Op::Allocate),
            2 => (0usize..24, 0usize..256, 0usize..64)
                .prop_map(|(n, s, len)| Op::AllocateInRegion(n, s, len)),
            1 => (0usize..280).prop_map(Op::Contains),
        ]
    }

    fn run_against_model(base: usize, ops: &[Op]) {
        let mut pool = DisjointAllocationPool::new();
        let mut model = Model::default();
        // Offsets from `base`, saturating so that tests near the top of the address space stay
        // valid ranges.
        let at = |x: usize| base.saturating_add(x);
        for op in ops {
            match *op {
                Op::Merge(s, n) => {
                    let range = r(at(s), at(s + n));
                    assert_eq!(pool.merge(range), model.merge(range), "{op:?}");
                }
                Op::Allocate(n) => assert_eq!(pool.allocate(n), model.allocate(n), "{op:?}"),
                Op::AllocateInRegion(n, s, len) => {
                    let region = r(at(s), at(s + len));
                    assert_eq!(
                        pool.allocate_in_region(n, region),
                        model.allocate_in_region(n, region),
                        "{op:?}"
                    );
                }
                Op::Contains(a) => {
                    let expected = model.ranges.iter().any(|f| f.contains(at(a)));
                    assert_eq!(pool.contains(at(a)), expected, "{op:?}");
                }
            }
            check_invariants(&pool);
            assert_eq!(ranges(&pool), model.ranges, "after {op:?}");
            assert_eq!(pool.len(), model.ranges.len());
            assert_eq!(
                pool.total_size(),
                model.ranges.iter().map(|f| f.size()).sum::<usize>()
            );
            assert_eq!(pool.largest(), model.largest());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn matches_model(
            top in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            // Either low addresses or the very top of the address space (overflow edges).
            let base = if top { usize::MAX - 256 } else { 0 };
            run_against_model(base, &ops);
        }
    }

    #[test]
    fn model_agrees_on_v8_example() {
        // Sanity check of the model itself on a hand-worked case.
        let mut model = Model::default();
        model.merge(r(0, 100)).unwrap();
        assert_eq!(model.allocate_in_region(10, r(40, 60)), Some(r(40, 50)));
        assert_eq!(model.ranges, vec![r(0, 40), r(50, 100)]);
        run_against_model(
            0,
            &[
                Op::Merge(0, 20),
                Op::AllocateInRegion(5, 5, 20),
                Op::Allocate(3),
            ],
        );
    }
}
