//! The ROX mode of the allocator run: which code spaces are on 2 MiB pages (learnt as spaces
//! appear, followed when one falls back to 4 KiB pages), and the injection of "no 2 MiB frame":
//! a hog takes every free 2 MiB run of the machine for a few steps, through the backend's own
//! `map_rox` at addresses outside the manager's window.

use codespace::mmu::{CommittedPage, Mmu, MmuError, TlbFlush};
use codespace::AddressRange;

use super::model::{ShadowSpace, HUGE};
use super::Run;
use crate::common::*;

/// Where the hog maps its 2 MiB pages: in the slot, far above the manager's window.
const HOG_BASE: usize = BASE + (256 << 30);
/// Frames of one 2 MiB page.
pub(super) const HUGE_FRAMES: usize = HUGE / PAGE;

/// 2 MiB pages held outside the manager, so that no 2 MiB frame is left.
#[derive(Default)]
pub(super) struct Hog {
    pages: Vec<Vec<CommittedPage>>,
    /// The step after which the runs go back.
    until: u64,
    /// Steps that ran with every 2 MiB frame taken.
    pub steps: u64,
}

/// What a ROX run went through (its summary; the run asserts it covered each).
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Most 2 MiB pages mapped at once.
    pub most_huge: usize,
    /// 2 MiB pages that went back when a free or discard left them wholly free.
    pub freed_huge: usize,
    /// Allocations refused at the commit limit.
    pub limit: usize,
    /// Allocations refused for want of frames.
    pub no_frame: usize,
    /// Failed allocations that left a page committed (`PartialDecommit`).
    pub left_behind: usize,
}

impl Hog {
    pub fn active(&self) -> bool {
        !self.pages.is_empty()
    }

    /// Frames the hog holds (data frames that are not the manager's).
    pub fn frames(&self) -> usize {
        self.pages.len() * HUGE_FRAMES
    }
}

