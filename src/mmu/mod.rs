//! The sealed boundary between codespace and the page tables.
//!
//! Everything above this module is safe Rust; everything that can break memory safety when
//! misused — mapping a page, unmapping it while code may run there, changing what is
//! executable, writing live code — is an `unsafe fn` of the `unsafe trait` [`Mmu`], with the
//! contract written on it. Backends:
//! - [`x86`]: a kernel's live x86-64 page tables through the `x86_64` crate's `Mapper`, with
//!   cross-CPU shootdowns and serialization through the kernel's [`x86::Smp`] hooks.
//! - [`soft`]: a software model of x86-64 paging with a TLB per simulated CPU, for host tests.
//!
//! Three ideas carry the layer:
//! - **Ownership is a value.** A committed page is a [`CommittedPage`]: not `Clone`, created
//!   only by a backend, consumed only by [`Mmu::unmap`]. The writable alias used to patch live
//!   code never escapes [`Mmu::poke`]: it is a different type ([`Poke`]) that owns no frame.
//! - **TLB work is a value.** Changes are staged in a `#[must_use]` [`TlbFlush`] and take full
//!   effect in [`Mmu::flush`]: invalidate on every CPU, then store final entries, then free
//!   frames (see the private `flush` module for why this keeps W^X on every CPU at every instant).
//! - **The calling CPU is explicit.** CPU-local state (NXE, WP, PCIDs) is checked per CPU and
//!   the alias is private to the CPU that uses it, with interrupts off.
//!
//! **W^X, and its one exception.** Outside [`Mmu::poke`], no CPU ever holds a writable
//! translation of a frame that any CPU may execute, stale TLB entries included (see [`TlbFlush`]).
//! Inside it, by design, the calling CPU holds a writable alias of frames that stay executable
//! through their own mappings (Linux `text_poke`): on that CPU only, for the duration of the call
//! with interrupts off, for the writes [`Poke`] allows. See [`Mmu::poke`] for the exact bounds.
//!
//! Generic code sees protections and mappings, never page-table bits: those live in backends.

use crate::AddressRange;

mod entry;
mod error;
mod flush;
mod page;
pub(crate) mod pte;
pub mod soft;
#[cfg(feature = "x86_64")]
pub mod x86;

pub use entry::EntryPoint;
pub use error::MmuError;
pub use flush::TlbFlush;
pub(crate) use page::page_aligned;
pub use page::{CommittedPage, FlushStats, Leaf, PageMapping, Protection};

/// Most pages one [`Mmu::poke`] session maps: a whole 2 MiB page ([`Mmu::map_rox`]), so the
/// code of a batch that fits in one is written in one session.
pub const MAX_POKE_PAGES: usize = 512;

/// Bytes of one 2 MiB page of [`Mmu::map_rox`].
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Writes through a private, writable alias of committed pages, inside [`Mmu::poke`].
///
/// Offsets are bounds-checked against the page; page `i` is the session's `i`-th page.
pub trait Poke {
    /// Copies `data` to `offset` of page `i`.
    ///
    /// # Errors
    /// `i` or the byte range outside the session.
    fn write(&mut self, i: usize, offset: usize, data: &[u8]) -> Result<(), MmuError>;

    /// Stores `value` at the 8-aligned `offset` of page `i` with one atomic 64-bit store, so
    /// code executing there sees the old or the new 8 bytes, never a mix.
    ///
    /// # Errors
    /// Misaligned or out-of-range offset, or `i` outside the session.
    fn store_u64(&mut self, i: usize, offset: usize, value: u64) -> Result<(), MmuError>;
}

/// A flush that could not complete (a CPU did not acknowledge). Nothing of the batch took
/// effect beyond invalidations: the staged pages stay not present and the frames stay
/// allocated, so the state is safe; the batch comes back to be flushed again.
#[derive(Debug)]
pub struct Unflushed {
    /// Why.
    pub error: MmuError,
    /// The batch, to pass to [`Mmu::flush`] again.
    pub tlb: alloc::boxed::Box<TlbFlush>,
}

