//! Vector classes of protected instructions: which exception a trap site raises.
//!
//! wasm code traps three ways: a load or store past its memory faults (#PF, with the faulting
//! address in CR2, filtered by the registration's accepted fault ranges), `unreachable`, a stack
//! overflow check and the other explicit checks execute `ud2` (#UD), and an integer division by
//! zero or overflow raises #DE. A site is registered for one vector and found only by the lookup
//! of that vector: [`TrapTable::lookup_fault`](super::TrapTable::lookup_fault) for #PF,
//! [`TrapTable::lookup_trap`](super::TrapTable::lookup_trap) for the others.

use core::fmt;

/// The exception a protected instruction may raise.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum TrapVector {
    /// #DE (vector 0): integer division by zero, or a quotient that does not fit.
    DivideError,
    /// #UD (vector 6): an invalid opcode, `ud2` in particular.
    InvalidOpcode,
    /// #PF (vector 14): a page fault, resumed only when CR2 lies in an accepted fault range.
    PageFault,
}

impl TrapVector {
    /// Every vector class, in vector-number order.
    pub const ALL: [TrapVector; 3] = [
        TrapVector::DivideError,
        TrapVector::InvalidOpcode,
        TrapVector::PageFault,
    ];

    /// The x86 exception vector number.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            TrapVector::DivideError => 0,
            TrapVector::InvalidOpcode => 6,
            TrapVector::PageFault => 14,
        }
    }

    /// The class of exception vector `number`, if it is one.
    #[must_use]
    pub const fn from_number(number: u8) -> Option<TrapVector> {
        match number {
            0 => Some(TrapVector::DivideError),
            6 => Some(TrapVector::InvalidOpcode),
            14 => Some(TrapVector::PageFault),
            _ => None,
        }
    }
}

impl fmt::Display for TrapVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrapVector::DivideError => "#DE",
            TrapVector::InvalidOpcode => "#UD",
            TrapVector::PageFault => "#PF",
        })
    }
}

/// The stored key of a site: ordered by offset, then vector.
#[inline]
pub(super) const fn key(offset: u32, vector: TrapVector) -> u64 {
    ((offset as u64) << 8) | vector.number() as u64
}
