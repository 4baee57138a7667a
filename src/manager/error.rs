//! Errors of the code manager. Every failed operation leaves pool, page tables and counters as
//! they were.

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
    /// The code window has no free virtual range this large (guard pages included).
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
    /// The window or configuration is unusable (unaligned, empty, too small for guard pages).
    InvalidConfig,
    /// A code handle was given to an allocator that did not create it.
    ForeignCode,
    /// The page-table backend refused.
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
            CodeError::WindowExhausted { size } => {
                write!(f, "no {size}-byte range left in the code window")
            }
            CodeError::CodeSpaceTooLarge { size, max } => {
                write!(f, "{size} bytes exceed the maximum code space size {max}")
            }
            CodeError::NotGrowable => f.write_str("the fixed-size code reservation is full"),
            CodeError::InvalidConfig => f.write_str("invalid code window or configuration"),
            CodeError::ForeignCode => f.write_str("code handle belongs to another allocator"),
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

/// A failed operation that hands its input back, so nothing is lost.
#[derive(Debug)]
pub struct Rejected<T> {
    /// Why it failed.
    pub error: CodeError,
    /// The handle given, unchanged.
    pub code: T,
}
