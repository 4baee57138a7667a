//! Committing and decommitting the pages of code spaces: 4 KiB pages one by one, and in ROX
//! spaces whole 2 MiB pages (mapped R+X from the start, INT3 filled, never writable).

use alloc::vec::Vec;

use super::error::CodeError;
use super::state::State;
use crate::mmu::{Mmu, TlbFlush, HUGE_PAGE_SIZE};
use crate::{AddressRange, PAGE_SIZE};

impl<M: Mmu> State<M> {
    /// Maps the pages of `range` that are not committed yet, RW+NX (in a ROX space: the 2 MiB
    /// pages it touches, R+X), charging them against the limit; on failure unmaps what it
    /// mapped and charges nothing, except pages it cannot unmap: those stay mapped and charged
    /// ([`CodeError::PartialDecommit`]). Allocation-free when warm.
    pub(crate) fn commit(&mut self, range: AddressRange) -> Result<(), CodeError> {
        if self.space_of(range.start()).is_some_and(|s| s.rox) {
            return self.commit_rox(range);
        }
        let mut missing = core::mem::take(&mut self.scratch);
        missing.clear();
        missing.extend(range.pages().filter(|p| !self.pages.contains_key(p)));
        let result = self.map_missing(&missing);
        self.scratch = missing;
        result
    }

    fn map_missing(&mut self, missing: &[usize]) -> Result<(), CodeError> {
        if missing.is_empty() {
            return Ok(());
        }
        let bytes = missing.len() * PAGE_SIZE;
        self.check_commit(bytes)?;
        for (i, &page) in missing.iter().enumerate() {
            debug_assert!(self.space_of(page).is_some());
            // SAFETY: `page` lies in a code space this manager reserved from its window, and no
            // other part of codespace maps it (it is not in `pages`); the backend refuses pages
            // outside the memory it was given for code.
            match unsafe { self.mmu.map_fresh(page) } {
                Ok(committed) => {
                    self.pages.insert(page, committed);
                }
                Err(e) => {
                    // Nothing ran on the pages just mapped: unmap them again. One that cannot
                    // be stays mapped and counted, for a later trim, and the error says so.
                    let mut tlb = TlbFlush::new();
                    let mut stuck = None;
                    for p in &missing[..i] {
                        if let Some(committed) = self.pages.remove(p) {
                            // SAFETY: mapped a moment ago by this call, never published.
                            if let Err((u, back)) = unsafe { self.mmu.unmap(committed, &mut tlb) } {
                                self.pages.insert(*p, back);
                                self.committed += PAGE_SIZE;
                                stuck.get_or_insert(u);
                            }
                        }
                    }
                    // A failed flush is retried by the next operation; the stuck page is the
                    // news the caller must act on (a trim).
                    let flushed = self.flush(tlb);
                    if let Some(u) = stuck {
                        return Err(CodeError::PartialDecommit(u));
                    }
                    flushed?;
                    return Err(e.into());
                }
            }
        }
        self.account_commit(bytes);
        Ok(())
    }

    /// Decommits every committed page inside `range` (whole pages; in a ROX space whole 2 MiB
    /// pages, the others stay), freeing the frames after one flush.
    ///
    /// # Errors
    /// [`CodeError::PartialDecommit`]: an unmap failed; pages from there on stay committed.
    /// [`CodeError::FlushFailed`]: the pages are unmapped, their frames freed by a later flush.
    pub(crate) fn decommit(&mut self, range: AddressRange) -> Result<(), CodeError> {
        let huge = HUGE_PAGE_SIZE;
        let bases: Vec<usize> = self
            .huge
            .range(range.start()..range.end())
            .copied()
            .filter(|&b| b.checked_add(huge).is_some_and(|end| end <= range.end()))
            .collect();
        let pages: Vec<usize> = self
            .pages
            .range(range.start()..range.end())
            .map(|(&p, _)| p)
            .filter(|&p| !self.huge.contains(&(p & !(huge - 1))))
            .collect();
        let mut tlb = TlbFlush::new();
        let mut failed = None;
        for base in bases {
            match self.unmap_huge(&[base], &mut tlb) {
                Ok(()) => self.committed -= huge,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for page in pages {
            if failed.is_some() {
                break;
            }
            let Some(committed) = self.pages.remove(&page) else {
                continue;
            };
            // SAFETY: callers decommit only pages no code runs on: wholly free pages of a
            // freed range (freed after its grace period by the module), or whole code spaces
            // being released.
            match unsafe { self.mmu.unmap(committed, &mut tlb) } {
                Ok(()) => self.committed -= PAGE_SIZE,
                Err((e, back)) => {
                    self.pages.insert(page, back);
                    failed = Some(e);
                    break;
                }
            }
        }
        self.flush(tlb)?;
        match failed {
            Some(e) => Err(CodeError::PartialDecommit(e)),
            None => Ok(()),
        }
    }
}
