//! Giving page tables back (issue 18, "Leaks"): the window's page tables once no page of theirs
//! is mapped, and linear-map tables split to seal a code frame's alias once every alias in them
//! is writable again (merged back into their huge page, as Linux's CPA collapses large pages).
//!
//! Only tables this backend created are freed (`owned`: built by the kernel's mapper for a
//! window page through our frame reserve, or by a split). Both kinds go through the flush batch
//! ([`TlbFlush::free_table_after_flush`]): a table is unlinked first, and its frame returns to
//! the allocator only after a full invalidation round on every CPU, since any CPU may still
//! walk through a cached entry pointing to it (paging-structure caches).

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use x86_64::structures::paging::mapper::PageTableFrameMapping;

use super::tables::{Slot, Tables, ADDR, P, PS, STAGED};
use crate::mmu::TlbFlush;

/// Accessed and dirty: set by hardware, ignored when comparing entries to merge.
const ACCESSED_DIRTY: u64 = (1 << 5) | (1 << 6);
/// PAT bit of a 4 KiB leaf, and of a huge one.
const PAT_4K: u64 = 1 << 7;
const PAT_HUGE: u64 = 1 << 12;

/// Before a flush's round: unlinks the window page tables `tlb` leaves empty — every entry
/// empty, or staged with a queued store of 0 (an unmap) in `tlb` — clearing those staged
/// entries first (not present already: nothing to invalidate), then the page directories left
/// empty (also those whose 2 MiB leaves of `map_rox` the batch unmaps); never a PDPT, whose
/// PML4 entry other address spaces may have copied. Their frames go
/// into `tlb`, freed after its (full) round; their queued stores then find no leaf.
///
/// The caller holds the page-table lock.
pub(super) fn unlink_empty<F: PageTableFrameMapping>(
    view: &Tables<'_, F>,
    owned: &BTreeSet<u64>,
    tlb: &mut TlbFlush,
) {
    let unmapping: BTreeSet<u64> = tlb
        .stores()
        .iter()
        .filter(|&&(_, entry)| entry == 0)
        .map(|&(va, _)| va as u64)
        .collect();
    let mut unlinked = Vec::new();
    // Each table is checked once, however many of its pages the batch unmaps.
    let mut checked = BTreeSet::new();
    for &va in &unmapping {
        let path = view.path(va);
        let (Some(pdpte), Some(pde)) = (path[1], path[2]) else {
            continue;
        };
        let e = pde.get();
        if e & PS != 0 && e & P == 0 && e & STAGED != 0 {
            // A 2 MiB leaf of `map_rox` being unmapped: its page directory may empty.
            if let Some(pd) = dying_directory(view, owned, pdpte, va, &unmapping, &mut checked) {
                pdpte.set(0);
                unlinked.push(pd);
            }
            continue;
        }
        let pt = e;
        if pt & P == 0 || pt & PS != 0 || !owned.contains(&(pt & ADDR)) {
            continue; // unlinked already (another page of the table), or not ours
        }
        if !checked.insert(pt & ADDR) {
            continue;
        }
        let entries = view.table(pt & ADDR);
        let base = va & !((2 << 20) - 1);
        let entry = |i: usize| {
            // SAFETY: a table frame through the physical mapping, index < 512, under the lock.
            unsafe { entries.add(i).read_volatile() }
        };
        let dying = |i: usize| {
            let e = entry(i);
            e == 0
                || (e & P == 0
                    && e & STAGED != 0
                    && unmapping.contains(&(base + (i as u64) * 4096)))
        };
        if !(0..512).all(dying) {
            continue;
        }
        for i in 0..512 {
            // SAFETY: as above; the entry is not present (checked), so clearing it changes no
            // translation.
            unsafe { entries.add(i).write_volatile(0) };
        }
        pde.set(0);
        unlinked.push(pt & ADDR);
        let pd = pdpte.get() & ADDR;
        if owned.contains(&pd) && is_empty(view, pd) {
            pdpte.set(0);
            unlinked.push(pd);
        }
    }
    for table in unlinked {
        // SAFETY: unlinked above (no entry points to it any more), created by this backend.
        unsafe { tlb.free_table_after_flush(table) };
    }
}

