//! Validating a registration and building its entry, before the writer lock is taken.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::entry::{scanned_whole, EntryBox, NewEntry, MAX_FAULT_RANGES};
use super::types::{TrapError, TrapHandle, TrapRegistration};
use super::vectors::{key, TrapVector};
use crate::range::AddressRange;

/// Serial numbers of registrations, unique across every table of the program: a handle names
/// one registration of one table, so a table answers a handle issued by another one (or a
/// released one) with [`TrapError::UnknownHandle`].
static SERIALS: AtomicU64 = AtomicU64::new(1);

/// Validated, allocated, not yet published.
pub(super) struct Prepared {
    pub(super) code: AddressRange,
    pub(super) serial: u64,
    pub(super) entry: EntryBox,
}

/// Validates a registration and builds its entry, before any lock is taken.
pub(super) fn prepare(reg: &TrapRegistration<'_>) -> Result<Prepared, TrapError> {
    let code = reg.code;
    if code.is_empty() {
        return Err(TrapError::EmptyCode);
    }
    let size =
        u32::try_from(code.size()).map_err(|_| TrapError::CodeTooLarge { size: code.size() })?;
    let all = reg
        .protected
        .iter()
        .copied()
        .chain(reg.sites.iter().map(|s| s.0));
    if let Some(offset) = all.clone().find(|&o| o >= size) {
        return Err(TrapError::OffsetOutOfRange { offset });
    }
    // #PF sites given with a vector join the scanned offsets (rare: allocate only then).
    let is_pf = |s: &&(u32, TrapVector)| s.1 == TrapVector::PageFault;
    let merged: Vec<u32>;
    let page_faults: &[u32] = if reg.sites.iter().any(|s| is_pf(&s)) {
        let pf = reg.sites.iter().filter(is_pf).map(|s| s.0);
        merged = reg.protected.iter().copied().chain(pf).collect();
        &merged
    } else {
        reg.protected
    };
    // A copy the entry can take: on the stack for the usual handful of offsets, else on the heap.
    let mut stack = [0u32; 64];
    let mut heap = Vec::new();
    let offsets: &mut [u32] = match stack.get_mut(..page_faults.len()) {
        Some(s) => s,
        None => {
            heap.resize(page_faults.len(), 0);
            &mut heap
        }
    };
    order_checked(page_faults, offsets, scanned_whole(offsets.len(), size))
        .map_err(|offset| TrapError::DuplicateOffset { offset })?;
    let mut sites: Vec<u64> = reg
        .sites
        .iter()
        .filter(|s| !is_pf(s))
        .map(|&(o, v)| key(o, v))
        .collect();
    sites.sort_unstable();
    if let Some(w) = sites.windows(2).find(|w| w[0] == w[1]) {
        return Err(TrapError::DuplicateOffset {
            offset: (w[0] >> 8) as u32,
        });
    }
    if !code.contains(reg.landing_pad) {
        return Err(TrapError::LandingPadOutsideCode {
            landing_pad: reg.landing_pad,
        });
    }
    if reg.fault_ranges.iter().any(AddressRange::is_empty) {
        return Err(TrapError::EmptyFaultRange);
    }
    if reg.fault_ranges.len() > MAX_FAULT_RANGES {
        return Err(TrapError::TooManyFaultRanges {
            count: reg.fault_ranges.len(),
        });
    }
    let serial = SERIALS.fetch_add(1, Ordering::Relaxed);
    let entry = EntryBox::new(&NewEntry {
        serial,
        size,
        // Inside the code, so below `size`.
        landing: (reg.landing_pad - code.start()) as u32,
        fault_ranges: reg.fault_ranges,
        offsets,
        sites: &sites,
    });
    Ok(Prepared {
        code,
        serial,
        entry,
    })
}

/// Copies `offsets` into `out` (of the same length) in an order lookups accept, or returns the
/// smallest offset given twice. Code generators emit offsets in order: one ordered pass then
/// checks them. Otherwise a list that lookups scan whole (`any_order`) keeps its order and is
/// checked for duplicates through a small hash set, a quarter of the cost of sorting 32
/// offsets; a longer one is sorted, as lookups binary-search it. (A bitmap of the code's bytes
/// was tried for sorting and was slower: reading the bits back mispredicts a branch per word.)
fn order_checked(offsets: &[u32], out: &mut [u32], any_order: bool) -> Result<(), u32> {
    out.copy_from_slice(offsets);
    if !out.is_sorted() {
        if any_order && out.len() <= DISTINCT_MAX && !has_duplicate(out) {
            return Ok(());
        }
        // Lookups binary-search long lists; a duplicate is named after sorting (the smallest).
        out.sort_unstable();
    }
    match out.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(w[0]),
        None => Ok(()),
    }
}

/// Most offsets [`has_duplicate`] takes.
const DISTINCT_MAX: usize = 64;

/// Whether an offset appears twice: open addressing in 128 slots (at most half full), a
/// multiplicative hash of the offset, linear probing.
fn has_duplicate(offsets: &[u32]) -> bool {
    const EMPTY: u32 = u32::MAX;
    const SLOTS: usize = 2 * DISTINCT_MAX;
    debug_assert!(offsets.len() <= DISTINCT_MAX);
    let mut slots = [EMPTY; SLOTS];
    for &o in offsets {
        // Offsets are below the code size, at most `u32::MAX`: never `EMPTY`.
        let mut i = (o.wrapping_mul(0x9E37_79B1) >> 25) as usize;
        loop {
            match slots[i % SLOTS] {
                EMPTY => {
                    slots[i % SLOTS] = o;
                    break;
                }
                x if x == o => return true,
                _ => i += 1,
            }
        }
    }
    false
}

/// Whether a handle appears twice.
pub(super) fn has_duplicates(handles: &[TrapHandle]) -> bool {
    if handles.len() <= 16 {
        return handles
            .iter()
            .enumerate()
            .any(|(i, h)| handles[..i].contains(h));
    }
    let mut sorted = handles.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec;

    proptest! {
        /// Against a plain sort: the same offsets (in order when they must be sorted), or the
        /// same smallest duplicate.
        #[test]
        fn order_checked_keeps_or_sorts_the_offsets_or_names_the_smallest_duplicate(
            size in prop_oneof![1u32..200, 200u32..20_000],
            raw in prop::collection::vec(any::<u32>(), 0..80),
            sorted_input in any::<bool>(),
            any_order in any::<bool>(),
        ) {
            let mut offsets: Vec<u32> = raw.iter().map(|o| o % size).collect();
            if sorted_input {
                offsets.sort_unstable();
            }
            let mut reference = offsets.clone();
            reference.sort_unstable();
            let duplicate = reference.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
            let mut out = vec![0; offsets.len()];
            match duplicate {
                Some(d) => prop_assert_eq!(order_checked(&offsets, &mut out, any_order), Err(d)),
                None => {
                    prop_assert_eq!(order_checked(&offsets, &mut out, any_order), Ok(()));
                    if !any_order || offsets.len() > DISTINCT_MAX {
                        prop_assert_eq!(out, reference);
                    } else {
                        prop_assert_eq!(out, offsets);
                    }
                }
            }
        }
    }
}
