//! Writing committed code pages without ever making one writable and executable.
//!
//! A page that is still RW+NX (fresh, not yet published) is written through its own mapping. A
//! page that holds published code (R+X) is written either through the backend's private alias
//! ([`ProtectionMode::Alias`]: only this CPU can see the alias, the executable mapping never
//! changes) or by flipping it ([`ProtectionMode::Flip`]: RW+NX, write, R+X, each step flushed
//! on every CPU) — which stops other code on the page from executing meanwhile, so it is
//! refused while more than one CPU is online.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::config::ProtectionMode;
use super::error::CodeError;
use super::state::State;
use crate::mmu::{CommittedPage, Mmu, MmuError, Protection, TlbFlush, MAX_POKE_PAGES};
use crate::{AddressRange, PAGE_SIZE};

/// INT3: what padding bytes of published ranges hold, so a stray jump traps.
const INT3: u8 = 0xCC;

/// One write inside one page: (page, offset in page, data).
type Chunk<'d> = (usize, usize, &'d [u8]);

/// The distinct pages of one private-alias session, in first-seen order (page `i` of the
/// session is `pages[i]`), and their committed pages: at most [`MAX_POKE_PAGES`], all committed,
/// checked before anything is written.
pub(super) fn session(
    committed: &BTreeMap<usize, CommittedPage>,
    addrs: impl Iterator<Item = usize>,
) -> Result<(Vec<usize>, Vec<&CommittedPage>), CodeError> {
    let mut pages: Vec<usize> = Vec::new();
    for page in addrs {
        if !pages.contains(&page) {
            pages.push(page);
        }
    }
    if pages.len() > MAX_POKE_PAGES {
        return Err(MmuError::TooManyPages {
            pages: pages.len(),
            max: MAX_POKE_PAGES,
        }
        .into());
    }
    let pages_ref = pages
        .iter()
        .map(|&page| committed.get(&page).ok_or(MmuError::NotMapped { page }))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((pages, pages_ref))
}

/// `data` at `addr` split at page boundaries; an error where `addr + done` leaves the address
/// space (checked, as in [`State::read`]: a caller's address is not trusted to leave room).
fn chunks(addr: usize, data: &[u8]) -> impl Iterator<Item = Result<Chunk<'_>, CodeError>> {
    let mut done = 0;
    core::iter::from_fn(move || {
        if done >= data.len() {
            return None;
        }
        let Some(at) = addr.checked_add(done) else {
            done = data.len();
            return Some(Err(MmuError::OutOfRange { addr }.into()));
        };
        let page = at & !(PAGE_SIZE - 1);
        // Not `page + PAGE_SIZE - at`: that overflows in the last page of the address space.
        let n = (PAGE_SIZE - (at - page)).min(data.len() - done);
        let chunk = (page, at - page, &data[done..done + n]);
        done += n;
        Some(Ok(chunk))
    })
}

impl<M: Mmu> State<M> {
    fn is_live(&self, page: usize) -> Result<bool, CodeError> {
        self.pages.get(&page).ok_or(MmuError::NotMapped { page })?;
        Ok(self.mmu.query(page).is_some_and(|m| !m.writable))
    }

    /// Writes `data` at `addr` of committed pages, whatever their protection; pages come back
    /// as they were. Returns whether published (live) pages were written, in which case the
    /// caller makes other CPUs see the new bytes ([`Mmu::sync_cores`]) before they may run them.
    ///
    /// All pages are checked before the first byte moves.
    pub(crate) fn write_code(&mut self, addr: usize, data: &[u8]) -> Result<bool, CodeError> {
        self.write_code_batch(&[(addr, data)])
    }

