//! 2 MiB code pages that are never writable ([`Mmu::map_rox`]) on the software machine: a run
//! of 512 frames starting 2 MiB aligned, INT3 filled (the model's fill through the direct map),
//! its direct-map aliases staged read-only (splitting the direct map's huge pages) and the
//! window's 2 MiB leaf staged, stored R+X by the flush; one TLB entry per leaf on every CPU
//! (see `tlb`). Unmapping stages the leaf empty and the aliases writable, and queues all 512
//! frames to be freed after the round.

use alloc::vec::Vec;

use super::inject::CallKind;
use super::machine::{canonical, leaf_frame, Memory, Slot, HUGE, P, PS, STAGED};
use super::Machine;
use crate::mmu::pte::huge_rx_entry;
use crate::mmu::{CommittedPage, MmuError, TlbFlush, HUGE_PAGE_SIZE};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

impl Machine {
    /// [`Mmu::map_rox`] on the machine (see there).
    pub(super) fn map_rox(
        &mut self,
        page: usize,
        tlb: &mut TlbFlush,
    ) -> Result<Vec<CommittedPage>, MmuError> {
        let m = self;
        m.injected(CallKind::Map)?;
        if !page.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MmuError::Unaligned { addr: page });
        }
        let va = page as u64;
        let last = va.wrapping_add(HUGE - 1);
        if last < va
            || !canonical(va)
            || !canonical(last)
            || m.in_direct_map(va)
            || m.in_direct_map(last)
        {
            return Err(MmuError::OutOfRange { addr: page });
        }
        let path = m.mem.path(va);
        for s in path.iter().take(2).flatten() {
            if m.mem.entry(s.table, s.index) & PS != 0 {
                return Err(MmuError::HugePage { page });
            }
        }
        // Anything in the 2 MiB (a leaf, staged or not, or a page table) is in the way.
        if path[2].is_some_and(|s| m.mem.entry(s.table, s.index) != 0) {
            return Err(MmuError::AlreadyMapped { page });
        }
        // The run, the tables missing on the way, and a table for each of the (at most two)
        // direct-map huge pages the frame's aliases lie in, split to seal them: counted first,
        // so nothing below runs out half way.
        let missing = m.mem.missing_to_huge(va);
        if m.mem.free_count() < missing + 2 + (HUGE / PAGE) as usize {
            return Err(MmuError::OutOfFrames);
        }
        let index = m.mem.alloc_huge().ok_or(MmuError::OutOfFrames)?;
        // Filled with INT3 through a writable, non-executable mapping (the direct map), before
        // any translation makes it executable: the model marks the frames as INT3.
        m.mem.int3.extend(index..index + (HUGE / PAGE) as usize);
        let frame = Memory::phys(index);
        for i in 0..HUGE / PAGE {
            m.set_alias_writable(frame + i * PAGE, false, tlb)?;
        }
        let slot = m.mem.make_huge_slot(va).ok_or(MmuError::OutOfFrames)?;
        let entry = huge_rx_entry(frame);
        // Staged: present R+X only once the flush invalidated the sealed aliases everywhere.
        m.store("map_rox", va, slot, (entry & !P) | STAGED);
        // SAFETY: the 2 MiB leaf of `page` is staged (not present) until the flush stores this.
        unsafe { tlb.store_after_flush(page, entry) };
        Ok((0..HUGE_PAGE_SIZE / PAGE_SIZE)
            .map(|i| {
                let (p, f) = (page + i * PAGE_SIZE, frame + (i * PAGE_SIZE) as u64);
                // SAFETY: page `p` of the 2 MiB leaf maps frame `f` of the run allocated for it.
                unsafe { CommittedPage::new(p, f) }
            })
            .collect())
    }

    /// [`Mmu::unmap_rox`] on the machine (see there).
    pub(super) fn unmap_rox(
        &mut self,
        pages: Vec<CommittedPage>,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, Vec<CommittedPage>)> {
        let m = self;
        if let Err(e) = m.injected(CallKind::Unmap) {
            return Err((e, pages));
        }
        let slot = match m.rox_leaf(&pages) {
            Ok(s) => s,
            Err(e) => return Err((e, pages)),
        };
        // Restore the aliases first: sealed when the leaf was mapped, they were split then, so
        // unsealing needs no frame; if one fails anyway, nothing of the leaf changed.
        for p in &pages {
            if let Err(e) = m.set_alias_writable(p.frame(), true, tlb) {
                return Err((e, pages));
            }
        }
        let va = pages[0].page() as u64;
        m.stage("unmap_rox", va, slot, 0, tlb);
        for p in pages {
            // SAFETY: the frame is mapped nowhere now (the staged leaf is not present and is
            // cleared in the flush, before frames are freed).
            unsafe { tlb.free_after_flush(p.page(), p.frame()) };
        }
        Ok(())
    }

    /// The 2 MiB leaf `pages` are exactly the pages of (as [`Mmu::map_rox`] handed them out).
    fn rox_leaf(&self, pages: &[CommittedPage]) -> Result<Slot, MmuError> {
        let first = pages.first().ok_or(MmuError::NotMapped { page: 0 })?;
        let not = MmuError::NotMapped { page: first.page() };
        let whole = pages.len() == HUGE_PAGE_SIZE / PAGE_SIZE
            && first.page().is_multiple_of(HUGE_PAGE_SIZE)
            && pages.iter().enumerate().all(|(i, p)| {
                p.page() == first.page() + i * PAGE_SIZE
                    && p.frame() == first.frame() + (i * PAGE_SIZE) as u64
            });
        match self.mem.walk(first.page() as u64).0 {
            Some(s) if whole && s.level == 2 => {
                let e = self.mem.entry(s.table, s.index);
                (leaf_frame(e, 2) == first.frame() && !self.in_direct_map(first.page() as u64))
                    .then_some(s)
                    .ok_or(not)
            }
            _ => Err(not),
        }
    }
}
