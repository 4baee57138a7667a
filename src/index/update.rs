//! Searching the tree, inserting by path copying and publishing (writer side; removal is in
//! `remove`, batches in `bulk`).
//!
//! An update works on the *draft*: the published tree plus the fresh nodes built so far. Before
//! changing a node the writer *owns* it: a fresh node is changed in place; a published one is
//! copied (the copy is fresh) and the original remembered as replaced, to be retired once the
//! update is published. A node leaving the draft is freed at once when fresh (no reader ever saw
//! it) and retired otherwise. Separators stay exact: `keys[i]` of an inner node is always the
//! smallest key under child `i`, which the search relies on.

use core::ptr::{self, NonNull};

use super::node::free_node;
use super::node::{Node, CAP};
use super::retire::KEEP_CAPACITY;
use super::{IndexValue, UpdateStep, Writer};
use crate::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use crate::sync::grace::GraceDomain;

/// The entry of greatest key `<= key` under `node`: its key and value pointer.
///
/// # Safety
/// `node` is null or the root of a tree whose nodes stay allocated and unchanged for the call.
#[inline(always)]
pub(super) unsafe fn find(root: *const Node, key: usize) -> Option<(usize, NonNull<()>)> {
    // SAFETY: the caller's contract.
    let mut n = unsafe { root.as_ref() }?;
    // `path_slot` needs `keys[0] <= key < usize::MAX` on the path. No entry has the key
    // `usize::MAX` (entries are starts of non-empty ranges, see `RangeIndex::insert`), so the
    // greatest key `<= usize::MAX - 1` is the answer for `usize::MAX` too; and a key below the
    // root's first key (the smallest of all) has no entry.
    let key = key.min(usize::MAX - 1);
    if key < n.min_key() {
        return None;
    }
    loop {
        n.read_check();
        n.prefetch_slots();
        let i = n.path_slot(key);
        if n.level == 0 {
            return Some((*n.keys.get(i)?, NonNull::new(*n.slots.get(i)?)?));
        }
        // SAFETY: the caller's contract (children of a published node are published nodes).
        n = unsafe { n.slots.get(i)?.cast::<Node>().as_ref() }?;
    }
}

/// An entry as `(key, value pointer)`.
pub(super) type Entry = (usize, NonNull<()>);

/// The entries of greatest key `<= key` and of smallest key `> key`.
///
/// # Safety
/// As for [`find`].
pub(super) unsafe fn neighbours(root: *const Node, key: usize) -> (Option<Entry>, Option<Entry>) {
    // SAFETY: the caller's contract.
    let before = unsafe { find(root, key) };
    // Descend towards `key`, remembering the subtree just right of the path.
    let mut right: *const Node = ptr::null();
    let mut node = root;
    // SAFETY (all derefs below): the caller's contract.
    while let Some(n) = unsafe { node.as_ref() } {
        let r = n.rank(key);
        if n.level == 0 {
            if r < n.len() {
                return (before, NonNull::new(n.slots[r]).map(|v| (n.keys[r], v)));
            }
            break;
        }
        let ci = r.saturating_sub(1);
        if ci + 1 < n.len() {
            right = n.slots[ci + 1].cast();
        }
        node = n.slots[ci].cast();
    }
    // The successor is the smallest entry of `right`.
    // SAFETY: `right` is null or a node of the tree (the caller's contract).
    while let Some(n) = unsafe { right.as_ref() } {
        if n.level == 0 {
            return (before, NonNull::new(n.slots[0]).map(|v| (n.keys[0], v)));
        }
        right = n.slots[0].cast();
    }
    (before, None)
}

/// Calls `f` on every entry under `node`, in key order.
///
/// # Safety
/// As for [`find`].
pub(super) unsafe fn for_each(node: *const Node, f: &mut dyn FnMut(usize, NonNull<()>)) {
    // SAFETY: the caller's contract.
    let Some(n) = (unsafe { node.as_ref() }) else {
        return;
    };
    for i in 0..n.len() {
        if n.level == 0 {
            if let Some(v) = NonNull::new(n.slots[i]) {
                f(n.keys[i], v);
            }
        } else {
            // SAFETY: a child of a tree node, same contract.
            unsafe { for_each(n.slots[i].cast(), f) };
        }
    }
}

