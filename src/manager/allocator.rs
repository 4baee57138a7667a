//! [`CodeAllocator`]: one module's code, in code spaces of its own (V8's `WasmCodeAllocator`).
//!
//! Allocation is first fit over the allocator's free ranges, at [`CODE_ALIGNMENT`]; only the
//! pages an allocation touches that are not committed yet get committed (RW+NX). Publishing
//! writes the staged bytes and makes the pages R+X in one shootdown round. Freeing merges the
//! range back (unlike V8, freed code is reused), fills it with INT3, and decommits the pages
//! that became wholly free.
//!
//! Freeing published code is `unsafe` ([`CodeAllocator::free`]): the allocator cannot know
//! whether a CPU still runs it, returns into it or holds a way into it; the caller proves that
//! none does (the module layer waits for a grace period after unpublishing it). Dropping an
//! allocator is safe because it frees no published code: code spaces that still hold published
//! code stay mapped (a leak, never a use-after-free) unless
//! [`release_all`](CodeAllocator::release_all) promised first that none of it runs.

use alloc::boxed::Box;
use alloc::vec::Vec;

#[path = "image.rs"]
mod image;
use core::sync::atomic::{AtomicU64, Ordering};
pub(crate) use image::{ImagePages, ImageSource};

use super::abandoned::AbandonedNode;
use super::code::{PublishedCode, WritableCode};
use super::cross_modify::SlotStore;
use super::error::{CodeError, FreeError, Rejected};
use super::state::{CodeManager, State};
use crate::mmu::Mmu;
use crate::pool::DisjointAllocationPool;
use crate::range::page_round_up;
use crate::{AddressRange, PAGE_SIZE};

/// Code sizes are rounded up to this, and code starts on it (V8's `kCodeAlignment` on x64).
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
    /// Code spaces on 2 MiB pages that are R+X from the start and never writable (the ROX
    /// mode; needs [`ManagerConfig::rox_code`](super::ManagerConfig::rox_code)): publishing
    /// changes no page-table entry and costs no shootdown, only one serialization round;
    /// each space takes whole 2 MiB pages of frames. A space falls back to 4 KiB pages when
    /// the backend has no 2 MiB frame for it. Images (whose pages change protection, which
    /// ROX pages never do) go to ordinary 4 KiB code spaces of their own, which code never
    /// shares: a ROX allocator that is not [`growable`](Self::growable), having one space,
    /// holds code or images, and the other answers [`CodeError::NotGrowable`]. Off by default.
    pub rox: bool,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            overhead: 0,
            growable: true,
            initial_reservation: 0,
            rox: false,
        }
    }
}

/// What an allocation is for, which decides the spaces it may take in a ROX allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Code and jump tables: on ROX pages in a ROX allocator.
    Code,
    /// An image (per-range protections): never on ROX pages.
    Image,
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

/// One module's code allocator. Dropping it releases its code spaces that hold no published
/// code (decommitting what they hold) — it may be dropped in any context: with interrupts off
/// or when the manager is busy, the manager's next operation with interrupts on releases them. Spaces still holding published code stay reserved and mapped (see
/// [`release_all`](Self::release_all)).
pub struct CodeAllocator<M: Mmu> {
    manager: CodeManager<M>,
    id: u64,
    config: AllocatorConfig,
    spaces: Vec<AddressRange>,
    /// Bytes of published, not yet freed code in each of `spaces` (same index): a space with any
    /// is never released by dropping.
    live: Vec<usize>,
    /// Carries the spaces to the manager when dropping cannot take its lock; allocated with the
    /// first space, so dropping never allocates.
    node: Option<Box<AbandonedNode>>,
    free: DisjointAllocationPool,
    allocated: usize,
    freed: usize,
    /// A decommit failed part way: free pages stay committed until a later free trims them.
    trim_pending: bool,
    /// Freed images whose decommit failed: kept out of the free pool (a committed page of one
    /// may be R+NX, holding image data) until a retry decommits them.
    stale_images: Vec<AddressRange>,
    /// In a ROX allocator, the spaces of `spaces` on 4 KiB pages that hold images: an image's
    /// pages change protection (data R+NX, text R+X), which ROX pages never do. Images go only
    /// there and code allocations never do (jump tables may, when asked for a region), so
    /// the module's code stays on ROX pages. Empty in other allocators.
    image_spaces: Vec<AddressRange>,
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
    /// When the initial reservation exceeds the maximum code-space size or does not fit;
    /// [`CodeError::InvalidConfig`] (`"rox"`) for `rox` on a manager without
    /// [`rox_code`](super::ManagerConfig::rox_code).
    pub fn new(manager: &CodeManager<M>, config: AllocatorConfig) -> Result<Self, CodeError> {
        if config.rox && !manager.config().rox_code {
            return Err(CodeError::InvalidConfig { setting: "rox" });
        }
        let mut a = CodeAllocator {
            manager: manager.clone(),
            id: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            config,
            spaces: Vec::new(),
            live: Vec::new(),
            node: None,
            free: DisjointAllocationPool::new(),
            allocated: 0,
            freed: 0,
            trim_pending: false,
            stale_images: Vec::new(),
            image_spaces: Vec::new(),
        };
        if config.initial_reservation > 0 {
            let max = manager.config().max_code_space_size;
            if config.initial_reservation > max {
                return Err(CodeError::CodeSpaceTooLarge {
                    size: config.initial_reservation,
                    max,
                });
            }
            let space = a
                .manager
                .lock()?
                .reserve_for(config.initial_reservation, config.rox)?;
            a.add_space(space);
        }
        Ok(a)
    }