/// The page directory holding the staged 2 MiB leaf of `va`, when it is ours, not checked
/// yet, and every entry of it is empty or a staged 2 MiB leaf the batch unmaps: those entries
/// are cleared (not present already: no translation changes) and the directory is returned,
/// for the caller to unlink.
fn dying_directory<F: PageTableFrameMapping>(
    view: &Tables<'_, F>,
    owned: &BTreeSet<u64>,
    pdpte: Slot,
    va: u64,
    unmapping: &BTreeSet<u64>,
    checked: &mut BTreeSet<u64>,
) -> Option<u64> {
    let link = pdpte.get();
    let pd = link & ADDR;
    if link & P == 0 || link & PS != 0 || !owned.contains(&pd) || !checked.insert(pd) {
        return None;
    }
    // The address entry 0 of the directory maps.
    let first = va & !((1u64 << 30) - 1);
    let entries = view.table(pd);
    let entry = |i: usize| {
        // SAFETY: a table frame through the physical mapping, index < 512, under the lock.
        unsafe { entries.add(i).read_volatile() }
    };
    let dying = |i: usize| {
        let e = entry(i);
        e == 0
            || (e & P == 0
                && e & STAGED != 0
                && e & PS != 0
                && unmapping.contains(&(first + (i as u64) * (2 << 20))))
    };
    if !(0..512).all(dying) {
        return None;
    }
    for i in 0..512 {
        // SAFETY: as above; the entry is not present (checked), so clearing it changes no
        // translation.
        unsafe { entries.add(i).write_volatile(0) };
    }
    Some(pd)
}

fn is_empty<F: PageTableFrameMapping>(view: &Tables<'_, F>, table: u64) -> bool {
    let entries = view.table(table);
    // SAFETY: a table frame through the physical mapping, index < 512, under the lock.
    (0..512).all(|i| unsafe { entries.add(i).read_volatile() } == 0)
}

/// After a flush stored the linear-map alias at `va` writable: merges the split table holding
/// it back into its huge page when all 512 entries map consecutive frames from an aligned base
/// with the same flags (accessed and dirty aside) — first a page table into a 2 MiB leaf, then
/// its page directory into a 1 GiB leaf if this backend split that too. In place: the merged
/// leaf maps the same frames with the same permissions, so no CPU's view changes (the 4 KiB
/// entries CPUs keep are identical translations). Returns the merged tables' frames, to free
/// after the next round.
///
/// The caller holds the page-table lock.
pub(super) fn collapse<F: PageTableFrameMapping>(
    view: &Tables<'_, F>,
    owned: &BTreeSet<u64>,
    va: u64,
) -> Vec<u64> {
    let mut merged = Vec::new();
    let path = view.path(va);
    // The entry pointing to the page table (level 2), then to the page directory (level 1).
    for parent in [path[2], path[1]] {
        let Some(parent) = parent else {
            break;
        };
        match merge(view, owned, parent) {
            Some(table) => merged.push(table),
            None => break,
        }
    }
    merged
}

/// Replaces the table `parent` points to by the equivalent huge leaf, if it is one of ours and
/// uniform; returns the table's frame.
fn merge<F: PageTableFrameMapping>(
    view: &Tables<'_, F>,
    owned: &BTreeSet<u64>,
    parent: Slot,
) -> Option<u64> {
    let link = parent.get();
    let table = link & ADDR;
    if link & P == 0 || link & PS != 0 || !owned.contains(&table) {
        return None;
    }
    // Children of a PD entry are 4 KiB leaves; of a PDPT entry, 2 MiB leaves.
    let (child_size, four_k) = match parent.level {
        2 => (4096u64, true),
        1 => (2u64 << 20, false),
        _ => return None,
    };
    let entries = view.table(table);
    // SAFETY: a table frame through the physical mapping, index < 512, under the lock.
    let entry = |i: usize| unsafe { entries.add(i).read_volatile() };
    let first = entry(0);
    let addr_mask = if four_k { ADDR } else { ADDR & !PAT_HUGE };
    let base = first & addr_mask;
    let flags = first & !addr_mask & !ACCESSED_DIRTY;
    let leaf = |e: u64| e & P != 0 && (e & PS != 0) != four_k;
    if !leaf(first) || !base.is_multiple_of(child_size * 512) {
        return None;
    }
    let mut ad = 0;
    for i in 0..512 {
        let e = entry(i);
        if !leaf(e) || e & addr_mask != base + i as u64 * child_size {
            return None;
        }
        if e & !addr_mask & !ACCESSED_DIRTY != flags {
            return None;
        }
        ad |= e & ACCESSED_DIRTY;
    }
    let mut huge = base | flags | ad | PS;
    if four_k && flags & PAT_4K != 0 {
        // In a huge leaf, bit 7 is PS and PAT moves to bit 12 (the reverse of `split`).
        huge = (huge & !PAT_4K) | PAT_HUGE | PS;
    }
    parent.set(huge);
    Some(table)
}
