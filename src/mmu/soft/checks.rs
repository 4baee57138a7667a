//! The machine's side of the `Mmu` methods: the checks of the contract's promises at every
//! page-table store, and the stores themselves.

use super::inject::CallKind;
use super::machine::{leaf_frame, present, Slot, ADDR, HUGE, P, STAGED, W};
use super::tlb::{Violation, ViolationKind};
use super::{cached, Machine};
use crate::mmu::{CommittedPage, MmuError, TlbFlush};
use crate::PAGE_SIZE;
use alloc::vec::Vec;
const PAGE: u64 = PAGE_SIZE as u64;

impl Machine {
    pub(super) fn violation(
        &mut self,
        op: &'static str,
        kind: ViolationKind,
        page: u64,
        frame: u64,
    ) {
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
    pub(super) fn direct_va(&self, frame: u64) -> Option<u64> {
        Some(self.mem.direct_map? + (frame - super::PHYS_BASE))
    }

    /// Every present translation of `frame` other than at `except`: (page, writable, exec).
    pub(super) fn mappings_of(&self, frame: u64, except: u64) -> Vec<(u64, bool, bool)> {
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

    pub(super) fn report_clash(
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
    pub(super) fn leaf_slot_splitting(&mut self, va: u64) -> Result<Slot, MmuError> {
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
    pub(super) fn free(&mut self, frame: u64) {
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
    pub(super) fn mapped_leaf(&self, page: &CommittedPage) -> Result<Slot, MmuError> {
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
    pub(super) fn leaf_of(&self, page: &CommittedPage) -> Result<Slot, MmuError> {
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
    pub(super) fn executable_anywhere(&self, frame: u64) -> bool {
        self.mappings_of(frame, u64::MAX).iter().any(|m| m.2)
            || self.tlbs.stale_of(frame).any(|(_, _, t)| t.executable)
    }
}
