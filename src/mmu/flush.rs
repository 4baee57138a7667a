//! [`TlbFlush`]: the TLB work of one operation, and what must wait for it (Linux `mmu_gather`).
//!
//! A page-table change takes effect on a CPU only once that CPU invalidated its cached
//! translation. codespace therefore never *changes* a present translation in place. Every
//! change — a protection, an unmap, sealing a direct-map alias — first makes the entry **not
//! present** and records the page here; [`Mmu::flush`](super::Mmu::flush) then invalidates the
//! pages on this CPU and on every other online CPU (one shootdown round), and only then:
//! 1. stores the entries' final values (recorded with
//!    [`store_after_flush`](TlbFlush::store_after_flush)) — no CPU can hold a stale
//!    translation at that point, and a not-present entry is never cached (Intel SDM 4.10.2.3),
//!    so the new permissions need no second round and cause no spurious faults;
//! 2. returns unmapped frames to the frame allocator
//!    ([`free_after_flush`](TlbFlush::free_after_flush)), so no CPU can reach a reused frame
//!    through a stale entry; page-table frames unlinked before the round go back the same way
//!    ([`free_table_after_flush`](TlbFlush::free_table_after_flush)).
//!
//! **Page tables.** A backend unlinks, before the round, the window's page tables (a page
//! table, then its page directory) that the batch leaves empty: all their entries are empty or
//! staged to become empty by this batch (unmaps). Those staged entries are cleared (not present
//! already: nothing to invalidate), their queued stores then find no leaf, and the tables'
//! frames are freed after the round. PDPTs stay: their PML4 entries may have been copied into
//! other address spaces. A linear-map table split to seal an alias is merged back into its
//! huge page (in place, the same translations) once a flush made all its aliases writable
//! again; its frame is freed after the next flush's round, since CPUs may have cached the entry
//! pointing to it until then.
//!
//! Hence, on every CPU and at every instant, no translation grants write access to a frame
//! while any translation grants execute access to it — the private alias inside
//! [`Mmu::poke`](super::Mmu::poke) excepted, on the poking CPU only (see its documentation). The price is that pages in flight are
//! briefly not present; codespace only stages pages nobody may touch meanwhile (pages of code
//! being published, decommitted or freed, direct-map aliases of code frames).
//!
//! **A failed flush.** A batch whose shootdown failed comes back ([`Unflushed`](super::Unflushed))
//! and is retried later, merged with newer batches (oldest first: the last staging of a leaf is
//! the one stored). In between, its staged leaves stay not present, and every later change of
//! one of them — a new protection, an unmap, sealing or unsealing a linear-map alias — is
//! staged too (into the newer batch), never stored in place: a leaf with a queued store is
//! written only by a flush. So the retried flush cannot replay a stale store over a page
//! unmapped since (issue 18, item 5), and an unmapped page's leaf stays staged, so not
//! mappable again, until the flush that frees its frame. (The alternative, refusing
//! `map_fresh`/`unmap` while a batch is pending, would wedge decommits behind an unresponsive
//! CPU for as long as it stays so.)
//!
//! The batch is `#[must_use]`: dropping it skips the invalidation, leaves the staged pages not
//! present, and leaks the frames — safe, but a bug, which the compiler points at.

use alloc::vec::Vec;

/// The TLB invalidations of one operation plus the work that must follow them.
///
/// Up to [`MAX_SINGLE_PAGES`](Self::MAX_SINGLE_PAGES) distinct pages are invalidated one by
/// one (`invlpg`) on each CPU; more turn the batch into one full flush per CPU (Linux's
/// `tlb_single_page_flush_ceiling`).
#[must_use = "changed translations stay in the TLBs until the batch is passed to Mmu::flush"]
#[derive(Debug, Default)]
pub struct TlbFlush {
    pages: [usize; TlbFlush::MAX_SINGLE_PAGES],
    len: usize,
    full: bool,
    stores: Vec<(usize, u64)>,
    frames: Vec<u64>,
}

impl TlbFlush {
    /// Largest batch flushed page by page.
    pub const MAX_SINGLE_PAGES: usize = 32;

    /// An empty batch.
    pub const fn new() -> Self {
        TlbFlush {
            pages: [0; Self::MAX_SINGLE_PAGES],
            len: 0,
            full: false,
            stores: Vec::new(),
            frames: Vec::new(),
        }
    }

    /// Records that the translation of `page` changed and must be invalidated everywhere.
    pub fn add(&mut self, page: usize) {
        if self.full || self.pages[..self.len].contains(&page) {
            return;
        }
        if self.len == Self::MAX_SINGLE_PAGES {
            self.full = true;
        } else {
            self.pages[self.len] = page;
            self.len += 1;
        }
    }

    /// Queues the store of `entry` (a backend-defined page-table entry value) for the leaf of
    /// `virt`, to happen after every CPU invalidated `virt`; also records `virt`. A store already
    /// queued for `virt` is replaced: only the last staging of a leaf is ever stored, so a change
    /// staged and then undone before the flush (a rolled-back publish) never makes the leaf
    /// briefly present with the undone permissions, which another CPU could cache.
    ///
    /// # Safety
    /// For backends: the leaf of `virt` is not present now and stays so until the flush, and
    /// `entry` is what the backend means to store there.
    pub unsafe fn store_after_flush(&mut self, virt: usize, entry: u64) {
        self.add(virt);
        match self.stores.iter_mut().find(|(v, _)| *v == virt) {
            Some(queued) => queued.1 = entry,
            None => self.stores.push((virt, entry)),
        }
    }

