//! Why a backend operation failed.

use core::fmt;

/// Why an MMU operation failed. A failed operation changed nothing unless its documentation
/// says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MmuError {
    /// The address is not 4 KiB aligned (or, for a 64-bit store, not 8 aligned).
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
    /// EFER.NXE is off on this CPU: code pages could not be non-executable.
    NoExecuteDisabled {
        /// The CPU.
        cpu: usize,
    },
    /// CR0.WP is off on this CPU: ring 0 could write read-only (published) code.
    WriteProtectDisabled {
        /// The CPU.
        cpu: usize,
    },
    /// Another CPU did not acknowledge a TLB shootdown or core serialization in time.
    ShootdownTimeout,
    /// Too many pages for one write through the private alias.
    TooManyPages {
        /// Pages asked for.
        pages: usize,
        /// The most one alias session maps.
        max: usize,
    },
    /// A simulated failure (failure-injection backends in tests).
    Injected,
    /// The backend does not offer this operation (2 MiB code pages, [`Mmu::map_rox`]).
    ///
    /// [`Mmu::map_rox`]: super::Mmu::map_rox
    Unsupported,
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Unaligned { addr } => write!(f, "address {addr:#x} is not aligned"),
            MmuError::OutOfRange { addr } => write!(f, "address {addr:#x} is out of range"),
            MmuError::AlreadyMapped { page } => write!(f, "page {page:#x} is already mapped"),
            MmuError::NotMapped { page } => write!(f, "page {page:#x} is not mapped"),
            MmuError::NotWritable { page } => write!(f, "page {page:#x} is not writable"),
            MmuError::HugePage { page } => write!(f, "a huge page covers {page:#x}"),
            MmuError::OutOfFrames => f.write_str("out of physical frames"),
            MmuError::NoExecuteDisabled { cpu } => write!(f, "EFER.NXE is off on CPU {cpu}"),
            MmuError::WriteProtectDisabled { cpu } => write!(f, "CR0.WP is off on CPU {cpu}"),
            MmuError::ShootdownTimeout => f.write_str("a CPU did not acknowledge a shootdown"),
            MmuError::TooManyPages { pages, max } => {
                write!(f, "{pages} pages in one alias session (at most {max})")
            }
            MmuError::Injected => f.write_str("injected failure"),
            MmuError::Unsupported => f.write_str("not supported by this backend"),
        }
    }
}

impl core::error::Error for MmuError {}
