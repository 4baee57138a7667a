//! The trap table's public types: handles, hits, registrations, errors, memory figures.

use core::fmt;

use super::TrapVector;
use crate::range::AddressRange;

/// Identifies one registration; pass it to [`TrapTable::release`](super::TrapTable::release).
///
/// It holds the range start (to find the entry in O(log n)) and a serial number unique across
/// all tables and never reused, so a stale handle or one from another table is always rejected.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TrapHandle {
    pub(super) start: usize,
    pub(super) serial: u64,
}

/// A successful lookup: the faulting PC is a protected instruction.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TrapHit {
    pub(super) code: AddressRange,
    pub(super) landing_pad: usize,
    pub(super) offset: u32,
    pub(super) vector: TrapVector,
}

impl TrapHit {
    /// Address at which the faulting code resumes.
    #[must_use]
    pub const fn landing_pad(&self) -> usize {
        self.landing_pad
    }

    /// Start of the registered code range that holds the PC.
    #[must_use]
    pub const fn code_start(&self) -> usize {
        self.code.start()
    }

    /// The registered code range that holds the PC.
    #[must_use]
    pub const fn code(&self) -> AddressRange {
        self.code
    }

    /// Offset of the PC from [`code_start`](Self::code_start): one of the protected offsets.
    #[must_use]
    pub const fn offset(&self) -> u32 {
        self.offset
    }

    /// The vector the site was registered for (the one looked up).
    #[must_use]
    pub const fn vector(&self) -> TrapVector {
        self.vector
    }

    /// The faulting PC itself (`code_start() + offset()`).
    #[must_use]
    pub const fn pc(&self) -> usize {
        self.code.start() + self.offset as usize
    }
}

/// Why a registration or release was refused; the table is unchanged.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TrapError {
    /// The code range holds no byte.
    EmptyCode,
    /// The code range is 4 GiB or larger (offsets are 32-bit).
    CodeTooLarge {
        /// Its size.
        size: usize,
    },
    /// A protected offset is not below the code size (the first such offset, in input order).
    OffsetOutOfRange {
        /// The offending offset.
        offset: u32,
    },
    /// A protected offset was given twice for the same vector (the smallest such offset; #PF
    /// sites given in `protected` and in `sites` count together).
    DuplicateOffset {
        /// The repeated offset.
        offset: u32,
    },
    /// The landing pad lies outside the code range.
    LandingPadOutsideCode {
        /// The landing pad given.
        landing_pad: usize,
    },
    /// An accepted fault-address range is empty: it would accept no fault.
    EmptyFaultRange,
    /// More accepted fault-address ranges than one registration may hold (65 535).
    TooManyFaultRanges {
        /// How many were given.
        count: usize,
    },
    /// The code range overlaps a registered one (or another one of the same batch).
    Overlap {
        /// The range it overlaps (the lowest one if several do).
        existing: AddressRange,
    },
    /// The handle does not name a live registration of this table (never issued by it, already
    /// released, or given twice in one batch).
    UnknownHandle,
}

impl fmt::Display for TrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrapError::EmptyCode => f.write_str("empty code range"),
            TrapError::CodeTooLarge { size } => {
                write!(f, "code range of {size:#x} bytes is 4 GiB or larger")
            }
            TrapError::OffsetOutOfRange { offset } => {
                write!(
                    f,
                    "protected offset {offset:#x} lies outside the code range"
                )
            }
            TrapError::DuplicateOffset { offset } => {
                write!(f, "protected offset {offset:#x} given twice")
            }
            TrapError::LandingPadOutsideCode { landing_pad } => {
                write!(
                    f,
                    "landing pad {landing_pad:#x} lies outside the code range"
                )
            }
            TrapError::EmptyFaultRange => f.write_str("empty accepted fault-address range"),
            TrapError::TooManyFaultRanges { count } => {
                write!(f, "{count} accepted fault-address ranges are too many")
            }
            TrapError::Overlap { existing } => {
                write!(f, "code range overlaps registered range {existing:?}")
            }
            TrapError::UnknownHandle => f.write_str("unknown or already released trap handle"),
        }
    }
}

impl core::error::Error for TrapError {}

/// One registration: code, its protected instructions, where they resume, and optionally the
/// fault addresses they may fault on.
///
/// Several accepted ranges are for code that may fault in more than one place: wasm code's
/// linear memories (each reservation with its guard region) and the low pages a null funcref or
/// a spectre-guarded bounds check loads from.
#[derive(Clone, Copy, Debug)]
pub struct TrapRegistration<'a> {
    /// The code range.
    pub code: AddressRange,
    /// Offsets from `code.start()` of the protected instructions that may page-fault (#PF), any
    /// order.
    pub protected: &'a [u32],
    /// Offsets of protected instructions with their vector class, any order: #PF sites join
    /// `protected`; #UD and #DE sites are found by
    /// [`lookup_trap`](super::TrapTable::lookup_trap) only (and `lookup_fault` never finds
    /// them). An offset may be a site of several vectors.
    pub sites: &'a [(u32, TrapVector)],
    /// Where a protected fault resumes; inside `code`.
    pub landing_pad: usize,
    /// The fault addresses the protected instructions may fault on (e.g. each linear memory and
    /// its guard region, the null page range): a fault at an address in none of them is not
    /// this table's. Empty: any address (V8). At most 65 535 ranges, none empty; they may
    /// overlap, in any order.
    pub fault_ranges: &'a [AddressRange],
}

/// Bytes a [`TrapTable`](super::TrapTable) uses (allocator overhead not included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrapMemory {
    /// Registered ranges.
    pub ranges: usize,
    /// Protected instructions (sites) of all ranges, every vector.
    pub protected: usize,
    /// Index nodes.
    pub index: usize,
    /// Entry headers (with accepted fault ranges and padding), one per registered range.
    pub headers: usize,
    /// Protected offsets (2 or 4 bytes each).
    pub offsets: usize,
    /// Unlinked memory waiting for its grace period.
    pub retired: usize,
}
