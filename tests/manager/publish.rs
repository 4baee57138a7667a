//! Publishing and freeing: R+X pages that were never W+X on any CPU, INT3 in padding and freed
//! bytes, V8's decommit rule, reuse of freed ranges, one flush per operation, and allocators on
//! several threads.

use codespace::manager::CODE_ALIGNMENT;
use codespace::mmu::{FlushStats, Mmu, TlbFlush};
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, ManagerConfig, ProtectionMode, PublishedCode,
};

use super::{allocator, allocator_with_space, publish_filled};
use crate::common::*;

const BOTH_MODES: [ProtectionMode; 2] = [ProtectionMode::Flip, ProtectionMode::Alias];

#[test]
fn free_decommits_exactly_the_wholly_dead_pages() {
    for mode in BOTH_MODES {
        let (machine, m) = rig(1024, config(mode));
        let mut a = allocator_with_space(&m, 16 * PAGE);
        let s = a.code_spaces()[0].start();

        // a: [0, 64) on page 0; b: [64, 64 + 3 pages) on pages 0..=3; c: right after b on page 3.
        let code_a = publish_filled(&mut a, 64, 0xA1);
        let code_b = publish_filled(&mut a, 3 * PAGE, 0xB2);
        let code_c = publish_filled(&mut a, 64, 0xC3);
        assert_eq!(code_b.range(), AddressRange::new(s + 64, s + 64 + 3 * PAGE));
        assert_eq!(code_c.start(), s + 64 + 3 * PAGE);
        assert_eq!(m.committed(), 4 * PAGE);
        let b_range = code_b.range();

        // b shares its first and last page with live code: only pages 1 and 2 die.
        free_published(&mut a, code_b).unwrap();
        assert_eq!(m.committed(), 2 * PAGE, "{mode:?}");
        for (page, mapped) in [(0, true), (1, false), (2, false), (3, true)] {
            assert_eq!(
                is_mapped(&m, s + page * PAGE),
                mapped,
                "{mode:?} page {page}"
            );
            if !mapped {
                assert_eq!(leaf(&machine, s + page * PAGE), Some(0), "leaf cleared");
            }
        }
        assert_eq!(a.stats().freed, 3 * PAGE);
        // Freed bytes on still-committed pages are INT3; live neighbours are untouched.
        assert!(read(&m, s + 64, PAGE - 64).iter().all(|&b| b == INT3));
        assert!(read(&m, s + 3 * PAGE, 64).iter().all(|&b| b == INT3));
        assert!(read(&m, s, 64).iter().all(|&b| b == 0xA1));
        assert!(read(&m, s + 3 * PAGE + 64, 64).iter().all(|&b| b == 0xC3));
        // The shared pages stay R+X.
        assert_eq!(leaf_flags(&machine, s), R_X);
        assert_eq!(leaf_flags(&machine, s + 3 * PAGE), R_X);
        assert_sound_no_leak(&machine, &m);

        // Freed ranges are reused (V8 never does): same size, same place, pages recommitted.
        let reused = publish_filled(&mut a, 3 * PAGE, 0xD4);
        assert_eq!(reused.range(), b_range);
        assert_eq!(m.committed(), 4 * PAGE);
        assert!(read(&m, s + 64, 3 * PAGE).iter().all(|&b| b == 0xD4));
        // Every CPU executes the new bytes, not the INT3s it may have seen there.
        for cpu in 0..machine.online_cpus() {
            let mut seen = [0; 64];
            machine.exec_as(cpu, s + 64, &mut seen).unwrap();
            assert_eq!(seen, [0xD4; 64], "{mode:?} CPU {cpu}");
        }
        free_published(&mut a, reused).unwrap();
        assert_eq!(m.committed(), 2 * PAGE);

        // Freeing the last neighbour on page 3 decommits it; then page 0 goes with a.
        free_published(&mut a, code_c).unwrap();
        assert_eq!(m.committed(), PAGE);
        assert!(!is_mapped(&m, s + 3 * PAGE));
        free_published(&mut a, code_a).unwrap();
        assert_eq!(m.committed(), 0);
        assert_eq!(m.audit().unwrap().mapped_pages, 0);
        assert_eq!(a.stats().allocated, 0);
        assert_sound_no_leak(&machine, &m);
    }
}

