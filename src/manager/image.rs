//! Images in a code space: whole pages holding bytes placed as they are (a precompiled wasm
//! module), read-only and non-executable except the text ranges a publish makes R+X.
//!
//! An image's pages are its own (page aligned, shared with no other allocation), so changing
//! their protection never touches other code. Every step keeps W^X and keeps image data
//! non-executable: the bytes are copied through the pages' own RW+NX mapping, then every page
//! becomes R+NX in one flush; publishing stages only the text pages (and a lead page holding a
//! landing stub) R+X, flushed once. Freeing decommits the pages whole; pages a failed decommit
//! left committed stay out of the free pool (retried later), so no page of the pool is ever
//! R+NX with image data in it, and image data is never made executable by a later allocation.

use alloc::vec::Vec;

use super::{fill_int3, CodeAllocator, Placement};
use crate::manager::error::{CodeError, FreeError};
use crate::manager::state::State;
use crate::mmu::{Mmu, MmuError, Protection, TlbFlush};
use crate::range::page_round_up;
use crate::{AddressRange, PAGE_SIZE};

/// The pages of one loaded image, owned by the allocator that loaded it: not `Clone`, consumed
/// by [`CodeAllocator::free_image`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ImagePages {
    range: AddressRange,
    owner: u64,
}

impl ImagePages {
    /// Every page of the image, lead pages included.
    pub(crate) fn range(&self) -> AddressRange {
        self.range
    }
}

/// Stages `prot` for each of `pages` (committed), then flushes once. When a page cannot be
/// staged, the pages staged before it are staged back to what they were and that is flushed:
/// the error comes back with nothing changed (unless that flush failed too, which leaves the
/// pages not present until a later flush stores what they were).
///
/// # Safety
/// [`Mmu::protect`]'s: no CPU accesses the pages until the flush; a page made executable holds
/// exactly what the caller means to run, one made non-executable runs nowhere.
unsafe fn protect_pages<M: Mmu>(
    state: &mut State<M>,
    pages: &[(usize, Protection)],
) -> Result<(), CodeError> {
    let before: Vec<Option<Protection>> = pages
        .iter()
        .map(|&(p, _)| state.mmu.query(p).and_then(|m| m.protection()))
        .collect();
    if let Some(&(page, _)) = pages.iter().find(|(p, _)| !state.pages.contains_key(p)) {
        return Err(MmuError::NotMapped { page }.into());
    }
    let mut tlb = TlbFlush::new();
    for (i, &(page, prot)) in pages.iter().enumerate() {
        let Some(committed) = state.pages.get(&page) else {
            continue;
        };
        // SAFETY: the caller's contract.
        if let Err(e) = unsafe { state.mmu.protect(committed, prot, &mut tlb) } {
            for (&(done, _), old) in pages[..i].iter().zip(&before) {
                if let (Some(c), Some(old)) = (state.pages.get(&done), *old) {
                    // SAFETY: back to what the page was a moment ago, before any CPU could
                    // access it with the new protection (nothing was flushed).
                    let _ = unsafe { state.mmu.protect(c, old, &mut tlb) };
                }
            }
            state.flush(tlb)?;
            return Err(e.into());
        }
    }
    state.flush(tlb)
}

/// What an image's bytes are: given, or written by the caller once their address is known.
pub(crate) enum ImageSource<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// `len` bytes, zeroed, then filled by the closure given the address of the first one (data
    /// whose pointers point into the image itself).
    Fill(usize, &'a mut dyn FnMut(usize, &mut [u8])),
}

impl<M: Mmu> CodeAllocator<M> {
    /// Commits whole fresh pages for `lead` bytes and then the image's bytes (page aligned,
    /// shared with no other allocation; a new code space if none fits — in a ROX allocator an
    /// image space on 4 KiB pages, see [`AllocatorConfig::rox`](super::AllocatorConfig::rox)), copies the bytes (given,
    /// or filled now that their address is known) at `lead` bytes from the start through the
    /// pages' own RW+NX mapping, and makes every page from `lead` on R+NX in one flush. The lead pages stay RW+NX (INT3): room for a landing stub written at publish.
    ///
    /// # Errors
    /// [`CodeError::InvalidSize`] for nothing to load; the allocation and commit errors of
    /// [`allocate`](Self::allocate); a backend failure — the pages are decommitted again, so
    /// nothing changed beyond a new code space the caller may release.
    pub(crate) fn load_image(
        &mut self,
        source: ImageSource<'_>,
        lead: usize,
    ) -> Result<ImagePages, CodeError> {
        self.retry_stale_images();
        let len = match &source {
            ImageSource::Bytes(bytes) => bytes.len(),
            ImageSource::Fill(len, _) => *len,
        };
        let invalid = CodeError::InvalidSize { size: len };
        if len == 0 || !lead.is_multiple_of(PAGE_SIZE) {
            return Err(invalid);
        }
        let size = lead
            .checked_add(len)
            .and_then(page_round_up)
            .ok_or(invalid)?;
        let range = self
            .allocate_where(0, size, PAGE_SIZE, None, Placement::Image)?
            .range;
        self.count_live(range, true);
        let image = ImagePages {
            range,
            owner: self.id,
        };
        let filled;
        let bytes = match source {
            ImageSource::Bytes(bytes) => bytes,
            ImageSource::Fill(len, fill) => {
                let mut buffer = alloc::vec![0u8; len];
                fill(range.start() + lead, &mut buffer);
                filled = buffer;
                &filled[..]
            }
        };
        match self.fill_image(range, bytes, lead) {
            Ok(()) => Ok(image),
            Err(e) => {
                // Never executable, never handed out: nothing can run or read it.
                let released = self.release_image(image);
                Err(match e {
                    CodeError::FlushFailed(m) if released => CodeError::Mmu(m),
                    e => e,
                })
            }
        }
    }