    /// Records `page` for invalidation and queues `frame`, which it mapped, to return to the
    /// frame allocator after the flush.
    ///
    /// # Safety
    /// For backends: `frame` is mapped nowhere any more (but may still be cached), and `page`
    /// is every page that mapped it (other pages that did were recorded with
    /// [`add`](Self::add)).
    pub unsafe fn free_after_flush(&mut self, page: usize, frame: u64) {
        self.add(page);
        self.frames.push(frame);
    }

    /// Queues `table`, a page-table frame unlinked from the page tables, to return to the frame
    /// allocator after the flush, and makes the flush a full one: CPUs may still walk through
    /// cached entries pointing to it (paging-structure caches) under any address, and a
    /// kernel's own mapper may reach it through translations of its own (a recursive mapping),
    /// which only a full flush drops. (Linux frees page tables through `mmu_gather` the same
    /// way.)
    ///
    /// # Safety
    /// For backends: no entry reachable from the page tables points to `table` any more (CPUs
    /// may still cache one), and the backend created it.
    pub unsafe fn free_table_after_flush(&mut self, table: u64) {
        self.full = true;
        self.frames.push(table);
    }

    /// Whether the batch holds nothing at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0 && !self.full && self.stores.is_empty() && self.frames.is_empty()
    }

    /// Whether the batch became a full flush.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// The pages to invalidate one by one (empty for a full flush).
    #[must_use]
    pub fn pages(&self) -> &[usize] {
        if self.full {
            &[]
        } else {
            &self.pages[..self.len]
        }
    }

    /// Whether any translation must be invalidated.
    #[must_use]
    pub fn needs_invalidation(&self) -> bool {
        self.full || self.len > 0
    }

    /// The queued stores, in order.
    #[must_use]
    pub fn stores(&self) -> &[(usize, u64)] {
        &self.stores
    }

    /// The frames queued for freeing.
    #[must_use]
    pub fn frames(&self) -> &[u64] {
        &self.frames
    }

    /// Moves `other`'s work into this batch, as if it was staged after this batch's: its
    /// stores replace queued ones for the same leaves.
    pub fn merge(&mut self, mut other: TlbFlush) {
        if other.full {
            self.full = true;
        }
        for &p in other.pages() {
            self.add(p);
        }
        for (virt, entry) in core::mem::take(&mut other.stores) {
            // SAFETY: moved from a batch whose backend promised this for `virt`.
            unsafe { self.store_after_flush(virt, entry) };
        }
        self.frames.append(&mut other.frames);
        other.len = 0;
        other.full = false;
    }

    /// Takes the queued work out, leaving the batch empty (for backends, once invalidated).
    pub fn take_work(&mut self) -> (Vec<(usize, u64)>, Vec<u64>) {
        self.len = 0;
        self.full = false;
        (
            core::mem::take(&mut self.stores),
            core::mem::take(&mut self.frames),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::TlbFlush;

    #[test]
    fn thirty_three_pages_become_a_full_flush_and_duplicates_count_once() {
        let mut t = TlbFlush::new();
        for p in 0..TlbFlush::MAX_SINGLE_PAGES {
            t.add(p * 4096);
            t.add(p * 4096);
        }
        assert!(!t.is_full());
        assert_eq!(t.pages().len(), 32);
        t.add(1 << 30);
        assert!(t.is_full());
        assert!(t.pages().is_empty());
        assert!(t.needs_invalidation());
    }

    #[test]
    fn the_last_staging_of_a_leaf_is_the_one_stored() {
        let mut a = TlbFlush::new();
        let mut b = TlbFlush::new();
        // SAFETY: no backend consumes these; the test only moves them around.
        unsafe {
            a.store_after_flush(0x5000, 1);
            a.store_after_flush(0x6000, 2);
            a.store_after_flush(0x5000, 3);
            b.store_after_flush(0x6000, 4);
            b.store_after_flush(0x7000, 5);
        }
        assert_eq!(a.stores(), &[(0x5000, 3), (0x6000, 2)]);
        a.merge(b);
        assert_eq!(a.stores(), &[(0x5000, 3), (0x6000, 4), (0x7000, 5)]);
        assert_eq!(a.pages(), &[0x5000, 0x6000, 0x7000]);
    }

    #[test]
    fn queued_work_is_merged_and_taken_once() {
        let mut a = TlbFlush::new();
        assert!(a.is_empty());
        let mut b = TlbFlush::new();
        // SAFETY: no backend consumes these; the test only moves them around.
        unsafe {
            b.store_after_flush(0x5000, 7);
            b.free_after_flush(0x5000, 0x9000);
        }
        a.merge(b);
        assert_eq!(a.pages(), &[0x5000]);
        assert_eq!(a.stores(), &[(0x5000, 7)]);
        assert_eq!(a.frames(), &[0x9000]);
        let (stores, frames) = a.take_work();
        assert_eq!((stores.len(), frames.len()), (1, 1));
        assert!(a.is_empty());
    }
}
