//! What a backend hands out and reports: owned committed pages, protections, mappings, leaves.

use crate::PAGE_SIZE;

/// A 4 KiB page of the code window, mapped to a frame the backend allocated for it alone.
///
/// Owning this value is owning the frame: it is neither `Clone` nor `Copy`, and only
/// [`Mmu::unmap`](super::Mmu::unmap) takes it back (queueing the frame to be freed after the
/// TLB flush). A writable alias of the frame is a different thing entirely — it exists only
/// inside [`Mmu::poke`](super::Mmu::poke) and never owns the frame — so the two cannot be mixed
/// up. Dropping a `CommittedPage` leaks its frame (it stays mapped), which is safe.
#[derive(Debug, PartialEq, Eq)]
pub struct CommittedPage {
    page: usize,
    frame: u64,
}

impl CommittedPage {
    /// A page `page` mapped to `frame`.
    ///
    /// # Safety
    /// For backends only: `frame` was allocated for `page`, is mapped there, and no other
    /// `CommittedPage` names it.
    #[must_use]
    pub const unsafe fn new(page: usize, frame: u64) -> Self {
        CommittedPage { page, frame }
    }

    /// The page's virtual address.
    #[must_use]
    pub const fn page(&self) -> usize {
        self.page
    }

    /// The physical address of its frame.
    #[must_use]
    pub const fn frame(&self) -> u64 {
        self.frame
    }
}

/// Protection of a committed code page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// Writable, not executable: code being written (RW+NX).
    ReadWrite,
    /// Executable, not writable: published code (R+X).
    ReadExecute,
    /// Neither writable nor executable: the data of a loaded image (R+NX).
    ReadOnly,
}

/// The translation of one mapped 4 KiB page, with the permissions all levels grant together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageMapping {
    /// Physical address of the frame.
    pub frame: u64,
    /// Writable at every level.
    pub writable: bool,
    /// Executable: no level sets NX.
    pub executable: bool,
}

impl PageMapping {
    /// The protection this mapping amounts to, or `None` for a W+X page, which codespace
    /// never leaves behind.
    #[must_use]
    pub fn protection(&self) -> Option<Protection> {
        match (self.writable, self.executable) {
            (true, false) => Some(Protection::ReadWrite),
            (false, true) => Some(Protection::ReadExecute),
            (false, false) => Some(Protection::ReadOnly),
            (true, true) => None,
        }
    }
}

/// One present leaf of the whole page table (any size), for audits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address it maps.
    pub virt: usize,
    /// Bytes it maps (4 KiB, 2 MiB or 1 GiB).
    pub size: usize,
    /// First physical address.
    pub frame: u64,
    /// Writable at every level of the walk.
    pub writable: bool,
    /// Executable at every level of the walk.
    pub executable: bool,
}

impl Leaf {
    /// Physical range `[frame, frame + size)`.
    #[must_use]
    pub const fn frames(&self) -> (u64, u64) {
        (self.frame, self.frame + self.size as u64)
    }
}

/// Counters of a backend's TLB and cross-CPU work, for tests and benchmarks of the flush
/// policy. Counts are what hardware did (or the model simulated), not calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Single-page invalidations on this CPU (`invlpg`).
    pub single_pages: u64,
    /// Full flushes on this CPU (CR3 reload).
    pub full: u64,
    /// Shootdown rounds: invalidation requests broadcast to the other online CPUs.
    pub shootdowns: u64,
    /// Cross-modifying-code rounds: every other CPU made to serialize.
    pub syncs: u64,
    /// Writes through the private alias (one map/switch/unmap each).
    pub pokes: u64,
}

/// Whether `addr` is 4 KiB aligned.
pub(crate) fn page_aligned(addr: usize) -> bool {
    addr.is_multiple_of(PAGE_SIZE)
}
