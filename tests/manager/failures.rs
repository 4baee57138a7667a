//! Backend failures in allocator operations: refused operations hand their handle back and
//! change nothing; what failed half way is finished by later operations.

use codespace::mmu::soft::CallKind;
use codespace::mmu::MmuError;
use codespace::{AllocatorConfig, CodeAllocator, CodeError, FreeError, ManagerConfig};

use super::{allocator_with_space, publish_filled};
use crate::common::*;

/// A free whose INT3 fill fails frees nothing and hands the code back, instead of consuming the
/// handle and leaking its range (and its pages) for the allocator's lifetime.
#[test]
fn a_free_that_cannot_fill_int3_hands_the_code_back() {
    // In both modes the fill goes through the alias: on a live 4 KiB page, or on a ROX page.
    for mode in [Mode::ALIAS, Mode::ROX] {
        let (machine, m) = rig(1024, mode.manager(ManagerConfig::default()));
        let config = AllocatorConfig {
            initial_reservation: 4 * PAGE,
            ..mode.allocator(AllocatorConfig::default())
        };
        let mut a = CodeAllocator::new(&m, config).unwrap();
        let keep = publish_filled(&mut a, 64, 0x90);
        let code = publish_filled(&mut a, 64, 0x91);
        mode.assert_in_use(&m);
        let stats = a.stats();
        let committed = m.committed();
        // The fill of the freed bytes on the shared, live page goes through the alias: make it
        // fail.
        machine.fail_nth(CallKind::Poke, 0);
        let code = match free_published(&mut a, code) {
            Err(FreeError::NotFreed(e, code)) => {
                assert_eq!(e, CodeError::Mmu(MmuError::Injected), "{mode:?}");
                code
            }
            other => panic!("{mode:?}: {other:?}"),
        };
        assert_eq!(a.stats(), stats, "{mode:?}: nothing freed");
        assert_eq!(m.committed(), committed, "{mode:?}");
        assert_eq!(read(&m, code.start(), 64), [0x91; 64]);
        free_published(&mut a, code).unwrap();
        free_published(&mut a, keep).unwrap();
        assert_eq!(a.stats().allocated, 0);
        assert_eq!(m.committed(), 0, "{mode:?}");
        assert_sound_no_leak(&machine, &m);
    }
}

/// A decommit that fails part way leaves wholly free pages committed; the next free decommits
/// them, as `PartialDecommit` promises, so a module (which never trims) does not keep them.
#[test]
fn pages_a_partial_decommit_left_go_with_the_next_free() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 8 * PAGE);
    let s = a.code_spaces()[0].start();
    let first = publish_filled(&mut a, 64, 0x90);
    let big = publish_filled(&mut a, 3 * PAGE, 0x91);
    let last = publish_filled(&mut a, 64, 0x92);
    assert_eq!(last.start(), s + 64 + 3 * PAGE);
    assert_eq!(m.committed(), 4 * PAGE);
    // Pages 1 and 2 die with `big`; unmapping the first of them fails.
    machine.fail_nth(CallKind::Unmap, 0);
    let e = free_published(&mut a, big).unwrap_err();
    assert!(matches!(
        e,
        FreeError::Decommit(CodeError::PartialDecommit(_))
    ));
    assert_eq!(
        m.committed(),
        4 * PAGE,
        "pages 1 and 2 stay committed for now"
    );
    assert_sound(&machine, &m);
    // Freeing `last` (which decommits page 3) takes pages 1 and 2 along.
    free_published(&mut a, last).unwrap();
    assert_eq!(m.committed(), PAGE);
    for p in 1..4 {
        assert!(!is_mapped(&m, s + p * PAGE), "page {p}");
    }
    free_published(&mut a, first).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// A publish whose second page cannot be made executable undoes the first page's staged
/// change before the flush: the undone R+X entry is never stored (where another CPU could cache
/// it while the page becomes writable again), and the handle comes back intact.
#[test]
fn a_publish_failing_midway_never_stores_the_undone_protection() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 8 * PAGE);
    let mut w = a.allocate(2 * PAGE).unwrap();
    w.as_mut_slice().fill(0x90);
    let start = w.start();
    machine.fail_nth(CallKind::Protect, 1);
    let rejected = a.publish(w).unwrap_err();
    assert_eq!(rejected.error, CodeError::Mmu(MmuError::Injected));
    assert!(
        machine.violations().is_empty(),
        "{:?}",
        machine.violations()
    );
    for p in 0..2 {
        assert_eq!(leaf_flags(&machine, start + p * PAGE), RW_NX, "page {p}");
    }
    let code = a.publish(rejected.code).unwrap();
    assert_eq!(read(&m, start, 2 * PAGE), vec![0x90; 2 * PAGE]);
    free_published(&mut a, code).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// Dropping an allocator whose code space cannot be released (a page fails to unmap) must not
/// leave the space and its pages behind for good: the next manager operation releases it.
#[test]
fn a_space_a_dropped_allocator_could_not_release_is_released_later() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 4 * PAGE);
    let code = publish_filled(&mut a, 64, 0x90);
    // The free's decommit fails: the page stays committed (the allocator would trim it).
    machine.fail_nth(CallKind::Unmap, 0);
    assert!(matches!(
        free_published(&mut a, code),
        Err(FreeError::Decommit(_))
    ));
    assert_eq!(m.committed(), PAGE);
    // So does the release when the allocator goes.
    machine.fail_nth(CallKind::Unmap, 0);
    drop(a);
    // Any later operation finishes it.
    let _other = allocator_with_space(&m, PAGE);
    assert_eq!(m.committed(), 0);
    assert_eq!(
        m.code_spaces().unwrap().len(),
        1,
        "only the new allocator's space"
    );
    assert_sound_no_leak(&machine, &m);
}

static IRQS_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn disable() -> bool {
    !IRQS_OFF.swap(true, std::sync::atomic::Ordering::SeqCst)
}

fn restore(enabled: bool) {
    if enabled {
        IRQS_OFF.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What a failed flush left pending is retried by the next operation, but not by one called
/// from interrupt context (a slot patch from a handler), where unmapping and freeing frames
/// could need locks the interrupted code holds.
#[test]
fn pending_work_waits_for_an_operation_outside_interrupt_context() {
    let machine = machine(1024);
    // Read by the manager when it is created.
    machine.set_interrupt_control(codespace::mmu::InterruptControl { disable, restore });
    let m = manager_on(&machine, slot(), ManagerConfig::default());
    let mut a = allocator_with_space(&m, 4 * PAGE);
    let mut t = a.allocate_table(64, None).unwrap();
    t.as_mut_slice().fill(INT3);
    let table = a.publish(t).unwrap();
    let code = publish_filled(&mut a, 2 * PAGE, 0x90);
    machine.fail_nth(CallKind::Flush, 0);
    assert!(matches!(
        free_published(&mut a, code),
        Err(FreeError::Decommit(CodeError::FlushFailed(_)))
    ));
    let flushes = machine.calls(CallKind::Flush);
    // "Interrupt context": the patch works, and leaves the pending flush alone.
    IRQS_OFF.store(true, std::sync::atomic::Ordering::SeqCst);
    patch_tables(&a, &[&table], &[(table.start(), 7)]).unwrap();
    IRQS_OFF.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(machine.calls(CallKind::Flush), flushes);
    // The next operation with interrupts on finishes it: the frames go back.
    m.audit().unwrap();
    assert_eq!(machine.calls(CallKind::Flush), flushes + 1);
    assert_sound_no_leak(&machine, &m);
}
