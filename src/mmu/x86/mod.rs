//! [`Mmu`] over a kernel's live x86-64 page tables.
//!
//! Generic over the kernel's page-table type (any `x86_64` [`Mapper<Size4KiB>`] +
//! [`Translate`]: `OffsetPageTable`, `MappedPageTable`, `RecursivePageTable`), its frame
//! allocator, its lock (a `lock_api` raw mutex that keeps interrupts off while held: [`IrqSpin`]) and the
//! mapping through which page-table frames are reached ([`PageTableFrameMapping`];
//! [`PhysOffset`] for a direct map at an offset). The kernel supplies its CPUs through [`Smp`].
//!
//! This is the arch layer: the only place where codespace executes `invlpg`, writes CR3, or
//! dereferences raw addresses of code and page tables. Lock order: page tables, then frames.
//! Window leaves are created through the kernel's `Mapper` (which builds missing tables) and
//! then changed with single stores to the leaf, following the staging rules of
//! [`TlbFlush`].

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::marker::PhantomData;

use lock_api::{Mutex, RawMutex};
use x86_64::structures::paging::mapper::{MapToError, PageTableFrameMapping};
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, Page, PageTable, PageTableFlags as Flags, PhysFrame,
    Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

mod cpu;
pub mod exception;
mod irq_spin;
mod linear;
mod poke;
mod reclaim;
mod rox;
mod smp;
mod tables;

pub use cpu::INTERRUPTS as X86_INTERRUPTS;
pub use irq_spin::{IrqMutex, IrqMutexGuard, IrqSpin};
pub use linear::LinearMap;
pub use rox::HugeFrames;
pub use smp::{Smp, UniProcessor};

use crate::mmu::pte::leaf_entry;
use crate::mmu::{
    CommittedPage, FlushStats, InterruptControl, Leaf, Mmu, MmuError, PageMapping, Poke,
    Protection, TlbFlush, Unflushed,
};
use crate::{AddressRange, PAGE_SIZE};
use poke::PokeSpace;
use tables::{Slot, Tables, ADDR, P, STAGED, W};

/// What fresh code frames are filled with: INT3, so a stray jump into free bytes traps.
const INT3: u8 = 0xCC;

/// A physical-memory mapping at a fixed offset (a kernel's direct map).
#[derive(Debug, Clone, Copy)]
pub struct PhysOffset(u64);

impl PhysOffset {
    /// The mapping at `offset`.
    ///
    /// # Safety
    /// Every physical frame the backend may touch (page tables, frames from the allocator) is
    /// mapped readable and writable at `offset + phys` for as long as the value is used.
    #[must_use]
    pub const unsafe fn new(offset: u64) -> Self {
        PhysOffset(offset)
    }
}

// SAFETY: `PhysOffset::new`'s caller promised the offset maps every frame used as a table.
unsafe impl PageTableFrameMapping for PhysOffset {
    fn frame_to_pointer(&self, frame: PhysFrame) -> *mut PageTable {
        (self.0 + frame.start_address().as_u64()) as *mut PageTable
    }
}

/// The backend: the kernel's page tables and frame allocator, each behind the kernel's lock.
pub struct X86Mmu<'a, R: RawMutex, M, A: FrameDeallocator<Size4KiB>, F> {
    tables: &'a Mutex<R, M>,
    frames: &'a Mutex<R, A>,
    phys: F,
    smp: &'a dyn Smp,
    linear: &'a [LinearMap],
    poke: PokeSpace,
    free_count: Option<fn(&A) -> usize>,
    stats: FlushStats,
    /// Page-table frames this backend created (window tables, split linear-map tables): the
    /// only ones it ever frees (see `reclaim`).
    owned: BTreeSet<u64>,
    /// Split tables merged back into their huge page, freed after the next round.
    deferred: Vec<u64>,
    /// The kernel's 2 MiB frames for ROX code, when it gave any (`with_huge_frames`).
    huge: Option<&'a Mutex<R, dyn HugeFrames + 'a>>,
    /// 2 MiB frames mapped by `map_rox` (by start): go back to `huge` when freed.
    huge_frames: BTreeSet<u64>,
    _tables: PhantomData<M>,
}

