//! Removal by path copying: the node that loses the entry is copied, and a node left less than
//! half full is merged with or evened out against a neighbour (both copied), so the tree keeps
//! its height bound; an emptied root goes, an inner root with one child gives way to it.

use core::ptr::{self, NonNull};

use super::node::{Node, CAP, MIN};
use super::update::{fresh, min_key};
use super::{IndexValue, UpdateStep, Writer};

impl<V: IndexValue> Writer<V> {
    /// Removes `key`, which is present; its value is retired at publication.
    pub(super) fn remove(&mut self, key: usize) {
        self.dirty = true;
        let (mut root, value) = self.remove_from(self.draft, key);
        self.len -= 1;
        if let Some(value) = value {
            // SAFETY: the value was the tree's; it left the tree, so it is ours now.
            let bytes = V::heap_bytes(unsafe { V::view(value) });
            self.value_bytes -= bytes;
            // SAFETY: as above, turned back once.
            self.removed.push((unsafe { V::from_raw(value) }, bytes));
        }
        // Shrink the root: an empty root goes, an inner root with one child gives way to it.
        while !root.is_null() {
            // SAFETY: a draft node.
            let (len, level, first) = unsafe { ((*root).len(), (*root).level, (*root).slots[0]) };
            if len == 0 {
                self.unlink(root);
                root = ptr::null_mut();
            } else if level > 0 && len == 1 {
                self.unlink(root);
                root = first.cast();
            } else {
                break;
            }
        }
        self.draft = root;
    }

    fn remove_from(&mut self, node: *mut Node, key: usize) -> (*mut Node, Option<NonNull<()>>) {
        let p = self.own(node);
        let n = fresh(p);
        let r = n.rank(key);
        let i = r.saturating_sub(1);
        if n.level == 0 {
            debug_assert!(r > 0 && n.keys[i] == key);
            let (_, v) = n.remove(i);
            self.step(UpdateStep::Modify);
            return (p, NonNull::new(v));
        }
        let (child, value) = self.remove_from(n.slots[i].cast(), key);
        let n = fresh(p);
        n.set(i, min_key(child), child.cast());
        // SAFETY: a draft node.
        let child_len = unsafe { (*child).len() };
        if child_len == 0 {
            n.remove(i);
            self.unlink(child);
        } else if child_len < MIN && n.len() > 1 {
            self.rebalance(p, i);
        }
        self.step(UpdateStep::Modify);
        (p, value)
    }

    /// Child `i` of the owned node `p` is underfull: merge it with a neighbour, or even out.
    fn rebalance(&mut self, p: *mut Node, i: usize) {
        let li = i.saturating_sub(1);
        let ri = li + 1;
        let n = fresh(p);
        let (l, r) = (n.slots[li].cast::<Node>(), n.slots[ri].cast::<Node>());
        // SAFETY: draft nodes.
        let (ll, rl) = unsafe { ((*l).len(), (*r).len()) };
        let l = self.own(l);
        if ll + rl <= CAP {
            // SAFETY: `r` is a draft node, read only.
            fresh(l).append(unsafe { &*r });
            let n = fresh(p);
            n.set(li, min_key(l), l.cast());
            n.remove(ri);
            self.unlink(r);
        } else {
            let r = self.own(r);
            fresh(l).rebalance_with(fresh(r));
            let n = fresh(p);
            n.set(li, min_key(l), l.cast());
            n.set(ri, min_key(r), r.cast());
        }
        self.step(UpdateStep::Modify);
    }
}
