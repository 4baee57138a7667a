//! Code spaces handed back by allocators that could not take the manager's lock.
//!
//! A [`CodeAllocator`](super::CodeAllocator) may be dropped anywhere: in an interrupt handler
//! that interrupted a holder of the manager's lock on this CPU, or with interrupts off while
//! another CPU holds it; the lock answers `Busy` there, and waiting would deadlock. Its spaces
//! must still reach the manager, or they stay reserved and committed for good. So dropping
//! pushes them here, lock-free and without allocating (the node was allocated with the
//! allocator's first space), and the manager's next operation with interrupts on (a drop with
//! interrupts on included) takes them all and releases them. A drop with interrupts off never
//! releases, even when the lock is free: releasing unmaps, flushes and frees frames, which takes
//! the kernel's allocator locks (see `CodeManager::abandon`).
//!
//! The stack is a Treiber stack whose only operations are *push* and *take all*: a push never
//! reads a node another CPU may free (it only writes its own node's `next`), and *take all*
//! swaps the head for null, so the ABA problem of a Treiber pop cannot arise.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

use crate::sync::atomic::{AtomicPtr, Ordering};
use crate::AddressRange;

/// One dropped allocator's spaces, owned by the stack once pushed.
#[derive(Debug)]
pub(crate) struct AbandonedNode {
    pub(crate) spaces: Vec<AddressRange>,
    next: *mut AbandonedNode,
}

impl Default for AbandonedNode {
    fn default() -> Self {
        AbandonedNode {
            spaces: Vec::new(),
            next: ptr::null_mut(),
        }
    }
}

/// The lock-free stack of [`AbandonedNode`]s of one manager.
#[derive(Debug)]
pub(crate) struct Abandoned {
    head: AtomicPtr<AbandonedNode>,
}

// SAFETY: `next` is only written by the pushing CPU before the node is published and only read
// by the CPU that took the whole list; a node is plain data owned by one holder at a time.
unsafe impl Send for AbandonedNode {}

impl Abandoned {
    pub(crate) fn new() -> Self {
        Abandoned {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Hands `node` to the stack: any CPU, any context, never blocks or allocates.
    pub(crate) fn push(&self, node: Box<AbandonedNode>) {
        let node = Box::into_raw(node);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` came from `Box::into_raw` above and is not shared until the CAS
            // below publishes it; only its `next` is written.
            unsafe { (*node).next = head };
            // Release: the node's contents (its spaces, its `next`) are visible to the CPU that
            // takes it with the Acquire swap of `take_all`.
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Takes every node pushed so far and appends their spaces to `out`.
    pub(crate) fn take_all(&self, out: &mut Vec<AddressRange>) {
        // Acquire pairs with the Release of `push`: every node reachable from the old head was
        // fully written before it was published.
        let mut at = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        while !at.is_null() {
            // SAFETY: the swap made this CPU the only owner of the whole list; each node came
            // from `Box::into_raw` in `push` and is freed exactly once, here.
            let node = unsafe { Box::from_raw(at) };
            out.extend_from_slice(&node.spaces);
            at = node.next;
        }
    }

    /// Whether nothing waits on the stack.
    pub(crate) fn is_empty(&self) -> bool {
        self.head.load(Ordering::Acquire).is_null()
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        // The manager is going away with its page tables: only the nodes' memory is left to
        // free.
        let mut spaces = Vec::new();
        self.take_all(&mut spaces);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn pushed_nodes_are_all_taken_once() {
        let stack = Abandoned::new();
        assert!(stack.is_empty());
        for i in 0..3 {
            let mut node = Box::new(AbandonedNode::default());
            node.spaces
                .push(AddressRange::new(i * 0x1000, (i + 1) * 0x1000));
            stack.push(node);
        }
        let mut out = Vec::new();
        stack.take_all(&mut out);
        out.sort();
        assert_eq!(out.len(), 3);
        assert_eq!(out[2], AddressRange::new(0x2000, 0x3000));
        assert!(stack.is_empty());
        stack.take_all(&mut out);
        assert_eq!(out.len(), 3);
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;

    fn node(start: usize) -> Box<AbandonedNode> {
        let mut node = Box::new(AbandonedNode::default());
        node.spaces.push(AddressRange::new(start, start + 0x1000));
        node
    }

    /// Two allocators dropped on two CPUs while the manager takes what is queued: every space
    /// is taken exactly once, whatever the interleaving (and loom reports a leaked node).
    #[test]
    fn loom_abandoned_spaces_are_taken_exactly_once() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(|| {
            let stack = Arc::new(Abandoned::new());
            let pushers: Vec<_> = [0x1000, 0x2000]
                .into_iter()
                .map(|start| {
                    let stack = Arc::clone(&stack);
                    loom::thread::spawn(move || stack.push(node(start)))
                })
                .collect();
            let mut taken = Vec::new();
            stack.take_all(&mut taken);
            for p in pushers {
                p.join().unwrap();
            }
            stack.take_all(&mut taken);
            taken.sort();
            assert_eq!(
                taken,
                [
                    AddressRange::new(0x1000, 0x2000),
                    AddressRange::new(0x2000, 0x3000)
                ]
            );
            assert!(stack.is_empty());
        });
    }
}
