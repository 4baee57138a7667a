//! Why a description was refused.

use super::*;

/// Why [`CodeObject::new`] refused a [`CodeDesc`] (checked in the order listed).
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CodeObjectError {
    /// The instruction range holds no byte.
    EmptyInstructions,
    /// A section count or the name length does not fit in a `u32`.
    MetadataTooLarge,
    /// A protected offset is not below the code size (the first one, in input order).
    ProtectedOffsetOutOfRange {
        /// The offending offset.
        offset: u32,
    },
    /// A protected offset was given twice (the smallest such offset).
    DuplicateProtectedOffset {
        /// The repeated offset.
        offset: u32,
    },
    /// A relocation's patched field does not lie inside the instructions (the first one).
    RelocationOutOfRange {
        /// The relocation's offset.
        offset: u32,
    },
    /// An internal reference points outside the instructions (the first one).
    RelocationTargetOutOfRange {
        /// The relocation's offset.
        offset: u32,
        /// Its target offset.
        target_offset: u32,
    },
    /// A source position's pc offset is not below the code size (the first one).
    SourcePositionOutOfRange {
        /// The offending pc offset.
        pc_offset: u32,
    },
    /// Source positions are not sorted by pc offset: entry `index` is below entry `index - 1`.
    UnsortedSourcePositions {
        /// Index of the first out-of-order entry.
        index: usize,
    },
}

impl fmt::Display for CodeObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeObjectError::EmptyInstructions => f.write_str("empty instruction range"),
            CodeObjectError::MetadataTooLarge => f.write_str("code metadata too large"),
            CodeObjectError::ProtectedOffsetOutOfRange { offset } => {
                write!(f, "protected offset {offset:#x} lies outside the code")
            }
            CodeObjectError::DuplicateProtectedOffset { offset } => {
                write!(f, "protected offset {offset:#x} given twice")
            }
            CodeObjectError::RelocationOutOfRange { offset } => {
                write!(
                    f,
                    "relocation at {offset:#x} patches bytes outside the code"
                )
            }
            CodeObjectError::RelocationTargetOutOfRange {
                offset,
                target_offset,
            } => write!(
                f,
                "relocation at {offset:#x} targets {target_offset:#x}, outside the code"
            ),
            CodeObjectError::SourcePositionOutOfRange { pc_offset } => {
                write!(f, "source position at {pc_offset:#x} lies outside the code")
            }
            CodeObjectError::UnsortedSourcePositions { index } => {
                write!(f, "source position {index} is out of pc order")
            }
        }
    }
}

impl core::error::Error for CodeObjectError {}
