//! Issue 18 items of this area; see `main.rs`.

use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::Mmu;
use codespace::{AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig};

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
    a.free(code).unwrap();
    a.free(first).unwrap();
    assert_sound_no_leak(&machine, &m);
}