    /// [`write_code`](Self::write_code) for several writes at once: every page of every write
    /// is checked before the first byte moves, and the live pages are written in as few alias
    /// sessions as [`MAX_POKE_PAGES`] allows (one for a batch within 2 MiB of pages).
    pub(crate) fn write_code_batch(
        &mut self,
        writes: &[(usize, &[u8])],
    ) -> Result<bool, CodeError> {
        let all = || writes.iter().flat_map(|&(addr, data)| chunks(addr, data));
        let mut live: Vec<Chunk<'_>> = Vec::new();
        for chunk in all() {
            let chunk = chunk?;
            if self.is_live(chunk.0)? {
                live.push(chunk);
            }
        }
        if !live.is_empty()
            && self.config.protection == ProtectionMode::Flip
            && self.mmu.online_cpus() > 1
        {
            return Err(CodeError::FlipNeedsOneCpu);
        }
        let live_pages: alloc::collections::BTreeSet<usize> = live.iter().map(|c| c.0).collect();
        for chunk in all() {
            let (page, offset, bytes) = chunk?;
            if !live_pages.contains(&page) {
                let committed = self.pages.get(&page).ok_or(MmuError::NotMapped { page })?;
                self.mmu.write(committed, offset, bytes)?;
            }
        }
        if live.is_empty() {
            return Ok(false);
        }
        match self.config.protection {
            ProtectionMode::Alias => {
                // Sessions of at most MAX_POKE_PAGES distinct pages, in order.
                let mut from = 0;
                let mut pages = alloc::collections::BTreeSet::new();
                for (i, c) in live.iter().enumerate() {
                    if !pages.contains(&c.0) && pages.len() == MAX_POKE_PAGES {
                        self.poke_chunks(&live[from..i])?;
                        (from, pages) = (i, alloc::collections::BTreeSet::new());
                    }
                    pages.insert(c.0);
                }
                self.poke_chunks(&live[from..])?;
            }
            ProtectionMode::Flip => {
                for &chunk in &live {
                    self.flip_write(chunk)?;
                }
            }
        }
        Ok(true)
    }

