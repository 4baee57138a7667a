//! What the code manager needs from an MMU, and the TLB-flush batching shared by all backends.
//!
//! Two backends implement [`Mmu`]: [`x86`] over the `x86_64` crate's `Mapper` and frame
//! allocator traits (a kernel's live page tables), and [`soft`], a software model of x86-64
//! 4-level paging in host memory, so every path of the manager runs in `cargo test` on the host.
//!
//! Conventions every backend keeps:
//! - committed code pages are 4 KiB leaves, either RW+NX or R+X, never W+X;
//! - intermediate entries never carry NX (and are always writable): the leaf decides;
//! - page-table edits record the page in a [`TlbFlush`] batch; nothing is invalidated until the
//!   batch is handed to [`Mmu::flush`], which issues one `invlpg` per page up to
//!   [`TlbFlush::MAX_SINGLE_PAGES`] pages and one full flush above.

use core::fmt;

pub mod soft;
#[cfg(feature = "x86_64")]
pub mod x86;

/// Page-table entry bit: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry bit: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry bit: no-execute (needs EFER.NXE).
pub const PTE_NO_EXECUTE: u64 = 1 << 63;
/// Bits 12..52 of an entry: the physical frame address.
pub const PTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Protection of a committed code page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// Writable, not executable: code being written (RW+NX).
    ReadWrite,
    /// Executable, not writable: published code (R+X).
    ReadExecute,
}

impl Protection {
    /// Leaf-entry flags of this protection (present included).
    #[must_use]
    pub const fn leaf_flags(self) -> u64 {
        match self {
            Protection::ReadWrite => PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE,
            Protection::ReadExecute => PTE_PRESENT,
        }
    }
}

/// The translation of one mapped 4 KiB page, with the permissions all four levels grant together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageMapping {
    /// Physical address of the frame.
    pub frame: u64,
    /// Writable at every level.
    pub writable: bool,
    /// Executable: no level sets NX.
    pub executable: bool,
    /// Whether some intermediate (non-leaf) entry on the walk sets NX, which codespace never does.
    pub intermediate_nx: bool,
}

impl PageMapping {
    /// The protection this mapping amounts to, or `None` for a W+X (or read-only, non-executable)
    /// page, which codespace never creates.
    #[must_use]
    pub fn protection(&self) -> Option<Protection> {
        match (self.writable, self.executable) {
            (true, false) => Some(Protection::ReadWrite),
            (false, true) => Some(Protection::ReadExecute),
            _ => None,
        }
    }
}

/// Why an MMU operation failed. A failed operation changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MmuError {
    /// The address is not 4 KiB aligned.
    Unaligned {
        /// The address given.
        addr: usize,
    },
    /// The address is not canonical or outside what the backend manages.
    OutOfRange {
        /// The address given.
        addr: usize,
    },
    /// The page is mapped already.
    AlreadyMapped {
        /// The page.
        page: usize,
    },
    /// The page is not mapped.
    NotMapped {
        /// The page.
        page: usize,
    },
    /// A write hit a page that is mapped but not writable.
    NotWritable {
        /// The page.
        page: usize,
    },
    /// Something in the way of the mapping (a huge page on the walk).
    HugePage {
        /// The page.
        page: usize,
    },
    /// No physical frame is left (for the page or for a page table).
    OutOfFrames,
    /// EFER.NXE is off: NX bits would fault as reserved and code pages could not be non-executable.
    NoExecuteDisabled,
    /// CR0.WP is off: ring 0 could write read-only (published) code.
    WriteProtectDisabled,
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Unaligned { addr } => write!(f, "address {addr:#x} is not page aligned"),
            MmuError::OutOfRange { addr } => write!(f, "address {addr:#x} is out of range"),
            MmuError::AlreadyMapped { page } => write!(f, "page {page:#x} is already mapped"),
            MmuError::NotMapped { page } => write!(f, "page {page:#x} is not mapped"),
            MmuError::NotWritable { page } => write!(f, "page {page:#x} is not writable"),
            MmuError::HugePage { page } => write!(f, "a huge page covers {page:#x}"),
            MmuError::OutOfFrames => f.write_str("out of physical frames"),
            MmuError::NoExecuteDisabled => f.write_str("EFER.NXE is off"),
            MmuError::WriteProtectDisabled => f.write_str("CR0.WP is off"),
        }
    }
}

impl core::error::Error for MmuError {}

