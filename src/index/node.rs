//! Nodes of the range index: one layout for leaves and inner nodes, eight cache lines each.
//!
//! ```text
//! bytes   0..256  keys[32]   sorted; unused slots and keys[31] hold usize::MAX
//! bytes 256..264  len, level, fresh
//! bytes 264..512  slots[31]  leaf: values (IndexValue::into_raw); inner: children
//! ```
//! A lookup finds the rank of the PC (the number of keys `<= pc`) with 11 comparisons and no
//! branch on the data: the last key of three of the four 8-key groups says how many groups lie
//! wholly below the PC, then the 8 keys of the next group are counted (the `usize::MAX` padding
//! never counts, except for `pc == usize::MAX`, which the clamp to `len` handles; lookups use
//! [`Node::path_slot`], which leaves both to one check at the root). Keys are
//! 8-aligned groups of one cache line each. In an inner node `keys[i]` is the smallest key under
//! `slots[i]`, so the same rank picks the child. Measured on the host against 256-byte nodes and
//! 1 KiB nodes, and against counting all keys: this layout was fastest at 10^4 and 10^5 ranges.
//!
//! Published nodes are immutable: the writer changes only *fresh* nodes, ones it allocated in the
//! current update and that no reader can reach yet (see the module docs of `index`).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

/// Most entries of a leaf, children of an inner node.
pub(super) const CAP: usize = 31;
/// Fewest entries or children of a node other than the root after a removal.
pub(super) const MIN: usize = CAP / 2;

/// A leaf (level 0) or an inner node (level > 0).
#[repr(C, align(64))]
pub(super) struct Node {
    pub(super) keys: [usize; CAP + 1],
    len: u8,
    pub(super) level: u8,
    /// Allocated by the running update and not published yet: the writer may change it in place.
    /// Read and written by the writer only.
    pub(super) fresh: bool,
    pub(super) slots: [*mut (); CAP],
    /// Loom's view of the node's contents: the writer "writes" it whenever it builds or changes
    /// the node (and when it frees it), readers "read" it on every visit, so a reader that can
    /// see a node without happening-after its construction, or that can still see it when it is
    /// freed, is reported.
    #[cfg(loom)]
    check: loom::cell::UnsafeCell<()>,
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<Node>() == 512);

impl Node {
    /// An empty fresh node.
    fn empty(level: u8) -> Node {
        Node {
            keys: [usize::MAX; CAP + 1],
            len: 0,
            level,
            fresh: true,
            slots: [ptr::null_mut(); CAP],
            #[cfg(loom)]
            check: loom::cell::UnsafeCell::new(()),
        }
    }

    /// A fresh copy of a node (the slots are shared, not copied).
    fn copy(&self) -> Node {
        self.read_check();
        Node {
            keys: self.keys,
            len: self.len,
            level: self.level,
            fresh: true,
            slots: self.slots,
            #[cfg(loom)]
            check: loom::cell::UnsafeCell::new(()),
        }
    }

    /// Number of entries or children.
    pub(super) fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Number of keys `<= key`, padding included: three group fences, then one 8-key group; no
    /// branch on the data. Panic-free.
    #[inline(always)]
    fn count_up_to(&self, key: usize) -> usize {
        let (groups, _) = self.keys.as_chunks::<8>();
        // The last key of each group but the last tells how many groups lie wholly below
        // `key` (keys are sorted); then one group of 8 is counted.
        let mut g = 0;
        for group in &groups[..groups.len() - 1] {
            g += usize::from(group[7] <= key);
        }
        let mut c = 0;
        for &k in &groups[g % groups.len()] {
            c += usize::from(k <= key);
        }
        8 * g + c
    }

    /// Number of keys `<= key`: the slot after the last entry not above `key`, clamped to `len`
    /// (the `usize::MAX` padding counts for `key == usize::MAX`). Panic-free.
    #[inline(always)]
    pub(super) fn rank(&self, key: usize) -> usize {
        self.count_up_to(key).min(self.len())
    }