/// How a lock of codespace turns interrupts off on the calling CPU while it is held.
#[derive(Debug, Clone, Copy)]
pub struct InterruptControl {
    /// Disables interrupts; returns whether they were enabled.
    pub disable: fn() -> bool,
    /// Re-enables them if the argument says they were enabled.
    pub restore: fn(bool),
}

impl InterruptControl {
    /// For environments without interrupts (host tests): always "enabled", nothing to do.
    pub const NONE: InterruptControl = InterruptControl {
        disable: || true,
        restore: |_| {},
    };
}

/// The page-table operations codespace needs.
///
/// Addresses are virtual and page aligned unless said otherwise. An operation that fails leaves
/// the tables as they were unless its documentation says otherwise.
///
/// # Safety
/// Implementing this trait promises what the rest of codespace relies on for memory safety:
/// - mappings are created, changed and removed only by these methods, exactly as documented:
///   [`map_fresh`](Self::map_fresh) maps a frame nothing else uses, [`unmap`](Self::unmap)
///   never frees a frame before [`flush`](Self::flush) invalidated it on every CPU,
///   [`protect`](Self::protect) never leaves a page writable and executable, not even in a
///   stale TLB entry of any CPU (see [`TlbFlush`]);
/// - [`flush`](Self::flush) invalidates the batch's pages on every online CPU that may hold
///   translations of them, before it stores final entries or frees frames; a page-table frame
///   is freed only once no entry points to it and a full invalidation on every CPU followed its
///   unlinking (CPUs cache entries pointing to tables), and a queued store is only ever made
///   over the not-present (staged) 4 KiB or 2 MiB leaf it was queued for;
/// - [`map_rox`](Self::map_rox) never makes a frame executable before every other mapping of
///   it is read-only on every CPU, and no translation of its leaf is ever writable;
/// - [`poke`](Self::poke)'s alias is usable by the calling CPU only, and only during the call;
/// - [`sync_cores`](Self::sync_cores) returns only after every online CPU executed a
///   serializing instruction;
/// - [`CommittedPage`] values are created only for pages mapped as documented.
pub unsafe trait Mmu {
    /// Checks that the calling CPU enforces what W^X relies on (EFER.NXE, CR0.WP) and that
    /// flushes reach every address space it may cache the window in.
    ///
    /// # Errors
    /// [`MmuError::NoExecuteDisabled`] or [`MmuError::WriteProtectDisabled`].
    fn check_cpu(&self) -> Result<(), MmuError>;

    /// Index of the calling CPU; stable while interrupts are disabled.
    fn current_cpu(&self) -> usize;

    /// CPUs online now (1 when the backend knows of no others).
    fn online_cpus(&self) -> usize;

    /// How codespace's locks disable interrupts on the calling CPU.
    fn interrupt_control(&self) -> InterruptControl;

    /// Maps a fresh frame at `page`, RW+NX, creating intermediate tables as needed. The frame is
    /// filled with INT3 (0xCC): every byte of a committed code page is code written on purpose
    /// or a trap, and nothing of the frame's previous use shows through.
    /// Needs no invalidation: a not-present entry is never cached (Intel SDM 4.10.2.3).
    ///
    /// # Errors
    /// Unaligned or out-of-range page, a page already mapped, or no frame left.
    ///
    /// # Safety
    /// `page` lies in virtual memory the caller owns exclusively (the code window): nothing
    /// else relies on it being unmapped.
    unsafe fn map_fresh(&mut self, page: usize) -> Result<CommittedPage, MmuError>;

