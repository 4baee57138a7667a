//! The [`Mmu`] implementation of the software machine, and the checks of its promises.

use alloc::vec::Vec;

use super::inject::CallKind;
use super::machine::{canonical, present, Memory, HUGE, P, PS, STAGED, W};
use super::{Machine, SoftMmu};
use crate::mmu::pte::leaf_entry;
use crate::mmu::{
    page_aligned, CommittedPage, FlushStats, InterruptControl, Leaf, Mmu, MmuError, PageMapping,
    Poke, Protection, TlbFlush, Unflushed, MAX_POKE_PAGES,
};
use crate::{AddressRange, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// The private alias of a [`SoftMmu::poke`] session: writes go straight to the frames.
struct Session<'m> {
    machine: &'m mut Machine,
    frames: Vec<u64>,
}

impl Session<'_> {
    fn bytes(&mut self, i: usize, offset: usize, len: usize) -> Result<&mut [u8], MmuError> {
        let frame = *self.frames.get(i).ok_or(MmuError::OutOfRange { addr: i })?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= PAGE_SIZE)
            .ok_or(MmuError::OutOfRange { addr: offset })?;
        let index = self
            .machine
            .mem
            .frame_index(frame)
            .ok_or(MmuError::OutOfRange {
                addr: frame as usize,
            })?;
        if self.machine.executable_anywhere(frame) {
            // Executing CPUs keep the old bytes until they serialize.
            let old = *self.machine.mem.frame_bytes_mut(index);
            self.machine.tlbs.code_changing(frame, &old);
        }
        Ok(&mut self.machine.mem.frame_bytes_mut(index)[offset..end])
    }
}