    /// `rank(key) - 1`: the child holding `key`, or the leaf entry of greatest key `<= key`, on
    /// a lookup's path, where `keys[0] <= key < usize::MAX`. Then the rank is at least 1 and
    /// the `usize::MAX` padding never counts, so the clamp to `len` and the saturating
    /// subtraction are not needed — a lookup would pay for them on every level's dependent
    /// chain (measured: 2.8 ns of a 10^4-range lookup). Lookups check the conditions once, at
    /// the root; every child on the path then has `keys[0] <= key`, since an inner node's
    /// `keys[i]` is exactly the smallest key under `slots[i]` (the index tests check this of
    /// every published tree). Outside them the result is out of the slots' bounds (or wraps to
    /// `usize::MAX`), never a wrong slot in range of a well-formed node.
    #[inline(always)]
    pub(super) fn path_slot(&self, key: usize) -> usize {
        self.count_up_to(key).wrapping_sub(1)
    }

    /// Smallest key under this node (`usize::MAX` when empty).
    pub(super) fn min_key(&self) -> usize {
        self.keys[0]
    }

    /// Starts loading the four slot lines while the keys are compared, so the child or value
    /// pointer is there when the rank is known: one memory round trip per node instead of two.
    /// (Fetching only the first and last slot lines, as this once did, left half the lookups a
    /// second round trip: spread over 10^5 ranges, 69–70 ns against 63–66 ns for all four.)
    #[inline(always)]
    pub(super) fn prefetch_slots(&self) {
        for first in [0, 8, 16, CAP - 1] {
            prefetch(self.slots[first..].as_ptr().cast());
        }
    }

    /// Loom: records a read of the node's contents (no-op otherwise).
    #[inline]
    pub(super) fn read_check(&self) {
        #[cfg(loom)]
        self.check.with(|_| ());
    }

    /// Loom: records a write of the node's contents (no-op otherwise).
    #[inline]
    pub(super) fn write_check(&self) {
        #[cfg(loom)]
        self.check.with_mut(|_| ());
    }

    /// Inserts `(key, slot)` at position `i <= len`; the node is fresh and not full.
    pub(super) fn insert(&mut self, i: usize, key: usize, slot: *mut ()) {
        let len = self.len();
        debug_assert!(self.fresh && len < CAP && i <= len);
        self.write_check();
        self.keys.copy_within(i..len, i + 1);
        self.slots.copy_within(i..len, i + 1);
        self.keys[i] = key;
        self.slots[i] = slot;
        self.len += 1;
    }

    /// Overwrites the entry at `i < len`; the node is fresh.
    pub(super) fn set(&mut self, i: usize, key: usize, slot: *mut ()) {
        debug_assert!(self.fresh && i < self.len());
        self.write_check();
        self.keys[i] = key;
        self.slots[i] = slot;
    }

    /// Removes and returns the entry at `i < len`; the node is fresh.
    pub(super) fn remove(&mut self, i: usize) -> (usize, *mut ()) {
        let len = self.len();
        debug_assert!(self.fresh && i < len);
        self.write_check();
        let out = (self.keys[i], self.slots[i]);
        self.keys.copy_within(i + 1..len, i);
        self.slots.copy_within(i + 1..len, i);
        self.keys[len - 1] = usize::MAX;
        self.slots[len - 1] = ptr::null_mut();
        self.len -= 1;
        out
    }

    /// Moves the entries from `at` on into `right`, an empty fresh node of the same level.
    pub(super) fn split_off(&mut self, at: usize, right: &mut Node) {
        let len = self.len();
        debug_assert!(self.fresh && right.fresh && at <= len && right.len == 0);
        self.write_check();
        right.write_check();
        let n = len - at;
        right.keys[..n].copy_from_slice(&self.keys[at..len]);
        right.slots[..n].copy_from_slice(&self.slots[at..len]);
        right.len = n as u8;
        self.keys[at..len].fill(usize::MAX);
        self.slots[at..len].fill(ptr::null_mut());
        self.len = at as u8;
    }

    /// Appends every entry of `other` (same level, all keys above ours); the node is fresh.
    pub(super) fn append(&mut self, other: &Node) {
        let (len, n) = (self.len(), other.len());
        debug_assert!(self.fresh && len + n <= CAP && self.level == other.level);
        other.read_check();
        self.write_check();
        self.keys[len..len + n].copy_from_slice(&other.keys[..n]);
        self.slots[len..len + n].copy_from_slice(&other.slots[..n]);
        self.len += n as u8;
    }