    /// Maps a fresh 2 MiB frame at `page` (2 MiB aligned) as one read-only, executable leaf
    /// that is never writable: code on it is written only through [`poke`](Self::poke) (the
    /// ROX mode; Linux's execmem ROX cache). The frame is filled with INT3 through a writable,
    /// non-executable mapping before anything can execute it; every other mapping of the frame
    /// the backend knows of (a direct map, an identity map) is staged read-only in `tlb`, and
    /// the leaf itself is staged too: not present until the flush of `tlb`, R+X after it, so no
    /// CPU ever holds a writable translation of the frame while one may execute it.
    ///
    /// Returns the frame's 512 pages in address order (page `i` at `page + i * 4096`, frame
    /// `i` at the frame's start plus `i * 4096`): [`poke`](Self::poke), [`read`](Self::read)
    /// and [`query`](Self::query) take them one by one; the leaf goes back only whole, with
    /// all of them, to [`unmap_rox`](Self::unmap_rox). [`unmap`](Self::unmap) and
    /// [`protect`](Self::protect) refuse them.
    ///
    /// The default answers [`MmuError::Unsupported`]: a backend without 2 MiB frames, for
    /// which codespace falls back to 4 KiB pages.
    ///
    /// # Errors
    /// Unaligned or out-of-range page, anything mapped (or a table) in its 2 MiB, no 2 MiB
    /// frame or table frame left ([`MmuError::OutOfFrames`]), or no support. Nothing changed.
    ///
    /// # Safety
    /// As [`map_fresh`](Self::map_fresh): the 2 MiB at `page` lie in virtual memory the caller
    /// owns exclusively.
    unsafe fn map_rox(
        &mut self,
        page: usize,
        tlb: &mut TlbFlush,
    ) -> Result<alloc::vec::Vec<CommittedPage>, MmuError> {
        let _ = (page, tlb);
        Err(MmuError::Unsupported)
    }

    /// Unmaps a 2 MiB leaf of [`map_rox`](Self::map_rox), given back as all its pages in
    /// order; the frame returns to the allocator after the next [`flush`](Self::flush) of
    /// `tlb` (one round), its aliases restored writable then. Staged like
    /// [`unmap`](Self::unmap).
    ///
    /// # Errors
    /// `pages` are not exactly the leaf's, or a backend failure: the pages come back, nothing
    /// changed.
    ///
    /// # Safety
    /// No CPU executes, or will return into, code on any of the pages, and nothing else reads
    /// them.
    unsafe fn unmap_rox(
        &mut self,
        pages: alloc::vec::Vec<CommittedPage>,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, alloc::vec::Vec<CommittedPage>)> {
        let _ = tlb;
        Err((MmuError::Unsupported, pages))
    }

    /// Unmaps `page`; its frame returns to the allocator after the next [`flush`](Self::flush)
    /// of `tlb`, along with any alias of it this backend sealed (restored then). The leaf is
    /// staged like any change (see [`TlbFlush`]): until that flush the page is not present and
    /// [`map_fresh`](Self::map_fresh) of it answers [`MmuError::AlreadyMapped`].
    ///
    /// # Errors
    /// A backend failure; the page comes back, still mapped.
    ///
    /// # Safety
    /// No CPU executes, or will return into, code on the page, and nothing else reads it.
    unsafe fn unmap(
        &mut self,
        page: CommittedPage,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, CommittedPage)>;