    /// Writes `chunks` of live pages in one private-alias session.
    fn poke_chunks(&mut self, chunks: &[Chunk<'_>]) -> Result<(), CodeError> {
        let (pages, committed) = session(&self.pages, chunks.iter().map(|c| c.0))?;
        let mut write = |poke: &mut dyn crate::mmu::Poke| {
            for &(page, offset, bytes) in chunks {
                let i = pages.iter().position(|&p| p == page).unwrap_or(usize::MAX);
                poke.write(i, offset, bytes)?;
            }
            Ok(())
        };
        // SAFETY: the bytes written are free space of published pages (code being published,
        // or INT3 fill of freed code no CPU runs any more); executing neighbours are untouched.
        unsafe { self.mmu.poke(&committed, &mut write) }?;
        Ok(())
    }

    /// Flip mode, one CPU: RW+NX (flushed), write, R+X (flushed). A page that cannot be made
    /// R+X again is remembered and restored by the next operation
    /// ([`State::finish_pending`]); the error says so.
    fn flip_write(&mut self, (page, offset, bytes): Chunk<'_>) -> Result<(), CodeError> {
        match self.protect_flushed(page, Protection::ReadWrite) {
            Ok(()) => {}
            Err(e @ CodeError::FlushFailed(_)) => {
                // Staged: the retried flush makes the page RW+NX; it must come back to R+X.
                self.unrestored.push(page);
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        let committed = self.pages.get(&page).ok_or(MmuError::NotMapped { page })?;
        let written = self.mmu.write(committed, offset, bytes);
        match (written, self.protect_flushed(page, Protection::ReadExecute)) {
            // R+X again, or staged R+X for the retried flush to finish.
            (written, Ok(()) | Err(CodeError::FlushFailed(_))) if written.is_err() => {
                written.map_err(CodeError::from)
            }
            (_, Ok(())) => Ok(()),
            (_, Err(e @ CodeError::FlushFailed(_))) => Err(e),
            (_, Err(e)) => {
                self.unrestored.push(page);
                Err(match e {
                    CodeError::Mmu(e) => CodeError::NotRestored(e),
                    e => e,
                })
            }
        }
    }

    fn protect_flushed(&mut self, page: usize, prot: Protection) -> Result<(), CodeError> {
        let committed = self.pages.get(&page).ok_or(MmuError::NotMapped { page })?;
        let mut tlb = TlbFlush::new();
        // SAFETY: flip mode runs with one CPU online and the manager lock held: nothing else
        // executes the page until it is R+X again (interrupt handlers running generated code on
        // a page being flipped are excluded by Flip mode's documentation).
        unsafe { self.mmu.protect(committed, prot, &mut tlb) }?;
        self.flush(tlb)
    }

    /// Publishes `codes` (range, bytes): copies the bytes into place, pads the rest of each
    /// range with INT3, makes every CPU serialize if a page already holding published code was
    /// written, and makes the fresh (still RW+NX) pages R+X in one flush.
    ///
    /// Serializing comes before any page becomes executable, so a failure leaves no page
    /// executable that was not (issue 18, item 21): [`CodeError::SyncFailed`] hands the code back
    /// with its fresh pages untouched, and a failed staging or flush stages them back to RW+NX.
    /// Only the codes' own ranges (free space, unreachable until published) may hold new bytes.
    pub(crate) fn publish(&mut self, codes: &[(AddressRange, &[u8])]) -> Result<(), CodeError> {
        // Code and padding in one write each, all written in one batch: every page is checked
        // before a byte moves, and live pages (ROX pages are all live) take one alias session
        // per batch, not per code.
        let images: Vec<Vec<u8>> = codes
            .iter()
            .map(|&(range, bytes)| {
                let mut image = Vec::with_capacity(range.size());
                image.extend_from_slice(bytes);
                image.resize(range.size(), INT3);
                image
            })
            .collect();
        let writes: Vec<(usize, &[u8])> = codes
            .iter()
            .zip(&images)
            .map(|(&(range, _), image)| (range.start(), &image[..]))
            .collect();
        let wrote_live = self.write_code_batch(&writes)?;
        // Pages still RW hold no published code (publishing any would have made them R+X).
        let mut fresh: Vec<usize> = codes
            .iter()
            .flat_map(|(range, _)| range.pages())
            .filter(|&p| self.mmu.query(p).is_some_and(|m| m.writable))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if wrote_live {
            // Other CPUs may have prefetched the INT3 fill of these ranges next to code they
            // run. Nothing can reach the ranges before this returns, so serializing now, before
            // the fresh pages change, is as good as after, and a failure changes nothing more.
            self.mmu.sync_cores().map_err(CodeError::SyncFailed)?;
        }
        let mut tlb = TlbFlush::new();
        for (i, &page) in fresh.iter().enumerate() {
            let committed = self.pages.get(&page).ok_or(MmuError::NotMapped { page })?;
            // SAFETY: no CPU executes these pages (never executable before), nothing writes them
            // until the flush, and they hold the bytes just written.
            if let Err(e) = unsafe {
                self.mmu
                    .protect(committed, Protection::ReadExecute, &mut tlb)
            } {
                self.unpublish(&fresh[..i], tlb)?;
                return Err(e.into());
            }
        }
        match self.flush(tlb) {
            Err(e @ CodeError::FlushFailed(_)) => {
                // The R+X stores are pending: replace them by RW+NX (the last staging wins).
                self.unpublish(&fresh, TlbFlush::new())?;
                Err(e)
            }
            result => result,
        }
    }

    /// Stages `pages`, staged R+X by a publish that failed (never executable on any CPU: their
    /// final entries were never stored), back to RW+NX, and flushes with `tlb`.
    fn unpublish(&mut self, pages: &[usize], mut tlb: TlbFlush) -> Result<(), CodeError> {
        for &page in pages {
            if let Some(c) = self.pages.get(&page) {
                // SAFETY: staged a moment ago and never stored R+X: nothing executes it. A
                // failure leaves it staged R+X, which is safe (and was the old behaviour).
                let _ = unsafe { self.mmu.protect(c, Protection::ReadWrite, &mut tlb) };
            }
        }
        self.flush(tlb)
    }

    /// Stores each `(addr, value)` with one aligned 8-byte store — through the private alias
    /// for published pages, all in one session, so either every store lands or none does — and
    /// then makes every CPU serialize: when this returns, every CPU executes the new bytes.
    ///
    /// This is the [`AtomicStore`](super::PatchProtocol::AtomicStore) protocol for every store,
    /// whatever the configuration: [`State::patch_slots`] applies the configured one.
    pub(crate) fn patch(&mut self, stores: &[(usize, u64)]) -> Result<(), CodeError> {
        self.finish_before_patch()?;
        if let Some(&(addr, _)) = stores.iter().find(|(a, _)| !a.is_multiple_of(8)) {
            return Err(CodeError::NotPatchable { addr });
        }
        self.store_and_sync(stores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_in_the_last_page_of_the_address_space_end_in_an_error_not_an_overflow() {
        let data = [0u8; 20];
        let addr = usize::MAX - 9;
        let got: Vec<_> = chunks(addr, &data).collect();
        // The last page's 10 bytes, then the step past the address space is an error.
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Ok((usize::MAX & !(PAGE_SIZE - 1), PAGE_SIZE - 10, &data[..10]))
        );
        assert!(matches!(
            got[1],
            Err(CodeError::Mmu(MmuError::OutOfRange { .. }))
        ));
    }
}