impl Run<'_> {
    /// Takes every free 2 MiB run until step `until` (before any failure is planned: these
    /// calls must succeed).
    pub(super) fn hog_huge_frames(&mut self, until: u64) {
        self.hog.until = until;
        let mut mmu = self.machine.clone();
        let mut tlb = TlbFlush::new();
        loop {
            let va = HOG_BASE + self.hog.pages.len() * HUGE;
            // SAFETY: `va` lies in the slot, outside the manager's window: nothing else maps
            // it, and no code ever runs on the software machine.
            match unsafe { mmu.map_rox(va, &mut tlb) } {
                Ok(pages) => self.hog.pages.push(pages),
                Err(MmuError::OutOfFrames) => break,
                Err(e) => panic!("{}: hog: {e:?}", self.label()),
            }
        }
        mmu.flush(tlb).map_err(|u| u.error).unwrap();
    }

    /// After a step: counts it if it ran hogged, and ends the period after its last step.
    pub(super) fn hog_step(&mut self) {
        if self.hog.active() {
            self.hog.steps += 1;
            if self.step >= self.hog.until {
                self.release_hog();
            }
        }
    }

    /// Gives the hogged runs back.
    pub(super) fn release_hog(&mut self) {
        if !self.hog.active() {
            return;
        }
        let mut mmu = self.machine.clone();
        let mut tlb = TlbFlush::new();
        for pages in self.hog.pages.drain(..) {
            // SAFETY: the hog's own 2 MiB pages, never run.
            unsafe { mmu.unmap_rox(pages, &mut tlb) }
                .map_err(|(e, _)| e)
                .unwrap();
        }
        mmu.flush(tlb).map_err(|u| u.error).unwrap();
    }

    /// Whether no 2 MiB frame is left: hogged, or (checked by trying one) the machine really
    /// has none. An operation that says so when a frame is free is a failure of the run.
    pub(super) fn no_huge_frame(&mut self) -> bool {
        if self.hog.active() {
            return true;
        }
        self.machine.clear_failures();
        let mut mmu = self.machine.clone();
        let mut tlb = TlbFlush::new();
        // SAFETY: as in `hog_huge_frames`; mapped and unmapped in one batch, never present.
        let free = match unsafe { mmu.map_rox(HOG_BASE, &mut tlb) } {
            Ok(pages) => {
                // SAFETY: just mapped by the probe, never run.
                unsafe { mmu.unmap_rox(pages, &mut tlb) }
                    .map_err(|(e, _)| e)
                    .unwrap();
                true
            }
            Err(MmuError::OutOfFrames) => false,
            Err(e) => panic!("{}: probe: {e:?}", self.label()),
        };
        mmu.flush(tlb).map_err(|u| u.error).unwrap();
        !free
    }

    /// A code space the model has not seen yet, reserved as a ROX space: 2 MiB aligned, whole
    /// 2 MiB pages (the window is large enough that reservation never falls back).
    pub(super) fn learn_space(&mut self, space: AddressRange) {
        if !self.mode.rox || self.spaces.contains_key(&space.start()) {
            return;
        }
        let label = self.label();
        assert!(
            space.start().is_multiple_of(HUGE) && space.size().is_multiple_of(HUGE),
            "{label}: ROX space {space:?}"
        );
        let rox = ShadowSpace {
            end: space.end(),
            rox: true,
        };
        self.spaces.insert(space.start(), rox);
    }

    /// After allocating `range` for module `mi` (`fallbacks`: the manager's count before): a
    /// new space is learnt, and a space that fell back to 4 KiB pages is followed. Only a
    /// space with no 2 MiB page may fall back, and only when no 2 MiB frame is left.
    pub(super) fn note_space(&mut self, mi: usize, range: AddressRange, fallbacks: u64) {
        if !self.mode.rox {
            return;
        }
        let space = self.modules[mi].alloc.space_of(range.start()).unwrap();
        self.learn_space(space);
        let fell = self.manager.stats().rox_fallbacks - fallbacks;
        let label = self.label();
        assert!(fell <= 1, "{label}: {fell} fallbacks in one allocation");
        if fell == 1 {
            let has_huge = self.huge.range(space.start()..space.end()).next().is_some();
            assert!(!has_huge, "{label}: {space:?} fell back with 2 MiB pages");
            assert!(
                self.no_huge_frame(),
                "{label}: {space:?} fell back with 2 MiB frames free"
            );
            let s = self.spaces.get_mut(&space.start()).unwrap();
            assert!(s.rox, "{label}: {space:?} fell back twice");
            s.rox = false;
            self.fallbacks += 1;
        }
    }

    /// Before freeing `range`: in a ROX space, the leaf stores and shootdown rounds so far.
    pub(super) fn free_costs(&self, range: AddressRange) -> Option<(u64, u64)> {
        self.in_rox_space(range.start()).then(|| {
            let shootdowns = self.manager.flush_stats().unwrap().shootdowns;
            (self.machine.leaf_stores(), shootdowns)
        })
    }

    /// A free or discard of `range` succeeded (`before`: [`free_costs`](Self::free_costs)):
    /// the model's rule, and in a ROX space what it cost. The INT3 refill goes through the
    /// alias: no page-table entry changes and no shootdown, unless 2 MiB pages went back,
    /// which cost one shootdown round for all of them.
    pub(super) fn freed(&mut self, range: AddressRange, before: Option<(u64, u64)>) {
        let died = self.remove_live(range);
        let Some((stores, shootdowns)) = before else {
            return;
        };
        let now = self.free_costs(range).unwrap_or_default();
        let label = self.label();
        if died == 0 {
            assert_eq!(now, (stores, shootdowns), "{label}: {range:?}");
        } else {
            assert_eq!(
                now.1,
                shootdowns + 1,
                "{label}: {died} 2 MiB pages went back"
            );
        }
    }

    /// An allocation of module `mi` failed with `PartialDecommit` (`fallbacks`: the manager's
    /// count before): its commit could not take back a page it mapped, which stays committed
    /// in free room. If a space fell back on the way, it is the one holding such a 4 KiB page
    /// (or it was new and went with the failed allocation); then a trim gives the pages back,
    /// so the model's rule holds again (the step's check verifies it).
    pub(super) fn left_behind(&mut self, mi: usize, fallbacks: u64) {
        let label = self.label();
        self.tally.left_behind += 1;
        for space in self.modules[mi].alloc.code_spaces().to_vec() {
            // A new space whose release failed stays with the allocator.
            self.learn_space(space);
        }
        let fell = self.manager.stats().rox_fallbacks - fallbacks;
        assert!(fell <= 1, "{label}: {fell} fallbacks in one allocation");
        if fell == 1 {
            self.fallbacks += 1;
            let mut small = Vec::new();
            for space in self.modules[mi].alloc.code_spaces() {
                let mut mapped = Vec::new();
                self.machine
                    .for_each_mapping(*space, &mut |page, _| mapped.push(page));
                // A 4 KiB leaf (pages of a 2 MiB leaf have none).
                let small_leaf = mapped.iter().any(|&p| leaf(&self.machine, p).is_some());
                if self.spaces[&space.start()].rox && small_leaf {
                    small.push(space.start());
                }
            }
            assert!(small.len() <= 1, "{label}: {small:x?}");
            if let Some(start) = small.pop() {
                let has_huge = self.huge.range(start..self.spaces[&start].end).next();
                assert!(
                    has_huge.is_none(),
                    "{label}: {start:#x} fell back with 2 MiB pages"
                );
                self.spaces.get_mut(&start).unwrap().rox = false;
            }
        }
        self.finish_decommit(mi);
    }

    /// Forgets the spaces of a released allocator and the 2 MiB pages they held.
    pub(super) fn forget_space(&mut self, space: AddressRange) {
        self.spaces.remove(&space.start());
        let bases: Vec<usize> = self
            .huge
            .range(space.start()..space.end())
            .copied()
            .collect();
        for base in bases {
            self.drop_huge(base);
        }
    }
}
