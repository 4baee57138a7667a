//! 2 MiB code pages that are never writable ([`Mmu::map_rox`](crate::mmu::Mmu::map_rox)), on
//! the kernel's page tables: Linux's execmem ROX cache.
//!
//! A 2 MiB frame from the kernel's [`HugeFrames`] is filled with INT3 through the physical
//! mapping (writable, non-executable), its aliases in the linear maps are staged read-only
//! (splitting their huge pages, as for 4 KiB code frames), and the window's page-directory
//! entry is staged as one R+X 2 MiB leaf: stored by the flush, after every CPU invalidated the
//! aliases. Unmapping stages the leaf empty and the aliases writable; the frame goes back to
//! [`HugeFrames`] after that flush's round.
//!
//! The page tables down to the page directory are built here (the kernel's `Mapper<Size4KiB>`
//! maps 4 KiB pages only), from the 4 KiB frame allocator, and owned by the backend like the
//! tables its mapper builds; a page directory whose last 2 MiB leaf goes is unlinked and freed
//! through the flush batch like an empty page table (`reclaim`).

use alloc::vec::Vec;

use lock_api::RawMutex;
use x86_64::structures::paging::mapper::PageTableFrameMapping;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, PhysFrame, Size2MiB, Size4KiB, Translate,
};
use x86_64::PhysAddr;

use super::tables::{index, Slot, Tables, ADDR, P, PS, STAGED, W};
use super::{frame, X86Mmu, INT3};
use crate::mmu::pte::{huge_rx_entry, leaf_frame};
use crate::mmu::{CommittedPage, MmuError, TlbFlush, HUGE_PAGE_SIZE};
use crate::PAGE_SIZE;

/// The kernel's allocator of 2 MiB frames, for [`X86Mmu::with_huge_frames`]: any
/// `x86_64` [`FrameAllocator<Size2MiB>`] + [`FrameDeallocator<Size2MiB>`].
pub trait HugeFrames: FrameAllocator<Size2MiB> + FrameDeallocator<Size2MiB> + Send {}

impl<T: FrameAllocator<Size2MiB> + FrameDeallocator<Size2MiB> + Send> HugeFrames for T {}

const HUGE: u64 = HUGE_PAGE_SIZE as u64;
const PAGES: usize = HUGE_PAGE_SIZE / PAGE_SIZE;