    /// Moves entries between two fresh neighbours (`self` left of `right`) so that the left one
    /// holds `total / 2` of them and the right one the rest.
    pub(super) fn rebalance_with(&mut self, right: &mut Node) {
        let (l, r) = (self.len(), right.len());
        let want = (l + r) / 2;
        debug_assert!(self.fresh && right.fresh && l + r <= 2 * CAP);
        self.write_check();
        right.write_check();
        if l > want {
            // Move our tail to the front of `right`.
            let n = l - want;
            right.keys.copy_within(0..r, n);
            right.slots.copy_within(0..r, n);
            right.keys[..n].copy_from_slice(&self.keys[want..l]);
            right.slots[..n].copy_from_slice(&self.slots[want..l]);
            self.keys[want..l].fill(usize::MAX);
            self.slots[want..l].fill(ptr::null_mut());
        } else {
            // Move the head of `right` to our tail.
            let n = want - l;
            self.keys[l..want].copy_from_slice(&right.keys[..n]);
            self.slots[l..want].copy_from_slice(&right.slots[..n]);
            right.keys.copy_within(n..r, 0);
            right.slots.copy_within(n..r, 0);
            right.keys[r - n..r].fill(usize::MAX);
            right.slots[r - n..r].fill(ptr::null_mut());
        }
        right.len = (l + r - want) as u8;
        self.len = want as u8;
    }
}

/// Most spare nodes a [`NodePool`] keeps (32 KiB).
const SPARE_MAX: usize = if cfg!(loom) { 0 } else { 64 };

/// Nodes for the writer: spare ones (freed by earlier updates, no reader can reach them) are
/// reused before the allocator is asked, so steady-state updates do not allocate nodes.
pub(super) struct NodePool {
    spare: Vec<*mut Node>,
}

impl NodePool {
    pub(super) const fn new() -> Self {
        NodePool { spare: Vec::new() }
    }

    fn place(&mut self, node: Node) -> *mut Node {
        match self.spare.pop() {
            Some(p) => {
                // SAFETY: a spare node is allocated, unreachable by readers and owned by the
                // pool; `Node` has no destructor to skip.
                unsafe { p.write(node) };
                p
            }
            None => Box::into_raw(Box::new(node)),
        }
    }

    /// An empty fresh node.
    pub(super) fn empty(&mut self, level: u8) -> *mut Node {
        self.place(Node::empty(level))
    }

    /// A fresh copy of `node`.
    pub(super) fn copy(&mut self, node: &Node) -> *mut Node {
        self.place(node.copy())
    }

    /// Takes back a node no reader can reach any more (never published, or retired and its
    /// grace period over).
    ///
    /// # Safety
    /// As for [`free_node`]: `node` came from this pool or `Box::into_raw`, is given back once,
    /// and no reader can reach it.
    pub(super) unsafe fn give(&mut self, node: *mut Node) {
        if self.spare.len() < SPARE_MAX {
            self.spare.push(node);
        } else {
            // SAFETY: the caller's contract.
            unsafe { free_node(node) };
        }
    }

    /// Bytes of spare nodes.
    pub(super) fn bytes(&self) -> usize {
        self.spare.len() * core::mem::size_of::<Node>()
    }

    /// Frees every spare node.
    pub(super) fn clear(&mut self) {
        for node in self.spare.drain(..) {
            // SAFETY: spare nodes are the pool's alone.
            unsafe { free_node(node) };
        }
    }
}

/// Frees a node's memory (never its children or values, which other nodes may own now).
///
/// # Safety
/// `node` came from `Box::into_raw`, is freed once, and no reader can reach it any more.
pub(super) unsafe fn free_node(node: *mut Node) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(node) };
    // Under loom the memory is poisoned, not released: a reader the protocol failed to wait for
    // is then reported as racing with this write instead of reading freed memory.
    #[cfg(loom)]
    {
        node.write_check();
        core::mem::forget(node);
    }
    #[cfg(not(loom))]
    drop(node);
}

/// Hints the CPU to load the cache line holding `p` (a no-op elsewhere). Never faults, whatever
/// `p` is: a prefetch is not an access.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: `prefetcht0` reads nothing architecturally and cannot fault, on any address; it
    // touches no register but its operand and no flag, and no stack.
    unsafe {
        core::arch::asm!("prefetcht0 [{}]", in(reg) p, options(nostack, preserves_flags, readonly));
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = p;
}
