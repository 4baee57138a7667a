//! Errors of the code manager. A failed operation leaves pool, page tables and counters as they
//! were, unless the error says otherwise ([`CodeError::FlushFailed`],
//! [`CodeError::PartialDecommit`]).

use core::fmt;

use crate::mmu::MmuError;

/// Why a code-manager operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodeError {
    /// A size of zero, or one that overflows when rounded.
    InvalidSize {
        /// The size asked for.
        size: usize,
    },
    /// Committing would exceed the manager's committed-bytes limit.
    CommitLimit {
        /// Bytes the operation needed to commit.
        requested: usize,
        /// Bytes still committable.
        remaining: usize,
    },
    /// The code window (or the region asked for) has no free range this large.
    WindowExhausted {
        /// Bytes asked for.
        size: usize,
    },
    /// The request cannot fit in one code space of the configured maximum size.
    CodeSpaceTooLarge {
        /// Bytes needed.
        size: usize,
        /// The maximum code-space size.
        max: usize,
    },
    /// A fixed-size allocator ran out of its reservation.
    NotGrowable,
    /// A setting or the window is unusable.
    InvalidConfig {
        /// Which setting.
        setting: &'static str,
    },
    /// A code handle was given to an allocator that did not create it.
    ForeignCode,
    /// A patch outside the patchable code (jump tables) it names, or not 8-aligned.
    NotPatchable {
        /// The offending address.
        addr: usize,
    },
    /// Writing into a page with published code in [`Flip`](super::ProtectionMode::Flip) mode
    /// while more than one CPU is online: other CPUs could be executing the page.
    FlipNeedsOneCpu,
    /// The lock was held and the caller runs with interrupts disabled (interrupt context), so it
    /// may not wait; retry from a context that can.
    Busy,
    /// A CPU does not enforce what W^X needs (EFER.NXE, CR0.WP).
    CpuUnsupported(MmuError),
    /// The change was made but a CPU did not acknowledge its TLB flush: the pages involved stay
    /// inaccessible and frames allocated (safe), and the flush is retried by the next operation.
    /// What the operation changed is not rolled back.
    FlushFailed(MmuError),
    /// The stores landed, but a CPU did not acknowledge serializing: it may run the old bytes
    /// until it next serializes (an interrupt or `iretq` does).
    SyncFailed(MmuError),
    /// An earlier INT3 patch (one that answered [`SyncFailed`](Self::SyncFailed)) could not be
    /// finished first: a CPU did not acknowledge serializing again. Nothing of this call was
    /// stored or freed; the earlier patch stays pending (its sites registered) and is retried
    /// by the next operation.
    PatchPending(MmuError),
    /// Flip mode: a page was written but could not be made executable again. It stays RW+NX
    /// (never writable and executable), so published code sharing it cannot run until the next
    /// operation of the manager makes it R+X again.
    NotRestored(MmuError),
    /// The range was freed, but not every wholly free page could be decommitted: those stay
    /// committed (and counted) until a later free or the allocator's drop decommits them. From
    /// an allocation: it failed, and a page its commit mapped could not be unmapped again; it
    /// stays committed (and counted) in free room the same way.
    PartialDecommit(MmuError),
    /// The page-table backend refused; nothing changed.
    Mmu(MmuError),
}

impl fmt::Display for CodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeError::InvalidSize { size } => write!(f, "invalid code size {size}"),
            CodeError::CommitLimit {
                requested,
                remaining,
            } => write!(
                f,
                "committing {requested} bytes exceeds the limit ({remaining} bytes remain)"
            ),
            CodeError::WindowExhausted { size } => write!(f, "no free {size}-byte range"),
            CodeError::CodeSpaceTooLarge { size, max } => {
                write!(f, "{size} bytes exceed the maximum code space size {max}")
            }
            CodeError::NotGrowable => f.write_str("the fixed-size code reservation is full"),
            CodeError::InvalidConfig { setting } => write!(f, "invalid configuration: {setting}"),
            CodeError::ForeignCode => f.write_str("code handle belongs to another allocator"),
            CodeError::NotPatchable { addr } => write!(f, "{addr:#x} is not a patchable slot"),
            CodeError::FlipNeedsOneCpu => {
                f.write_str("flip mode cannot write live pages while several CPUs are online")
            }
            CodeError::Busy => f.write_str("lock held; interrupts are disabled, so not waiting"),
            CodeError::CpuUnsupported(e) => write!(f, "CPU unsupported: {e}"),
            CodeError::FlushFailed(e) => write!(f, "TLB flush incomplete: {e}"),
            CodeError::SyncFailed(e) => write!(f, "stored, but cores not serialized: {e}"),
            CodeError::PatchPending(e) => {
                write!(f, "an earlier patch is unfinished, nothing done: {e}")
            }
            CodeError::NotRestored(e) => {
                write!(f, "written, but the page is not executable again yet: {e}")
            }
            CodeError::PartialDecommit(e) => write!(f, "freed, but decommit incomplete: {e}"),
            CodeError::Mmu(e) => write!(f, "page tables: {e}"),
        }
    }
}

impl core::error::Error for CodeError {}

impl From<MmuError> for CodeError {
    fn from(e: MmuError) -> Self {
        CodeError::Mmu(e)
    }
}

impl From<crate::sync::irq_lock::Busy> for CodeError {
    fn from(_: crate::sync::irq_lock::Busy) -> Self {
        CodeError::Busy
    }
}

/// Why freeing code failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum FreeError<T> {
    /// The handle belongs to another allocator: handed back, nothing changed.
    Foreign(T),
    /// Nothing was freed and the handle comes back, to be freed again later: the manager was
    /// [`Busy`](CodeError::Busy), or writing INT3 over the code failed (some of its bytes may be
    /// INT3 already; with [`CodeError::NotRestored`] all are, and the page is repaired by the
    /// next operation).
    NotFreed(CodeError, T),
    /// The code was freed, but decommitting its wholly free pages failed
    /// ([`CodeError::PartialDecommit`] or [`CodeError::FlushFailed`]): those pages stay
    /// committed and counted, and a later free, [`trim`](super::CodeAllocator::trim) or the
    /// allocator's drop decommits them.
    Decommit(CodeError),
}

impl<T> FreeError<T> {
    /// The error as a [`CodeError`].
    pub fn error(&self) -> CodeError {
        match self {
            FreeError::Foreign(_) => CodeError::ForeignCode,
            FreeError::NotFreed(e, _) => *e,
            FreeError::Decommit(e) => *e,
        }
    }
}

/// A failed operation that hands its input back, so nothing is lost.
#[derive(Debug)]
pub struct Rejected<T> {
    /// Why it failed.
    pub error: CodeError,
    /// The handle given, unchanged.
    pub code: T,
}