/// Frees a whole tree and drops its values.
///
/// # Safety
/// No reader can reach the tree, and nothing else owns its nodes or values.
pub(super) unsafe fn free_tree<V: IndexValue>(node: *mut Node) {
    // SAFETY: the caller's contract.
    let Some(n) = (unsafe { node.as_ref() }) else {
        return;
    };
    for &slot in &n.slots[..n.len()] {
        if n.level == 0 {
            if let Some(v) = NonNull::new(slot) {
                // SAFETY: leaves own their values, each once.
                drop(unsafe { V::from_raw(v) });
            }
        } else {
            // SAFETY: inner nodes own their children, each once.
            unsafe { free_tree::<V>(slot.cast()) };
        }
    }
    // SAFETY: owned, unreachable.
    unsafe { free_node(node) };
}

/// Marks every fresh node of the draft published; fresh nodes are reachable only through fresh
/// parents, so the walk visits exactly them.
///
/// # Safety
/// `node` is null or a node of the draft tree, which the caller (the writer) owns.
unsafe fn clear_fresh(node: *mut Node) {
    // SAFETY: the caller's contract; fresh nodes are the writer's alone.
    let Some(n) = (unsafe { node.as_mut() }) else {
        return;
    };
    if !n.fresh {
        return;
    }
    n.fresh = false;
    if n.level > 0 {
        for &child in &n.slots[..n.len()] {
            // SAFETY: a child of a draft node is a draft node.
            unsafe { clear_fresh(child.cast()) };
        }
    }
}

/// `node` after a change: it must be fresh.
pub(super) fn fresh<'a>(node: *mut Node) -> &'a mut Node {
    // SAFETY: only called on nodes `own` or `alloc` returned during the running update: fresh,
    // allocated, unreachable by readers and referenced by no other live borrow.
    let n = unsafe { &mut *node };
    debug_assert!(n.fresh);
    n
}

/// Smallest key under a draft node.
pub(super) fn min_key(node: *mut Node) -> usize {
    // SAFETY: a draft node, allocated while the writer lock is held.
    unsafe { (*node).min_key() }
}

impl<V: IndexValue> Writer<V> {
    pub(super) fn step(&self, step: UpdateStep) {
        if let Some(hook) = self.hook {
            hook(step);
        }
    }

    /// Adds a new, empty fresh node to the draft.
    pub(super) fn alloc(&mut self, level: u8) -> *mut Node {
        self.nodes += 1;
        let p = self.pool.empty(level);
        self.step(UpdateStep::Allocate);
        p
    }

    /// `node`, writable: itself when fresh, else a fresh copy (the original is retired at
    /// publication).
    pub(super) fn own(&mut self, node: *mut Node) -> *mut Node {
        // SAFETY: a draft node (published ones are immutable and stay allocated while they are
        // in the draft; fresh ones are ours).
        let n = unsafe { &*node };
        if n.fresh {
            return node;
        }
        let copy = self.pool.copy(n);
        self.replaced.push(node);
        self.step(UpdateStep::Allocate);
        copy
    }

    /// Takes `node` out of the draft: freed now when fresh, retired when published.
    pub(super) fn unlink(&mut self, node: *mut Node) {
        self.nodes -= 1;
        // SAFETY: a draft node.
        if unsafe { (*node).fresh } {
            // SAFETY: fresh, so never published: no reader can reach it, and it left the draft.
            unsafe { self.pool.give(node) };
        } else {
            self.replaced.push(node);
        }
    }

    /// Inserts `(key, value)`; `key` is absent.
    pub(super) fn insert(&mut self, key: usize, value: NonNull<()>) {
        self.dirty = true;
        self.len += 1;
        // SAFETY: the value is ours and alive.
        self.value_bytes += V::heap_bytes(unsafe { V::view(value) });
        if self.draft.is_null() {
            let leaf = self.alloc(0);
            fresh(leaf).insert(0, key, value.as_ptr());
            self.step(UpdateStep::Modify);
            self.draft = leaf;
            return;
        }
        let (node, split) = self.insert_into(self.draft, key, value.as_ptr(), true);
        self.draft = match split {
            None => node,
            Some(right) => {
                // SAFETY: a draft node.
                let level = unsafe { (*node).level } + 1;
                let root = self.alloc(level);
                let r = fresh(root);
                r.insert(0, min_key(node), node.cast());
                r.insert(1, min_key(right), right.cast());
                self.step(UpdateStep::Modify);
                root
            }
        };
    }

