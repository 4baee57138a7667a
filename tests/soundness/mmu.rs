//! Issue 18 items of this area; see `main.rs`.

use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::Mmu;
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig,
};

use crate::common::*;

fn allocator(m: &CodeManager<SoftMmu>, bytes: usize) -> CodeAllocator<SoftMmu> {
    let config = AllocatorConfig {
        initial_reservation: bytes,
        growable: false,
        ..AllocatorConfig::default()
    };
    CodeAllocator::new(m, config).expect("allocator")
}

/// The direct-map address of a window page's frame.
fn alias_of(machine: &SoftMmu, page: usize) -> usize {
    let frame = leaf(machine, page).expect("a leaf") & PTE_ADDR;
    DIRECT_MAP + (frame - codespace::mmu::soft::PHYS_BASE) as usize
}

/// Item 5: a publish whose flushes keep failing (its own, the retry the next operation starts
/// with) leaves a batch pending that stages the page (R+X, or back to RW+NX) and its direct-map
/// alias read-only. Discarding the code then unmaps the page and queues its frame; the late
/// flush must not store the stale leaf over the unmapped page (mapping a freed frame, which,
/// once reused writable elsewhere, is writable and executable at once) nor leave the freed
/// frame's alias read-only.
#[test]
fn item_05_retried_flush_does_not_replay_stale_page_table_stores() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator(&m, 4 * PAGE);
    let mut code = a.allocate(PAGE).unwrap();
    code.as_mut_slice().copy_from_slice(&body(PAGE, 0x90));
    let page = code.start();
    let alias = alias_of(&machine, page);
    let frame = leaf(&machine, page).unwrap() & PTE_ADDR;

    // Three flushes in a row fail: whatever the publish and the discard flush, the batch
    // staging the page stays pending until the page is unmapped.
    machine.fail_next(CallKind::Flush, 3);
    let rejected = a.publish(code).unwrap_err();
    assert!(matches!(rejected.error, CodeError::FlushFailed(_)));
    match a.discard(rejected.code) {
        Ok(()) | Err(FreeError::Decommit(CodeError::FlushFailed(_))) => {}
        Err(e) => panic!("discard: {e:?}"),
    }
    machine.clear_failures();
    m.audit().unwrap(); // the next operation finishes what is pending
    assert!(machine.calls(CallKind::Flush) >= 4);

    assert_eq!(
        leaf(&machine, page).unwrap_or(0),
        0,
        "the page stays unmapped"
    );
    assert!(!is_mapped(&m, page));
    let direct = Mmu::query(&machine, alias).expect("the direct map maps every frame");
    assert!(direct.writable, "the freed frame's alias is writable again");
    // The frame is reused, writable, at another page: nothing may still execute it.
    let mut other = a.allocate(PAGE).unwrap();
    other.as_mut_slice().fill(0x90);
    assert_eq!(leaf(&machine, other.start()).unwrap() & PTE_ADDR, frame);
    a.discard(other).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// Item 21: a publish that writes into a page already holding published code and then fails to
/// serialize the CPUs ([`CodeError::SyncFailed`]) hands the code back; its fresh pages must be
/// as they were (RW+NX), not executable code the caller does not hold as published.
#[test]
fn item_21_publish_failing_to_sync_leaves_fresh_pages_writable() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator(&m, 4 * PAGE);
    let mut first = a.allocate(64).unwrap();
    first.as_mut_slice().copy_from_slice(&body(64, 0x90));
    let first = a.publish(first).unwrap();
    // Spans the rest of the live first page and a fresh second one.
    let mut code = a.allocate(PAGE).unwrap();
    code.as_mut_slice().copy_from_slice(&body(PAGE, 0x90));
    let fresh = first.start() + PAGE;
    assert!(code.range().contains(fresh) && code.start() < fresh);
    let before = leaf_flags(&machine, fresh);
    assert_eq!(before, RW_NX);

    machine.fail_nth(CallKind::Sync, 0);
    let rejected = a.publish(code).unwrap_err();
    assert!(matches!(rejected.error, CodeError::SyncFailed(_)));
    assert_eq!(
        leaf_flags(&machine, fresh),
        before,
        "the fresh page is as it was"
    );
    let mapping = m.query(fresh).unwrap().unwrap();
    assert!(mapping.writable && !mapping.executable);

    // Retried, it publishes.
    let code = a.publish(rejected.code).unwrap();
    assert_eq!(leaf_flags(&machine, fresh), R_X);
    free_published(&mut a, code).unwrap();
    free_published(&mut a, first).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// One more flush with work (a page committed and decommitted, never published): frees the
/// split direct-map tables an earlier flush merged back into their huge pages.
fn one_more_flush(m: &CodeManager<SoftMmu>) {
    let mut a = allocator(m, PAGE);
    let w = a.allocate(PAGE).unwrap();
    a.discard(w).unwrap();
}