    fn fill_image(
        &mut self,
        range: AddressRange,
        bytes: &[u8],
        lead: usize,
    ) -> Result<(), CodeError> {
        let manager = self.manager.clone();
        let mut state = manager.lock()?;
        // Wholly free pages are decommitted when freed; one a failed decommit left committed
        // may still be R+X (INT3): RW+NX first, so no byte of the image is ever executable.
        let left: Vec<(usize, Protection)> = range
            .pages()
            .filter(|&p| state.mmu.query(p).is_some_and(|m| !m.writable))
            .map(|p| (p, Protection::ReadWrite))
            .collect();
        if !left.is_empty() {
            // SAFETY: free pages of this allocator: no CPU runs code there any more (freed
            // code's contract), and nothing executes them until made executable again.
            unsafe { protect_pages(&mut state, &left) }?;
        }
        state.write_code(range.start() + lead, bytes)?;
        let data: Vec<(usize, Protection)> = AddressRange::new(range.start() + lead, range.end())
            .pages()
            .map(|p| (p, Protection::ReadOnly))
            .collect();
        // SAFETY: RW+NX pages nothing executes, made R+NX.
        unsafe { protect_pages(&mut state, &data) }
    }

    /// Makes the pages of `text` (page aligned, inside `image`) R+X and, with `lead`, writes
    /// `lead` at the image's first page (a lead page) and makes that page R+X too: every page in
    /// one flush. Other pages of the image stay R+NX.
    ///
    /// # Errors
    /// [`CodeError::ForeignCode`]; a backend failure, after which the pages are as they were
    /// (a lead page refilled with INT3); [`CodeError::FlushFailed`] when undoing needed a
    /// flush that failed too: the pages stay not present until a later flush stores what they
    /// were; [`CodeError::SyncFailed`] (published; a CPU may run stale lead bytes).
    pub(crate) fn publish_image(
        &mut self,
        image: &ImagePages,
        text: AddressRange,
        lead: Option<&[u8]>,
    ) -> Result<(), CodeError> {
        if image.owner != self.id {
            return Err(CodeError::ForeignCode);
        }
        let manager = self.manager.clone();
        let mut state = manager.lock()?;
        let start = image.range.start();
        let lead_range = AddressRange::new(start, start + lead.map_or(0, <[u8]>::len));
        let mut wrote_live = false;
        if let Some(bytes) = lead {
            wrote_live = state.write_code(start, bytes)?;
        }
        let pages: Vec<(usize, Protection)> = lead_range
            .pages()
            .chain(text.pages())
            .map(|p| (p, Protection::ReadExecute))
            .collect();
        // SAFETY: the lead page holds the bytes just written (and INT3) and the text pages the
        // image's text, never executable before: what the caller means to run.
        let flipped = unsafe { protect_pages(&mut state, &pages) };
        if let Err(e) = flipped {
            let mut result = Err(e);
            if let CodeError::FlushFailed(m) = e {
                // Staged R+X: stage them back (the retried flush stores the last staging).
                let back: Vec<(usize, Protection)> = lead_range
                    .pages()
                    .map(|p| (p, Protection::ReadWrite))
                    .chain(text.pages().map(|p| (p, Protection::ReadOnly)))
                    .collect();
                // SAFETY: nothing ran on the pages: they were never present with R+X.
                if unsafe { protect_pages(&mut state, &back) }.is_ok() {
                    result = Err(CodeError::Mmu(m));
                }
            }
            if !lead_range.is_empty() && state.mmu.query(start).is_some_and(|m| m.writable) {
                let _ = fill_int3(&mut state, &[lead_range]);
            }
            return result;
        }
        if wrote_live {
            state.mmu.sync_cores().map_err(CodeError::SyncFailed)?;
        }
        Ok(())
    }

    /// Frees an image: its pages are decommitted whole and its range becomes reusable. Pages a
    /// failed decommit left committed keep the range out of the free pool; later image loads
    /// and frees retry them.
    ///
    /// # Safety
    /// As [`free`](Self::free) for the image's text: no CPU runs, returns into or can reach it
    /// any more; and nothing reads the image's bytes any more.
    ///
    /// # Errors
    /// [`FreeError::Foreign`] hands the image back.
    pub(crate) unsafe fn free_image(
        &mut self,
        image: ImagePages,
    ) -> Result<(), FreeError<ImagePages>> {
        if image.owner != self.id {
            return Err(FreeError::Foreign(image));
        }
        self.retry_stale_images();
        self.release_image(image);
        Ok(())
    }

    /// Decommits `image` and gives its range back to the pool; keeps it aside (in
    /// `stale_images`) when pages stay committed. Returns whether it went back.
    fn release_image(&mut self, image: ImagePages) -> bool {
        let range = image.range;
        if self.decommit_image(range) {
            true
        } else {
            self.stale_images.push(range);
            false
        }
    }

    fn decommit_image(&mut self, range: AddressRange) -> bool {
        let manager = self.manager.clone();
        let Ok(mut state) = manager.lock() else {
            return false;
        };
        match state.decommit(range) {
            // Unmapped; the frames go with a later flush.
            Ok(()) | Err(CodeError::FlushFailed(_)) => {}
            Err(_) => return false,
        }
        drop(state);
        let _ = self.free.merge(range);
        self.allocated -= range.size();
        self.freed += range.size();
        self.count_live(range, false);
        true
    }

    /// Tries again to decommit images a failed decommit left committed.
    fn retry_stale_images(&mut self) {
        for range in core::mem::take(&mut self.stale_images) {
            if !self.decommit_image(range) {
                self.stale_images.push(range);
            }
        }
    }
}
