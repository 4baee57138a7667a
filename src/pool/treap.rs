//! The pool's tree: a treap keyed by range start, each node caching the largest free size in
//! its subtree, so searches walk one root-to-leaf path and updates stay O(log n) expected.

use super::{DisjointAllocationPool, Node, NIL};
use crate::range::AddressRange;

impl DisjointAllocationPool {
    // ---- Read-only searches (iterative; each walks one root-to-leaf path) ----

    /// The node with the greatest start `< key`, or `NIL`.
    pub(super) fn last_starting_before(&self, key: usize) -> u32 {
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
    pub(super) fn first_starting_at_or_after(&self, key: usize) -> u32 {
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
    pub(super) fn first_fit(&self, mut t: u32, size: usize) -> u32 {
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
    pub(super) fn first_fit_starting_at_or_after(&self, lo: usize, size: usize) -> u32 {
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

    pub(super) fn node(&self, t: u32) -> &Node {
        &self.nodes[t as usize]
    }

    pub(super) fn node_mut(&mut self, t: u32) -> &mut Node {
        &mut self.nodes[t as usize]
    }

    pub(super) fn max_of(&self, t: u32) -> usize {
        if t == NIL {
            0
        } else {
            self.node(t).max
        }
    }

    /// Recomputes `t`'s subtree maximum from its own range and its children.
    pub(super) fn update(&mut self, t: u32) {
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
    pub(super) fn next_prio(&mut self) -> u32 {
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
    pub(super) fn alloc_node(&mut self, range: AddressRange) -> u32 {
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
    pub(super) fn free_node(&mut self, t: u32) {
        let head = self.free_slot;
        let n = self.node_mut(t);
        n.left = head;
        n.right = NIL;
        self.free_slot = t;
    }

    /// Splits subtree `t` into (starts `< key`, starts `>= key`).
    pub(super) fn split(&mut self, t: u32, key: usize) -> (u32, u32) {
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
    pub(super) fn join(&mut self, a: u32, b: u32) -> u32 {
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
    pub(super) fn insert(&mut self, t: u32, n: u32) -> u32 {
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
    pub(super) fn remove(&mut self, t: u32, key: usize) -> u32 {
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
    pub(super) fn replace(&mut self, t: u32, key: usize, range: AddressRange) {
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
