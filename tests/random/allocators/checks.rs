//! The allocator run's checks against its shadow model.

use codespace::mmu::soft::PHYS_BASE;
use codespace::mmu::Mmu;

use super::model::{Prot, HUGE};
use super::{Counters, Run};
use crate::common::*;

/// The page-size bit of a directory entry: a 2 MiB leaf.
const PTE_HUGE: u64 = 1 << 7;

impl Run<'_> {
    pub(super) fn counters(&self) -> Counters {
        Counters {
            manager: self.manager.stats(),
            allocators: self.modules.iter().map(|m| m.alloc.stats()).collect(),
            audit: self.manager.audit().unwrap(),
            data_frames: self.machine.total_frames()
                - self.machine.free_frames().unwrap()
                - self.machine.table_frames()
                - self.hog.frames(),
        }
    }

    /// A refused operation: counters and audit as after the last step, and every committed
    /// page as the model says.
    pub(super) fn assert_unchanged(&self) {
        assert_eq!(
            Some(&self.counters()),
            self.last.as_ref(),
            "{}",
            self.label()
        );
        self.verify_pages(self.pages.keys().copied());
    }

    /// As `assert_unchanged`, but the allocators' cumulative `freed` is not compared.
    pub(super) fn check_counters_unchanged(&self) {
        let now = self.counters();
        let last = self.last.as_ref().unwrap();
        assert_eq!(now.manager, last.manager, "{}", self.label());
        assert_eq!(now.audit, last.audit, "{}", self.label());
        for (a, b) in now.allocators.iter().zip(&last.allocators) {
            assert_eq!(
                (a.allocated, a.reserved),
                (b.allocated, b.reserved),
                "{}",
                self.label()
            );
        }
    }

    /// Each page's mapping as the model says: a 4 KiB leaf RW+NX or R+X, part of a 2 MiB leaf
    /// that is R+X and nothing else (never writable, no 4 KiB leaf under it), or nothing.
    pub(super) fn verify_pages(&self, pages: impl IntoIterator<Item = usize>) {
        for page in pages {
            // (flags of a 2 MiB leaf holding the page, flags of its 4 KiB leaf)
            let expected = match self.pages.get(&page).map(|s| s.prot) {
                Some(Prot::Huge) => (Some(PTE_HUGE | R_X), 0),
                Some(Prot::Rx) => (None, R_X),
                Some(Prot::RwNx) => (None, RW_NX),
                None => (None, 0),
            };
            let walk = self.machine.raw_entries(page);
            let huge = walk[2].filter(|e| e & PTE_HUGE != 0).map(|e| e & !PTE_ADDR);
            let got = (huge, walk[3].unwrap_or(0) & !PTE_ADDR);
            assert_eq!(got, expected, "{} page {page:#x}", self.label());
        }
    }

    /// Lets the manager finish what a failed operation left pending (flushes, flip backs):
    /// any call that takes its lock with interrupts on does (the audit of `check` then sees
    /// the settled state; auditing here as well would walk every page table twice a step).
    pub(super) fn settle(&self) {
        self.manager.flush_stats().unwrap();
    }

    /// After every operation: no broken promise in the TLB model, a clean audit counting
    /// exactly the pages live code touches, the touched pages as the model says, counters that
    /// agree. Every 500 steps all pages and bytes.
    pub(super) fn check(&mut self) {
        let label = self.label();
        let v = self.machine.violations();
        assert!(v.is_empty(), "{label}: {v:#?}");
        assert!(!self.machine.wx_ever_observed(), "{label}");
        let snap = self.counters();
        let audit = snap.audit;
        assert!(audit.is_clean(), "{label}: {audit:?}");
        assert_eq!(audit.mapped_pages, self.pages.len(), "{label}");
        // Leaves: one per 2 MiB page, one per other page; spaces as the model follows them.
        let huge = self.huge.len();
        assert_eq!(
            (audit.huge_leaves, audit.small_leaves),
            (huge, self.pages.len() - huge * (HUGE / PAGE)),
            "{label}"
        );
        let rox_spaces = self.spaces.values().filter(|s| s.rox).count();
        assert_eq!(
            (
                snap.manager.huge_pages,
                snap.manager.rox_spaces,
                snap.manager.rox_fallbacks
            ),
            (huge, rox_spaces, self.fallbacks),
            "{label}"
        );
        assert_eq!(
            snap.data_frames * PAGE,
            snap.manager.committed,
            "{label}: frame leak"
        );
        let touched = std::mem::take(&mut self.touched);
        self.verify_pages(touched);
        if self.step.is_multiple_of(100) {
            self.verify_pages(self.pages.keys().copied());
        }
        let reserved: usize = snap.allocators.iter().map(|s| s.reserved).sum();
        let spaces: usize = snap.allocators.iter().map(|s| s.code_spaces).sum();
        assert_eq!(snap.manager.reserved, reserved, "{label}");
        assert_eq!(snap.manager.code_spaces, spaces, "{label}");
        for (mi, stats) in snap.allocators.iter().enumerate() {
            assert_eq!(stats.allocated, self.allocated[mi], "{label} module {mi}");
        }
        self.last = Some(snap);
        if self.step.is_multiple_of(500) {
            self.check_bytes();
        }
    }

    /// No byte of a mapped 2 MiB page can be written by any CPU (whatever its TLB holds),
    /// through the page itself or through the direct-map alias of any of its frames.
    fn check_never_writable(&self) {
        let label = self.label();
        for &base in &self.huge {
            let leaf = self.machine.raw_entries(base)[2].unwrap();
            let frame = (leaf & PTE_ADDR) as usize - PHYS_BASE as usize;
            for cpu in 0..self.machine.online_cpus() {
                for offset in (0..HUGE).step_by(PAGE) {
                    for va in [base + offset, DIRECT_MAP + frame + offset] {
                        let wrote = self.machine.write_as(cpu, va, &[INT3]).is_ok();
                        assert!(!wrote, "{label}: CPU {cpu} wrote {va:#x} ({base:#x})");
                    }
                }
            }
        }
    }

    /// Every byte the model knows reads back, and what every CPU fetches from published code
    /// is what was published; no 2 MiB page is writable.
    pub(super) fn check_bytes(&self) {
        self.check_never_writable();
        let mut buf = vec![0; PAGE];
        for (&page, shadow) in &self.pages {
            self.manager.read(page, &mut buf).unwrap();
            for (offset, (&got, want)) in buf.iter().zip(&shadow.bytes).enumerate() {
                if let Some(want) = *want {
                    assert_eq!(got, want, "{} at {:#x}", self.label(), page + offset);
                }
            }
        }
        let cpus = self.machine.online_cpus();
        for module in &self.modules {
            for (code, bytes) in &module.published {
                let Some(bytes) = bytes else { continue };
                assert_eq!(
                    &read(&self.manager, code.start(), bytes.len()),
                    bytes,
                    "{}: {:?}",
                    self.label(),
                    code.range()
                );
                let mut fetched = vec![0; bytes.len()];
                let cpu = (code.start() / 64) % cpus;
                self.machine
                    .exec_as(cpu, code.start(), &mut fetched)
                    .unwrap();
                assert_eq!(&fetched, bytes, "{}: CPU {cpu}", self.label());
            }
        }
    }
}
