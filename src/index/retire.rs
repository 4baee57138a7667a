//! Memory readers may still hold: nodes and values unlinked by a published update, freed once
//! the grace period of their update is over.
//!
//! Every update that unlinks something takes one [`GraceTicket`] right after publishing its new
//! root (so after the unlink) and queues what it unlinked under it. Tickets only grow, so each
//! queue is in ticket order and reclaiming pops from the front until it meets a ticket whose
//! grace period is still running. Nothing here waits.

use alloc::collections::VecDeque;

use super::node::{Node, NodePool};
use super::{IndexValue, UpdateStep};
use crate::sync::grace::{GraceDomain, GraceTicket};

/// Entries of queue (and update scratch list) capacity kept once it is empty. A large teardown (a module of 10^4
/// functions removed in one update) queues an entry per node and value it unlinked; without a
/// shrink that capacity (hundreds of KiB per queue) would stay allocated for good.
pub(super) const KEEP_CAPACITY: usize = 256;

/// Unlinked nodes and values, oldest first. Owned by the writer (behind the writer lock).
pub(super) struct RetireQueue<V> {
    nodes: VecDeque<(GraceTicket, *mut Node)>,
    values: VecDeque<(GraceTicket, V, usize)>,
    /// Bytes queued (nodes plus the values' own heap bytes).
    pub(super) bytes: usize,
}

impl<V: IndexValue> RetireQueue<V> {
    pub(super) const fn new() -> Self {
        RetireQueue {
            nodes: VecDeque::new(),
            values: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Queues a node some reader may still be visiting.
    pub(super) fn node(&mut self, ticket: GraceTicket, node: *mut Node) {
        self.bytes += core::mem::size_of::<Node>();
        self.nodes.push_back((ticket, node));
    }

    /// Queues a removed value some reader may still be looking at (`bytes`: its heap bytes).
    pub(super) fn value(&mut self, ticket: GraceTicket, value: V, bytes: usize) {
        self.bytes += bytes;
        self.values.push_back((ticket, value, bytes));
    }

    /// Number of queued nodes and values.
    pub(super) fn len(&self) -> usize {
        self.nodes.len() + self.values.len()
    }

    /// Frees everything whose grace period is over (nodes go back to `pool`); `hook` runs after
    /// each free.
    pub(super) fn reclaim(
        &mut self,
        grace: &GraceDomain,
        hook: Option<fn(UpdateStep)>,
        pool: &mut NodePool,
    ) {
        // Tickets are monotone: once one is over, every earlier one is.
        let mut over: Option<GraceTicket> = None;
        let mut is_over = |t: GraceTicket| {
            if over.is_some_and(|o| t <= o) {
                return true;
            }
            let done = grace.is_over(t);
            if done {
                over = Some(t);
            }
            done
        };
        while let Some(&(t, node)) = self.nodes.front() {
            if !is_over(t) {
                break;
            }
            self.nodes.pop_front();
            self.bytes -= core::mem::size_of::<Node>();
            // SAFETY: `node` was unlinked by an update published before `t` was taken, and the
            // grace period of `t` is over, so no reader holds it; the writer queued it once.
            unsafe { pool.give(node) };
            if let Some(h) = hook {
                h(UpdateStep::Free);
            }
        }
        while let Some((t, _, _)) = self.values.front() {
            if !is_over(*t) {
                break;
            }
            if let Some((_, value, bytes)) = self.values.pop_front() {
                self.bytes -= bytes;
                drop(value);
            }
            if let Some(h) = hook {
                h(UpdateStep::Free);
            }
        }
        if self.nodes.is_empty() {
            self.nodes.shrink_to(KEEP_CAPACITY);
        }
        if self.values.is_empty() {
            self.values.shrink_to(KEEP_CAPACITY);
        }
    }

    /// Entries the queues can hold without allocating.
    #[cfg(all(test, not(loom)))]
    pub(super) fn capacity(&self) -> usize {
        self.nodes.capacity() + self.values.capacity()
    }

    /// Frees everything now. Only with `&mut` access to the index: no reader exists.
    pub(super) fn clear(&mut self, pool: &mut NodePool) {
        for (_, node) in self.nodes.drain(..) {
            // SAFETY: no reader exists (caller) and each node was queued once.
            unsafe { pool.give(node) };
        }
        self.values.clear();
        self.bytes = 0;
    }
}