#[test]
fn free_within_one_page_keeps_the_page_and_fills_int3() {
    for mode in BOTH_MODES {
        let (machine, m) = rig(1024, config(mode));
        let mut a = allocator_with_space(&m, 4 * PAGE);
        let s = a.code_spaces()[0].start();
        let x = publish_filled(&mut a, 100, 0x11);
        let y = a.allocate(200).unwrap(); // never published: its page is R+X because of x
        let z = publish_filled(&mut a, 64, 0x33);
        assert_eq!(m.committed(), PAGE);
        free_published(&mut a, x).unwrap();
        assert_eq!(m.committed(), PAGE);
        assert!(read(&m, s, 128).iter().all(|&b| b == INT3));
        // Discarding unpublished code on an R+X page also fills INT3 without W+X.
        let y_range = y.range();
        a.discard(y).unwrap();
        assert!(read(&m, y_range.start(), y_range.size())
            .iter()
            .all(|&b| b == INT3));
        assert!(read(&m, z.start(), 64).iter().all(|&b| b == 0x33));
        free_published(&mut a, z).unwrap();
        assert_eq!(m.committed(), 0);
        assert_sound_no_leak(&machine, &m);
    }
}

/// Asserts that no intermediate entry on the walk to `addr` sets NX or clears present.
fn assert_intermediates_executable(machine: &codespace::mmu::soft::SoftMmu, addr: usize) {
    let raw = machine.raw_entries(addr);
    for (level, entry) in raw[..3].iter().enumerate() {
        let e = entry.expect("table present");
        assert_eq!(e & PTE_NO_EXECUTE, 0, "level {level}: {e:#x}");
        assert_ne!(e & PTE_PRESENT, 0);
    }
}

#[test]
fn publish_makes_pages_r_x_and_never_w_x() {
    for mode in BOTH_MODES {
        let (machine, m) = rig(1024, config(mode));
        let mut a = allocator_with_space(&m, 8 * PAGE);
        let s = a.code_spaces()[0].start();

        let mut w = a.allocate(64).unwrap();
        assert_eq!(leaf_flags(&machine, s), RW_NX, "fresh code is RW+NX");
        assert_intermediates_executable(&machine, s);
        w.as_mut_slice().fill(0x90);
        let first = a.publish(w).unwrap();
        assert_eq!(
            leaf_flags(&machine, s),
            R_X,
            "{mode:?}: published code is R+X"
        );
        assert_intermediates_executable(&machine, s);
        let mapping = m.query(s).unwrap().unwrap();
        assert!(mapping.executable && !mapping.writable);
        // Sealed in the direct map too: no writable mapping of the frame anywhere.
        let direct = DIRECT_MAP + (mapping.frame - codespace::mmu::soft::PHYS_BASE) as usize;
        assert_eq!(leaf_flags(&machine, direct) & PTE_WRITABLE, 0);

        // A second function on the same, already executable page.
        let raw_before = leaf(&machine, s).unwrap();
        let stores_before = machine.leaf_stores();
        let mut w = a.allocate(64).unwrap();
        assert_eq!(w.start(), s + 64);
        assert_eq!(leaf(&machine, s), Some(raw_before), "allocating keeps R+X");
        w.as_mut_slice().fill(0xC3);
        let second = a.publish(w).unwrap();
        let stores = machine.leaf_stores() - stores_before;
        assert_eq!(
            leaf(&machine, s),
            Some(raw_before),
            "{mode:?}: leaf restored"
        );
        match mode {
            // Through the private alias: no leaf of the shared page tables changes.
            ProtectionMode::Alias => assert_eq!(stores, 0),
            // Flip: not present, RW+NX (flushed), not present, R+X (flushed).
            ProtectionMode::Flip => assert_eq!(stores, 4),
        }
        assert!(read(&m, s, 64).iter().all(|&b| b == 0x90));
        assert!(read(&m, s + 64, 64).iter().all(|&b| b == 0xC3));

        // A function spanning the executable page and fresh pages: the fresh ones go RW+NX to
        // R+X, the shared one is written without ever being W+X.
        let mut w = a.allocate(2 * PAGE).unwrap();
        assert_eq!(leaf_flags(&machine, s), R_X);
        assert_eq!(leaf_flags(&machine, s + PAGE), RW_NX);
        assert_eq!(leaf_flags(&machine, s + 2 * PAGE), RW_NX);
        w.as_mut_slice().fill(0x55);
        let third = a.publish(w).unwrap();
        for p in 0..3 {
            assert_eq!(leaf_flags(&machine, s + p * PAGE), R_X, "page {p}");
            assert_intermediates_executable(&machine, s + p * PAGE);
        }
        assert!(read(&m, s + 128, 2 * PAGE).iter().all(|&b| b == 0x55));
        assert_eq!(m.audit().unwrap().mapped_pages, 3);
        assert_sound_no_leak(&machine, &m);
        for code in [first, second, third] {
            free_published(&mut a, code).unwrap();
        }
        assert_sound_no_leak(&machine, &m);
    }
}

