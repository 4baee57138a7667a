//! Code spaces: fixed and growable allocators, V8's reservation sizes, guard pages, settings and
//! sizes that are refused, foreign handles, and dropping allocators.

use codespace::manager::CODE_ALIGNMENT;
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::{Mmu, MmuError};
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig,
    ProtectionMode,
};

use super::{allocator, publish_filled, state};
use crate::common::*;

/// The handle a refused free hands back.
fn foreign<T: std::fmt::Debug>(e: FreeError<T>) -> T {
    match e {
        FreeError::Foreign(code) => code,
        e => panic!("{e:?}"),
    }
}

/// V8's `ReservationSize` (page rounded), as the tests expect it.
fn v8_reservation_size(need: usize, overhead: usize, reserved: usize, max: usize) -> usize {
    let need = need.next_multiple_of(PAGE);
    (need + overhead)
        .max(2 * overhead)
        .max(reserved / 4)
        .min(max)
        .next_multiple_of(PAGE)
}

#[test]
fn a_fixed_module_fails_when_full_and_changes_nothing() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let fixed = AllocatorConfig {
        growable: false,
        initial_reservation: 4 * PAGE,
        ..AllocatorConfig::default()
    };
    let mut a = CodeAllocator::new(&m, fixed).unwrap();
    assert_eq!(a.code_spaces().len(), 1);
    assert_eq!(a.stats().reserved, 4 * PAGE);
    assert_eq!(m.committed(), 0);

    let w1 = a.allocate(3 * PAGE).unwrap();
    let w2 = a.allocate(PAGE - 64 - 10).unwrap();
    let before = state(&machine, &m, &[&a]);
    assert_eq!(
        a.allocate(65).map(|w| w.range()),
        Err(CodeError::NotGrowable)
    );
    assert_eq!(state(&machine, &m, &[&a]), before);
    let last = a.allocate(64).expect("the last 64 bytes");
    assert_eq!(last.range().end(), a.code_spaces()[0].end());
    assert_eq!(
        a.allocate(1).map(|w| w.range()),
        Err(CodeError::NotGrowable)
    );
    assert_eq!(m.stats().code_spaces, 1);

    // Freed room is reused within the fixed space.
    let start = w2.start();
    a.discard(w2).unwrap();
    let again = a.allocate(PAGE - 64).unwrap();
    assert_eq!(again.start(), start);
    a.discard(w1).unwrap();

    // A fixed module without an initial reservation reserves once, on first use.
    let lazy = AllocatorConfig {
        growable: false,
        ..AllocatorConfig::default()
    };
    let mut b = CodeAllocator::new(&m, lazy).unwrap();
    assert!(b.code_spaces().is_empty());
    let _w = b.allocate(100).unwrap();
    assert_eq!(b.stats().reserved, PAGE);
    assert_eq!(
        b.allocate(PAGE).map(|w| w.range()),
        Err(CodeError::NotGrowable)
    );
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_growable_module_reserves_spaces_of_v8_reservation_size() {
    let max_space = 2 << 20;
    let (machine, m) = rig(
        8192,
        ManagerConfig {
            max_code_space_size: max_space,
            ..ManagerConfig::default()
        },
    );
    let overhead = 2 * PAGE;
    let mut a = CodeAllocator::new(
        &m,
        AllocatorConfig {
            overhead,
            ..AllocatorConfig::default()
        },
    )
    .unwrap();

    // Each request is too large for what is free, so each reserves a new space.
    let largest = max_space - overhead;
    let needs = [
        100,
        4 * PAGE,
        1 << 20,
        64 << 10,
        100,
        largest,
        largest,
        largest,
        largest,
        largest,
        100,
    ];
    let mut reserved = 0;
    let mut live = Vec::new();
    for need in needs {
        let spaces_before = a.code_spaces().len();
        let w = a.allocate(need).unwrap();
        assert_eq!(a.code_spaces().len(), spaces_before + 1, "need {need:#x}");
        let space = *a.code_spaces().last().unwrap();
        let expected = v8_reservation_size(need, overhead, reserved, max_space);
        assert_eq!(
            space.size(),
            expected,
            "need {need:#x}, reserved {reserved:#x}"
        );
        assert!(space.contains_range(&w.range()));
        // Fill the rest of the new space so the next request needs another one.
        let rest = space.end() - w.range().end();
        if rest > 0 {
            live.push(a.allocate(rest).unwrap());
        }
        live.push(w);
        reserved += expected;
        assert_eq!(a.stats().reserved, reserved);
        assert_eq!(m.stats().reserved, reserved);
        assert_eq!(m.code_spaces().unwrap().len(), a.code_spaces().len());
    }
    let sizes: Vec<usize> = a.code_spaces().iter().map(AddressRange::size).collect();
    // Twice the overhead for a tiny first request; need + overhead otherwise.
    assert_eq!(sizes[0], 2 * overhead);
    assert_eq!(sizes[1], 4 * PAGE + overhead);
    // A quarter of what is reserved: 100 bytes after ~1.6 MiB get a ~420 KiB space.
    assert_eq!(
        sizes[4],
        (sizes[..4].iter().sum::<usize>() / 4).next_multiple_of(PAGE)
    );
    assert_eq!(sizes[5], max_space);
    // A quarter of ~12 MiB is over the cap: capped.
    assert!(sizes[..10].iter().sum::<usize>() / 4 > max_space);
    assert_eq!(sizes[10], max_space);

    // Larger than one code space may be: refused, nothing changes.
    let before = state(&machine, &m, &[&a]);
    assert_eq!(
        a.allocate(largest + 1).map(|w| w.range()),
        Err(CodeError::CodeSpaceTooLarge {
            size: largest + CODE_ALIGNMENT,
            max: max_space
        })
    );
    assert_eq!(state(&machine, &m, &[&a]), before);
    for w in live {
        a.discard(w).unwrap();
    }
    assert_eq!(m.committed(), 0);
    assert_eq!(m.audit().unwrap().mapped_pages, 0);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn code_spaces_have_guard_pages_and_never_touch() {
    for guard_pages in [1, 3] {
        let win = window(512);
        let machine = machine(4096);
        let m = manager_on(
            &machine,
            win,
            ManagerConfig {
                guard_pages,
                ..ManagerConfig::default()
            },
        );
        let guard = guard_pages * PAGE;
        let mut modules: Vec<_> = (0..3).map(|_| allocator(&m)).collect();
        let mut live = Vec::new();
        // Interleave allocations so the modules' spaces alternate in the window, and fill each
        // space completely (every usable page committed, up to the guard pages).
        for round in 0..3 {
            for a in modules.iter_mut() {
                live.push(a.allocate((round + 1) * 3 * PAGE).unwrap());
            }
        }
        let spaces = m.code_spaces().unwrap();
        assert_eq!(spaces.len(), 9);
        assert_eq!(
            m.audit().unwrap().mapped_pages * PAGE,
            spaces.iter().map(AddressRange::size).sum::<usize>()
        );
        let mut all: Vec<_> = modules
            .iter()
            .flat_map(|a| a.code_spaces().to_vec())
            .collect();
        all.sort();
        assert_eq!(all, spaces, "the manager knows exactly the modules' spaces");

        // Nothing of the window is kept for codespace itself: the writable alias is private.
        assert_eq!(spaces[0].start(), win.start() + guard);
        assert!(spaces.last().unwrap().end() + guard <= win.end());
        for pair in spaces.windows(2) {
            assert!(
                pair[1].start() - pair[0].end() >= 2 * guard,
                "{guard_pages} guard pages between {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
        for s in &spaces {
            assert!(s.is_page_aligned());
            assert_eq!(m.space_of(s.start()).unwrap(), Some(*s));
            assert_eq!(m.space_of(s.start() - 1).unwrap(), None, "guard page");
            for g in 1..=guard_pages {
                assert!(!is_mapped(&m, s.start() - g * PAGE));
                assert!(!is_mapped(&m, s.end() + (g - 1) * PAGE));
            }
            assert!(is_mapped(&m, s.start()) && is_mapped(&m, s.end() - 1));
        }
        assert_sound_no_leak(&machine, &m);
        drop(live);
    }
}

#[test]
fn new_checks_every_setting_and_the_cpu() {
    let no_nx = SoftMmu::new(64);
    no_nx.set_nxe(0, false);
    assert_eq!(
        CodeManager::new(no_nx, slot(), ManagerConfig::default()).err(),
        Some(CodeError::CpuUnsupported(MmuError::NoExecuteDisabled {
            cpu: 0
        }))
    );
    // The CPU creating the manager is the one checked.
    let no_wp = SoftMmu::new(64);
    no_wp.set_wp(2, false);
    assert!(CodeManager::new(no_wp.clone(), slot(), ManagerConfig::default()).is_ok());
    assert_eq!(
        CodeManager::new(no_wp.on_cpu(2), slot(), ManagerConfig::default()).err(),
        Some(CodeError::CpuUnsupported(MmuError::WriteProtectDisabled {
            cpu: 2
        }))
    );

    let invalid = |window: AddressRange, config: ManagerConfig| {
        CodeManager::new(SoftMmu::new(64), window, config).err()
    };
    let bad = |setting| Some(CodeError::InvalidConfig { setting });
    let cfg = ManagerConfig::default();
    let unaligned_start = AddressRange::new(BASE + 8, BASE + (1 << 20));
    let unaligned_end = AddressRange::new(BASE, BASE + (1 << 20) + 8);
    assert_eq!(invalid(unaligned_start, cfg), bad("window"));
    assert_eq!(invalid(unaligned_end, cfg), bad("window"));
    assert_eq!(invalid(AddressRange::EMPTY, cfg), bad("window"));
    // Guard + one usable page + guard is the minimum.
    assert_eq!(invalid(window(2), cfg), bad("guard_pages"));
    let guards = |guard_pages| ManagerConfig { guard_pages, ..cfg };
    assert_eq!(invalid(slot(), guards(0)), bad("guard_pages"));
    assert_eq!(invalid(window(4), guards(2)), bad("guard_pages"));
    assert!(invalid(window(5), guards(2)).is_none());
    let commit = ManagerConfig {
        max_committed: PAGE + 1,
        ..cfg
    };
    assert_eq!(invalid(slot(), commit), bad("max_committed"));

    // The smallest window holds exactly one one-page code space.
    let machine = machine(64);
    let m = manager_on(&machine, window(3), cfg);
    assert_eq!(m.stats().window_free, 3 * PAGE);
    let mut a = allocator(&m);
    let w = a.allocate(PAGE).unwrap();
    assert_eq!(w.start(), BASE + PAGE);
    let mut b = allocator(&m);
    let before = state(&machine, &m, &[&a, &b]);
    assert_eq!(
        b.allocate(1).map(|w| w.range()),
        Err(CodeError::WindowExhausted { size: 3 * PAGE })
    );
    assert_eq!(state(&machine, &m, &[&a, &b]), before);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn invalid_sizes_and_reservations_are_refused() {
    let machine = machine(256);
    let m = manager_on(
        &machine,
        window(64),
        ManagerConfig {
            max_code_space_size: 16 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let mut a = allocator(&m);
    let before = state(&machine, &m, &[&a]);
    assert_eq!(
        a.allocate(0).map(|w| w.range()),
        Err(CodeError::InvalidSize { size: 0 })
    );
    assert_eq!(
        a.allocate(usize::MAX).map(|w| w.range()),
        Err(CodeError::InvalidSize { size: usize::MAX })
    );
    assert!(matches!(
        a.allocate(usize::MAX - 63),
        Err(CodeError::CodeSpaceTooLarge { .. })
    ));
    assert!(matches!(
        a.allocate_table(0, None),
        Err(CodeError::InvalidSize { size: 0 })
    ));
    assert_eq!(state(&machine, &m, &[&a]), before);

    // The initial reservation is checked against the space cap and the window.
    let too_big = AllocatorConfig {
        initial_reservation: 17 * PAGE,
        ..AllocatorConfig::default()
    };
    assert!(matches!(
        CodeAllocator::new(&m, too_big),
        Err(CodeError::CodeSpaceTooLarge { .. })
    ));
    let fits = AllocatorConfig {
        initial_reservation: 16 * PAGE,
        ..AllocatorConfig::default()
    };
    let _b = CodeAllocator::new(&m, fits).unwrap();
    let _c = CodeAllocator::new(&m, fits).unwrap();
    let _d = CodeAllocator::new(&m, fits).unwrap();
    let before = state(&machine, &m, &[&a]);
    assert!(matches!(
        CodeAllocator::new(&m, fits),
        Err(CodeError::WindowExhausted { .. })
    ));
    assert_eq!(state(&machine, &m, &[&a]), before);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn foreign_handles_are_handed_back() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let (_, other_manager) = rig(1024, ManagerConfig::default());
    let mut a = allocator(&m);
    let mut b = allocator(&m);
    let mut c = allocator(&other_manager);

    let mut w = a.allocate(100).unwrap();
    w.as_mut_slice().fill(0x42);
    let range = w.range();
    let before = state(&machine, &m, &[&a, &b]);
    let w = {
        let rejected = b.publish(w).unwrap_err();
        assert_eq!(rejected.error, CodeError::ForeignCode);
        rejected.code
    };
    let w = c.publish(w).unwrap_err().code;
    assert_eq!(w.range(), range);
    assert!(w.as_slice().iter().all(|&x| x == 0x42), "bytes unchanged");
    let w = b.publish_batch(vec![w]).unwrap_err().code.pop().unwrap();
    assert_eq!(state(&machine, &m, &[&a, &b]), before);

    let code = a.publish(w).expect("the owner publishes");
    let code = foreign(free_published(&mut b, code).unwrap_err());
    assert_eq!(code.range(), range);
    assert_eq!(code.len(), 100);
    assert_eq!(
        patch_tables(&b, &[&code], &[(code.start(), 0)]),
        Err(CodeError::ForeignCode)
    );

    let w2 = b.allocate(64).unwrap();
    let w2 = foreign(a.discard(w2).unwrap_err());
    let before = state(&machine, &m, &[&a, &b]);
    let code = foreign(free_published(&mut c, code).unwrap_err());
    assert_eq!(state(&machine, &m, &[&a, &b]), before);

    free_published(&mut a, code).expect("the owner frees");
    b.discard(w2).expect("the owner discards");
    assert_eq!(m.committed(), 0);

    // Handles of a dropped allocator are foreign to a new one.
    let stale = a.allocate(64).unwrap();
    drop(a);
    let mut a2 = allocator(&m);
    assert_eq!(
        a2.discard(stale).unwrap_err().error(),
        CodeError::ForeignCode
    );
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn dropping_an_allocator_releases_its_spaces() {
    for mode in [ProtectionMode::Flip, ProtectionMode::Alias] {
        let (machine, m) = rig(4096, config(mode));
        let initial = m.stats();
        let frames_before = machine.free_frames().unwrap();
        let tables_before = machine.table_frames();
        let mut keep = allocator(&m);
        let kept = publish_filled(&mut keep, 100, 0x77);
        let committed_kept = m.committed();
        let spaces_kept = m.code_spaces().unwrap();

        let mut a = allocator(&m);
        let mut b = CodeAllocator::new(
            &m,
            AllocatorConfig {
                overhead: 4 * PAGE,
                ..AllocatorConfig::default()
            },
        )
        .unwrap();
        for i in 0..20 {
            let code = publish_filled(&mut a, 700 * (i + 1), i as u8);
            if i % 3 == 0 {
                free_published(&mut a, code).unwrap();
            }
            let w = b.allocate(3000 * (i + 1)).unwrap();
            if i % 2 == 0 {
                let _ = b.publish(w).unwrap(); // never freed: released by `release_all`
            } else {
                drop(w); // leaked until `b` goes
            }
        }
        assert!(m.stats().code_spaces > 2);
        assert!(m.committed() > committed_kept);
        // Published code is still allocated in both: dropping alone would keep those spaces.
        // SAFETY: the software machine never runs its code.
        unsafe {
            a.release_all();
            b.release_all();
        }
        drop(a);
        drop(b);

        assert_eq!(m.committed(), committed_kept, "{mode:?}");
        assert_eq!(m.code_spaces().unwrap(), spaces_kept);
        assert_eq!(m.audit().unwrap().mapped_pages * PAGE, committed_kept);
        assert!(read(&m, kept.start(), 100).iter().all(|&x| x == 0x77));
        assert_sound_no_leak(&machine, &m);

        free_published(&mut keep, kept).unwrap();
        drop(keep);
        let after = m.stats();
        assert_eq!(after.committed, 0);
        assert_eq!(after.reserved, 0);
        assert_eq!(after.code_spaces, 0);
        assert_eq!(after.window_free, initial.window_free);
        assert_eq!(m.audit().unwrap().mapped_pages, 0);
        // Data frames all came back; page-table frames are counted apart (split direct-map
        // tables merged back are freed by the next flush, the window's PDPT stays).
        let new_tables = machine.table_frames() - tables_before;
        assert_eq!(machine.free_frames().unwrap() + new_tables, frames_before);
        assert_sound_no_leak(&machine, &m);
    }
}
