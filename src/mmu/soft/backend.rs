//! The [`Mmu`] implementation of the software machine, and the checks of its promises.

use alloc::vec::Vec;

use super::inject::CallKind;
use super::machine::{canonical, leaf_frame, present, Memory, Slot, ADDR, HUGE, P, PS, STAGED, W};
use super::tlb::{Violation, ViolationKind};
use super::{cached, Machine, SoftMmu};
use crate::mmu::pte::leaf_entry;
use crate::mmu::{
    page_aligned, CommittedPage, FlushStats, InterruptControl, Leaf, Mmu, MmuError, PageMapping,
    Poke, Protection, TlbFlush, Unflushed, MAX_POKE_PAGES,
};
use crate::{AddressRange, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

impl Machine {
    fn violation(&mut self, op: &'static str, kind: ViolationKind, page: u64, frame: u64) {
        self.violations.push(Violation {
            op,
            kind,
            page: page as usize,
            frame,
            cpu: None,
        });
    }

    pub(super) fn in_direct_map(&self, va: u64) -> bool {
        self.mem
            .direct_map
            .is_some_and(|b| va >= b && va - b < self.mem.total() as u64 * PAGE)
    }

    /// The direct-map address of `frame`, if the machine has a direct map.
    fn direct_va(&self, frame: u64) -> Option<u64> {
        Some(self.mem.direct_map? + (frame - super::PHYS_BASE))
    }

    /// Every present translation of `frame` other than at `except`: (page, writable, exec).
    fn mappings_of(&self, frame: u64, except: u64) -> Vec<(u64, bool, bool)> {
        let mut out: Vec<_> = self
            .rmap
            .get(&frame)
            .into_iter()
            .flatten()
            .filter(|&&va| va != except)
            .filter_map(|&va| {
                let m = self.mem.translate(va)?;
                Some((va, m.writable, m.executable))
            })
            .collect();
        if let Some(va) = self.direct_va(frame).filter(|&va| va != except) {
            if let Some(m) = self.mem.translate(va) {
                out.push((va, m.writable, m.executable));
            }
        }
        out
    }

    /// Stores `new` in the leaf `slot` of page `va` (a 4 KiB leaf, or a 2 MiB one at level 2)
    /// and checks the promises: the old translation becomes stale on every CPU (one TLB entry,
    /// whatever its size); the new one must not be W+X, nor executable while anything grants
    /// writes to any of its frames, nor writable while anything executes one.
    pub(super) fn store(&mut self, op: &'static str, va: u64, slot: Slot, new: u64) {
        let old = self.mem.entry(slot.table, slot.index);
        let level = slot.level;
        if present(old) {
            self.tlbs.went_stale(va, cached(old, level));
        }
        self.mem.set_entry(slot.table, slot.index, new);
        self.leaf_stores += 1;
        let window = !self.in_direct_map(va);
        // The 4 KiB pages the leaf maps: (page, frame) for entry `e`.
        let pages = if level == 2 { HUGE / PAGE } else { 1 };
        let sub =
            move |e: u64| (0..pages).map(move |i| (va + i * PAGE, leaf_frame(e, level) + i * PAGE));
        if window
            && leaf_frame(old, level) != leaf_frame(new, level)
            && (present(old) || old & STAGED != 0)
        {
            for (page, frame) in sub(old) {
                if let Some(set) = self.rmap.get_mut(&frame) {
                    set.remove(&page);
                }
            }
        }
        if !present(new) && new & STAGED == 0 {
            return;
        }
        if window {
            for (page, frame) in sub(new) {
                self.rmap.entry(frame).or_default().insert(page);
            }
        }
        if !present(new) {
            return;
        }
        let now = cached(new, level);
        if window && now.executable {
            self.ever_executable.extend(sub(new).map(|(page, _)| page));
        }
        if now.writable && now.executable {
            self.wx_stores += 1;
            self.violation(op, ViolationKind::WritableAndExecutable, va, now.frame);
        }
        let clash = |w: bool, x: bool| (now.executable && w) || (now.writable && x);
        for (va, frame) in sub(new) {
            let others = self.mappings_of(frame, va);
            let stale: Vec<_> = self.tlbs.stale_of(frame).collect();
            for &(page, w, x) in &others {
                if clash(w, x) {
                    self.report_clash(op, now.executable, page, frame, None);
                }
            }
            for &(cpu, page, t) in &stale {
                if clash(t.writable, t.executable) {
                    self.report_clash(op, now.executable, page, frame, Some(cpu));
                }
            }
        }
    }

    fn report_clash(
        &mut self,
        op: &'static str,
        exec: bool,
        page: u64,
        frame: u64,
        cpu: Option<usize>,
    ) {
        let kind = if exec {
            ViolationKind::ExecutableWhileWritable
        } else {
            ViolationKind::WritableWhileExecutable
        };
        self.violations.push(Violation {
            op,
            kind,
            page: page as usize,
            frame,
            cpu,
        });
    }

    /// The 4 KiB leaf slot of `va`, splitting a 2 MiB direct-map page on the way if needed.
    fn leaf_slot_splitting(&mut self, va: u64) -> Result<Slot, MmuError> {
        match self.mem.walk(va).0 {
            Some(slot) if slot.level == 3 => Ok(slot),
            Some(slot) => {
                self.mem.split(slot).ok_or(MmuError::OutOfFrames)?;
                match self.mem.walk(va).0 {
                    Some(s) if s.level == 3 => Ok(s),
                    _ => Err(MmuError::NotMapped { page: va as usize }),
                }
            }
            None => Err(MmuError::NotMapped { page: va as usize }),
        }
    }

    /// Stages `slot`'s entry at `va`: not present now (keeping its frame and flags, so a later
    /// staging can tell what it was), `final_entry` after the flush.
    pub(super) fn stage(
        &mut self,
        op: &'static str,
        va: u64,
        slot: Slot,
        final_entry: u64,
        tlb: &mut TlbFlush,
    ) {
        let e = self.mem.entry(slot.table, slot.index);
        if present(e) {
            self.store(op, va, slot, (e & !P) | STAGED);
        }
        // SAFETY: the leaf of `va` is not present and stays so until the flush stores this
        // (a leaf staged already is replaced only through batches, see `TlbFlush`).
        unsafe { tlb.store_after_flush(va as usize, final_entry) };
    }

    /// Seals (read-only) or unseals (writable) the direct-map alias of `frame`.
    pub(super) fn set_alias_writable(
        &mut self,
        frame: u64,
        writable: bool,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        let Some(va) = self.direct_va(frame) else {
            return Ok(());
        };
        // A huge leaf that already grants what is asked is not split (as on x86).
        if let Some(slot) = self.mem.walk(va).0.filter(|s| s.level != 3) {
            if (self.mem.entry(slot.table, slot.index) & W != 0) == writable {
                return Ok(());
            }
        }
        let slot = self.leaf_slot_splitting(va)?;
        let e = self.mem.entry(slot.table, slot.index);
        // A leaf staged by an earlier batch (whose flush failed) gets this batch's final value:
        // the merged batch stores the last staging, so the alias ends as asked now.
        let staged = !present(e) && e & STAGED != 0;
        if staged || (present(e) && (e & W != 0) != writable) {
            let e = (e | P) & !STAGED;
            let target = if writable { e | W } else { e & !W };
            self.stage("protect", va, slot, target, tlb);
        }
        Ok(())
    }

    /// Returns `frame` to the allocator, checking that no CPU may still reach it.
    fn free(&mut self, frame: u64) {
        let stale: Vec<_> = self.tlbs.stale_of(frame).collect();
        for (cpu, page, _) in stale {
            self.violations.push(Violation {
                op: "flush",
                kind: ViolationKind::FreedWhileCached,
                page: page as usize,
                frame,
                cpu: Some(cpu),
            });
        }
        if self.rmap.get(&frame).is_some_and(|s| !s.is_empty()) {
            self.violation("flush", ViolationKind::FreedWhileMapped, 0, frame);
        }
        if let Some(i) = self.mem.frame_index(frame) {
            if self.mem.tables.contains(&i) {
                let walking: Vec<_> = self.tlbs.walking(frame).collect();
                for cpu in walking {
                    self.violations.push(Violation {
                        op: "flush",
                        kind: ViolationKind::FreedWhileCached,
                        page: 0,
                        frame,
                        cpu: Some(cpu),
                    });
                }
                if self.mem.is_linked(i) {
                    self.violation("flush", ViolationKind::FreedWhileMapped, 0, frame);
                }
            }
            self.mem.free_frame(i);
        }
        // Every CPU invalidated the frame's translations in the flush freeing it, and on x86
        // every invalidation (INVLPG, a CR3 reload, the shootdown interrupt) serializes: no CPU
        // keeps bytes it fetched from the frame for when it holds other code.
        self.tlbs.forget_code(frame);
    }

    /// The leaf mapping `page`: its own 4 KiB leaf, or the 2 MiB leaf (present or staged) of
    /// [`Mmu::map_rox`] whose frame holds `page`'s frame at the page's offset.
    fn mapped_leaf(&self, page: &CommittedPage) -> Result<Slot, MmuError> {
        let va = page.page() as u64;
        match self.mem.walk(va).0 {
            Some(s) if s.level == 2 => {
                let e = self.mem.entry(s.table, s.index);
                if leaf_frame(e, 2) + (va & (HUGE - 1)) == page.frame() && !self.in_direct_map(va) {
                    Ok(s)
                } else {
                    Err(MmuError::NotMapped { page: page.page() })
                }
            }
            _ => self.leaf_of(page),
        }
    }

    /// The 4 KiB leaf of `page` (a page of a 2 MiB leaf has none: it is unmapped and never
    /// changes protection alone).
    fn leaf_of(&self, page: &CommittedPage) -> Result<Slot, MmuError> {
        let va = page.page() as u64;
        match self.mem.walk(va).0 {
            Some(s) if s.level == 3 && self.mem.entry(s.table, s.index) & ADDR == page.frame() => {
                Ok(s)
            }
            _ => Err(MmuError::NotMapped { page: page.page() }),
        }
    }

    pub(super) fn injected(&mut self, kind: CallKind) -> Result<(), MmuError> {
        if self.inject.call(kind) {
            Err(MmuError::Injected)
        } else {
            Ok(())
        }
    }

    /// Whether some present translation executes `frame`, or a CPU may (stale).
    fn executable_anywhere(&self, frame: u64) -> bool {
        self.mappings_of(frame, u64::MAX).iter().any(|m| m.2)
            || self.tlbs.stale_of(frame).any(|(_, _, t)| t.executable)
    }
}

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