#[test]
fn published_bytes_read_back_with_int3_padding() {
    for mode in MODES {
        let (machine, m) = rig(1024, mode.manager(ManagerConfig::default()));
        let mut a = CodeAllocator::new(&m, mode.allocator(AllocatorConfig::default())).unwrap();
        let mut rng = Rng::new(7);
        let mut published = Vec::new();
        for len in [1, 63, 64, 65, 100, PAGE - 1, PAGE + 1, 5000, 3 * PAGE] {
            let mut w = a.allocate(len).unwrap();
            assert_eq!(w.as_slice().len(), len);
            assert_eq!(w.range().size(), len.next_multiple_of(CODE_ALIGNMENT));
            assert_eq!(w.start() % CODE_ALIGNMENT, 0);
            rng.fill(w.as_mut_slice());
            let bytes = w.as_slice().to_vec();
            let code = a.publish(w).unwrap();
            assert_eq!(code.len(), len);
            assert!(!code.is_empty() && !code.is_patchable());
            published.push((code, bytes));
        }
        for (code, bytes) in &published {
            let back = read(&m, code.start(), code.range().size());
            assert_eq!(
                &back[..bytes.len()],
                &bytes[..],
                "{mode:?} {:?}",
                code.range()
            );
            assert!(back[bytes.len()..].iter().all(|&b| b == INT3));
            // What every CPU fetches is what was published.
            for cpu in 0..machine.online_cpus() {
                let mut fetched = vec![0; code.range().size()];
                machine.exec_as(cpu, code.start(), &mut fetched).unwrap();
                assert_eq!(fetched, back, "{mode:?} CPU {cpu}");
            }
        }
        mode.assert_in_use(&m);
        for (code, _) in published {
            free_published(&mut a, code).unwrap();
        }
        assert_sound_no_leak(&machine, &m);
    }
}