fn frame(phys: u64) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new(phys))
}

mod construct;
use construct::Reserve;

// SAFETY: mappings change only through these methods; every change of a present window or
// linear-map leaf goes through the not-present staging of `TlbFlush` (see `stage`), frames are
// freed in `flush` after `Smp::shootdown` returned, the alias is the private address space of
// `poke`, and `sync_cores` serializes this CPU and, through `Smp`, every other one.
unsafe impl<R, M, A, F> Mmu for X86Mmu<'_, R, M, A, F>
where
    R: RawMutex,
    M: Mapper<Size4KiB> + Translate,
    A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>,
    F: PageTableFrameMapping,
{
    fn check_cpu(&self) -> Result<(), MmuError> {
        let cpu = self.smp.current_cpu();
        match cpu::protection_enabled() {
            (false, _) => Err(MmuError::NoExecuteDisabled { cpu }),
            (_, false) => Err(MmuError::WriteProtectDisabled { cpu }),
            _ => Ok(()),
        }
    }

    fn current_cpu(&self) -> usize {
        self.smp.current_cpu()
    }

    fn online_cpus(&self) -> usize {
        self.smp.online_cpus()
    }

    fn interrupt_control(&self) -> InterruptControl {
        cpu::INTERRUPTS
    }

    unsafe fn map_fresh(&mut self, page: usize) -> Result<CommittedPage, MmuError> {
        let va = VirtAddr::try_new(page as u64).map_err(|_| MmuError::OutOfRange { addr: page })?;
        let p = Page::<Size4KiB>::from_start_address(va)
            .map_err(|_| MmuError::Unaligned { addr: page })?;
        let mut mapper = self.tables.lock();
        let view = self.view();
        // Count the tables to create (and refuse what is in the way) before taking frames.
        let mut missing = 3;
        if let Some(slot) = view.leaf(page as u64) {
            if slot.level != 3 {
                return Err(MmuError::HugePage { page });
            }
            if slot.get() != 0 {
                return Err(MmuError::AlreadyMapped { page });
            }
            missing = 0;
        } else {
            let mut table = view.table(view.pml4);
            for level in 0..3 {
                // SAFETY: a table frame through the physical mapping, index < 512.
                let e = unsafe { table.add(tables::index(page as u64, level)).read_volatile() };
                if e & P == 0 {
                    break;
                }
                missing -= 1;
                table = view.table(e);
            }
        }
        let mut frames = self.frames.lock();
        let mut reserve = Reserve::take(&mut *frames, missing + 1).ok_or(MmuError::OutOfFrames)?;
        let f = reserve.allocate_frame().ok_or(MmuError::OutOfFrames)?;
        let flags = Flags::from_bits_truncate(leaf_entry(0, Protection::ReadWrite));
        // SAFETY: `page` is unmapped (checked) in the window the caller owns; `f` is fresh.
        // Intermediate tables get PRESENT|WRITABLE, never NX: the leaf decides.
        let mapped = unsafe {
            mapper.map_to_with_table_flags(
                p,
                f,
                flags,
                Flags::PRESENT | Flags::WRITABLE,
                &mut reserve,
            )
        };
        match mapped {
            // Not present before: nothing to invalidate.
            Ok(flush) => {
                flush.ignore();
                // The frames the mapper took after the leaf's are the tables it built.
                for t in reserve.given.iter().skip(1).flatten() {
                    self.owned.insert(t.start_address().as_u64());
                }
            }
            Err(e) => {
                // SAFETY: the fresh frame was not mapped.
                unsafe { reserve.source.deallocate_frame(f) };
                return Err(match e {
                    MapToError::FrameAllocationFailed => MmuError::OutOfFrames,
                    MapToError::ParentEntryHugePage => MmuError::HugePage { page },
                    MapToError::PageAlreadyMapped(_) => MmuError::AlreadyMapped { page },
                });
            }
        }
        // SAFETY: the page was just mapped RW+NX to a fresh frame only we know of.
        unsafe { core::ptr::write_bytes(page as *mut u8, INT3, PAGE_SIZE) };
        // SAFETY: `f` was allocated for `page` and is mapped there.
        Ok(unsafe { CommittedPage::new(page, f.start_address().as_u64()) })
    }

    unsafe fn map_rox(
        &mut self,
        page: usize,
        tlb: &mut TlbFlush,
    ) -> Result<Vec<CommittedPage>, MmuError> {
        self.map_rox_at(page, tlb)
    }

    unsafe fn unmap_rox(
        &mut self,
        pages: Vec<CommittedPage>,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, Vec<CommittedPage>)> {
        self.unmap_rox_at(pages, tlb)
    }

    unsafe fn unmap(
        &mut self,
        page: CommittedPage,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, CommittedPage)> {
        let _mapper = self.tables.lock();
        let view = self.view();
        let slot = match Self::leaf_of(&view, &page) {
            Ok(s) => s,
            Err(e) => return Err((e, page)),
        };
        // Unseal first (no frame needed: sealing split the huge pages already).
        for map in self.linear {
            if let Err(e) = map.set_writable(&view, page.frame(), true, tlb, || {
                Err(MmuError::OutOfFrames)
            }) {
                return Err((e, page));
            }
        }
        // Staged like every other change: a batch still pending from a failed flush may hold a
        // store for this leaf (a publish's R+X), and only a later staging replaces it. The leaf
        // stays not present (and not mappable again) until the flush clears it.
        stage(slot, page.page(), 0, tlb);
        // SAFETY: the frame is mapped nowhere in the window now (the staged leaf is not present
        // and is cleared in the flush, before frames are freed); its page goes into the batch
        // with it.
        unsafe { tlb.free_after_flush(page.page(), page.frame()) };
        Ok(())
    }

    unsafe fn protect(
        &mut self,
        page: &CommittedPage,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        let _mapper = self.tables.lock();
        let view = self.view();
        let slot = Self::leaf_of(&view, page)?;
        let target = leaf_entry(page.frame(), prot);
        if slot.get() == target {
            return Ok(());
        }
        if prot == Protection::ReadExecute {
            let mut split = Vec::new();
            let sealed = self.linear.iter().try_for_each(|map| {
                map.set_writable(&view, page.frame(), false, tlb, || {
                    let table = self.table_frame(&view)?;
                    split.push(table);
                    Ok(table)
                })
            });
            // Tables split in are linked (translations unchanged) even when sealing failed.
            self.owned.extend(split);
            sealed?;
        }
        stage(slot, page.page(), target, tlb);
        Ok(())
    }

    fn write(&mut self, page: &CommittedPage, offset: usize, data: &[u8]) -> Result<(), MmuError> {
        let _mapper = self.tables.lock();
        let view = self.view();
        Self::mapped_leaf(&view, page)?;
        match view.translate(page.page() as u64) {
            Some((_, _, true, _)) => {}
            Some(_) => return Err(MmuError::NotWritable { page: page.page() }),
            None => return Err(MmuError::NotMapped { page: page.page() }),
        }
        if offset.checked_add(data.len()).is_none_or(|e| e > PAGE_SIZE) {
            return Err(MmuError::OutOfRange {
                addr: page.page() + offset,
            });
        }
        // SAFETY: the page is mapped writable (checked, under the lock) and owned by the
        // caller; the range stays inside it; no Rust reference points into code pages.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (page.page() + offset) as *mut u8,
                data.len(),
            )
        };
        Ok(())
    }

    unsafe fn poke(
        &mut self,
        pages: &[&CommittedPage],
        f: &mut dyn FnMut(&mut dyn Poke) -> Result<(), MmuError>,
    ) -> Result<(), MmuError> {
        let _mapper = self.tables.lock();
        let view = self.view();
        let max = crate::mmu::MAX_POKE_PAGES;
        if pages.len() > max {
            return Err(MmuError::TooManyPages {
                pages: pages.len(),
                max,
            });
        }
        // On the heap: a whole 2 MiB page's 512 frames would take 4 KiB of kernel stack.
        let mut frames = Vec::with_capacity(pages.len());
        for p in pages {
            Self::mapped_leaf(&view, p)?;
            frames.push(p.frame());
        }
        // SAFETY: the caller owns the pages (CommittedPage values) and keeps `poke`'s contract.
        let result = unsafe { self.poke.session(&view, &frames, f) };
        self.stats.pokes += 1;
        result
    }

    fn read(&self, page: &CommittedPage, offset: usize, buf: &mut [u8]) -> Result<(), MmuError> {
        let _mapper = self.tables.lock();
        let view = self.view();
        Self::mapped_leaf(&view, page)?;
        if view.translate(page.page() as u64).is_none() {
            return Err(MmuError::NotMapped { page: page.page() });
        }
        if offset.checked_add(buf.len()).is_none_or(|e| e > PAGE_SIZE) {
            return Err(MmuError::OutOfRange {
                addr: page.page() + offset,
            });
        }
        // SAFETY: the page is present (checked under the lock) and readable; code bytes change
        // only through the alias under the manager's lock, which the caller holds.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (page.page() + offset) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn flush(&mut self, mut tlb: TlbFlush) -> Result<(), Unflushed> {
        // Before the round: tables unlinked now or merged by the last flush are freed after it.
        for table in core::mem::take(&mut self.deferred) {
            // SAFETY: merged into its huge page (unlinked) by an earlier flush; ours.
            unsafe { tlb.free_table_after_flush(table) };
        }
        if tlb.stores().iter().any(|&(_, entry)| entry == 0) {
            let _mapper = self.tables.lock();
            reclaim::unlink_empty(&self.view(), &self.owned, &mut tlb);
        }
        if tlb.needs_invalidation() {
            if cpu::flush_local(tlb.pages(), tlb.is_full()) {
                self.stats.full += 1;
            } else {
                self.stats.single_pages += tlb.pages().len() as u64;
            }
            // Fenced against a CPU coming online meanwhile (see `others_online`).
            if smp::others_online(|| self.smp.online_cpus()) {
                if let Err(error) = self.smp.shootdown(tlb.pages(), tlb.is_full()) {
                    return Err(Unflushed {
                        error,
                        tlb: alloc::boxed::Box::new(tlb),
                    });
                }
                self.stats.shootdowns += 1;
            }
        }
        let (stores, freed) = tlb.take_work();
        if !stores.is_empty() {
            let _mapper = self.tables.lock();
            let view = self.view();
            let mut merged = Vec::new();
            for &(va, entry) in &stores {
                if let Some(slot) = view.leaf(va as u64) {
                    let e = slot.get();
                    // An unmap's store clears only the leaf it staged: after a failed round
                    // whose tables were unlinked, the page may have been mapped afresh (in a
                    // new table) before this retry.
                    // A 4 KiB leaf: a huge leaf here was merged from a table whose entries were
                    // all present, so no store of this batch (for a staged leaf) targets it.
                    // A 2 MiB slot takes only the stores queued for a staged leaf of `map_rox`.
                    let huge_ok = slot.level == 2 && self.huge_store_ok(va as u64, e, entry);
                    if (slot.level != 3 && !huge_ok)
                        || (entry == 0 && (e & P != 0 || e & STAGED == 0))
                    {
                        continue;
                    }
                    // No CPU holds a translation of `va` now and the entry is not present, so
                    // this store needs no invalidation (SDM 4.10.2.3).
                    slot.set(entry);
                    if entry & W != 0 && self.linear.iter().any(|m| m.covers(va as u64)) {
                        merged.extend(reclaim::collapse(&view, &self.owned, va as u64));
                    }
                }
            }
            self.deferred.extend(merged);
        }
        if !freed.is_empty() {
            let mut huge = Vec::new();
            {
                let mut frames = self.frames.lock();
                for f in freed {
                    self.owned.remove(&f);
                    if self.huge_frames.remove(&f) {
                        huge.push(f);
                    } else {
                        // SAFETY: unmapped (or, for a table, unlinked), and invalidated on
                        // every CPU above.
                        unsafe { frames.deallocate_frame(frame(f)) };
                    }
                }
            }
            // After the 4 KiB allocator's lock: a kernel may serve both from one allocator.
            self.give_back_huge(&huge);
        }
        Ok(())
    }

    fn sync_cores(&mut self) -> Result<(), MmuError> {
        cpu::serialize();
        // The code stores before this call are ordered before the count is read, as in `flush`.
        if smp::others_online(|| self.smp.online_cpus()) {
            self.smp.sync_cores()?;
            self.stats.syncs += 1;
        }
        Ok(())
    }

    fn query(&self, addr: usize) -> Option<PageMapping> {
        let _mapper = self.tables.lock();
        let (_, frame, writable, executable) = self.view().translate(addr as u64 & !0xFFF)?;
        Some(PageMapping {
            frame,
            writable,
            executable,
        })
    }

    fn for_each_mapping(&self, range: AddressRange, f: &mut dyn FnMut(usize, PageMapping)) {
        if range.is_empty() {
            return;
        }
        let _mapper = self.tables.lock();
        let (lo, last) = ((range.start() & !0xFFF) as u64, range.end() as u64 - 1);
        self.view().visit_range(lo, last, &mut |leaf| {
            let first = (leaf.virt as u64).max(lo);
            let end = (leaf.virt as u64 + (leaf.size as u64 - 1)).min(last);
            let mut va = first;
            while va <= end {
                let frame = leaf.frame + (va - leaf.virt as u64);
                f(
                    va as usize,
                    PageMapping {
                        frame,
                        writable: leaf.writable,
                        executable: leaf.executable,
                    },
                );
                va += PAGE_SIZE as u64;
            }
        });
    }

    fn for_each_leaf(&self, f: &mut dyn FnMut(&Leaf)) {
        let _mapper = self.tables.lock();
        self.view().visit_range(0, u64::MAX, f);
    }

    fn flush_stats(&self) -> FlushStats {
        self.stats
    }

    fn free_frames(&self) -> Option<usize> {
        self.free_count.map(|count| count(&self.frames.lock()))
    }
}

impl<R: RawMutex, M, A: FrameDeallocator<Size4KiB>, F> Drop for X86Mmu<'_, R, M, A, F> {
    /// Frees the private alias tables. Tables merged back by the last flush (`deferred`) stay
    /// allocated: CPUs may still cache entries pointing to them, and no round follows.
    fn drop(&mut self) {
        let mut frames = self.frames.lock();
        for f in self.poke.frames() {
            // SAFETY: the private tables are used only inside `poke`, which cannot run any more;
            // no CPU loads their PML4 outside a session.
            unsafe { frames.deallocate_frame(frame(f)) };
        }
    }
}

/// Stages the leaf in `slot` (page `va`): not present now, `target` after the flush. The
/// not-present entry keeps the frame and flags (ignored by hardware) so a later staging of a
/// leaf staged already knows what it was; a leaf staged already stays as it is.
fn stage(slot: Slot, va: usize, target: u64, tlb: &mut TlbFlush) {
    let e = slot.get();
    if e & P != 0 {
        slot.set((e & !P) | STAGED);
    }
    // SAFETY: the leaf is not present now; the backend's `flush` stores `target` after every CPU
    // invalidated `va`.
    unsafe { tlb.store_after_flush(va, target) };
}
