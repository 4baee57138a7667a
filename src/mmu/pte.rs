//! x86-64 page-table entry bits, shared by the hardware backend and the software machine that
//! models it (so both encode leaves, and staged leaves, the same way).

use super::Protection;

/// Present.
pub(crate) const P: u64 = 1 << 0;
/// Writable.
pub(crate) const W: u64 = 1 << 1;
/// Huge page (in a PDPT or PD entry).
pub(crate) const PS: u64 = 1 << 7;
/// No-execute.
pub(crate) const NX: u64 = 1 << 63;
/// An AVL bit (ignored by hardware): marks a staged not-present leaf, so it never reads as an
/// empty entry (even for a frame at physical address 0) and nothing maps over it.
pub(crate) const STAGED: u64 = 1 << 9;
/// The frame address bits of an entry.
pub(crate) const ADDR: u64 = 0x000F_FFFF_FFFF_F000;

/// A present RW+NX, R+X or R+NX leaf for `frame`.
pub(crate) fn leaf_entry(frame: u64, prot: Protection) -> u64 {
    match prot {
        Protection::ReadWrite => (frame & ADDR) | P | W | NX,
        Protection::ReadExecute => (frame & ADDR) | P,
        Protection::ReadOnly => (frame & ADDR) | P | NX,
    }
}