#[test]
fn publish_batch_publishes_all_in_one_flush() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 64 * PAGE);
    let codes: Vec<_> = (0..5u8)
        .map(|i| {
            let mut w = a.allocate(PAGE + 64 * usize::from(i)).unwrap();
            w.as_mut_slice().fill(i + 1);
            w
        })
        .collect();
    let ranges: Vec<AddressRange> = codes.iter().map(|w| w.range()).collect();
    let before = m.flush_stats().unwrap();
    let published = a.publish_batch(codes).unwrap();
    let after = m.flush_stats().unwrap();
    assert_eq!(after.shootdowns - before.shootdowns, 1, "one round");
    assert_eq!(after.syncs, before.syncs, "nothing live was written");
    for (i, (code, range)) in published.iter().zip(&ranges).enumerate() {
        assert_eq!(code.range(), *range);
        assert!(read(&m, code.start(), code.len())
            .iter()
            .all(|&b| usize::from(b) == i + 1));
    }
    assert!(a.publish_batch(Vec::new()).unwrap().is_empty());
    for code in published {
        free_published(&mut a, code).unwrap();
    }
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn tlb_flushes_are_batched_per_operation() {
    for mode in BOTH_MODES {
        // No direct map: every invalidation counted here is a window page's.
        let cpus = if mode == ProtectionMode::Flip { 1 } else { 4 };
        let machine = codespace::mmu::soft::SoftMmu::with_cpus(1024, cpus);
        let m = manager_on(&machine, slot(), config(mode));
        let mut a = allocator_with_space(&m, 64 * PAGE);
        let stats = || m.flush_stats().unwrap();
        let delta = |before: FlushStats| {
            let now = stats();
            (
                now.single_pages - before.single_pages,
                now.full - before.full,
            )
        };

        // Committing maps not-present pages: nothing to invalidate.
        let before = stats();
        let mut w = a.allocate(3 * PAGE - 64).unwrap();
        assert_eq!(delta(before), (0, 0), "{mode:?}: commit");
        // Publishing fresh pages: one batch, one invlpg per page.
        w.as_mut_slice().fill(1);
        let first = a.publish(w).unwrap();
        assert_eq!(delta(before), (3, 0), "{mode:?}: publish 3 pages");

        // Publishing onto an executable page: through the alias (no shared-table change, one
        // serialization round), or by flipping it there and back (two flushes).
        let on_shared_page = match mode {
            ProtectionMode::Alias => 0,
            ProtectionMode::Flip => 2,
        };
        let before = stats();
        let end_of_page_2 = publish_filled(&mut a, 64, 2);
        assert_eq!(end_of_page_2.range().end(), first.start() + 3 * PAGE);
        assert_eq!(delta(before), (on_shared_page, 0), "{mode:?}: on R+X");
        if mode == ProtectionMode::Alias {
            assert_eq!(stats().pokes - before.pokes, 1);
            assert_eq!(stats().syncs - before.syncs, 1, "other CPUs serialized");
        }
        let before = stats();
        let _page_3 = publish_filled(&mut a, 64, 3);
        assert_eq!(delta(before), (1, 0), "{mode:?}: on a fresh page");

        // 40 fresh pages and page 3 (R+X): the protection batch becomes one full flush.
        let before = stats();
        let big = a.allocate(40 * PAGE).unwrap();
        let big_range = big.range();
        let big = a.publish(big).unwrap();
        const { assert!(40 > TlbFlush::MAX_SINGLE_PAGES) };
        assert_eq!(delta(before), (on_shared_page, 1), "{mode:?}: publish");

        // Freeing it decommits 40 wholly dead pages (a full flush) and fills INT3 on page 3,
        // which it shares with live code.
        let before = stats();
        free_published(&mut a, big).unwrap();
        assert_eq!(m.committed(), 4 * PAGE);
        let rest_of_page_3 = read(&m, big_range.start(), PAGE - 64);
        assert!(rest_of_page_3.iter().all(|&b| b == INT3));
        assert_eq!(delta(before), (on_shared_page, 1), "{mode:?}: free");
        let shootdowns = stats().shootdowns;
        free_published(&mut a, first).unwrap();
        if mode == ProtectionMode::Alias {
            assert_eq!(stats().shootdowns - shootdowns, 1, "one round per free");
        }
        assert_sound_no_leak(&machine, &m);
    }
}

#[test]
fn allocators_on_threads_share_one_manager() {
    let machine = machine(100_000);
    let m = manager_on(
        &machine,
        window(4096),
        ManagerConfig {
            max_committed: 256 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut a = allocator(&m);
                let mut rng = Rng::new(100 + t);
                let mut live: Vec<(PublishedCode, Vec<u8>)> = Vec::new();
                for _ in 0..2_000 {
                    if live.len() < 20 && rng.below(3) != 0 {
                        let mut w = a.allocate(rng.code_size()).unwrap();
                        rng.fill(w.as_mut_slice());
                        let bytes = w.as_slice().to_vec();
                        live.push((a.publish(w).unwrap(), bytes));
                    } else if !live.is_empty() {
                        let (code, bytes) = live.swap_remove(rng.below(live.len()));
                        assert_eq!(read(&m, code.start(), bytes.len()), bytes);
                        free_published(&mut a, code).unwrap();
                    }
                }
                for (code, bytes) in live {
                    assert_eq!(read(&m, code.start(), bytes.len()), bytes);
                    free_published(&mut a, code).unwrap();
                }
                a.stats()
            })
        })
        .collect();
    for t in threads {
        let stats = t.join().unwrap();
        assert_eq!(stats.allocated, 0);
    }
    assert_eq!(m.committed(), 0);
    assert_eq!(m.stats().code_spaces, 0);
    assert_eq!(m.audit().unwrap().mapped_pages, 0);
    assert_sound_no_leak(&machine, &m);
}
