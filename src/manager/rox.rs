//! ROX code spaces (issue 20): 2 MiB aligned spaces of whole 2 MiB pages, mapped R+X once by
//! [`Mmu::map_rox`] and never writable; their reservation, their commits (a whole 2 MiB page at
//! a time, all of a commit's pages in one flush) and the fallback to 4 KiB pages of a space
//! whose first 2 MiB page finds no frame. Decommitting (whole 2 MiB pages only) is in
//! `commit.rs`; writing goes through the alias like any live page (`write.rs`).

use alloc::vec::Vec;

use super::error::CodeError;
use super::state::State;
use crate::mmu::{CommittedPage, Mmu, MmuError, TlbFlush, HUGE_PAGE_SIZE};
use crate::{AddressRange, PAGE_SIZE};

impl<M: Mmu> State<M> {
    /// Reserves a code space of `size` usable bytes for an allocator that asks for ROX pages
    /// (`rox`): with [`ManagerConfig::rox_code`], 2 MiB aligned and rounded to whole 2 MiB
    /// pages, with guards of whole 2 MiB pages (so no other space shares its 2 MiB pages);
    /// else, or when that does not fit (code-space size, window), an ordinary space (a
    /// fallback, counted).
    pub(crate) fn reserve_for(
        &mut self,
        size: usize,
        rox: bool,
    ) -> Result<AddressRange, CodeError> {
        if !(rox && self.config.rox_code) {
            return self.reserve(size);
        }
        match self.reserve_rox(size) {
            Some(usable) => Ok(usable),
            None => {
                // Counted only when the fallback space exists: a failed reservation changes
                // no counter.
                let usable = self.reserve(size)?;
                self.rox_fallbacks += 1;
                Ok(usable)
            }
        }
    }

    fn reserve_rox(&mut self, size: usize) -> Option<AddressRange> {
        let size = size
            .checked_next_multiple_of(HUGE_PAGE_SIZE)
            .filter(|&s| s > 0)?;
        if size > self.config.max_code_space_size {
            return None;
        }
        let guard = self
            .config
            .guard_bytes()
            .checked_next_multiple_of(HUGE_PAGE_SIZE)?;
        let total = size.checked_add(guard.checked_mul(2)?)?;
        let reservation =
            self.free_va
                .allocate_aligned_in_region(total, HUGE_PAGE_SIZE, self.window)?;
        Some(self.book_space(reservation, guard, true))
    }

    /// The unit pages are decommitted in at `addr`: 2 MiB in a ROX space, else 4 KiB.
    pub(crate) fn granule(&self, addr: usize) -> usize {
        match self.space_of(addr) {
            Some(s) if s.rox => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        }
    }

    /// Maps the 2 MiB pages `range` touches that are not mapped yet, all in one flush (the one
    /// that seals their aliases). A space whose first 2 MiB page finds no 2 MiB frame (or a
    /// backend without them) falls back to 4 KiB pages for good, counted.
    pub(super) fn commit_rox(&mut self, range: AddressRange) -> Result<(), CodeError> {
        let first = range.start() & !(HUGE_PAGE_SIZE - 1);
        let bases: Vec<usize> = (first..range.end())
            .step_by(HUGE_PAGE_SIZE)
            .filter(|b| !self.huge.contains(b))
            .collect();
        if bases.is_empty() {
            return Ok(());
        }
        self.check_commit(bases.len() * HUGE_PAGE_SIZE)?;
        let mut tlb = TlbFlush::new();
        for (i, &base) in bases.iter().enumerate() {
            // SAFETY: the 2 MiB at `base` lie in a ROX code space this manager reserved from
            // its window (2 MiB aligned, whole 2 MiB pages), and nothing of it is mapped (not
            // in `huge`; a ROX space maps nothing else).
            match unsafe { self.mmu.map_rox(base, &mut tlb) } {
                Ok(pages) => {
                    for p in pages {
                        self.pages.insert(p.page(), p);
                    }
                    self.huge.insert(base);
                }
                Err(e) => {
                    // Nothing ran on the pages just mapped (staged, never present): take them
                    // back in the same batch (the last staging of a leaf wins).
                    let undone = self.unmap_huge(&bases[..i], &mut tlb);
                    let flushed = self.flush(tlb);
                    self.stuck(&bases[..i], undone)?;
                    flushed?;
                    let space = range.start();
                    let untouched = i == 0 && !self.space_has_huge(space);
                    if untouched && matches!(e, MmuError::OutOfFrames | MmuError::Unsupported) {
                        if let Some(s) = self.spaces.values_mut().find(|s| s.usable.contains(space))
                        {
                            s.rox = false;
                            let key = s.usable.start();
                            let result = self.commit(range);
                            match result {
                                // With `PartialDecommit` 4 KiB pages of the space stay
                                // (counted, for a trim): it fell back all the same.
                                Ok(()) | Err(CodeError::PartialDecommit(_)) => {
                                    self.rox_fallbacks += 1;
                                }
                                // Nothing committed: the space stays as it was, a ROX space.
                                Err(_) => {
                                    if let Some(s) = self.spaces.get_mut(&key) {
                                        s.rox = true;
                                    }
                                }
                            }
                            return result;
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        if let Err(e) = self.flush(tlb) {
            // The leaves stay staged: take them back, so nothing is committed (the pending
            // batch then stores nothing for them and frees their frames).
            let mut undo = TlbFlush::new();
            let undone = self.unmap_huge(&bases, &mut undo);
            let _ = self.flush(undo);
            self.stuck(&bases, undone)?;
            return Err(e);
        }
        self.account_commit(bases.len() * HUGE_PAGE_SIZE);
        Ok(())
    }

    /// After a failed commit took back the 2 MiB pages at `bases` (`undone`): those it could
    /// not unmap stay mapped, so they are counted (a later trim or free decommits them, and
    /// the counter then agrees) and reported as [`CodeError::PartialDecommit`].
    fn stuck(&mut self, bases: &[usize], undone: Result<(), MmuError>) -> Result<(), CodeError> {
        let Err(e) = undone else {
            return Ok(());
        };
        let stuck = bases.iter().filter(|b| self.huge.contains(b)).count();
        self.committed += stuck * HUGE_PAGE_SIZE;
        Err(CodeError::PartialDecommit(e))
    }

    /// Whether the ROX space holding `addr` has a 2 MiB page mapped.
    fn space_has_huge(&self, addr: usize) -> bool {
        self.space_of(addr).is_some_and(|s| {
            self.huge
                .range(s.usable.start()..s.usable.end())
                .next()
                .is_some()
        })
    }

    /// Unmaps the 2 MiB pages at `bases` into `tlb`, in order; stops at the first failure,
    /// which leaves that page and the rest mapped.
    pub(super) fn unmap_huge(
        &mut self,
        bases: &[usize],
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        for &base in bases {
            let pages: Vec<CommittedPage> = (0..HUGE_PAGE_SIZE / PAGE_SIZE)
                .filter_map(|i| self.pages.remove(&(base + i * PAGE_SIZE)))
                .collect();
            // SAFETY: callers unmap only 2 MiB pages no code runs on: never published (a
            // commit rolled back), wholly free after the grace period, or a released space.
            match unsafe { self.mmu.unmap_rox(pages, tlb) } {
                Ok(()) => {
                    self.huge.remove(&base);
                }
                Err((e, back)) => {
                    for p in back {
                        self.pages.insert(p.page(), p);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}
