//! Publishing, freeing and discarding code in the allocator run, each checked against the
//! model, failures included.

use codespace::{AddressRange, CodeError, FreeError};

use super::{Failure, Run};
use crate::common::*;

impl Run<'_> {
    pub(super) fn publish(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.writable.is_empty() {
            return;
        }
        let i = self.rng.below(module.writable.len());
        let w = module.writable.swap_remove(i);
        let bytes = w.as_slice().to_vec();
        let range = w.range();
        // A publish on 2 MiB ROX pages changes no page-table entry and costs no shootdown,
        // one serialization round.
        let costs = |r: &Self| {
            let stats = r.manager.flush_stats().unwrap();
            (r.machine.leaf_stores(), stats.shootdowns, stats.syncs)
        };
        let before = self.in_rox_space(range.start()).then(|| costs(self));
        let module = &mut self.modules[mi];
        match module.alloc.publish(w) {
            Ok(code) => {
                assert_eq!((code.range(), code.len()), (range, bytes.len()));
                module.published.push((code, Some(bytes.clone())));
                if let Some((stores, shootdowns, syncs)) = before {
                    let after = (stores, shootdowns, syncs + 1);
                    assert_eq!(costs(self), after, "{}", self.label());
                }
                self.published(range, Some(&bytes));
            }
            Err(r) => {
                module.writable.push(r.code);
                match self.failure(r.error, false) {
                    Failure::Unchanged => {
                        // Bytes of its own range may have been written already.
                        self.forget_bytes(range);
                        self.check_counters_unchanged();
                    }
                    Failure::Changed => {
                        // Published, or half: the pages' protection is read back below.
                        self.forget_bytes(range);
                        self.resync_protection(range);
                    }
                }
            }
        }
    }

    pub(super) fn free(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.published.is_empty() {
            return;
        }
        let i = self.rng.below(module.published.len());
        let (code, bytes) = module.published.swap_remove(i);
        let range = code.range();
        let before = self.free_costs(range);
        let module = &mut self.modules[mi];
        match free_published(&mut module.alloc, code) {
            Ok(()) => self.freed(range, before),
            Err(FreeError::NotFreed(e, code)) => {
                // Its bytes may be half INT3 now: the model no longer knows them.
                drop(bytes);
                self.modules[mi].published.push((code, None));
                self.not_freed(e, range);
            }
            Err(FreeError::Decommit(e)) => self.freed_but_not_decommitted(e, range, mi),
            Err(e) => panic!("{}: {e:?}", self.label()),
        }
    }

    pub(super) fn discard(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.writable.is_empty() {
            return;
        }
        let i = self.rng.below(module.writable.len());
        let w = module.writable.swap_remove(i);
        let range = w.range();
        let before = self.free_costs(range);
        let module = &mut self.modules[mi];
        match module.alloc.discard(w) {
            Ok(()) => self.freed(range, before),
            Err(FreeError::NotFreed(e, w)) => {
                self.modules[mi].writable.push(w);
                self.not_freed(e, range);
            }
            Err(FreeError::Decommit(e)) => self.freed_but_not_decommitted(e, range, mi),
            Err(e) => panic!("{}: {e:?}", self.label()),
        }
    }

    /// A free of `range` that failed and handed its handle back (already stored again): its
    /// bytes are unknown, nothing else changed.
    fn not_freed(&mut self, e: CodeError, range: AddressRange) {
        self.failure(e, false);
        self.forget_bytes(range);
        self.check_counters_unchanged();
    }

    /// `range` was freed but a decommit failed part way: the range is gone from the model and
    /// a trim finishes the decommit.
    fn freed_but_not_decommitted(&mut self, e: CodeError, range: AddressRange, mi: usize) {
        self.failure(e, false);
        let _ = self.remove_live(range);
        self.finish_decommit(mi);
    }

    /// A decommit failed part way: trimming finishes it, so the model's rule holds again.
    pub(super) fn finish_decommit(&mut self, mi: usize) {
        self.machine.clear_failures();
        self.modules[mi].alloc.trim().unwrap();
    }
}