impl Poke for Session<'_> {
    fn write(&mut self, i: usize, offset: usize, data: &[u8]) -> Result<(), MmuError> {
        self.bytes(i, offset, data.len())?.copy_from_slice(data);
        Ok(())
    }

    fn store_u64(&mut self, i: usize, offset: usize, value: u64) -> Result<(), MmuError> {
        if !offset.is_multiple_of(8) {
            return Err(MmuError::Unaligned { addr: offset });
        }
        // Aligned: one copy, like the single store it models.
        self.bytes(i, offset, 8)?
            .copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

// SAFETY: the model keeps the trait's promises by construction (mappings change only through
// these methods, frames are freed after every CPU invalidated, the alias is private to the
// session), and it checks them as it goes: a broken promise becomes a recorded `Violation`.
unsafe impl Mmu for SoftMmu {
    fn check_cpu(&self) -> Result<(), MmuError> {
        let m = self.machine.lock();
        let cpu = m
            .tlbs
            .cpus
            .get(self.cpu)
            .ok_or(MmuError::OutOfRange { addr: self.cpu })?;
        if cpu.no_nxe {
            return Err(MmuError::NoExecuteDisabled { cpu: self.cpu });
        }
        if cpu.no_wp {
            return Err(MmuError::WriteProtectDisabled { cpu: self.cpu });
        }
        Ok(())
    }

    fn current_cpu(&self) -> usize {
        self.cpu
    }

    fn online_cpus(&self) -> usize {
        self.machine.lock().tlbs.cpus.len()
    }

    fn interrupt_control(&self) -> InterruptControl {
        self.machine.lock().irq
    }

    unsafe fn map_fresh(&mut self, page: usize) -> Result<CommittedPage, MmuError> {
        let mut m = self.machine.lock();
        m.injected(CallKind::Map)?;
        if !page_aligned(page) {
            return Err(MmuError::Unaligned { addr: page });
        }
        let va = page as u64;
        if !canonical(va) || m.in_direct_map(va) {
            return Err(MmuError::OutOfRange { addr: page });
        }
        let (slot, missing) = m.mem.walk(va);
        if let Some(s) = slot {
            if s.level != 3 {
                return Err(MmuError::HugePage { page });
            }
            if m.mem.entry(s.table, s.index) != 0 {
                return Err(MmuError::AlreadyMapped { page });
            }
        }
        if m.mem.free_count() < missing + 1 {
            return Err(MmuError::OutOfFrames);
        }
        let slot = m.mem.make_leaf_slot(va).ok_or(MmuError::OutOfFrames)?;
        let index = m.mem.alloc_frame().ok_or(MmuError::OutOfFrames)?;
        m.mem.int3.insert(index);
        let frame = Memory::phys(index);
        m.store(
            "map_fresh",
            va,
            slot,
            leaf_entry(frame, Protection::ReadWrite),
        );
        // SAFETY: `frame` was just allocated for `page` and mapped there.
        Ok(unsafe { CommittedPage::new(page, frame) })
    }

    unsafe fn map_rox(
        &mut self,
        page: usize,
        tlb: &mut TlbFlush,
    ) -> Result<Vec<CommittedPage>, MmuError> {
        self.machine.lock().map_rox(page, tlb)
    }

    unsafe fn unmap_rox(
        &mut self,
        pages: Vec<CommittedPage>,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, Vec<CommittedPage>)> {
        self.machine.lock().unmap_rox(pages, tlb)
    }

    unsafe fn unmap(
        &mut self,
        page: CommittedPage,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, CommittedPage)> {
        let mut m = self.machine.lock();
        if let Err(e) = m.injected(CallKind::Unmap) {
            return Err((e, page));
        }
        let slot = match m.leaf_of(&page) {
            Ok(s) => s,
            Err(e) => return Err((e, page)),
        };
        // Restore the direct-map alias first: if that fails, nothing changed.
        if let Err(e) = m.set_alias_writable(page.frame(), true, tlb) {
            return Err((e, page));
        }
        // Staged like every other change: a batch still pending from a failed flush may hold a
        // store for this leaf (a publish's R+X), and only a later staging replaces it. The leaf
        // stays not present (and not mappable again) until the flush clears it.
        m.stage("unmap", page.page() as u64, slot, 0, tlb);
        // SAFETY: the frame is mapped nowhere now (the staged leaf is not present and becomes
        // empty in the flush, before frames are freed); its page goes into the batch with it.
        unsafe { tlb.free_after_flush(page.page(), page.frame()) };
        Ok(())
    }

    unsafe fn protect(
        &mut self,
        page: &CommittedPage,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        let mut m = self.machine.lock();
        m.injected(CallKind::Protect)?;
        let slot = m.leaf_of(page)?;
        let target = leaf_entry(page.frame(), prot);
        if m.mem.entry(slot.table, slot.index) == target {
            return Ok(());
        }
        if prot == Protection::ReadExecute {
            m.set_alias_writable(page.frame(), false, tlb)?;
        }
        m.stage("protect", page.page() as u64, slot, target, tlb);
        Ok(())
    }

    fn write(&mut self, page: &CommittedPage, offset: usize, data: &[u8]) -> Result<(), MmuError> {
        let mut m = self.machine.lock();
        m.injected(CallKind::Write)?;
        m.mapped_leaf(page)?;
        match m.mem.translate(page.page() as u64) {
            Some(t) if t.writable => {}
            Some(_) => return Err(MmuError::NotWritable { page: page.page() }),
            None => return Err(MmuError::NotMapped { page: page.page() }),
        }
        let end = offset
            .checked_add(data.len())
            .filter(|&e| e <= PAGE_SIZE)
            .ok_or(MmuError::OutOfRange {
                addr: page.page() + offset,
            })?;
        let index = m
            .mem
            .frame_index(page.frame())
            .ok_or(MmuError::NotMapped { page: page.page() })?;
        m.mem.frame_bytes_mut(index)[offset..end].copy_from_slice(data);
        Ok(())
    }

    unsafe fn poke(
        &mut self,
        pages: &[&CommittedPage],
        f: &mut dyn FnMut(&mut dyn Poke) -> Result<(), MmuError>,
    ) -> Result<(), MmuError> {
        let mut m = self.machine.lock();
        m.injected(CallKind::Poke)?;
        if pages.len() > MAX_POKE_PAGES {
            return Err(MmuError::TooManyPages {
                pages: pages.len(),
                max: MAX_POKE_PAGES,
            });
        }
        for p in pages {
            m.mapped_leaf(p)?;
        }
        m.stats.pokes += 1;
        let mut session = Session {
            machine: &mut m,
            frames: pages.iter().map(|p| p.frame()).collect(),
        };
        f(&mut session)
    }

    fn read(&self, page: &CommittedPage, offset: usize, buf: &mut [u8]) -> Result<(), MmuError> {
        let m = self.machine.lock();
        m.mapped_leaf(page)?;
        if m.mem.translate(page.page() as u64).is_none() {
            return Err(MmuError::NotMapped { page: page.page() });
        }
        let end = offset
            .checked_add(buf.len())
            .filter(|&e| e <= PAGE_SIZE)
            .ok_or(MmuError::OutOfRange {
                addr: page.page() + offset,
            })?;
        match m
            .mem
            .frame_index(page.frame())
            .and_then(|i| m.mem.frame_bytes(i))
        {
            Some(bytes) => buf.copy_from_slice(&bytes[offset..end]),
            None => buf.fill(0),
        }
        Ok(())
    }

    fn flush(&mut self, mut tlb: TlbFlush) -> Result<(), Unflushed> {
        let mut m = self.machine.lock();
        // Before the round, as on x86, where the round is what may fail.
        m.unlink_tables(&mut tlb);
        if let Err(error) = m.injected(CallKind::Flush) {
            return Err(Unflushed {
                error,
                tlb: alloc::boxed::Box::new(tlb),
            });
        }
        let cpus = m.tlbs.cpus.len();
        if tlb.needs_invalidation() {
            for cpu in 0..cpus {
                if tlb.is_full() {
                    m.tlbs.invalidate(cpu, None);
                } else {
                    for &p in tlb.pages() {
                        m.tlbs.invalidate(cpu, Some(p as u64));
                    }
                }
            }
            if tlb.is_full() {
                m.stats.full += 1;
            } else {
                m.stats.single_pages += tlb.pages().len() as u64;
            }
            if cpus > 1 {
                m.stats.shootdowns += 1;
            }
        }
        let (stores, frames) = tlb.take_work();
        for &(va, entry) in &stores {
            if let Some(slot) = m.mem.walk(va as u64).0 {
                // An unmap's store clears only the leaf it staged: after a failed round, the
                // page may have been mapped afresh (in a new table) before the retry.
                let e = m.mem.entry(slot.table, slot.index);
                // A 2 MiB slot takes only the stores queued for a staged 2 MiB leaf (`map_rox`,
                // `unmap_rox`), never a 4 KiB page's.
                let huge_ok = slot.level == 2
                    && (va as u64).is_multiple_of(HUGE)
                    && e & PS != 0
                    && (entry == 0 || entry & PS != 0);
                if (slot.level != 3 && !huge_ok) || (entry == 0 && (present(e) || e & STAGED == 0))
                {
                    continue;
                }
                m.store("flush", va as u64, slot, entry);
            }
        }
        for &(va, entry) in &stores {
            if entry & W != 0 && m.in_direct_map(va as u64) {
                m.collapse(va as u64);
            }
        }
        for frame in frames {
            m.free(frame);
        }
        Ok(())
    }

    fn sync_cores(&mut self) -> Result<(), MmuError> {
        let mut m = self.machine.lock();
        m.injected(CallKind::Sync)?;
        let cpus = m.tlbs.cpus.len();
        for cpu in 0..cpus {
            m.tlbs.serialize(cpu);
        }
        if cpus > 1 {
            m.stats.syncs += 1;
        }
        Ok(())
    }

    fn query(&self, addr: usize) -> Option<PageMapping> {
        self.machine.lock().mem.translate(addr as u64 & !(PAGE - 1))
    }

    fn for_each_mapping(&self, range: AddressRange, f: &mut dyn FnMut(usize, PageMapping)) {
        if range.is_empty() {
            return;
        }
        let m = self.machine.lock();
        let (lo, last) = ((range.start() as u64) & !(PAGE - 1), range.end() as u64 - 1);
        m.mem.visit(lo, last, &mut |leaf| {
            let first = (leaf.virt as u64).max(lo);
            let end = (leaf.virt as u64 + (leaf.size as u64 - 1)).min(last);
            let mut va = first;
            while va <= end {
                f(
                    va as usize,
                    PageMapping {
                        frame: leaf.frame + (va - leaf.virt as u64),
                        writable: leaf.writable,
                        executable: leaf.executable,
                    },
                );
                va += PAGE;
            }
        });
    }

    fn for_each_leaf(&self, f: &mut dyn FnMut(&Leaf)) {
        self.machine.lock().mem.visit(0, u64::MAX, f);
    }

    fn flush_stats(&self) -> FlushStats {
        self.machine.lock().stats
    }

    fn free_frames(&self) -> Option<usize> {
        Some(self.machine.lock().mem.free_count())
    }
}

/// Staged entries are the entry with `P` cleared and `STAGED` set: never present, never empty.
const _: () = assert!(STAGED & P == 0);