    /// Inserts into the subtree at `node`; returns its owned root and a right sibling split off
    /// it. `rightmost`: the subtree is the last one at its level.
    fn insert_into(
        &mut self,
        node: *mut Node,
        key: usize,
        slot: *mut (),
        rightmost: bool,
    ) -> (*mut Node, Option<*mut Node>) {
        let p = self.own(node);
        let n = fresh(p);
        let r = n.rank(key);
        if n.level == 0 {
            return self.insert_slot(p, r, key, slot, rightmost);
        }
        let mut ci = r.saturating_sub(1);
        if self.make_room(p, ci) {
            ci = fresh(p).rank(key).saturating_sub(1);
        }
        let n = fresh(p);
        let last = ci + 1 == n.len();
        let (child, split) = self.insert_into(n.slots[ci].cast(), key, slot, rightmost && last);
        fresh(p).set(ci, min_key(child), child.cast());
        self.step(UpdateStep::Modify);
        match split {
            None => (p, None),
            Some(s) => self.insert_slot(p, ci + 1, min_key(s), s.cast(), rightmost),
        }
    }

    /// When child `ci` of the owned node `p` is full and a neighbour has room, evens the two out
    /// (as a B*-tree does) so the insertion needs no split: nodes stay fuller than the half a
    /// split leaves, so the tree is smaller and lookups touch fewer nodes. Returns whether it did.
    fn make_room(&mut self, p: *mut Node, ci: usize) -> bool {
        let n = fresh(p);
        // SAFETY: children of a draft node are draft nodes.
        let len_at = |i: usize| unsafe { (*n.slots[i].cast::<Node>()).len() };
        if len_at(ci) < CAP {
            return false;
        }
        let li = if ci + 1 < n.len() && len_at(ci + 1) + 2 <= CAP {
            ci
        } else if ci > 0 && len_at(ci - 1) + 2 <= CAP {
            ci - 1
        } else {
            return false;
        };
        let l = self.own(n.slots[li].cast());
        let r = self.own(fresh(p).slots[li + 1].cast());
        fresh(l).rebalance_with(fresh(r));
        let n = fresh(p);
        n.set(li, min_key(l), l.cast());
        n.set(li + 1, min_key(r), r.cast());
        self.step(UpdateStep::Modify);
        true
    }

    /// Inserts at position `i` of the owned node `p`, splitting it first when full.
    fn insert_slot(
        &mut self,
        p: *mut Node,
        i: usize,
        key: usize,
        slot: *mut (),
        rightmost: bool,
    ) -> (*mut Node, Option<*mut Node>) {
        if fresh(p).len() < CAP {
            fresh(p).insert(i, key, slot);
            self.step(UpdateStep::Modify);
            return (p, None);
        }
        // Appending past the last node of a level keeps it full and starts the next one, so
        // ascending insertions (a module's code, allocated upwards) fill nodes completely;
        // elsewhere split in the middle.
        let at = if rightmost && i == CAP {
            CAP
        } else {
            CAP.div_ceil(2)
        };
        // SAFETY: a draft node.
        let level = unsafe { (*p).level };
        let right = self.alloc(level);
        fresh(p).split_off(at, fresh(right));
        if i < at {
            fresh(p).insert(i, key, slot);
        } else {
            fresh(right).insert(i - at, key, slot);
        }
        self.step(UpdateStep::Modify);
        (p, Some(right))
    }

    /// Publishes the draft (if changed), retires what it replaced, reclaims what is due.
    pub(super) fn commit(
        &mut self,
        root: &AtomicPtr<Node>,
        len: &AtomicUsize,
        grace: &GraceDomain,
    ) {
        if self.dirty {
            self.dirty = false;
            // SAFETY: the draft is ours (writer lock).
            unsafe { clear_fresh(self.draft) };
            // Release: every write to the new nodes (above and during the update) happens-before
            // the walk of any reader whose Acquire load returns this root.
            root.store(self.draft, Ordering::Release);
            self.step(UpdateStep::Publish);
            len.store(self.len, Ordering::Relaxed);
            if !self.replaced.is_empty() || !self.removed.is_empty() {
                // After the store: the ticket's grace period covers every reader that could
                // still have loaded the old root.
                let ticket = grace.defer();
                let mut replaced = core::mem::take(&mut self.replaced);
                for node in replaced.drain(..) {
                    self.retired.node(ticket, node);
                    self.step(UpdateStep::Retire);
                }
                replaced.shrink_to(KEEP_CAPACITY);
                self.replaced = replaced;
                let mut removed = core::mem::take(&mut self.removed);
                for (value, bytes) in removed.drain(..) {
                    self.retired.value(ticket, value, bytes);
                    self.step(UpdateStep::Retire);
                }
                // The scratch lists are reused by the next update; a large one (a module
                // teardown) keeps no more than a small one would.
                removed.shrink_to(KEEP_CAPACITY);
                self.removed = removed;
            }
        }
        self.retired.reclaim(grace, self.hook, &mut self.pool);
    }
}