    fn add_space(&mut self, space: AddressRange) {
        self.node.get_or_insert_with(Box::default);
        self.spaces.push(space);
        self.live.push(0);
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

    /// The code space of this allocator holding `addr`.
    #[must_use]
    pub fn space_of(&self, addr: usize) -> Option<AddressRange> {
        self.spaces.iter().copied().find(|s| s.contains(addr))
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
    /// full, or out of frames. Nothing changes on error, but after
    /// [`CodeError::PartialDecommit`] (the backend failed to take back a page the failed
    /// commit mapped) that page stays committed in free room, until a later free or
    /// [`trim`](Self::trim) decommits it.
    pub fn allocate(&mut self, size: usize) -> Result<WritableCode, CodeError> {
        let aligned = aligned_size(size)?;
        self.allocate_where(size, aligned, CODE_ALIGNMENT, None, Placement::Code)
    }

    /// Allocates `size` bytes inside `region` (first fit there, at [`CODE_ALIGNMENT`], V8's
    /// `AllocateForCodeInRegion`), committing as [`allocate`](Self::allocate) does; never
    /// reserves a new code space.
    ///
    /// # Errors
    /// [`CodeError::WindowExhausted`] when nothing free in `region` fits; the commit errors of
    /// `allocate`. Nothing changes on error.
    pub fn allocate_in_region(
        &mut self,
        size: usize,
        region: AddressRange,
    ) -> Result<WritableCode, CodeError> {
        let aligned = aligned_size(size)?;
        self.allocate_where(size, aligned, CODE_ALIGNMENT, Some(region), Placement::Code)
    }

    /// Allocates whole pages for a jump table: `size` rounded up to pages, page aligned, sharing
    /// no page with other code (writing code next to a table — a flip, an INT3 fill — must never
    /// touch a page calls execute through), inside `region` when given, else anywhere (a new
    /// code space if needed). Its slots can be patched once published
    /// ([`patch`](Self::patch)).
    ///
    /// # Errors
    /// As [`allocate`](Self::allocate). Nothing changes on error.
    pub fn allocate_table(
        &mut self,
        size: usize,
        region: Option<AddressRange>,
    ) -> Result<WritableCode, CodeError> {
        let bytes = page_round_up(aligned_size(size)?).ok_or(CodeError::InvalidSize { size })?;
        let mut code = self.allocate_where(bytes, bytes, PAGE_SIZE, region, Placement::Code)?;
        code.bytes.truncate(size);
        code.patchable = true;
        Ok(code)
    }

    /// Takes `aligned` bytes at `align` (in `region`, or anywhere with growth, in a space that
    /// suits `placement`), commits them and hands out a handle of `size` staged bytes.
    fn allocate_where(
        &mut self,
        size: usize,
        aligned: usize,
        align: usize,
        region: Option<AddressRange>,
        placement: Placement,
    ) -> Result<WritableCode, CodeError> {
        let manager = self.manager.clone();
        let mut state = manager.lock()?;
        let mut new_space = None;
        let range = match self.take_free(aligned, align, region, placement) {
            Some(r) => r,
            None if region.is_some() => return Err(CodeError::WindowExhausted { size: aligned }),
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
                let image_space = self.config.rox && placement == Placement::Image;
                let space = state.reserve_for(rsize, self.config.rox && !image_space)?;
                self.add_space(space);
                if image_space {
                    self.image_spaces.push(space);
                }
                new_space = Some(space);
                // A fresh space is page aligned and at least `aligned` bytes long.
                match self.free.allocate_aligned_in_region(aligned, align, space) {
                    Some(r) => r,
                    None => {
                        self.drop_space(&mut state, space);
                        return Err(CodeError::InvalidSize { size });
                    }
                }
            }
        };
        if let Err(e) = state.commit(range) {
            // Pages the commit could not take back go with a later free's trim.
            self.trim_pending |= matches!(e, CodeError::PartialDecommit(_));
            let _ = self.free.merge(range);
            if let Some(space) = new_space {
                self.drop_space(&mut state, space);
            }
            return Err(e);
        }
        self.allocated += range.size();
        Ok(WritableCode {
            range,
            owner: self.id,
            bytes: alloc::vec![0; size],
            patchable: false,
            written: false,
        })
    }

    /// First fit of `aligned` bytes at `align` among the free ranges: inside `region` when
    /// given; else anywhere, except that in a ROX allocator images take only image spaces and
    /// code only the others (one first-fit search per space: an allocator has few spaces).
    fn take_free(
        &mut self,
        aligned: usize,
        align: usize,
        region: Option<AddressRange>,
        placement: Placement,
    ) -> Option<AddressRange> {
        let image = placement == Placement::Image;
        if let Some(region) = region {
            return self.free.allocate_aligned_in_region(aligned, align, region);
        }
        if !self.config.rox || (!image && self.image_spaces.is_empty()) {
            let anywhere = AddressRange::new(0, usize::MAX);
            return self
                .free
                .allocate_aligned_in_region(aligned, align, anywhere);
        }
        for i in 0..self.spaces.len() {
            let space = self.spaces[i];
            if self.image_spaces.contains(&space) != image {
                continue;
            }
            if let Some(r) = self.free.allocate_aligned_in_region(aligned, align, space) {
                return Some(r);
            }
        }
        None
    }

    /// Gives back `space` if it holds no allocation (a space reserved for code whose add then
    /// failed); returns whether it did.
    pub fn release_if_empty(&mut self, space: AddressRange) -> bool {
        let manager = self.manager.clone();
        let Ok(mut state) = manager.lock() else {
            return false;
        };
        let free = self.free.ranges().any(|r| r.contains_range(&space));
        if !free || !self.spaces.contains(&space) {
            return false;
        }
        self.drop_space(&mut state, space);
        !self.spaces.contains(&space)
    }

    /// Gives back a wholly free code space; keeps it (free) if the release fails.
    fn drop_space(&mut self, state: &mut State<M>, space: AddressRange) {
        if self.free.allocate_in_region(space.size(), space) == Some(space) {
            if state.release(space).is_ok() {
                if let Some(i) = self.spaces.iter().position(|s| *s == space) {
                    self.spaces.remove(i);
                    self.live.remove(i);
                }
                self.image_spaces.retain(|s| *s != space);
            } else {
                let _ = self.free.merge(space);
            }
        }
    }

    /// Copies the written bytes into place, pads the rest of the range with INT3 and makes the
    /// pages R+X: one shootdown round, after which no CPU holds a writable translation of them.
    ///
    /// # Errors
    /// A handle of another allocator, flip mode on several CPUs, or a backend failure; the handle
    /// comes back and no page became executable: fresh pages stay RW+NX (after
    /// [`CodeError::FlushFailed`], staged back to RW+NX for the retried flush) and only the
    /// code's own range may hold its bytes ([`discard`](Self::discard) refills it with INT3).
    pub fn publish(&mut self, code: WritableCode) -> Result<PublishedCode, Rejected<WritableCode>> {
        let mut code = self.own(code.owner, code)?;
        code.written = true;
        match self.publish_ranges(&[(code.range, &code.bytes)]) {
            Ok(()) => Ok(self.published(&code)),
            Err(error) => Err(Rejected { error, code }),
        }
    }

    /// Publishes many allocations at once: every page made R+X in one shootdown round, and at
    /// most one serialization round. All or nothing: on error every handle comes back.
    ///
    /// # Errors
    /// As [`publish`](Self::publish).
    pub fn publish_batch(
        &mut self,
        mut codes: Vec<WritableCode>,
    ) -> Result<Vec<PublishedCode>, Rejected<Vec<WritableCode>>> {
        if codes.iter().any(|c| c.owner != self.id) {
            return Err(Rejected {
                error: CodeError::ForeignCode,
                code: codes,
            });
        }
        for c in &mut codes {
            c.written = true;
        }
        let ranges: Vec<(AddressRange, &[u8])> =
            codes.iter().map(|c| (c.range, &c.bytes[..])).collect();
        match self.publish_ranges(&ranges) {
            Ok(()) => Ok(codes.iter().map(|c| self.published(c)).collect()),
            Err(error) => Err(Rejected { error, code: codes }),
        }
    }

    /// The published handle of `code`, counted live in its space.
    fn published(&mut self, code: &WritableCode) -> PublishedCode {
        self.count_live(code.range, true);
        PublishedCode {
            range: code.range,
            owner: self.id,
            len: code.bytes.len(),
            patchable: code.patchable,
        }
    }

    /// Adds (`add`) or removes the bytes of published `range` to its space's live count.
    fn count_live(&mut self, range: AddressRange, add: bool) {
        if let Some(i) = self.spaces.iter().position(|s| s.contains_range(&range)) {
            if add {
                self.live[i] += range.size();
            } else {
                self.live[i] -= range.size();
            }
        }
    }

    fn publish_ranges(&mut self, codes: &[(AddressRange, &[u8])]) -> Result<(), CodeError> {
        let manager = self.manager.clone();
        let mut state = manager.lock()?;
        state.publish(codes)
    }
}

#[path = "allocator_release.rs"]
mod release;
use release::fill_int3;
impl<M: Mmu> Drop for CodeAllocator<M> {
    /// Hands the spaces without published code to the manager: released now when dropped with
    /// interrupts on and its lock can be taken, else (interrupts off here — interrupt context
    /// never unmaps or frees frames — or the lock is held elsewhere) by its next operation with
    /// interrupts on. A release that fails is retried the same way. Spaces
    /// holding published code stay reserved and mapped: the allocator cannot know no CPU runs
    /// it ([`release_all`](Self::release_all) can be told).
    fn drop(&mut self) {
        self.hand_over_releasable();
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