    /// Stages a new protection: the page becomes not present now and `prot` after the next
    /// [`flush`](Self::flush) of `tlb`. Becoming executable for the first time also stages
    /// read-only for every other mapping of the frame the backend knows of (a direct map).
    ///
    /// # Errors
    /// A backend failure; nothing changed.
    ///
    /// # Safety
    /// No CPU accesses the page until the flush: for [`Protection::ReadExecute`], the page
    /// holds no code being executed and the bytes written are what the caller means to run;
    /// for [`Protection::ReadWrite`] and [`Protection::ReadOnly`], nothing executes on the page
    /// until it is made executable again.
    unsafe fn protect(
        &mut self,
        page: &CommittedPage,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError>;

    /// Copies `data` to `offset` of `page` through its own mapping, which must be writable.
    ///
    /// # Errors
    /// The page is not writable (or the range leaves the page).
    fn write(&mut self, page: &CommittedPage, offset: usize, data: &[u8]) -> Result<(), MmuError>;

    /// Maps `pages` writable (RW+NX) at a private alias visible to the calling CPU only, runs
    /// `f` on them with interrupts disabled, removes the alias and invalidates it locally. The
    /// pages' own mappings never change. Linux's `text_poke`.
    ///
    /// # The W^X exception
    /// This is the one place where a frame is writable through one translation while
    /// executable through another (its own, R+X mapping, which any CPU may be executing). The
    /// exception is exactly this wide:
    /// - **one CPU**: the alias exists only in a private address space (x86: a PML4 of its own)
    ///   that only the calling CPU loads, so no other CPU holds or can speculatively cache the
    ///   writable translation;
    /// - **one call**: interrupts are off on that CPU from before the alias is mapped until it
    ///   is unmapped and invalidated there (and the CPU is back on its own address space), so no
    ///   interrupt handler, other task or later code of this CPU can use or cache it;
    /// - **these writes**: only what `f` writes through [`Poke`], under the contract below.
    ///
    /// Implementations must keep it that narrow; audits of the page tables never see the alias.
    ///
    /// # Errors
    /// More than [`MAX_POKE_PAGES`] pages, a backend failure, or what `f` returned. A backend
    /// failure comes before `f` runs: nothing was written. When `f` fails, its error is
    /// returned as is and what it wrote before failing stays written (no rollback): a caller
    /// that needs all-or-nothing checks its stores before the session, so `f` cannot fail
    /// after its first store.
    ///
    /// # Safety
    /// What `f` writes is either not executing anywhere or a single aligned 8-byte store that
    /// executing code may see change ([`Poke::store_u64`]); the caller makes other CPUs see
    /// changed code with [`sync_cores`](Self::sync_cores).
    unsafe fn poke(
        &mut self,
        pages: &[&CommittedPage],
        f: &mut dyn FnMut(&mut dyn Poke) -> Result<(), MmuError>,
    ) -> Result<(), MmuError>;

    /// Copies bytes at `offset` of `page` into `buf` (the page must be present).
    ///
    /// # Errors
    /// The page is not present or the range leaves the page.
    fn read(&self, page: &CommittedPage, offset: usize, buf: &mut [u8]) -> Result<(), MmuError>;

    /// Invalidates the batch's pages on this CPU and every other online CPU (one round), then
    /// stores the staged final entries, then frees the queued frames. Every CPU that invalidates
    /// also serializes (on x86, `invlpg`, a CR3 write and taking the shootdown interrupt each do):
    /// a freed frame that is reused for new code is never executed from a stale prefetch.
    ///
    /// # Errors
    /// A CPU did not acknowledge: nothing after the invalidation happened and the batch comes
    /// back in [`Unflushed`].
    fn flush(&mut self, tlb: TlbFlush) -> Result<(), Unflushed>;

    /// Makes every online CPU execute a serializing instruction (this one included), so code
    /// changed by this CPU is what all of them execute from now on (Intel SDM vol. 3,
    /// "cross-modifying code").
    ///
    /// # Errors
    /// A CPU did not acknowledge.
    fn sync_cores(&mut self) -> Result<(), MmuError>;

    /// The mapping of the page holding `addr`, if present.
    fn query(&self, addr: usize) -> Option<PageMapping>;

    /// Calls `f` for every present 4 KiB page in `range`, in address order, skipping absent
    /// subtrees wholesale.
    fn for_each_mapping(&self, range: AddressRange, f: &mut dyn FnMut(usize, PageMapping));

    /// Calls `f` for every present leaf of the whole page table (every size), in address order.
    fn for_each_leaf(&self, f: &mut dyn FnMut(&Leaf));

    /// Counters.
    fn flush_stats(&self) -> FlushStats;

    /// Physical frames still free in the backing allocator, when it can tell.
    fn free_frames(&self) -> Option<usize>;
}
