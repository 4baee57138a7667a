//! Nodes of the range index: one layout for leaves and inner nodes, four cache lines each.
//!
//! ```text
//! bytes   0..128  keys[16]   sorted; unused slots and keys[15] hold usize::MAX
//! bytes 128..136  len, level, fresh
//! bytes 136..256  slots[15]  leaf: values (IndexValue::into_raw); inner: children
//! ```
//! A lookup reads the two key lines of each node it visits and one slot line: it counts the keys
//! `<= pc` over all 16 slots with no branch on the data (the `usize::MAX` padding never counts,
//! except for `pc == usize::MAX`, which the clamp to `len` handles). In an inner node `keys[i]`
//! is the smallest key under `slots[i]`, so the same count picks the child.
//!
//! Published nodes are immutable: the writer changes only *fresh* nodes, ones it allocated in the
//! current update and that no reader can reach yet (see the module docs of `index`).

use alloc::boxed::Box;
use core::ptr;

/// Most entries of a leaf, children of an inner node.
pub(super) const CAP: usize = 15;
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
const _: () = assert!(core::mem::size_of::<Node>() == 256);

impl Node {
    /// An empty fresh node.
    pub(super) fn new(level: u8) -> Box<Node> {
        Box::new(Node {
            keys: [usize::MAX; CAP + 1],
            len: 0,
            level,
            fresh: true,
            slots: [ptr::null_mut(); CAP],
            #[cfg(loom)]
            check: loom::cell::UnsafeCell::new(()),
        })
    }

    /// A fresh copy of a node (the slots are shared, not copied).
    pub(super) fn copy(&self) -> Box<Node> {
        self.read_check();
        Box::new(Node {
            keys: self.keys,
            len: self.len,
            level: self.level,
            fresh: true,
            slots: self.slots,
            #[cfg(loom)]
            check: loom::cell::UnsafeCell::new(()),
        })
    }

    /// Number of entries or children.
    pub(super) fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Number of keys `<= key`: the slot after the last entry not above `key`. Branch-free over
    /// the 16 key slots, clamped to `len`. Panic-free.
    #[inline]
    pub(super) fn rank(&self, key: usize) -> usize {
        let mut r = 0;
        for &k in &self.keys {
            r += usize::from(k <= key);
        }
        r.min(self.len())
    }

    /// Smallest key under this node (`usize::MAX` when empty).
    pub(super) fn min_key(&self) -> usize {
        self.keys[0]
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

    /// Moves the entries from `at` on into a new fresh node of the same level.
    pub(super) fn split_off(&mut self, at: usize) -> Box<Node> {
        let len = self.len();
        debug_assert!(self.fresh && at <= len);
        self.write_check();
        let mut right = Node::new(self.level);
        let n = len - at;
        right.keys[..n].copy_from_slice(&self.keys[at..len]);
        right.slots[..n].copy_from_slice(&self.slots[at..len]);
        right.len = n as u8;
        self.keys[at..len].fill(usize::MAX);
        self.slots[at..len].fill(ptr::null_mut());
        self.len = at as u8;
        right
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
