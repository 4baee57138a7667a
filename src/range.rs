//! Half-open address ranges, the unit every other module speaks in.

use core::fmt;

/// Size of a small page on x86-64: the granule of commit, protection and decommit.
pub const PAGE_SIZE: usize = 4096;

/// A half-open range of addresses `[start, end)`.
///
/// Ordering is by `start`, then `end`, which is address order for the disjoint ranges of a pool.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AddressRange {
    start: usize,
    end: usize,
}

impl AddressRange {
    /// The empty range at address 0.
    pub const EMPTY: AddressRange = AddressRange { start: 0, end: 0 };

    /// `[start, end)`; an `end` below `start` gives the empty range at `start`.
    #[must_use]
    pub const fn new(start: usize, end: usize) -> Self {
        if end < start {
            AddressRange { start, end: start }
        } else {
            AddressRange { start, end }
        }
    }

    /// `[start, start + size)`, or `None` when the end would overflow.
    #[must_use]
    pub const fn from_start_size(start: usize, size: usize) -> Option<Self> {
        match start.checked_add(size) {
            Some(end) => Some(AddressRange { start, end }),
            None => None,
        }
    }

    /// First address in the range.
    #[must_use]
    pub const fn start(&self) -> usize {
        self.start
    }

    /// First address past the range.
    #[must_use]
    pub const fn end(&self) -> usize {
        self.end
    }

    /// Number of bytes in the range.
    #[must_use]
    pub const fn size(&self) -> usize {
        self.end - self.start
    }

    /// Whether the range holds no address.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether `addr` lies in `[start, end)`.
    #[must_use]
    pub const fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether `other` lies wholly inside `self` (an empty `other` lies inside when its start does).
    #[must_use]
    pub const fn contains_range(&self, other: &AddressRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// The common part of both ranges; an empty range when they are disjoint.
    #[must_use]
    pub fn overlap(&self, other: &AddressRange) -> AddressRange {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        if start < end {
            AddressRange { start, end }
        } else {
            AddressRange::EMPTY
        }
    }

    /// The smallest page-aligned range that covers `self` (saturating at the top of the address space).
    #[must_use]
    pub const fn page_expand(&self) -> AddressRange {
        AddressRange::new(
            page_round_down(self.start),
            page_round_up_saturating(self.end),
        )
    }

    /// The largest page-aligned range inside `self` (empty when no whole page fits).
    #[must_use]
    pub const fn page_shrink(&self) -> AddressRange {
        AddressRange::new(
            page_round_up_saturating(self.start),
            page_round_down(self.end),
        )
    }

    /// Whether both ends are page-aligned.
    #[must_use]
    pub const fn is_page_aligned(&self) -> bool {
        self.start.is_multiple_of(PAGE_SIZE) && self.end.is_multiple_of(PAGE_SIZE)
    }

    /// Page-aligned addresses of every page that `self` touches, in order (the last page of
    /// the address space included, which [`page_expand`](Self::page_expand) cannot express).
    pub fn pages(&self) -> impl DoubleEndedIterator<Item = usize> + ExactSizeIterator {
        // Page numbers, last one inclusive: `end - 1` is the last byte, so no rounding up (which
        // overflows in the last page). `last + 1` is at most `usize::MAX / PAGE_SIZE + 1`.
        let (first, end) = if self.is_empty() {
            (0, 0)
        } else {
            (self.start / PAGE_SIZE, (self.end - 1) / PAGE_SIZE + 1)
        };
        (first..end).map(|p| p * PAGE_SIZE)
    }
}

/// `addr` rounded down to a page boundary.
#[must_use]
pub const fn page_round_down(addr: usize) -> usize {
    addr & !(PAGE_SIZE - 1)
}

/// `addr` rounded up to a page boundary, or `None` on overflow.
#[must_use]
pub const fn page_round_up(addr: usize) -> Option<usize> {
    match addr.checked_add(PAGE_SIZE - 1) {
        Some(a) => Some(a & !(PAGE_SIZE - 1)),
        None => None,
    }
}

const fn page_round_up_saturating(addr: usize) -> usize {
    match page_round_up(addr) {
        Some(a) => a,
        None => page_round_down(usize::MAX),
    }
}

impl fmt::Debug for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_of_disjoint_ranges_is_empty() {
        let a = AddressRange::new(0x1000, 0x2000);
        let b = AddressRange::new(0x2000, 0x3000);
        assert!(a.overlap(&b).is_empty());
        assert_eq!(
            a.overlap(&AddressRange::new(0x1800, 0x2800)),
            AddressRange::new(0x1800, 0x2000)
        );
    }

    #[test]
    fn page_rounding() {
        let r = AddressRange::new(0x1001, 0x2fff);
        assert_eq!(r.page_expand(), AddressRange::new(0x1000, 0x3000));
        assert!(r.page_shrink().is_empty());
        assert_eq!(
            AddressRange::new(0x1000, 0x4001).page_shrink(),
            AddressRange::new(0x1000, 0x4000)
        );
        assert_eq!(r.pages().collect::<alloc::vec::Vec<_>>(), [0x1000, 0x2000]);
        assert_eq!(AddressRange::from_start_size(usize::MAX, 2), None);
    }
}