/// Pages whose translations changed and must leave the TLB, batched until [`Mmu::flush`].
///
/// Up to [`MAX_SINGLE_PAGES`](Self::MAX_SINGLE_PAGES) distinct pages are invalidated one by one
/// (`invlpg`); more make the batch a single full flush (like Linux's
/// `tlb_single_page_flush_ceiling`). Dropping a batch without flushing leaves stale
/// translations, hence `#[must_use]`.
#[must_use = "changed translations stay in the TLB until the batch is passed to Mmu::flush"]
#[derive(Debug, Clone)]
pub struct TlbFlush {
    pages: [usize; TlbFlush::MAX_SINGLE_PAGES],
    len: usize,
    full: bool,
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
        }
    }

    /// Records that the translation of `page` changed.
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

    /// Whether nothing needs flushing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0 && !self.full
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

    /// Adds `other`'s pages to this batch.
    pub fn merge(&mut self, other: TlbFlush) {
        if other.full {
            self.full = true;
        }
        for &p in other.pages() {
            self.add(p);
        }
    }
}

impl Default for TlbFlush {
    fn default() -> Self {
        Self::new()
    }
}

/// How many TLB invalidations a backend issued, for tests and benchmarks of the flush policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Single-page invalidations (`invlpg`).
    pub single_pages: u64,
    /// Full flushes (CR3 reload).
    pub full: u64,
}

/// The page-table operations the code manager needs. Addresses are virtual and page aligned
/// unless said otherwise; every operation that fails leaves the tables as they were.
pub trait Mmu {
    /// Checks that the CPU enforces what W^X relies on: EFER.NXE and CR0.WP.
    ///
    /// # Errors
    /// [`MmuError::NoExecuteDisabled`] or [`MmuError::WriteProtectDisabled`].
    fn check_protection_support(&self) -> Result<(), MmuError>;

    /// Maps a fresh, zeroed frame at `page`, RW+NX, creating intermediate tables as needed.
    /// Records nothing in `tlb`: a not-present entry is never cached (Intel SDM 4.10.2.3).
    ///
    /// # Errors
    /// Unaligned or out-of-range page, a page already mapped, or no frame left.
    fn map_fresh(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<(), MmuError>;

    /// Unmaps `page` and returns its frame to the frame allocator.
    ///
    /// # Errors
    /// The page is not mapped (or not aligned).
    fn unmap(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<(), MmuError>;

    /// Changes the protection of the mapped `page`. Going to RW sets NX before W, going to R+X
    /// clears W before NX, so no step is ever W+X.
    ///
    /// # Errors
    /// The page is not mapped (or not aligned).
    fn protect(
        &mut self,
        page: usize,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError>;

    /// The mapping of `page`, if any (`page` may be any address inside the page).
    fn query(&self, page: usize) -> Option<PageMapping>;

    /// Calls `f` for every mapped 4 KiB page in `range`, in address order, skipping absent
    /// subtrees wholesale (so a walk over a 512 GiB window is cheap when it is sparse).
    fn for_each_mapping(&self, range: crate::AddressRange, f: &mut dyn FnMut(usize, PageMapping));

    /// Maps `frame` (which stays owned by its other mapping) at `alias`, RW+NX. Like
    /// [`map_fresh`](Self::map_fresh), records nothing in `tlb`.
    ///
    /// # Errors
    /// Unaligned or out-of-range page, already mapped, or no frame for a page table.
    fn map_alias(&mut self, alias: usize, frame: u64, tlb: &mut TlbFlush) -> Result<(), MmuError>;

    /// Removes an alias mapping without freeing the frame.
    ///
    /// # Errors
    /// The alias is not mapped.
    fn unmap_alias(&mut self, alias: usize, tlb: &mut TlbFlush) -> Result<(), MmuError>;

    /// Copies `data` to virtual address `addr` (any alignment, may cross pages) through the
    /// current mappings, which must all be present and writable; checked before any byte moves.
    ///
    /// # Errors
    /// A page of the destination is unmapped or not writable.
    fn write(&mut self, addr: usize, data: &[u8]) -> Result<(), MmuError>;

    /// Stores `value` at the 8-byte aligned `addr` with one atomic 64-bit store through a
    /// writable mapping (jump-table slot patching).
    ///
    /// # Errors
    /// Unaligned address, or the page is unmapped or not writable.
    fn write_u64_atomic(&mut self, addr: usize, value: u64) -> Result<(), MmuError>;

    /// Copies bytes at virtual address `addr` into `buf` through present mappings.
    ///
    /// # Errors
    /// A page of the source is unmapped.
    fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), MmuError>;

    /// Invalidates the batch's translations: one `invlpg` per page, or one full flush.
    fn flush(&mut self, tlb: TlbFlush);

    /// Makes code changed by this CPU visible to its own instruction stream: a serializing
    /// instruction (`cpuid`) on hardware (Intel SDM 8.1.3); nothing in a model.
    fn serialize(&self) {}

    /// Invalidations issued so far.
    fn flush_stats(&self) -> FlushStats;

    /// Physical frames still free in the backing allocator, when it can tell.
    fn free_frames(&self) -> Option<usize>;
}
