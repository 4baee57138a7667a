//! The commit limit, commit increments, the critical threshold and running out of frames (V8:
//! AllocateAndGoOverLimit, SpaceLimit, CommitIncrements).

use std::sync::atomic::{AtomicUsize, Ordering};

use codespace::mmu::soft::SoftMmu;
use codespace::mmu::{Mmu, MmuError};
use codespace::{AddressRange, CodeError, ManagerConfig};

use super::{allocator, allocator_with_space, limited, state};
use crate::common::*;

#[test]
fn going_over_the_commit_limit_fails_and_changes_nothing() {
    let (machine, m) = rig(1024, limited(16 * PAGE));
    let mut a = allocator(&m);
    let before = state(&machine, &m, &[&a]);

    // A fresh allocator must reserve a code space first; the failed commit gives it back.
    assert_eq!(
        a.allocate(17 * PAGE).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: 17 * PAGE,
            remaining: 16 * PAGE
        })
    );
    assert_eq!(state(&machine, &m, &[&a]), before);
    assert!(a.code_spaces().is_empty());

    // A smaller allocation still works, and exactly reaches the limit.
    let big = a.allocate(16 * PAGE).expect("up to the limit");
    assert_eq!(m.committed(), 16 * PAGE);
    assert_eq!(m.remaining_uncommitted(), 0);

    // Over the limit once more, now with an existing code space that has no room left.
    let before = state(&machine, &m, &[&a]);
    assert_eq!(
        a.allocate(1).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: PAGE,
            remaining: 0
        })
    );
    assert_eq!(state(&machine, &m, &[&a]), before);

    // Freeing makes room again.
    a.discard(big).unwrap();
    assert_eq!(m.committed(), 0);
    let w = a.allocate(8 * PAGE).expect("after free");
    assert_eq!(m.committed(), 8 * PAGE);
    a.discard(w).unwrap();
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_partial_page_commit_charges_only_the_new_pages() {
    let (machine, m) = rig(1024, limited(2 * PAGE));
    let mut a = allocator_with_space(&m, 16 * PAGE);
    let _first = a.allocate(64).unwrap();
    // [64, 64 + 2 pages) touches pages 0..=2; page 0 is committed, so 2 pages are requested.
    assert_eq!(
        a.allocate(2 * PAGE).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: 2 * PAGE,
            remaining: PAGE
        })
    );
    let w = a.allocate(PAGE).expect("touches pages 0 and 1 only");
    assert_eq!(m.committed(), 2 * PAGE);
    assert_eq!(w.start(), a.code_spaces()[0].start() + 64);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn the_commit_limit_holds_across_modules() {
    let (machine, m) = rig(1024, limited(16 * PAGE));
    let mut a1 = allocator(&m);
    let mut a2 = allocator(&m);
    let w1 = a1.allocate(10 * PAGE).unwrap();
    assert_eq!(m.committed(), 10 * PAGE);

    let before = state(&machine, &m, &[&a1, &a2]);
    assert_eq!(
        a2.allocate(8 * PAGE).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: 8 * PAGE,
            remaining: 6 * PAGE
        })
    );
    assert_eq!(state(&machine, &m, &[&a1, &a2]), before);

    let w2 = a2.allocate(6 * PAGE).expect("fits the shared budget");
    assert_eq!(m.committed(), 16 * PAGE);
    let before = state(&machine, &m, &[&a1, &a2]);
    for a in [&mut a1, &mut a2] {
        assert!(matches!(
            a.allocate(1),
            Err(CodeError::CommitLimit { remaining: 0, .. })
        ));
    }
    assert_eq!(state(&machine, &m, &[&a1, &a2]), before);

    // What one module frees, the other may use.
    a1.discard(w1).unwrap();
    let w3 = a2.allocate(10 * PAGE).expect("a1's budget is back");
    assert_eq!(m.committed(), 16 * PAGE);
    assert_eq!(a2.stats().allocated, 16 * PAGE);
    assert_eq!(a1.stats().allocated, 0);
    a2.discard(w2).unwrap();
    a2.discard(w3).unwrap();
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn commit_grows_in_page_steps() {
    let max = 64 * PAGE;
    let (machine, m) = rig(1024, limited(max));
    let mut a = allocator_with_space(&m, 1 << 20);
    let space = a.code_spaces()[0];
    assert_eq!(m.committed(), 0, "reserving commits nothing");
    assert_eq!(m.stats().reserved, 1 << 20);

    let w0 = a.allocate(64).unwrap();
    assert_eq!(
        w0.range(),
        AddressRange::new(space.start(), space.start() + 64)
    );
    assert_eq!(m.committed(), PAGE);
    assert_eq!(m.remaining_uncommitted(), max - PAGE);

    // More small allocations on the same page commit nothing more.
    let mut small = Vec::new();
    for i in 1..PAGE / 64 {
        let w = a.allocate(1 + i % 64).unwrap();
        assert_eq!(w.start(), space.start() + 64 * i);
        assert_eq!(m.committed(), PAGE);
        small.push(w);
    }
    assert_eq!(m.remaining_uncommitted(), max - PAGE);

    // The page is full: the next byte commits the next page, and only it.
    let w = a.allocate(1).unwrap();
    assert_eq!(w.start(), space.start() + PAGE);
    assert_eq!(m.committed(), 2 * PAGE);
    // Crossing from page 1 into pages 2 and 3 commits exactly those.
    let w2 = a.allocate(2 * PAGE).unwrap();
    assert_eq!(w2.start(), space.start() + PAGE + 64);
    assert_eq!(m.committed(), 4 * PAGE);
    assert_eq!(m.remaining_uncommitted(), max - 4 * PAGE);
    for p in 0..4 {
        assert_eq!(leaf_flags(&machine, space.start() + p * PAGE), RW_NX);
    }
    assert!(!is_mapped(&m, space.start() + 4 * PAGE));
    assert_eq!(m.audit().unwrap().mapped_pages, 4);
    assert_eq!(a.stats().allocated, PAGE + 64 + 2 * PAGE);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn out_of_frames_fails_and_changes_nothing() {
    // No direct map: 1 PML4 + 3 tables for the window's first page table + 3 data frames.
    let machine = SoftMmu::new(7);
    let m = manager_on(&machine, slot(), ManagerConfig::default());
    let mut a = allocator(&m);

    // Not enough frames for a fresh space: the failed commit gives the reservation back. Of the
    // page tables it built, the PDPT stays (its PML4 entry may be shared by other address
    // spaces); the PD and PT, empty again, are freed; no data frame stays taken.
    let before = state(&machine, &m, &[&a]);
    assert_eq!(
        a.allocate(4 * PAGE).map(|w| w.range()),
        Err(CodeError::Mmu(MmuError::OutOfFrames))
    );
    assert_eq!(machine.table_frames(), 2);
    assert_eq!(state(&machine, &m, &[&a]), before);
    assert!(a.code_spaces().is_empty());
    assert_eq!(machine.free_frames(), Some(5));

    let w = a.allocate(2 * PAGE).unwrap();
    assert_eq!(machine.free_frames(), Some(1));
    let _w2 = a.allocate(PAGE).unwrap();
    assert_eq!(machine.free_frames(), Some(0));

    // Exactly one frame short, with an existing space and a new one.
    let before = state(&machine, &m, &[&a]);
    assert_eq!(
        a.allocate(1).map(|w| w.range()),
        Err(CodeError::Mmu(MmuError::OutOfFrames))
    );
    assert_eq!(state(&machine, &m, &[&a]), before, "nothing at all changed");

    a.discard(w).unwrap();
    assert_eq!(machine.free_frames(), Some(2));
    let _w3 = a.allocate(1).expect("frames are back");
    assert_sound_no_leak(&machine, &m);
}

static CRITICAL_CALLS: AtomicUsize = AtomicUsize::new(0);
static CRITICAL_LAST: AtomicUsize = AtomicUsize::new(0);

fn on_critical(committed: usize) {
    CRITICAL_CALLS.fetch_add(1, Ordering::SeqCst);
    CRITICAL_LAST.store(committed, Ordering::SeqCst);
}

#[test]
fn crossing_the_critical_threshold_calls_the_hook_and_moves_it() {
    let max = 64 * PAGE;
    let (machine, m) = rig(
        1024,
        ManagerConfig {
            on_critical: Some(on_critical),
            ..limited(max)
        },
    );
    let mut a = allocator_with_space(&m, max);
    assert_eq!(m.stats().critical_threshold, max / 2);

    let _w = a.allocate(31 * PAGE).unwrap();
    assert_eq!(CRITICAL_CALLS.load(Ordering::SeqCst), 0);
    assert_eq!(m.stats().critical_crossings, 0);

    // Reaching max/2 crosses: one call, threshold halfway to the limit.
    let _w = a.allocate(2 * PAGE).unwrap();
    let committed = 33 * PAGE;
    assert_eq!(CRITICAL_CALLS.load(Ordering::SeqCst), 1);
    assert_eq!(CRITICAL_LAST.load(Ordering::SeqCst), committed);
    let stats = m.stats();
    assert_eq!(stats.critical_crossings, 1);
    assert_eq!(stats.critical_threshold, committed + (max - committed) / 2);

    // Below the new threshold: no call.
    let threshold = stats.critical_threshold;
    let _w = a.allocate(threshold - committed - PAGE).unwrap();
    assert_eq!(CRITICAL_CALLS.load(Ordering::SeqCst), 1);
    // A failed commit over the limit crosses nothing.
    assert!(matches!(
        a.allocate(max),
        Err(CodeError::CommitLimit { .. })
    ));
    assert_eq!(m.stats().critical_crossings, 1);
    // Crossing again (one more page, 49 pages >= 48.5) moves it again.
    let _w = a.allocate(PAGE).unwrap();
    let committed = m.committed();
    assert_eq!(committed, 49 * PAGE);
    assert!(committed >= threshold);
    assert_eq!(CRITICAL_CALLS.load(Ordering::SeqCst), 2);
    assert_eq!(CRITICAL_LAST.load(Ordering::SeqCst), committed);
    assert_eq!(m.stats().critical_crossings, 2);
    assert_eq!(
        m.stats().critical_threshold,
        committed + (max - committed) / 2
    );
    assert_sound_no_leak(&machine, &m);
}

static FAILED_COMMIT_CALLS: AtomicUsize = AtomicUsize::new(0);

fn on_critical_failed_commit(_committed: usize) {
    FAILED_COMMIT_CALLS.fetch_add(1, Ordering::SeqCst);
}

/// A commit that fails for lack of frames after passing the limit check must not count as a
/// crossing of the critical threshold (every failed operation leaves the counters as they were).
#[test]
fn a_failed_commit_does_not_cross_the_critical_threshold() {
    // 1 PML4 + 3 window tables + 3 data frames; critical threshold at 4 of 8 pages.
    let machine = SoftMmu::new(7);
    let m = manager_on(
        &machine,
        slot(),
        ManagerConfig {
            on_critical: Some(on_critical_failed_commit),
            ..limited(8 * PAGE)
        },
    );
    let mut a = allocator_with_space(&m, 8 * PAGE);
    let _w = a.allocate(2 * PAGE).unwrap();
    let before = state(&machine, &m, &[&a]);
    assert_eq!(before.manager.critical_threshold, 4 * PAGE);
    // 3 more pages pass the limit (5 <= 8) but only 1 frame is left.
    assert_eq!(
        a.allocate(3 * PAGE).map(|w| w.range()),
        Err(CodeError::Mmu(MmuError::OutOfFrames))
    );
    assert_eq!(FAILED_COMMIT_CALLS.load(Ordering::SeqCst), 0, "hook called");
    assert_eq!(state(&machine, &m, &[&a]), before);
    assert_sound_no_leak(&machine, &m);
}
