//! [`CodeAllocator`]: one module's code, in code spaces of its own (V8's `WasmCodeAllocator`).
//!
//! Allocation is first fit over the module's free ranges; only the pages an allocation touches
//! and that are not yet mapped get committed (RW+NX). Freeing merges the range back (unlike V8,
//! freed code is reused), decommits exactly the pages that became wholly free, and fills freed
//! bytes on pages that stay committed with INT3.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::code::{PublishedCode, WritableCode};
use super::error::{CodeError, Rejected};
use super::state::{CodeManager, State};
use crate::mmu::{Mmu, Protection, TlbFlush};
use crate::pool::DisjointAllocationPool;
use crate::range::{page_round_down, page_round_up};
use crate::{AddressRange, PAGE_SIZE};

/// Code sizes are rounded up to this (V8's `kCodeAlignment` on x64).
pub const CODE_ALIGNMENT: usize = 64;
/// INT3: what freed and padding bytes of code pages hold, so a stray jump traps.
const INT3: u8 = 0xCC;

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Settings of one [`CodeAllocator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Bytes each code space sets aside for its jump tables (V8's overhead in `ReservationSize`).
    pub overhead: usize,
    /// Whether more code spaces may be reserved when the first is full.
    pub growable: bool,
    /// Size of the first reservation (0: sized by the first allocation).
    pub initial_reservation: usize,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            overhead: 0,
            growable: true,
            initial_reservation: 0,
        }
    }
}

/// Counters of one allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocatorStats {
    /// Usable bytes of this allocator's code spaces.
    pub reserved: usize,
    /// Bytes in live allocations (rounded to [`CODE_ALIGNMENT`]).
    pub allocated: usize,
    /// Bytes ever freed.
    pub freed: usize,
    /// Code spaces owned.
    pub code_spaces: usize,
}

/// One module's code allocator. Dropping it releases its code spaces (unmapping what they hold).
pub struct CodeAllocator<M: Mmu> {
    manager: CodeManager<M>,
    id: u64,
    config: AllocatorConfig,
    spaces: Vec<AddressRange>,
    free: DisjointAllocationPool,
    allocated: usize,
    freed: usize,
}

/// `size` rounded up to [`CODE_ALIGNMENT`]; zero and overflowing sizes are invalid.
fn aligned_size(size: usize) -> Result<usize, CodeError> {
    size.checked_next_multiple_of(CODE_ALIGNMENT)
        .filter(|&s| s > 0)
        .ok_or(CodeError::InvalidSize { size })
}

/// V8's `ReservationSize`: room for the code and its tables, at least twice the tables, at
/// least a quarter of what is reserved already; capped by the maximum code-space size.
fn reservation_size(
    need: usize,
    overhead: usize,
    total_reserved: usize,
    max_space: usize,
) -> Result<usize, CodeError> {
    let too_large = CodeError::CodeSpaceTooLarge {
        size: need,
        max: max_space,
    };
    let need_pages = page_round_up(need).ok_or(too_large)?;
    let minimum = need_pages.checked_add(overhead).ok_or(too_large)?;
    let twice_overhead = overhead.checked_mul(2).ok_or(too_large)?;
    if minimum > max_space || twice_overhead > max_space {
        return Err(too_large);
    }
    let wanted = minimum.max(twice_overhead).max(total_reserved / 4);
    page_round_up(wanted.min(max_space)).ok_or(too_large)
}

impl<M: Mmu> CodeAllocator<M> {
    /// A new allocator (one per module) over `manager`'s window. With a nonzero
    /// `initial_reservation` the first code space is reserved now.
    ///
    /// # Errors
    /// When the initial reservation does not fit the window or the maximum code-space size.
    pub fn new(manager: &CodeManager<M>, config: AllocatorConfig) -> Result<Self, CodeError> {
        let mut a = CodeAllocator {
            manager: manager.clone(),
            id: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            config,
            spaces: Vec::new(),
            free: DisjointAllocationPool::new(),
            allocated: 0,
            freed: 0,
        };
        if config.initial_reservation > 0 {
            let mut state = a.manager.lock();
            let max = state.config.max_code_space_size;
            if config.initial_reservation > max {
                return Err(CodeError::CodeSpaceTooLarge {
                    size: config.initial_reservation,
                    max,
                });
            }
            let space = state.reserve(config.initial_reservation)?;
            drop(state);
            a.add_space(space);
        }
        Ok(a)
    }

    fn add_space(&mut self, space: AddressRange) {
        self.spaces.push(space);
        // A fresh reservation from the window never overlaps this allocator's free ranges.
        let _ = self.free.merge(space);
    }

    /// The manager this allocator belongs to.
    #[must_use]
    pub fn manager(&self) -> &CodeManager<M> {
        &self.manager
    }

    /// This allocator's code spaces (usable ranges), in creation order.
    #[must_use]
    pub fn code_spaces(&self) -> &[AddressRange] {
        &self.spaces
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> AllocatorStats {
        AllocatorStats {
            reserved: self.spaces.iter().map(AddressRange::size).sum(),
            allocated: self.allocated,
            freed: self.freed,
            code_spaces: self.spaces.len(),
        }
    }

    /// Allocates `size` bytes of code (rounded up to [`CODE_ALIGNMENT`]), committing the pages it
    /// touches that are not committed yet (RW+NX). Reserves a new code space when none fits.
    ///
    /// # Errors
    /// Invalid size, commit limit, window exhausted, code-space size, a fixed allocator that is
    /// full, or out of frames. Nothing changes on error.
    pub fn allocate(&mut self, size: usize) -> Result<WritableCode, CodeError> {
        let aligned = aligned_size(size)?;
        let manager = self.manager.clone();
        let mut state = manager.lock();

        let mut new_space = None;
        let range = match self.free.allocate(aligned) {
            Some(r) => r,
            None => {
                if !self.config.growable && !self.spaces.is_empty() {
                    return Err(CodeError::NotGrowable);
                }
                let total_reserved: usize = self.spaces.iter().map(AddressRange::size).sum();
                let rsize = reservation_size(
                    aligned,
                    self.config.overhead,
                    total_reserved,
                    state.config.max_code_space_size,
                )?;
                let space = state.reserve(rsize)?;
                self.add_space(space);
                new_space = Some(space);
                match self.free.allocate(aligned) {
                    Some(r) => r,
                    None => {
                        self.drop_space(&mut state, space);
                        return Err(CodeError::InvalidSize { size });
                    }
                }
            }
        };
        let result = self.commit_allocation(&mut state, range, size);
        if let (Err(_), Some(space)) = (&result, new_space) {
            self.drop_space(&mut state, space);
        }
        result
    }

    /// Allocates `size` bytes inside `region` (first fit there, V8's `AllocateForCodeInRegion`),
    /// committing as [`allocate`](Self::allocate) does; never reserves a new code space.
    ///
    /// # Errors
    /// [`CodeError::WindowExhausted`] when nothing free in `region` is large enough; the commit
    /// errors of `allocate`. Nothing changes on error.
    pub fn allocate_in_region(
        &mut self,
        size: usize,
        region: AddressRange,
    ) -> Result<WritableCode, CodeError> {
        let aligned = aligned_size(size)?;
        let manager = self.manager.clone();
        let mut state = manager.lock();
        let range = self
            .free
            .allocate_in_region(aligned, region)
            .ok_or(CodeError::WindowExhausted { size: aligned })?;
        self.commit_allocation(&mut state, range, size)
    }

    /// Allocates whole pages inside `region` that share no page with other code: `size` rounded
    /// up to pages, starting on a page boundary. Live jump tables use this, so that writing code
    /// next to them (a flip in [`ProtectionMode::Flip`](super::ProtectionMode::Flip), INT3 fills)
    /// never touches their pages.
    ///
    /// # Errors
    /// As [`allocate_in_region`](Self::allocate_in_region). Nothing changes on error.
    pub fn allocate_pages_in_region(
        &mut self,
        size: usize,
        region: AddressRange,
    ) -> Result<WritableCode, CodeError> {
        let bytes = page_round_up(aligned_size(size)?).ok_or(CodeError::InvalidSize { size })?;
        // Any 64-byte aligned free run this long holds a page-aligned run of `bytes`.
        let padded = bytes
            .checked_add(PAGE_SIZE - CODE_ALIGNMENT)
            .ok_or(CodeError::InvalidSize { size })?;
        let manager = self.manager.clone();
        let mut state = manager.lock();
        // First choice: a free run that already starts on a page boundary inside the region
        // (a fresh code space does); else a run long enough to hold an aligned one.
        let aligned_region = AddressRange::new(
            page_round_up(region.start()).unwrap_or(region.end()),
            region.end(),
        );
        let exact = match self.free.allocate_in_region(bytes, aligned_region) {
            Some(r) if r.start().is_multiple_of(PAGE_SIZE) => Some(r),
            Some(r) => {
                let _ = self.free.merge(r);
                None
            }
            None => None,
        };
        let got = match exact {
            Some(r) => r,
            None => self
                .free
                .allocate_in_region(padded, region)
                .ok_or(CodeError::WindowExhausted { size: padded })?,
        };
        let start = page_round_up(got.start()).ok_or(CodeError::InvalidSize { size })?;
        let range = AddressRange::new(start, start + bytes);
        // Hand back the slack on both sides; it was free a moment ago, so it cannot overlap.
        for slack in [
            AddressRange::new(got.start(), range.start()),
            AddressRange::new(range.end(), got.end()),
        ] {
            if !slack.is_empty() {
                let _ = self.free.merge(slack);
            }
        }
        let mut code = self.commit_allocation(&mut state, range, bytes)?;
        code.bytes.truncate(size);
        Ok(code)
    }

    /// Commits the pages of the just-allocated `range` and hands it out; on failure returns the
    /// range to the pool, so nothing changed.
    fn commit_allocation(
        &mut self,
        state: &mut State<M>,
        range: AddressRange,
        size: usize,
    ) -> Result<WritableCode, CodeError> {
        if let Err(e) = commit(state, range) {
            let _ = self.free.merge(range);
            return Err(e);
        }
        self.allocated += range.size();
        Ok(WritableCode {
            range,
            owner: self.id,
            bytes: alloc::vec![0; size],
        })
    }

    fn drop_space(&mut self, state: &mut State<M>, space: AddressRange) {
        self.spaces.retain(|s| *s != space);
        // Remove the (wholly free) space from the pool by allocating exactly it.
        let _ = self.free.allocate_in_region(space.size(), space);
        state.release(space);
    }

    /// Copies the written bytes into place, pads the rest of the range with INT3 and makes the
    /// pages R+X (one TLB batch). Pages shared with other published code never become W+X.
    ///
    /// # Errors
    /// A handle of another allocator, or a backend failure; the handle comes back unchanged.
    pub fn publish(&mut self, code: WritableCode) -> Result<PublishedCode, Rejected<WritableCode>> {
        let code = self.own(code.owner, code)?;
        let manager = self.manager.clone();
        let mut state = manager.lock();
        let range = code.range;
        let padding = AddressRange::new(range.start() + code.bytes.len(), range.end());
        let written = state
            .write_code(range.start(), &code.bytes)
            .and_then(|()| fill_int3(&mut state, padding));
        if let Err(error) = written {
            return Err(Rejected { error, code });
        }
        // Only the first and last page can hold other (published) code; pages wholly inside the
        // range are ours and still RW. Remember which ends were R+X already, for a rollback.
        let first = page_round_down(range.start());
        let last = page_round_down(range.end() - 1);
        let was_rx = |state: &State<M>, p: usize| state.mmu.query(p).is_some_and(|m| !m.writable);
        let (first_rx, last_rx) = (was_rx(&state, first), was_rx(&state, last));
        let mut tlb = TlbFlush::new();
        for page in range.pages() {
            if let Err(e) = state.mmu.protect(page, Protection::ReadExecute, &mut tlb) {
                // Put back the pages this call made R+X, so the handle returns as it was.
                for done in range.pages().take_while(|&p| p != page) {
                    let keep = (done == first && first_rx) || (done == last && last_rx);
                    if !keep {
                        let _ = state.mmu.protect(done, Protection::ReadWrite, &mut tlb);
                    }
                }
                state.mmu.flush(tlb);
                return Err(Rejected {
                    error: e.into(),
                    code,
                });
            }
        }
        state.mmu.flush(tlb);
        Ok(PublishedCode {
            range,
            owner: self.id,
            len: code.bytes.len(),
        })
    }

    /// Frees published code: its range becomes reusable, wholly free pages are decommitted and
    /// freed bytes on pages that stay committed become INT3.
    ///
    /// # Errors
    /// A handle of another allocator (handed back).
    pub fn free(&mut self, code: PublishedCode) -> Result<(), Rejected<PublishedCode>> {
        let code = self.own(code.owner, code)?;
        self.free_range(code.range);
        Ok(())
    }

    /// Frees code that was never published.
    ///
    /// # Errors
    /// A handle of another allocator (handed back).
    pub fn discard(&mut self, code: WritableCode) -> Result<(), Rejected<WritableCode>> {
        let code = self.own(code.owner, code)?;
        self.free_range(code.range);
        Ok(())
    }

    /// Hands `code` back as [`CodeError::ForeignCode`] unless this allocator created it.
    fn own<T>(&self, owner: u64, code: T) -> Result<T, Rejected<T>> {
        if owner == self.id {
            Ok(code)
        } else {
            Err(Rejected {
                error: CodeError::ForeignCode,
                code,
            })
        }
    }

    fn free_range(&mut self, range: AddressRange) {
        let manager = self.manager.clone();
        let mut state = manager.lock();
        // Handles are unique and owned, so their range is allocated and cannot overlap free space.
        let Ok(merged) = self.free.merge(range) else {
            return;
        };
        self.allocated -= range.size();
        self.freed += range.size();

        // V8's rule: decommit the whole pages that are now free and touch the freed range.
        let start = page_round_up(merged.start())
            .unwrap_or(usize::MAX)
            .max(page_round_down(range.start()));
        let end =
            page_round_down(merged.end()).min(page_round_up(range.end()).unwrap_or(usize::MAX));
        let dead = AddressRange::new(start, end);
        let mut tlb = TlbFlush::new();
        for page in dead.pages().filter(|_| !dead.is_empty()) {
            if state.mmu.query(page).is_some() && state.mmu.unmap(page, &mut tlb).is_ok() {
                state.committed -= PAGE_SIZE;
            }
        }
        state.mmu.flush(tlb);

        // What stays committed of the freed range becomes INT3. Those pages hold other live
        // code, so they are mapped; a failure could only leave stale bytes in free space.
        let kept = if dead.is_empty() {
            [range, AddressRange::EMPTY]
        } else {
            [
                AddressRange::new(range.start(), dead.start()),
                AddressRange::new(dead.end(), range.end()),
            ]
        };
        for part in kept.into_iter().filter(|p| !p.is_empty()) {
            let _ = fill_int3(&mut state, part);
        }
    }
}

/// Writes INT3 over `range` of committed code, whatever the pages' protection.
fn fill_int3<M: Mmu>(state: &mut State<M>, range: AddressRange) -> Result<(), CodeError> {
    static INT3_PAGE: [u8; PAGE_SIZE] = [INT3; PAGE_SIZE];
    let mut at = range.start();
    while at < range.end() {
        let n = (range.end() - at).min(PAGE_SIZE);
        state.write_code(at, &INT3_PAGE[..n])?;
        at += n;
    }
    Ok(())
}

/// Maps the pages of `range` that are not mapped yet, RW+NX, charging them against the limit;
/// on failure unmaps what it mapped and charges nothing.
fn commit<M: Mmu>(state: &mut State<M>, range: AddressRange) -> Result<(), CodeError> {
    // The list of missing pages lives in a buffer the manager keeps, so a warm allocation path
    // does not allocate.
    let mut missing = core::mem::take(&mut state.scratch_pages);
    missing.clear();
    missing.extend(range.pages().filter(|&p| state.mmu.query(p).is_none()));
    let result = map_missing(state, &missing);
    state.scratch_pages = missing;
    result
}

fn map_missing<M: Mmu>(state: &mut State<M>, missing: &[usize]) -> Result<(), CodeError> {
    if missing.is_empty() {
        return Ok(());
    }
    let bytes = missing.len() * PAGE_SIZE;
    state.check_commit(bytes)?;
    let mut tlb = TlbFlush::new();
    for (i, &page) in missing.iter().enumerate() {
        if let Err(e) = state.mmu.map_fresh(page, &mut tlb) {
            for &p in &missing[..i] {
                let _ = state.mmu.unmap(p, &mut tlb);
            }
            state.mmu.flush(tlb);
            return Err(e.into());
        }
    }
    state.mmu.flush(tlb);
    state.account_commit(bytes);
    Ok(())
}

impl<M: Mmu> Drop for CodeAllocator<M> {
    fn drop(&mut self) {
        let manager = self.manager.clone();
        let mut state = manager.lock();
        for space in self.spaces.drain(..) {
            state.release(space);
        }
    }
}

impl<M: Mmu> core::fmt::Debug for CodeAllocator<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CodeAllocator")
            .field("id", &self.id)
            .field("spaces", &self.spaces)
            .field("free", &self.free.total_size())
            .field("allocated", &self.allocated)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::reservation_size;

    #[test]
    fn reservation_size_follows_v8() {
        let max = 1 << 30;
        assert_eq!(reservation_size(100, 0, 0, max), Ok(4096));
        assert_eq!(reservation_size(100, 8192, 0, max), Ok(16384));
        assert_eq!(reservation_size(100, 0, 1 << 24, max), Ok(1 << 22));
        assert!(reservation_size(max, 4096, 0, max).is_err());
        assert!(reservation_size(100, max, 0, max).is_err());
    }
}
