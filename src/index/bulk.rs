//! Batch insertion: one entry at a time by path copying when the batch is small against the
//! tree, else a bottom-up rebuild of a whole new tree from the merged, sorted entries.
//!
//! The rebuild is O(n + k) for k entries into a tree of n, with every node filled evenly
//! (between `MIN` and `CAP` entries, so lookups touch as few nodes as possible); the old tree's
//! nodes are retired as a whole and readers keep walking them until the new root is published,
//! exactly as for any other update.

use alloc::vec::Vec;
use core::ptr::NonNull;

use super::node::{Node, CAP};
use super::update::{for_each, neighbours};
use super::{IndexValue, UpdateStep, Writer};
use crate::range::AddressRange;

/// Below this batch size relative to the tree (k * REBUILD_RATIO < n) entries are inserted one
/// by one: O(k log n) beats the O(n) rebuild.
const REBUILD_RATIO: usize = 8;

impl<V: IndexValue> Writer<V> {
    /// The range of the entry `(key, value)`.
    fn range_of(key: usize, value: NonNull<()>) -> AddressRange {
        // SAFETY: a value of the draft or of the batch: ours, alive.
        AddressRange::new(key, V::end(unsafe { V::view(value) }, key))
    }

    /// Inserts `batch` (sorted by key) unless some range overlaps another (of the table or of
    /// the batch): then returns the lowest such range, drops the batch and changes nothing.
    pub(super) fn insert_batch(
        &mut self,
        batch: Vec<(usize, NonNull<()>)>,
    ) -> Result<(), AddressRange> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.len() * REBUILD_RATIO < self.len {
            if let Some(lowest) = self.lowest_overlap(&batch) {
                Self::drop_batch(batch);
                return Err(lowest);
            }
            for (key, value) in batch {
                self.insert(key, value);
            }
            return Ok(());
        }
        // Merge the table's entries with the batch, checking each neighbour pair: in ranges
        // sorted by start, two overlap only if some neighbours do, and the first such pair's
        // lower range is the lowest that overlaps another.
        let mut old = Vec::with_capacity(self.len);
        // SAFETY: the draft is ours; its values stay owned by the tree (they move to the new one).
        unsafe { for_each(self.draft, &mut |k, v| old.push((k, v))) };
        let total = old.len() + batch.len();
        let mut merged: Vec<(usize, NonNull<()>)> = Vec::with_capacity(total);
        {
            let (mut a, mut b) = (old.iter().peekable(), batch.iter().peekable());
            while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
                merged.extend(if x.0 <= y.0 { a.next() } else { b.next() });
            }
            merged.extend(a.chain(b));
        }
        let clash = merged.windows(2).find_map(|w| {
            let lower = Self::range_of(w[0].0, w[0].1);
            (lower.end() > w[1].0).then_some(lower)
        });
        if let Some(lowest) = clash {
            Self::drop_batch(batch);
            return Err(lowest);
        }
        self.dirty = true;
        for &(_, v) in &batch {
            // SAFETY: the batch's values are ours and alive.
            self.value_bytes += V::heap_bytes(unsafe { V::view(v) });
        }
        let old_root = self.draft;
        self.discard_nodes(old_root);
        let merged: Vec<(usize, *mut ())> =
            merged.into_iter().map(|(k, v)| (k, v.as_ptr())).collect();
        self.draft = self.build(&merged);
        self.len = total;
        Ok(())
    }

    /// The lowest range, of the table or of `batch` (sorted), that overlaps another; for each
    /// batch range it checks the table's ranges just before and after it and the next batch
    /// range, which finds every overlap (ranges in the table are disjoint).
    fn lowest_overlap(&self, batch: &[(usize, NonNull<()>)]) -> Option<AddressRange> {
        let mut lowest: Option<AddressRange> = None;
        let mut found = |r: AddressRange| {
            if lowest.is_none_or(|l| r.start() < l.start()) {
                lowest = Some(r);
            }
        };
        for (i, &(key, value)) in batch.iter().enumerate() {
            let r = Self::range_of(key, value);
            // SAFETY: the draft is ours (writer lock).
            let (before, after) = unsafe { neighbours(self.draft, key) };
            if let Some(b) = before.map(|(k, v)| Self::range_of(k, v)) {
                if b.end() > key {
                    found(b);
                }
            }
            let next = after
                .map(|(k, _)| k)
                .into_iter()
                .chain(batch.get(i + 1).map(|e| e.0));
            if next.into_iter().any(|start| r.end() > start) {
                found(r);
            }
        }
        lowest
    }

    /// Drops the values of a batch that was not inserted.
    fn drop_batch(batch: Vec<(usize, NonNull<()>)>) {
        for (_, v) in batch {
            // SAFETY: the batch's values were handed over by `into_raw` and never published.
            drop(unsafe { V::from_raw(v) });
        }
    }

    /// Takes every node of the subtree at `node` out of the draft (values untouched).
    fn discard_nodes(&mut self, node: *mut Node) {
        // SAFETY: a draft node or null.
        let Some(n) = (unsafe { node.as_ref() }) else {
            return;
        };
        if n.level > 0 {
            let children: Vec<*mut Node> = n.slots[..n.len()].iter().map(|s| s.cast()).collect();
            for child in children {
                self.discard_nodes(child);
            }
        }
        self.unlink(node);
    }

    /// Builds a tree of fresh nodes over `entries` (sorted), bottom-up; returns its root.
    fn build(&mut self, entries: &[(usize, *mut ())]) -> *mut Node {
        let mut level = 0u8;
        let mut nodes = self.build_level(entries, level);
        while nodes.len() > 1 {
            level += 1;
            // SAFETY: fresh nodes just built, each non-empty.
            let children: Vec<(usize, *mut ())> = nodes
                .iter()
                .map(|&n| (unsafe { (*n).min_key() }, n.cast()))
                .collect();
            nodes = self.build_level(&children, level);
        }
        nodes.first().copied().unwrap_or(core::ptr::null_mut())
    }

    /// One level: `items` split evenly into as few nodes as hold them.
    fn build_level(&mut self, items: &[(usize, *mut ())], level: u8) -> Vec<*mut Node> {
        let count = items.len().div_ceil(CAP);
        let mut out = Vec::with_capacity(count);
        let mut rest = items;
        for i in 0..count {
            // Even split: the first `len % count` nodes take one more.
            let take = rest.len().div_ceil(count - i);
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let node = self.alloc(level);
            // SAFETY: just allocated: fresh, ours alone.
            let n = unsafe { &mut *node };
            for (j, &(key, slot)) in chunk.iter().enumerate() {
                n.insert(j, key, slot);
            }
            self.step(UpdateStep::Modify);
            out.push(node);
        }
        out
    }
}
