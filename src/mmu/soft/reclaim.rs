//! Giving page tables back on the software machine, as the x86 backend does (its `reclaim`
//! module): the window's page tables once no page of theirs is mapped, and direct-map tables
//! split to seal an alias once every alias in them is writable again (merged back into the
//! 2 MiB page). Both go through the flush batch: unlinked, then freed after a round, which the
//! machine checks (a table frame freed while linked, or while a CPU may still walk through a
//! cached entry pointing to it, is a violation).

use alloc::collections::BTreeSet;

use super::machine::{present, Memory, Slot, HUGE, PS, STAGED};
use super::Machine;
use crate::mmu::TlbFlush;
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

impl Machine {
    /// Before a flush's round: queues the split tables collapsed by an earlier flush, and
    /// unlinks the window tables the batch leaves empty — every entry empty, or staged with a
    /// queued store of 0 (an unmap) — clearing those staged entries first (not present
    /// already). A page table, then its page directory; never a PDPT, whose PML4 entry other
    /// address spaces may have copied. The frames go back after the round.
    pub(super) fn unlink_tables(&mut self, tlb: &mut TlbFlush) {
        for table in core::mem::take(&mut self.deferred) {
            // SAFETY: collapsed (unlinked) by an earlier flush, created by `split`.
            unsafe { tlb.free_table_after_flush(table) };
        }
        let unmapping: BTreeSet<u64> = tlb
            .stores()
            .iter()
            .filter(|&&(va, e)| e == 0 && !self.in_direct_map(va as u64))
            .map(|&(va, _)| va as u64)
            .collect();
        let mut checked = BTreeSet::new();
        for &va in &unmapping {
            let path = self.mem.path(va);
            if let (Some(pde), None) = (path[2], path[3]) {
                // A 2 MiB leaf (`unmap_rox`): its page directory may become empty.
                if self.mem.entry(pde.table, pde.index) & PS != 0 && checked.insert(pde.table) {
                    self.unlink_directory(va, &path, &unmapping, tlb);
                }
                continue;
            }
            let (Some(pde), Some(_)) = (path[2], path[3]) else {
                continue; // unlinked already, for another page of the same table
            };
            let pt = self.mem.child(pde);
            if !checked.insert(pt) {
                continue; // checked for another page of the same table
            }
            let base = va & !(HUGE - 1);
            let dying = |i: usize| {
                let e = self.mem.entry(pt, i);
                e == 0
                    || (!present(e)
                        && e & STAGED != 0
                        && unmapping.contains(&(base + i as u64 * PAGE)))
            };
            if !self.mem.freeable.contains(&pt) || !(0..512).all(dying) {
                continue;
            }
            for index in 0..512 {
                if self.mem.entry(pt, index) != 0 {
                    let slot = Slot {
                        table: pt,
                        index,
                        level: 3,
                    };
                    self.store("flush", base + index as u64 * PAGE, slot, 0);
                }
            }
            self.unlink(pde, 0, Some(tlb));
            if let Some(pdpte) = path[1] {
                let pd = pde.table;
                if self.mem.freeable.contains(&pd) && self.mem.is_empty_table(pd) {
                    self.unlink(pdpte, 0, Some(tlb));
                }
            }
        }
    }

    /// Unlinks the page directory on `path` (to a staged 2 MiB leaf) when the batch leaves it
    /// empty: every entry empty or a 2 MiB leaf staged to be unmapped by it.
    fn unlink_directory(
        &mut self,
        va: u64,
        path: &[Option<Slot>; 4],
        unmapping: &BTreeSet<u64>,
        tlb: &mut TlbFlush,
    ) {
        let (Some(pdpte), Some(pde)) = (path[1], path[2]) else {
            return;
        };
        let pd = pde.table;
        // The virtual address entry 0 of `pd` maps.
        let first = va & !((1u64 << 30) - 1);
        let dying = |i: usize| {
            let e = self.mem.entry(pd, i);
            e == 0
                || (!present(e)
                    && e & STAGED != 0
                    && e & PS != 0
                    && unmapping.contains(&(first + i as u64 * HUGE)))
        };
        if !self.mem.freeable.contains(&pd) || !(0..512).all(dying) {
            return;
        }
        for index in 0..512 {
            if self.mem.entry(pd, index) != 0 {
                let slot = Slot {
                    table: pd,
                    index,
                    level: 2,
                };
                self.store("flush", first + index as u64 * HUGE, slot, 0);
            }
        }
        self.unlink(pdpte, 0, Some(tlb));
    }

    /// After a flush stored the alias of `va` writable: merges its split table back into the
    /// 2 MiB page once its 512 entries map that page uniformly again. The same translations
    /// one level up, so no CPU's view changes; the table's frame is freed after the next
    /// flush's round (CPUs may cache the entry that pointed to it until they invalidate).
    pub(super) fn collapse(&mut self, va: u64) {
        let path = self.mem.path(va);
        if let (Some(pde), Some(_)) = (path[2], path[3]) {
            let pt = self.mem.child(pde);
            if self.mem.freeable.contains(&pt) {
                if let Some(huge) = self.mem.collapsed(pt) {
                    self.unlink(pde, huge, None);
                }
            }
        }
    }

    /// Replaces the present entry in `parent` (pointing to a table) by `new`; the table's
    /// frame goes back after `tlb`'s round, or after the next flush's (`None`).
    fn unlink(&mut self, parent: Slot, new: u64, tlb: Option<&mut TlbFlush>) {
        let table = Memory::phys(self.mem.child(parent));
        self.mem.set_entry(parent.table, parent.index, new);
        self.tlbs.table_unlinked(table);
        match tlb {
            // SAFETY: unlinked just now; created by the machine for the window or a split.
            Some(tlb) => unsafe { tlb.free_table_after_flush(table) },
            None => self.deferred.push(table),
        }
    }
}