/// Leaks (issue 18, "Leaks and loose ends"): the page tables built for the code window and the
/// tables that sealing split out of the direct map's 2 MiB pages come back once nothing needs
/// them, freed through the flush batch after every CPU dropped its cached entries pointing to
/// them (the machine records a table frame freed while linked or cached). The code spans two
/// page tables and two page directories of the window and seals aliases in every 2 MiB page of
/// the direct map.
#[test]
fn item_leaks_decommitting_everything_returns_the_table_frames() {
    let (machine, m) = rig(2048, ManagerConfig::default());
    // The window's PDPT stays once created (its PML4 entry may be copied into other address
    // spaces): create it, then take the baseline.
    one_more_flush(&m);
    let free = machine.free_frames().unwrap();
    let tables = machine.table_frames();
    let leaves = machine.snapshot().leaves;

    // 3 MiB of code (two page tables, aliases sealed in every 2 MiB page of the direct map),
    // and a page past the first GiB of the window (a second page directory).
    let mut a = allocator(&m, 4 << 20);
    let mut b = allocator(&m, GIB);
    let mut published = Vec::new();
    for _ in 0..3 {
        let mut w = a.allocate(1 << 20).unwrap();
        w.as_mut_slice().fill(0x90);
        published.push(a.publish(w).unwrap());
    }
    let space = b.code_spaces()[0];
    assert!(space.end() > BASE + GIB);
    let mut w = b
        .allocate_in_region(64, AddressRange::new(BASE + GIB, space.end()))
        .unwrap();
    w.as_mut_slice()[0] = 0xC3;
    published.push(b.publish(w).unwrap());
    assert!(
        machine.table_frames() >= tables + 5,
        "page tables, directories and split tables were built"
    );
    assert_sound(&machine, &m);

    let last = published.pop().unwrap();
    for code in published {
        free_published(&mut a, code).unwrap();
    }
    free_published(&mut b, last).unwrap();
    drop(a);
    drop(b);
    assert_eq!(m.committed(), 0);
    // The window's tables went with the decommits' own flushes.
    let built = machine.table_frames() - tables;
    one_more_flush(&m);
    assert_sound(&machine, &m);
    assert!(
        built <= 4,
        "{built} tables left before the last flush: split tables only"
    );
    assert_eq!(
        machine.table_frames(),
        tables,
        "every table built since is freed"
    );
    assert_eq!(machine.free_frames().unwrap(), free, "every frame is back");
    assert_eq!(
        machine.snapshot().leaves,
        leaves,
        "the direct map is whole again"
    );
}

/// Item 5 with page tables freed: a decommit that empties a page table unlinks it before the
/// round; when the round fails and the page is committed afresh (in a new table) before the
/// retry, the retried flush's store clearing the old leaf must not clear the new one.
#[test]
fn item_05_retried_unmap_store_leaves_a_page_mapped_afresh_alone() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator(&m, PAGE);
    let mut w = a.allocate(PAGE).unwrap();
    w.as_mut_slice().fill(0x90);
    let page = w.start();
    let code = a.publish(w).unwrap();

    // The decommit's flush and the retry the next operation starts with both fail.
    machine.fail_next(CallKind::Flush, 2);
    assert!(matches!(
        free_published(&mut a, code),
        Err(FreeError::Decommit(CodeError::FlushFailed(_)))
    ));
    let mut w = a.allocate(PAGE).unwrap();
    assert_eq!(w.start(), page, "the same page, committed afresh");
    assert_eq!(leaf_flags(&machine, page), RW_NX, "mapped in a new table");
    m.audit().unwrap(); // the retry succeeds now
    assert!(
        is_mapped(&m, page),
        "the new mapping survives the retried flush"
    );
    w.as_mut_slice().fill(0x90);
    let code = a.publish(w).unwrap();
    assert_eq!(read(&m, page, 4), vec![0x90; 4]);
    free_published(&mut a, code).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// Item 21, the flush variant: a publish whose shootdown fails stages its fresh pages back to
/// RW+NX (the last staging of a leaf is the one stored), so once the batch is flushed the code
/// handed back is still not executable.
#[test]
fn item_21_publish_failing_to_flush_leaves_fresh_pages_writable() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator(&m, 4 * PAGE);
    let mut code = a.allocate(2 * PAGE).unwrap();
    code.as_mut_slice().copy_from_slice(&body(2 * PAGE, 0x90));
    let start = code.start();

    machine.fail_nth(CallKind::Flush, 0);
    let rejected = a.publish(code).unwrap_err();
    assert!(matches!(rejected.error, CodeError::FlushFailed(_)));
    m.audit().unwrap(); // whatever is pending is flushed
    for page in [start, start + PAGE] {
        assert_eq!(leaf_flags(&machine, page), RW_NX, "{page:#x} as it was");
    }
    let code = a.publish(rejected.code).unwrap();
    assert_eq!(leaf_flags(&machine, start), R_X);
    free_published(&mut a, code).unwrap();
    assert_sound_no_leak(&machine, &m);
}
