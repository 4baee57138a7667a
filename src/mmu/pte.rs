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

/// Bit 12 of a 2 MiB (or 1 GiB) leaf is its PAT bit, not an address bit (Intel SDM vol. 3,
/// table 4-18), so a huge leaf's frame is never `e & ADDR`. (Bits 13..21 are reserved, zero on
/// hardware; the software machine's direct map, whose frames start at 1 MiB, uses them.)
pub(crate) const PAT_HUGE: u64 = 1 << 12;

/// The first physical address a leaf entry maps: `level` 3 is a 4 KiB leaf, 2 a 2 MiB leaf, 1
/// a 1 GiB leaf (whose bits 12..30 are PAT and reserved, as a 2 MiB leaf's bits 12..21).
pub(crate) fn leaf_frame(entry: u64, level: usize) -> u64 {
    match level {
        3 => entry & ADDR,
        2 => entry & ADDR & !PAT_HUGE,
        _ => entry & ADDR & !((1 << 30) - 1),
    }
}

/// A present R+X 2 MiB leaf for the 2 MiB aligned `frame`.
pub(crate) fn huge_rx_entry(frame: u64) -> u64 {
    (frame & ADDR & !PAT_HUGE) | P | PS
}

/// A present RW+NX, R+X or R+NX leaf for `frame`.
pub(crate) fn leaf_entry(frame: u64, prot: Protection) -> u64 {
    match prot {
        Protection::ReadWrite => (frame & ADDR) | P | W | NX,
        Protection::ReadExecute => (frame & ADDR) | P,
        Protection::ReadOnly => (frame & ADDR) | P | NX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_leaf_with_its_pat_bit_set_maps_its_2mib_aligned_frame() {
        let frame = 0x4060_0000;
        let e = huge_rx_entry(frame) | PAT_HUGE;
        assert_eq!(leaf_frame(e, 2), frame);
        // The same bit in a 4 KiB leaf is an address bit.
        assert_eq!(leaf_frame(frame | PAT_HUGE | P, 3), frame | PAT_HUGE);
        // A 1 GiB leaf: bits 12..30 are PAT and reserved.
        assert_eq!(leaf_frame((1 << 30) | PAT_HUGE | PS | P, 1), 1 << 30);
        assert_eq!(huge_rx_entry(frame) & (W | NX), 0, "R+X");
    }
}