impl<R, M, A, F> X86Mmu<'_, R, M, A, F>
where
    R: RawMutex,
    M: Mapper<Size4KiB> + Translate,
    A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>,
    F: PageTableFrameMapping,
{
    /// The page-directory slot of the 2 MiB at `va`, creating the PDPT and PD on the way; the
    /// tables made go into `made` (owned by the backend once linked).
    fn huge_slot(
        &self,
        view: &Tables<'_, F>,
        va: u64,
        made: &mut Vec<u64>,
    ) -> Result<Slot, MmuError> {
        let pml4e = Slot::at(view.table(view.pml4), index(va, 0), 0);
        let e = pml4e.get();
        let pdpt = if e & P != 0 {
            e & ADDR
        } else {
            let t = self.table_frame(view)?;
            made.push(t);
            // Intermediate entries grant everything the leaves may grant; the leaf decides.
            pml4e.set(t | P | W);
            t
        };
        self.pd_slot(view, va, pdpt, made)
    }

    /// Below the PDPT at `pdpt`: the PD (made if missing) and the slot of `va` in it.
    fn pd_slot(
        &self,
        view: &Tables<'_, F>,
        va: u64,
        pdpt: u64,
        made: &mut Vec<u64>,
    ) -> Result<Slot, MmuError> {
        let pdpte = Slot::at(view.table(pdpt), index(va, 1), 1);
        let e = pdpte.get();
        if e & P != 0 && e & PS != 0 {
            return Err(MmuError::HugePage { page: va as usize });
        }
        let pd = if e & P != 0 {
            e & ADDR
        } else {
            let t = self.table_frame(view)?;
            made.push(t);
            pdpte.set(t | P | W);
            t
        };
        Ok(Slot::at(view.table(pd), index(va, 2), 2))
    }

    /// See [`Mmu::map_rox`](crate::mmu::Mmu::map_rox).
    pub(super) fn map_rox_at(
        &mut self,
        page: usize,
        tlb: &mut TlbFlush,
    ) -> Result<Vec<CommittedPage>, MmuError> {
        let huge = self.huge.ok_or(MmuError::Unsupported)?;
        if !page.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MmuError::Unaligned { addr: page });
        }
        let va = x86_64::VirtAddr::try_new(page as u64)
            .map_err(|_| MmuError::OutOfRange { addr: page })?
            .as_u64();
        if self.linear.iter().any(|m| m.covers(va)) {
            return Err(MmuError::OutOfRange { addr: page });
        }
        let _mapper = self.tables.lock();
        let view = self.view();
        // Refuse what is in the way before taking anything.
        let path = view.path(va);
        if let Some(s) = path[1] {
            let e = s.get();
            if e & P != 0 && e & PS != 0 {
                return Err(MmuError::HugePage { page });
            }
        }
        if path[2].is_some_and(|s| s.get() != 0) {
            return Err(MmuError::AlreadyMapped { page });
        }
        let f: PhysFrame<Size2MiB> = huge.lock().allocate_frame().ok_or(MmuError::OutOfFrames)?;
        let base = f.start_address().as_u64();
        // Tables linked on the way (window tables, split linear-map tables) are the backend's
        // whatever happens next.
        let mut made = Vec::new();
        let result = self.fill_seal_and_stage(&view, page, base, tlb, &mut made);
        self.owned.extend(made);
        match result {
            Ok(()) => {
                self.huge_frames.insert(base);
                Ok((0..PAGES)
                    .map(|i| {
                        // SAFETY: page `i` of the leaf maps frame `i` of the 2 MiB frame
                        // allocated for it alone.
                        unsafe {
                            CommittedPage::new(page + i * PAGE_SIZE, base + (i * PAGE_SIZE) as u64)
                        }
                    })
                    .collect())
            }
            Err((e, false)) => {
                // SAFETY: allocated above, never mapped, no alias staged.
                unsafe { huge.lock().deallocate_frame(f) };
                Err(e)
            }
            Err((e, true)) => {
                // Aliases were staged: the frame goes back after the batch's round.
                self.huge_frames.insert(base);
                // SAFETY: mapped nowhere in the window; its aliases are staged back in `tlb`.
                unsafe { tlb.free_after_flush(page, base) };
                Err(e)
            }
        }
    }

    /// Fills the 2 MiB frame at `base` with INT3, stages its linear-map aliases read-only and
    /// the leaf of `page` R+X. On failure: the error, and whether aliases were staged (then
    /// staged back writable in `tlb`).
    fn fill_seal_and_stage(
        &self,
        view: &Tables<'_, F>,
        page: usize,
        base: u64,
        tlb: &mut TlbFlush,
        made: &mut Vec<u64>,
    ) -> Result<(), (MmuError, bool)> {
        let slot = self
            .huge_slot(view, page as u64, made)
            .map_err(|e| (e, false))?;
        // INT3 through the physical mapping (writable, non-executable): nothing executes the
        // frame yet, and nothing of its previous use shows through.
        for i in 0..PAGES as u64 {
            let p = self
                .phys
                .frame_to_pointer(frame(base + i * PAGE_SIZE as u64));
            // SAFETY: `with_huge_frames`' contract: the physical mapping maps every frame the
            // huge allocator hands out, writable; the frame is ours alone.
            unsafe { core::ptr::write_bytes(p.cast::<u8>(), INT3, PAGE_SIZE) };
        }
        let sealed = (0..PAGES as u64).try_for_each(|i| {
            self.linear.iter().try_for_each(|map| {
                map.set_writable(view, base + i * PAGE_SIZE as u64, false, tlb, || {
                    let table = self.table_frame(view)?;
                    made.push(table);
                    Ok(table)
                })
            })
        });
        if let Err(e) = sealed {
            // Aliases sealed so far are staged read-only: stage them writable again (the last
            // staging wins; sealing split their huge pages, so this needs no frame).
            for i in 0..PAGES as u64 {
                for map in self.linear {
                    let _ = map.set_writable(view, base + i * PAGE_SIZE as u64, true, tlb, || {
                        Err(MmuError::OutOfFrames)
                    });
                }
            }
            return Err((e, true));
        }
        let entry = huge_rx_entry(base);
        slot.set((entry & !P) | STAGED);
        // SAFETY: the 2 MiB leaf is staged (not present) until the flush stores `entry`, after
        // every CPU invalidated the aliases sealed above.
        unsafe { tlb.store_after_flush(page, entry) };
        Ok(())
    }

    /// See [`Mmu::unmap_rox`](crate::mmu::Mmu::unmap_rox).
    pub(super) fn unmap_rox_at(
        &mut self,
        pages: Vec<CommittedPage>,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, Vec<CommittedPage>)> {
        let _mapper = self.tables.lock();
        let view = self.view();
        let slot = match Self::rox_leaf(&view, &pages) {
            Ok(s) => s,
            Err(e) => return Err((e, pages)),
        };
        let (page, base) = (pages[0].page(), pages[0].frame());
        // Unseal first (no frame needed: sealing split the huge pages already).
        for p in &pages {
            for map in self.linear {
                if let Err(e) =
                    map.set_writable(&view, p.frame(), true, tlb, || Err(MmuError::OutOfFrames))
                {
                    return Err((e, pages));
                }
            }
        }
        super::stage(slot, page, 0, tlb);
        // One `invlpg` of any address in it drops a 2 MiB translation; the frame goes back to
        // the huge allocator as a whole (`huge_frames` tells `flush`).
        // SAFETY: mapped nowhere now (the staged leaf is cleared in the flush, before frames
        // are freed).
        unsafe { tlb.free_after_flush(page, base) };
        Ok(())
    }

    /// The 2 MiB leaf (present or staged) `pages` are exactly the pages of.
    fn rox_leaf(view: &Tables<'_, F>, pages: &[CommittedPage]) -> Result<Slot, MmuError> {
        let first = pages.first().ok_or(MmuError::NotMapped { page: 0 })?;
        let not = MmuError::NotMapped { page: first.page() };
        let whole = pages.len() == PAGES
            && first.page().is_multiple_of(HUGE_PAGE_SIZE)
            && pages.iter().enumerate().all(|(i, p)| {
                p.page() == first.page() + i * PAGE_SIZE
                    && p.frame() == first.frame() + (i * PAGE_SIZE) as u64
            });
        match view.leaf(first.page() as u64) {
            Some(s) if whole && s.level == 2 && leaf_frame(s.get(), 2) == first.frame() => Ok(s),
            _ => Err(not),
        }
    }

    /// Returns 2 MiB frames of `map_rox` freed by a flush to the kernel's huge allocator.
    pub(super) fn give_back_huge(&self, freed: &[u64]) {
        if let (Some(huge), false) = (self.huge, freed.is_empty()) {
            let mut huge = huge.lock();
            for &f in freed {
                // SAFETY: a 2 MiB frame of `map_rox`, unmapped and invalidated on every CPU.
                unsafe {
                    huge.deallocate_frame(PhysFrame::containing_address(PhysAddr::new(f)));
                }
            }
        }
    }

    /// Whether a queued store for `va` may land on `slot`'s 2 MiB entry `e`: a staged window
    /// leaf of `map_rox`, getting its R+X leaf or emptied.
    pub(super) fn huge_store_ok(&self, va: u64, e: u64, entry: u64) -> bool {
        va.is_multiple_of(HUGE)
            && e & PS != 0
            && e & P == 0
            && e & STAGED != 0
            && (entry == 0 || entry & PS != 0)
            && !self.linear.iter().any(|m| m.covers(va))
    }
}
