//! Host integration tests of the code manager over the software MMU.
//!
//! They mirror V8's code-manager unit tests (test-wasm-code-manager.cc: going over the commit
//! limit, the limit across modules, growable vs fixed modules, commit increments) and add what
//! codespace promises beyond V8: W^X at every page-table store, INT3 in freed and padding bytes,
//! reuse of freed code, guard pages, foreign handles, and a long random run against a shadow model.
//!
//! Every test asserts real state: manager and allocator counters, raw page-table entries of the
//! `SoftMmu`, bytes read back through the MMU and the window audit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use codespace::manager::{AllocatorStats, ManagerStats, CODE_ALIGNMENT};
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::{Mmu, MmuError, PTE_ADDR_MASK, PTE_NO_EXECUTE, PTE_PRESENT, PTE_WRITABLE};
use codespace::{
    AddressRange, AllocatorConfig, AuditReport, CodeAllocator, CodeError, CodeManager,
    ManagerConfig, ProtectionMode, PublishedCode, WritableCode, PAGE_SIZE,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Start of a 512 GiB PML4 slot in the higher half (PML4 index 384).
const BASE: usize = 0xFFFF_C000_0000_0000;
/// Alias pages the manager keeps at the bottom of its window.
const ALIAS_PAGES: usize = 2;
const INT3: u8 = 0xCC;
const PAGE: usize = PAGE_SIZE;
const BOTH_MODES: [ProtectionMode; 2] = [ProtectionMode::Flip, ProtectionMode::Alias];

/// A whole PML4 slot.
fn slot() -> AddressRange {
    AddressRange::new(BASE, BASE + (512 << 30))
}

/// A window of `pages` pages at the start of the slot.
fn window(pages: usize) -> AddressRange {
    AddressRange::new(BASE, BASE + pages * PAGE)
}

fn config(protection: ProtectionMode) -> ManagerConfig {
    ManagerConfig {
        protection,
        ..ManagerConfig::default()
    }
}

/// A manager over `window` with a `frames`-frame software MMU.
fn manager(frames: usize, window: AddressRange, config: ManagerConfig) -> CodeManager<SoftMmu> {
    CodeManager::new(SoftMmu::new(frames), window, config).expect("manager")
}

fn allocator(m: &CodeManager<SoftMmu>) -> CodeAllocator<SoftMmu> {
    CodeAllocator::new(m, AllocatorConfig::default()).expect("allocator")
}

/// An allocator whose first code space (`bytes` large) is reserved up front.
fn allocator_with_space(m: &CodeManager<SoftMmu>, bytes: usize) -> CodeAllocator<SoftMmu> {
    let config = AllocatorConfig {
        initial_reservation: bytes,
        ..AllocatorConfig::default()
    };
    CodeAllocator::new(m, config).expect("allocator")
}

/// The raw leaf (PT) entry of `addr`'s page, `None` when a table on the walk is missing.
fn leaf(m: &CodeManager<SoftMmu>, addr: usize) -> Option<u64> {
    m.with_mmu(|mmu| mmu.raw_entries(addr)[3])
}

/// The flag bits of `addr`'s leaf entry (0 when not mapped).
fn leaf_flags(m: &CodeManager<SoftMmu>, addr: usize) -> u64 {
    leaf(m, addr).unwrap_or(0) & !PTE_ADDR_MASK
}

const RW_NX: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE;
const R_X: u64 = PTE_PRESENT;

fn is_mapped(m: &CodeManager<SoftMmu>, addr: usize) -> bool {
    m.with_mmu(|mmu| mmu.query(addr).is_some())
}

/// `len` bytes at `addr`, read through the MMU.
fn read(m: &CodeManager<SoftMmu>, addr: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    m.with_mmu(|mmu| mmu.read(addr, &mut buf)).expect("read");
    buf
}

fn free_frames(m: &CodeManager<SoftMmu>) -> usize {
    m.with_mmu(|mmu| mmu.free_frames())
        .expect("SoftMmu counts frames")
}

/// Allocates `len` bytes, fills them with `fill` and publishes them.
fn publish_filled(a: &mut CodeAllocator<SoftMmu>, len: usize, fill: u8) -> PublishedCode {
    let mut w = a.allocate(len).expect("allocate");
    w.as_mut_slice().fill(fill);
    a.publish(w).expect("publish")
}

/// Everything a failed operation must leave as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    manager: ManagerStats,
    allocators: Vec<AllocatorStats>,
    audit: AuditReport,
    free_frames: usize,
    table_frames: usize,
    mapped: Vec<(usize, u64)>,
}

/// The counters and the audit, without the (slower) list of mapped pages.
fn counters(m: &CodeManager<SoftMmu>, allocators: &[&CodeAllocator<SoftMmu>]) -> Snapshot {
    Snapshot {
        manager: m.stats(),
        allocators: allocators.iter().map(|a| a.stats()).collect(),
        audit: m.audit(),
        free_frames: free_frames(m),
        table_frames: m.with_mmu(|mmu| mmu.table_frames()),
        mapped: Vec::new(),
    }
}

/// The counters, the audit and every mapped page of the window with its raw leaf entry.
fn snapshot(m: &CodeManager<SoftMmu>, allocators: &[&CodeAllocator<SoftMmu>]) -> Snapshot {
    let window = m.window();
    Snapshot {
        mapped: m.with_mmu(|mmu| {
            let mut pages = Vec::new();
            mmu.for_each_mapping(window, &mut |page, _| pages.push(page));
            pages
                .into_iter()
                .map(|p| (p, mmu.raw_entries(p)[3].unwrap()))
                .collect()
        }),
        ..counters(m, allocators)
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

/// xorshift64*: deterministic, no crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    /// A code size in `1..=3 pages`, skewed small.
    fn code_size(&mut self) -> usize {
        let max = match self.below(8) {
            0..=3 => 128,
            4 | 5 => 1024,
            6 => PAGE,
            _ => 3 * PAGE,
        };
        1 + self.below(max)
    }
}

// ---------------------------------------------------------------------------------------------
// 1-3. The commit limit and commit increments (V8: AllocateAndGoOverLimit, SpaceLimit,
//      CommitIncrements)
// ---------------------------------------------------------------------------------------------

#[test]
fn going_over_the_commit_limit_fails_and_changes_nothing() {
    let m = manager(
        1024,
        slot(),
        ManagerConfig {
            max_committed: 16 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let mut a = allocator(&m);
    let before = snapshot(&m, &[&a]);
    let mmu_before = m.with_mmu(|mmu| mmu.clone());

    // A fresh allocator must reserve a code space first; the failed commit gives it back.
    assert_eq!(
        a.allocate(17 * PAGE).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: 17 * PAGE,
            remaining: 16 * PAGE
        })
    );
    assert_eq!(snapshot(&m, &[&a]), before);
    assert_eq!(m.with_mmu(|mmu| mmu.clone()), mmu_before);
    assert!(a.code_spaces().is_empty());

    // A smaller allocation still works, and exactly reaches the limit.
    let big = a.allocate(16 * PAGE).expect("up to the limit");
    assert_eq!(m.committed(), 16 * PAGE);
    assert_eq!(m.remaining_uncommitted(), 0);

    // Over the limit once more, now with an existing code space that has no room left.
    let before = snapshot(&m, &[&a]);
    assert_eq!(
        a.allocate(1).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: PAGE,
            remaining: 0
        })
    );
    assert_eq!(snapshot(&m, &[&a]), before);
    assert!(m.audit().is_clean());

    // Freeing makes room again.
    a.discard(big).unwrap();
    assert_eq!(m.committed(), 0);
    let w = a.allocate(8 * PAGE).expect("after free");
    assert_eq!(m.committed(), 8 * PAGE);
    a.discard(w).unwrap();
    assert!(m.audit().is_clean());
}

#[test]
fn a_partial_page_commit_charges_only_the_new_pages() {
    let m = manager(
        1024,
        slot(),
        ManagerConfig {
            max_committed: 2 * PAGE,
            ..ManagerConfig::default()
        },
    );
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
    assert!(m.audit().is_clean());
}

#[test]
fn the_commit_limit_holds_across_modules() {
    let m = manager(
        1024,
        slot(),
        ManagerConfig {
            max_committed: 16 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let mut a1 = allocator(&m);
    let mut a2 = allocator(&m);
    let w1 = a1.allocate(10 * PAGE).unwrap();
    assert_eq!(m.committed(), 10 * PAGE);

    let before = snapshot(&m, &[&a1, &a2]);
    assert_eq!(
        a2.allocate(8 * PAGE).map(|w| w.range()),
        Err(CodeError::CommitLimit {
            requested: 8 * PAGE,
            remaining: 6 * PAGE
        })
    );
    assert_eq!(snapshot(&m, &[&a1, &a2]), before);

    let w2 = a2.allocate(6 * PAGE).expect("fits the shared budget");
    assert_eq!(m.committed(), 16 * PAGE);
    let before = snapshot(&m, &[&a1, &a2]);
    for a in [&mut a1, &mut a2] {
        assert!(matches!(
            a.allocate(1),
            Err(CodeError::CommitLimit { remaining: 0, .. })
        ));
    }
    assert_eq!(snapshot(&m, &[&a1, &a2]), before);

    // What one module frees, the other may use.
    a1.discard(w1).unwrap();
    let w3 = a2.allocate(10 * PAGE).expect("a1's budget is back");
    assert_eq!(m.committed(), 16 * PAGE);
    assert_eq!(a2.stats().allocated, 16 * PAGE);
    assert_eq!(a1.stats().allocated, 0);
    a2.discard(w2).unwrap();
    a2.discard(w3).unwrap();
    assert_eq!(m.committed(), 0);
    assert!(m.audit().is_clean());
}

#[test]
fn commit_grows_in_page_steps() {
    let max = 64 * PAGE;
    let m = manager(
        1024,
        slot(),
        ManagerConfig {
            max_committed: max,
            ..ManagerConfig::default()
        },
    );
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
        assert_eq!(leaf_flags(&m, space.start() + p * PAGE), RW_NX);
    }
    assert!(!is_mapped(&m, space.start() + 4 * PAGE));
    assert_eq!(m.audit().mapped_pages, 4);
    assert!(m.audit().is_clean());
    assert_eq!(a.stats().allocated, PAGE + 64 + 2 * PAGE);
}

// ---------------------------------------------------------------------------------------------
// 4-5. Growable vs fixed modules, reservation sizes, guard pages
// ---------------------------------------------------------------------------------------------

#[test]
fn a_fixed_module_fails_when_full_and_changes_nothing() {
    let m = manager(1024, slot(), ManagerConfig::default());
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
    let before = snapshot(&m, &[&a]);
    assert_eq!(
        a.allocate(65).map(|w| w.range()),
        Err(CodeError::NotGrowable)
    );
    assert_eq!(snapshot(&m, &[&a]), before);
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
    assert_eq!(a.allocate(PAGE - 64).unwrap().start(), start);
    a.discard(w1).unwrap();
    assert!(m.audit().is_clean());

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
}

#[test]
fn a_growable_module_reserves_spaces_of_v8_reservation_size() {
    let max_space = 2 << 20;
    let m = manager(
        8192,
        slot(),
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
        assert_eq!(m.code_spaces().len(), a.code_spaces().len());
        assert!(m.audit().is_clean());
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
    let before = snapshot(&m, &[&a]);
    assert_eq!(
        a.allocate(largest + 1).map(|w| w.range()),
        Err(CodeError::CodeSpaceTooLarge {
            size: largest + CODE_ALIGNMENT,
            max: max_space
        })
    );
    assert_eq!(snapshot(&m, &[&a]), before);
    for w in live {
        a.discard(w).unwrap();
    }
    assert_eq!(m.committed(), 0);
    assert_eq!(m.audit().mapped_pages, 0);
}

#[test]
fn code_spaces_have_guard_pages_and_never_touch() {
    for guard_pages in [1, 3] {
        let win = window(512);
        let m = manager(
            4096,
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
                let w = a.allocate((round + 1) * 3 * PAGE).unwrap();
                live.push(w);
            }
        }
        let spaces = m.code_spaces();
        assert_eq!(spaces.len(), 9);
        assert_eq!(
            m.audit().mapped_pages * PAGE,
            spaces.iter().map(AddressRange::size).sum::<usize>()
        );
        let mut all: Vec<_> = modules
            .iter()
            .flat_map(|a| a.code_spaces().to_vec())
            .collect();
        all.sort();
        assert_eq!(all, spaces, "the manager knows exactly the modules' spaces");

        let lowest = win.start() + ALIAS_PAGES * PAGE + guard;
        assert!(spaces[0].start() >= lowest, "{:?}", spaces[0]);
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
            for g in 1..=guard_pages {
                assert!(!is_mapped(&m, s.start() - g * PAGE));
                assert!(!is_mapped(&m, s.end() + (g - 1) * PAGE));
            }
            assert!(is_mapped(&m, s.start()) && is_mapped(&m, s.end() - 1));
        }
        // The alias pages are unmapped at rest.
        for p in 0..ALIAS_PAGES {
            assert!(!is_mapped(&m, win.start() + p * PAGE));
        }
        assert!(m.audit().is_clean());
        drop(live);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Free: V8's decommit rule, INT3 in freed bytes, reuse
// ---------------------------------------------------------------------------------------------

#[test]
fn free_decommits_exactly_the_wholly_dead_pages() {
    for mode in BOTH_MODES {
        let m = manager(1024, slot(), config(mode));
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
        a.free(code_b).unwrap();
        assert_eq!(m.committed(), 2 * PAGE, "{mode:?}");
        for (page, mapped) in [(0, true), (1, false), (2, false), (3, true)] {
            assert_eq!(
                is_mapped(&m, s + page * PAGE),
                mapped,
                "{mode:?} page {page}"
            );
            if !mapped {
                assert_eq!(leaf(&m, s + page * PAGE), Some(0), "the leaf is cleared");
            }
        }
        assert_eq!(a.stats().freed, 3 * PAGE);
        // Freed bytes on still-committed pages are INT3; live neighbours are untouched.
        assert!(read(&m, s + 64, PAGE - 64).iter().all(|&b| b == INT3));
        assert!(read(&m, s + 3 * PAGE, 64).iter().all(|&b| b == INT3));
        assert!(read(&m, s, 64).iter().all(|&b| b == 0xA1));
        assert!(read(&m, s + 3 * PAGE + 64, 64).iter().all(|&b| b == 0xC3));
        // The shared pages stay R+X.
        assert_eq!(leaf_flags(&m, s), R_X);
        assert_eq!(leaf_flags(&m, s + 3 * PAGE), R_X);
        assert!(m.audit().is_clean());

        // Freed ranges are reused (V8 never does): same size, same place, pages recommitted.
        let reused = publish_filled(&mut a, 3 * PAGE, 0xD4);
        assert_eq!(reused.range(), b_range);
        assert_eq!(m.committed(), 4 * PAGE);
        assert!(read(&m, s + 64, 3 * PAGE).iter().all(|&b| b == 0xD4));
        a.free(reused).unwrap();
        assert_eq!(m.committed(), 2 * PAGE);

        // Freeing the last neighbour on page 3 decommits it; then page 0 goes with a.
        a.free(code_c).unwrap();
        assert_eq!(m.committed(), PAGE);
        assert!(!is_mapped(&m, s + 3 * PAGE));
        a.free(code_a).unwrap();
        assert_eq!(m.committed(), 0);
        assert_eq!(m.audit().mapped_pages, 0);
        assert_eq!(a.stats().allocated, 0);
        assert!(m.audit().is_clean());
        assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
    }
}

#[test]
fn free_within_one_page_keeps_the_page_and_fills_int3() {
    for mode in BOTH_MODES {
        let m = manager(1024, slot(), config(mode));
        let mut a = allocator_with_space(&m, 4 * PAGE);
        let s = a.code_spaces()[0].start();
        let x = publish_filled(&mut a, 100, 0x11);
        let y = a.allocate(200).unwrap(); // never published: its page is R+X because of x
        let z = publish_filled(&mut a, 64, 0x33);
        assert_eq!(m.committed(), PAGE);
        a.free(x).unwrap();
        assert_eq!(m.committed(), PAGE);
        assert!(read(&m, s, 128).iter().all(|&b| b == INT3));
        // Discarding unpublished code on an R+X page also fills INT3 without W+X.
        let y_range = y.range();
        a.discard(y).unwrap();
        assert!(read(&m, y_range.start(), y_range.size())
            .iter()
            .all(|&b| b == INT3));
        assert!(read(&m, z.start(), 64).iter().all(|&b| b == 0x33));
        a.free(z).unwrap();
        assert_eq!(m.committed(), 0);
        assert!(m.audit().is_clean());
        assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
    }
}

// ---------------------------------------------------------------------------------------------
// 7-8. W^X and published bytes
// ---------------------------------------------------------------------------------------------

/// Asserts that no intermediate entry on the walk to `addr` sets NX.
fn assert_intermediates_executable(m: &CodeManager<SoftMmu>, addr: usize) {
    let raw = m.with_mmu(|mmu| mmu.raw_entries(addr));
    for (level, entry) in raw[..3].iter().enumerate() {
        let e = entry.expect("table present");
        assert_eq!(e & PTE_NO_EXECUTE, 0, "level {level}: {e:#x}");
        assert_ne!(e & PTE_PRESENT, 0);
    }
}

#[test]
fn publish_makes_pages_r_x_and_never_w_x() {
    for mode in BOTH_MODES {
        let m = manager(1024, slot(), config(mode));
        let mut a = allocator_with_space(&m, 8 * PAGE);
        let s = a.code_spaces()[0].start();

        let mut w = a.allocate(64).unwrap();
        assert_eq!(leaf_flags(&m, s), RW_NX, "fresh code is RW+NX");
        assert_intermediates_executable(&m, s);
        w.as_mut_slice().fill(0x90);
        let first = a.publish(w).unwrap();
        assert_eq!(leaf_flags(&m, s), R_X, "{mode:?}: published code is R+X");
        assert_intermediates_executable(&m, s);
        let mapping = m.with_mmu(|mmu| mmu.query(s)).unwrap();
        assert!(mapping.executable && !mapping.writable && !mapping.intermediate_nx);

        // A second function on the same, already executable page.
        let raw_before = leaf(&m, s).unwrap();
        let stores_before = m.with_mmu(|mmu| mmu.leaf_stores());
        let mut w = a.allocate(64).unwrap();
        assert_eq!(w.start(), s + 64);
        assert_eq!(
            leaf(&m, s),
            Some(raw_before),
            "allocating keeps the page R+X"
        );
        w.as_mut_slice().fill(0xC3);
        let second = a.publish(w).unwrap();
        let stores = m.with_mmu(|mmu| mmu.leaf_stores()) - stores_before;
        assert_eq!(
            leaf(&m, s),
            Some(raw_before),
            "{mode:?}: the leaf is restored"
        );
        match mode {
            // Through an alias: only the alias leaf is written (map + unmap), never the code's.
            ProtectionMode::Alias => {
                assert_eq!(stores, 2, "alias map and unmap only");
                assert!(!is_mapped(&m, m.window().start()), "alias unmapped again");
            }
            // Flip: NX on, W on, then W off, NX off.
            ProtectionMode::Flip => assert_eq!(stores, 4, "two stores each way"),
        }
        assert!(read(&m, s, 64).iter().all(|&b| b == 0x90));
        assert!(read(&m, s + 64, 64).iter().all(|&b| b == 0xC3));

        // A function spanning the executable page and fresh pages: the fresh ones go RW+NX to
        // R+X, the shared one is written without ever being W+X.
        let mut w = a.allocate(2 * PAGE).unwrap();
        assert_eq!(leaf_flags(&m, s), R_X);
        assert_eq!(leaf_flags(&m, s + PAGE), RW_NX);
        assert_eq!(leaf_flags(&m, s + 2 * PAGE), RW_NX);
        w.as_mut_slice().fill(0x55);
        let third = a.publish(w).unwrap();
        for p in 0..3 {
            assert_eq!(leaf_flags(&m, s + p * PAGE), R_X, "page {p}");
            assert_intermediates_executable(&m, s + p * PAGE);
        }
        assert!(read(&m, s + 128, 2 * PAGE).iter().all(|&b| b == 0x55));
        assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()), "{mode:?}");
        let audit = m.audit();
        assert!(audit.is_clean(), "{audit:?}");
        assert_eq!(audit.writable_and_executable, 0);
        assert_eq!(audit.mapped_pages, 3);
        for code in [first, second, third] {
            a.free(code).unwrap();
        }
        assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()), "{mode:?}");
        assert!(m.audit().is_clean());
    }
}

#[test]
fn published_bytes_read_back_with_int3_padding() {
    for mode in BOTH_MODES {
        let m = manager(1024, slot(), config(mode));
        let mut a = allocator(&m);
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
            assert!(!code.is_empty());
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
        }
        assert!(m.audit().is_clean());
        assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
    }
}

// ---------------------------------------------------------------------------------------------
// 9-10. Configuration checks and foreign handles
// ---------------------------------------------------------------------------------------------

#[test]
fn new_checks_the_cpu_and_the_window() {
    let mut no_nx = SoftMmu::new(64);
    no_nx.set_nxe(false);
    assert_eq!(
        CodeManager::new(no_nx, slot(), ManagerConfig::default()).err(),
        Some(CodeError::Mmu(MmuError::NoExecuteDisabled))
    );
    let mut no_wp = SoftMmu::new(64);
    no_wp.set_wp(false);
    assert_eq!(
        CodeManager::new(no_wp, slot(), ManagerConfig::default()).err(),
        Some(CodeError::Mmu(MmuError::WriteProtectDisabled))
    );

    let invalid = |window: AddressRange, config: ManagerConfig| {
        CodeManager::new(SoftMmu::new(64), window, config).err()
    };
    let cfg = ManagerConfig::default();
    let unaligned_start = AddressRange::new(BASE + 8, BASE + (1 << 20));
    let unaligned_end = AddressRange::new(BASE, BASE + (1 << 20) + 8);
    assert_eq!(
        invalid(unaligned_start, cfg),
        Some(CodeError::InvalidConfig)
    );
    assert_eq!(invalid(unaligned_end, cfg), Some(CodeError::InvalidConfig));
    assert_eq!(
        invalid(AddressRange::EMPTY, cfg),
        Some(CodeError::InvalidConfig)
    );
    // Alias pages + guard + one usable page + guard is the minimum.
    assert_eq!(invalid(window(4), cfg), Some(CodeError::InvalidConfig));
    let no_guard = ManagerConfig {
        guard_pages: 0,
        ..cfg
    };
    assert_eq!(invalid(slot(), no_guard), Some(CodeError::InvalidConfig));
    let two_guards = ManagerConfig {
        guard_pages: 2,
        ..cfg
    };
    assert_eq!(
        invalid(window(6), two_guards),
        Some(CodeError::InvalidConfig)
    );

    // The alias pages' tables are built up front: PML4 + 3 tables + a probe frame.
    assert_eq!(
        CodeManager::new(SoftMmu::new(4), slot(), cfg).err(),
        Some(CodeError::Mmu(MmuError::OutOfFrames))
    );
    let m = manager(5, slot(), cfg);
    assert_eq!(free_frames(&m), 1);
    assert!(!is_mapped(&m, BASE), "the probe is unmapped again");

    // The smallest window holds exactly one one-page code space.
    let m = manager(64, window(5), cfg);
    assert_eq!(m.stats().window_free, 3 * PAGE);
    let mut a = allocator(&m);
    let w = a.allocate(PAGE).unwrap();
    assert_eq!(w.start(), BASE + 3 * PAGE);
    let mut b = allocator(&m);
    let before = snapshot(&m, &[&a, &b]);
    assert_eq!(
        b.allocate(1).map(|w| w.range()),
        Err(CodeError::WindowExhausted { size: 3 * PAGE })
    );
    assert_eq!(snapshot(&m, &[&a, &b]), before);
    assert!(m.audit().is_clean());
}

#[test]
fn invalid_sizes_and_reservations_are_refused() {
    let m = manager(
        256,
        window(64),
        ManagerConfig {
            max_code_space_size: 16 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let mut a = allocator(&m);
    let before = snapshot(&m, &[&a]);
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
    assert_eq!(snapshot(&m, &[&a]), before);

    // The initial reservation is checked against the space cap and the window (and the failed
    // constructor does not deadlock on the manager lock when it drops the half-built allocator).
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
    let before = snapshot(&m, &[&a]);
    assert!(matches!(
        CodeAllocator::new(&m, fits),
        Err(CodeError::WindowExhausted { .. })
    ));
    assert_eq!(snapshot(&m, &[&a]), before);
}

#[test]
fn foreign_handles_are_handed_back() {
    let m = manager(1024, slot(), ManagerConfig::default());
    let other_manager = manager(1024, slot(), ManagerConfig::default());
    let mut a = allocator(&m);
    let mut b = allocator(&m);
    let mut c = allocator(&other_manager);

    let mut w = a.allocate(100).unwrap();
    w.as_mut_slice().fill(0x42);
    let range = w.range();
    let before = snapshot(&m, &[&a, &b]);
    let w = {
        let rejected = b.publish(w).unwrap_err();
        assert_eq!(rejected.error, CodeError::ForeignCode);
        rejected.code
    };
    let w = c.publish(w).unwrap_err().code;
    assert_eq!(w.range(), range);
    assert!(w.as_slice().iter().all(|&x| x == 0x42), "bytes unchanged");
    assert_eq!(snapshot(&m, &[&a, &b]), before);

    let code = a.publish(w).expect("the owner publishes");
    let code = {
        let rejected = b.free(code).unwrap_err();
        assert_eq!(rejected.error, CodeError::ForeignCode);
        rejected.code
    };
    assert_eq!(code.range(), range);
    assert_eq!(code.len(), 100);

    let w2 = b.allocate(64).unwrap();
    let w2 = a.discard(w2).unwrap_err().code;
    let before = snapshot(&m, &[&a, &b]);
    let code = c.free(code).unwrap_err().code;
    assert_eq!(snapshot(&m, &[&a, &b]), before);

    a.free(code).expect("the owner frees");
    b.discard(w2).expect("the owner discards");
    assert_eq!(m.committed(), 0);
    assert!(m.audit().is_clean());

    // Handles of a dropped allocator are foreign to a new one.
    let stale = a.allocate(64).unwrap();
    drop(a);
    let mut a2 = allocator(&m);
    assert_eq!(a2.discard(stale).unwrap_err().error, CodeError::ForeignCode);
    assert_eq!(m.committed(), 0);
}

// ---------------------------------------------------------------------------------------------
// 11-13. Out of frames, dropping allocators, the critical threshold
// ---------------------------------------------------------------------------------------------

#[test]
fn out_of_frames_fails_and_changes_nothing() {
    // 1 PML4 + 3 tables for the alias pages (the space shares their page table) + 3 data frames.
    let m = manager(7, slot(), ManagerConfig::default());
    assert_eq!(free_frames(&m), 3);
    let mut a = allocator(&m);

    // Not enough frames for a fresh space: the failed commit gives the reservation back.
    let before = snapshot(&m, &[&a]);
    let mmu_before = m.with_mmu(|mmu| mmu.clone());
    assert_eq!(
        a.allocate(4 * PAGE).map(|w| w.range()),
        Err(CodeError::Mmu(MmuError::OutOfFrames))
    );
    assert_eq!(snapshot(&m, &[&a]), before);
    assert!(a.code_spaces().is_empty());
    // Three frames were mapped and unmapped again: only counters of stores and flushes moved.
    assert_eq!(free_frames(&m), mmu_before.free_frames().unwrap());

    let w = a.allocate(2 * PAGE).unwrap();
    assert_eq!(free_frames(&m), 1);
    let _w2 = a.allocate(PAGE).unwrap();
    assert_eq!(free_frames(&m), 0);

    // Exactly one frame short, with an existing space and a new one.
    let before = snapshot(&m, &[&a]);
    let mmu_before = m.with_mmu(|mmu| mmu.clone());
    assert_eq!(
        a.allocate(1).map(|w| w.range()),
        Err(CodeError::Mmu(MmuError::OutOfFrames))
    );
    assert_eq!(snapshot(&m, &[&a]), before);
    assert_eq!(
        m.with_mmu(|mmu| mmu.clone()),
        mmu_before,
        "nothing at all changed"
    );

    a.discard(w).unwrap();
    assert_eq!(free_frames(&m), 2);
    let _w3 = a.allocate(1).expect("frames are back");
    assert!(m.audit().is_clean());
}

#[test]
fn dropping_an_allocator_releases_its_spaces() {
    for mode in BOTH_MODES {
        let m = manager(4096, slot(), config(mode));
        let initial = m.stats();
        let frames_before = free_frames(&m);
        let tables_before = m.with_mmu(|mmu| mmu.table_frames());
        let mut keep = allocator(&m);
        let kept = publish_filled(&mut keep, 100, 0x77);
        let committed_kept = m.committed();
        let spaces_kept = m.code_spaces();

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
                a.free(code).unwrap();
            }
            let w = b.allocate(3000 * (i + 1)).unwrap();
            if i % 2 == 0 {
                let _ = b.publish(w).unwrap(); // never freed: released with `b`
            } else {
                drop(w); // leaked until `b` goes
            }
        }
        assert!(m.stats().code_spaces > 2);
        assert!(m.committed() > committed_kept);
        drop(a);
        drop(b);

        assert_eq!(m.committed(), committed_kept, "{mode:?}");
        assert_eq!(m.code_spaces(), spaces_kept);
        let audit = m.audit();
        assert!(audit.is_clean(), "{audit:?}");
        assert_eq!(audit.mapped_pages * PAGE, committed_kept);
        assert!(read(&m, kept.start(), 100).iter().all(|&x| x == 0x77));

        keep.free(kept).unwrap();
        drop(keep);
        let after = m.stats();
        assert_eq!(after.committed, 0);
        assert_eq!(after.reserved, 0);
        assert_eq!(after.code_spaces, 0);
        assert_eq!(after.window_free, initial.window_free);
        assert_eq!(m.audit().mapped_pages, 0);
        // Data frames all came back; page-table frames stay (they are never freed).
        let new_tables = m.with_mmu(|mmu| mmu.table_frames()) - tables_before;
        assert_eq!(free_frames(&m) + new_tables, frames_before);
        assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
    }
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
    let m = manager(
        1024,
        slot(),
        ManagerConfig {
            max_committed: max,
            on_critical: Some(on_critical),
            ..ManagerConfig::default()
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
}

static FAILED_COMMIT_CALLS: AtomicUsize = AtomicUsize::new(0);

fn on_critical_failed_commit(_committed: usize) {
    FAILED_COMMIT_CALLS.fetch_add(1, Ordering::SeqCst);
}

/// A commit that fails for lack of frames after passing the limit check must not count as a
/// crossing of the critical threshold (every failed operation leaves the counters as they were).
#[test]
fn a_failed_commit_does_not_cross_the_critical_threshold() {
    // 1 PML4 + 3 alias tables + 3 data frames; critical threshold at 4 of 8 pages.
    let m = manager(
        7,
        slot(),
        ManagerConfig {
            max_committed: 8 * PAGE,
            on_critical: Some(on_critical_failed_commit),
            ..ManagerConfig::default()
        },
    );
    let mut a = allocator_with_space(&m, 8 * PAGE);
    let _w = a.allocate(2 * PAGE).unwrap();
    let before = snapshot(&m, &[&a]);
    assert_eq!(before.manager.critical_threshold, 4 * PAGE);
    // 3 more pages pass the limit (5 <= 8) but only 1 frame is left.
    assert_eq!(
        a.allocate(3 * PAGE).map(|w| w.range()),
        Err(CodeError::Mmu(MmuError::OutOfFrames))
    );
    assert_eq!(FAILED_COMMIT_CALLS.load(Ordering::SeqCst), 0, "hook called");
    assert_eq!(snapshot(&m, &[&a]), before);
}

// ---------------------------------------------------------------------------------------------
// TLB flushes and threads
// ---------------------------------------------------------------------------------------------

#[test]
fn tlb_flushes_are_batched_per_operation() {
    use codespace::mmu::FlushStats;
    for mode in BOTH_MODES {
        let m = manager(1024, slot(), config(mode));
        let mut a = allocator_with_space(&m, 64 * PAGE);
        let stats = || m.with_mmu(|mmu| mmu.flush_stats());
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

        // Publishing onto an executable page: the alias (unmapped once) or the flip (twice).
        let on_shared_page = match mode {
            ProtectionMode::Alias => 1,
            ProtectionMode::Flip => 2,
        };
        let before = stats();
        let end_of_page_2 = publish_filled(&mut a, 64, 2);
        assert_eq!(end_of_page_2.range().end(), first.start() + 3 * PAGE);
        assert_eq!(delta(before), (on_shared_page, 0), "{mode:?}: on R+X");
        let before = stats();
        let _page_3 = publish_filled(&mut a, 64, 3);
        assert_eq!(delta(before), (1, 0), "{mode:?}: on a fresh page");

        // 40 fresh pages and page 3 (R+X): the protection batch becomes one full flush.
        let before = stats();
        let big = a.allocate(40 * PAGE).unwrap();
        let big_range = big.range();
        let big = a.publish(big).unwrap();
        assert_eq!(delta(before), (on_shared_page, 1), "{mode:?}: publish");

        // Freeing it decommits 40 wholly dead pages (a full flush) and fills INT3 on page 3,
        // which it shares with live code.
        let before = stats();
        a.free(big).unwrap();
        assert_eq!(m.committed(), 4 * PAGE);
        let rest_of_page_3 = read(&m, big_range.start(), PAGE - 64);
        assert!(rest_of_page_3.iter().all(|&b| b == INT3));
        assert_eq!(delta(before), (on_shared_page, 1), "{mode:?}: free");
        a.free(first).unwrap();
        assert!(m.audit().is_clean());
    }
}

#[test]
fn allocators_on_threads_share_one_manager() {
    let m = manager(
        100_000,
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
                        a.free(code).unwrap();
                    }
                }
                for (code, bytes) in live {
                    assert_eq!(read(&m, code.start(), bytes.len()), bytes);
                    a.free(code).unwrap();
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
    let audit = m.audit();
    assert!(audit.is_clean() && audit.mapped_pages == 0, "{audit:?}");
    assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
}

// ---------------------------------------------------------------------------------------------
// 14. The random run: 10^5 operations per protection mode against a shadow model
// ---------------------------------------------------------------------------------------------

/// What one committed page must hold: its protection and the bytes known so far (`None`: never
/// written by the manager since it was committed).
struct ShadowPage {
    executable: bool,
    bytes: Vec<Option<u8>>,
}

/// One module of the run: its allocator and the handles it gave out.
struct Module {
    config: AllocatorConfig,
    alloc: CodeAllocator<SoftMmu>,
    writable: Vec<WritableCode>,
    published: Vec<(PublishedCode, Vec<u8>)>,
    /// Ranges whose handle was dropped without discard: live until the allocator goes.
    leaked: Vec<AddressRange>,
}

/// Handles of dropped allocators, to try on the live ones.
enum Stale {
    Writable(WritableCode),
    Published(PublishedCode),
}

struct Run {
    mode: ProtectionMode,
    manager: CodeManager<SoftMmu>,
    modules: Vec<Module>,
    rng: Rng,
    /// Live ranges (allocated, published or leaked): start -> (end, module).
    live: BTreeMap<usize, (usize, usize)>,
    /// Live bytes per module.
    allocated: Vec<usize>,
    /// Committed pages as the model sees them.
    pages: BTreeMap<usize, ShadowPage>,
    stale: Vec<Stale>,
    /// State after the last successful check, which a failed operation must leave untouched.
    last: Option<Snapshot>,
    /// Pages the current operation touched, checked after it.
    touched: Vec<usize>,
    step: usize,
    counts: BTreeMap<&'static str, usize>,
}

const RUN_STEPS: usize = 100_000;
/// 16 MiB: a walk of the window visits few page tables, so auditing every step stays cheap.
const RUN_WINDOW: usize = 16 << 20;
const RUN_MAX_COMMITTED: usize = 128 * PAGE;
const RUN_MAX_SPACE: usize = 128 * PAGE;

impl Run {
    fn new(mode: ProtectionMode, seed: u64) -> Self {
        let manager = manager(
            100_000,
            window(RUN_WINDOW / PAGE),
            ManagerConfig {
                max_committed: RUN_MAX_COMMITTED,
                max_code_space_size: RUN_MAX_SPACE,
                protection: mode,
                ..ManagerConfig::default()
            },
        );
        let configs = [
            AllocatorConfig::default(),
            AllocatorConfig {
                overhead: 2 * PAGE,
                ..AllocatorConfig::default()
            },
            AllocatorConfig {
                growable: false,
                initial_reservation: 48 * PAGE,
                ..AllocatorConfig::default()
            },
        ];
        let modules = configs
            .into_iter()
            .map(|config| Module {
                config,
                alloc: CodeAllocator::new(&manager, config).unwrap(),
                writable: Vec::new(),
                published: Vec::new(),
                leaked: Vec::new(),
            })
            .collect();
        Run {
            mode,
            manager,
            modules,
            rng: Rng::new(seed),
            live: BTreeMap::new(),
            allocated: vec![0; 3],
            pages: BTreeMap::new(),
            stale: Vec::new(),
            last: None,
            touched: Vec::new(),
            step: 0,
            counts: BTreeMap::new(),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn allocators(&self) -> Vec<&CodeAllocator<SoftMmu>> {
        self.modules.iter().map(|m| &m.alloc).collect()
    }

    // ---- operations ----

    fn step(&mut self) {
        self.step += 1;
        let mi = self.rng.below(self.modules.len());
        match self.rng.below(1000) {
            0..=399 => self.allocate(mi),
            400..=649 => self.publish(mi),
            650..=869 => self.free(mi),
            870..=949 => self.discard(mi),
            950..=969 => self.over_limit(mi),
            970..=989 => self.foreign(mi),
            990..=998 => self.leak(mi),
            _ => self.recreate(mi),
        }
        self.check();
    }

    fn allocate(&mut self, mi: usize) {
        let size = self.rng.code_size();
        match self.modules[mi].alloc.allocate(size) {
            Ok(mut w) => {
                self.count("allocate");
                let range = w.range();
                assert_eq!(range.size(), size.next_multiple_of(CODE_ALIGNMENT));
                assert_eq!(range.start() % CODE_ALIGNMENT, 0);
                let alloc = &self.modules[mi].alloc;
                assert!(
                    alloc.code_spaces().iter().any(|s| s.contains_range(&range)),
                    "{range:?} outside module {mi}'s spaces"
                );
                self.add_live(range, mi);
                self.rng.fill(w.as_mut_slice());
                self.modules[mi].writable.push(w);
            }
            Err(e) => {
                self.count("allocate failed");
                assert!(
                    matches!(e, CodeError::CommitLimit { .. } | CodeError::NotGrowable),
                    "step {}: {e:?}",
                    self.step
                );
                if let CodeError::CommitLimit { requested, .. } = e {
                    assert!(requested > self.manager.remaining_uncommitted());
                }
                self.assert_unchanged();
            }
        }
    }

    /// Asks for more than can be committed, or more than a code space may hold.
    fn over_limit(&mut self, mi: usize) {
        let remaining = self.manager.remaining_uncommitted();
        let size = match self.rng.below(3) {
            0 => remaining + 1 + self.rng.below(2 * PAGE),
            1 => RUN_MAX_SPACE + 1,
            _ => RUN_MAX_COMMITTED,
        };
        match self.modules[mi].alloc.allocate(size) {
            Ok(w) => {
                // Possible only when it fits in free, already committed room (rare).
                self.count("over_limit fit");
                self.add_live(w.range(), mi);
                self.modules[mi].writable.push(w);
            }
            Err(e) => {
                self.count("over_limit");
                assert!(
                    matches!(
                        e,
                        CodeError::CommitLimit { .. }
                            | CodeError::NotGrowable
                            | CodeError::CodeSpaceTooLarge { .. }
                    ),
                    "step {}: {e:?}",
                    self.step
                );
                self.assert_unchanged();
            }
        }
    }

    fn publish(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.writable.is_empty() {
            return;
        }
        let i = self.rng.below(module.writable.len());
        let w = module.writable.swap_remove(i);
        let bytes = w.as_slice().to_vec();
        let range = w.range();
        let code = module.alloc.publish(w).expect("publish");
        assert_eq!(code.range(), range);
        assert_eq!(code.len(), bytes.len());
        // Model: the bytes, INT3 padding, and every page of the range executable.
        for page in range.pages() {
            let shadow = self.pages.get_mut(&page).unwrap();
            shadow.executable = true;
            let part = range.overlap(&AddressRange::new(page, page + PAGE));
            for addr in part.start()..part.end() {
                let value = bytes.get(addr - range.start()).copied().unwrap_or(INT3);
                shadow.bytes[addr - page] = Some(value);
            }
        }
        module.published.push((code, bytes));
        self.touched.extend(range.pages());
        self.count("publish");
    }

    fn free(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.published.is_empty() {
            return;
        }
        let i = self.rng.below(module.published.len());
        let (code, _) = module.published.swap_remove(i);
        let range = code.range();
        module.alloc.free(code).expect("free");
        self.remove_live(range);
        self.count("free");
    }

    fn discard(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.writable.is_empty() {
            return;
        }
        let i = self.rng.below(module.writable.len());
        let w = module.writable.swap_remove(i);
        let range = w.range();
        module.alloc.discard(w).expect("discard");
        self.remove_live(range);
        self.count("discard");
    }

    /// Hands a handle to an allocator that does not own it, then gives it back.
    fn foreign(&mut self, mi: usize) {
        let other = (mi + 1 + self.rng.below(self.modules.len() - 1)) % self.modules.len();
        if let Some(stale) = self.stale.pop() {
            let target = &mut self.modules[other].alloc;
            let error = match stale {
                Stale::Writable(w) => target.publish(w).map(drop).unwrap_err().error,
                Stale::Published(p) => target.free(p).unwrap_err().error,
            };
            assert_eq!(error, CodeError::ForeignCode);
            self.count("foreign stale");
        } else if self.rng.below(2) == 0 && !self.modules[mi].writable.is_empty() {
            let w = self.modules[mi].writable.pop().unwrap();
            let (range, bytes) = (w.range(), w.as_slice().to_vec());
            let rejected = if self.rng.below(2) == 0 {
                self.modules[other].alloc.publish(w).map(drop).unwrap_err()
            } else {
                self.modules[other].alloc.discard(w).unwrap_err()
            };
            assert_eq!(rejected.error, CodeError::ForeignCode);
            assert_eq!(
                (rejected.code.range(), rejected.code.as_slice()),
                (range, &bytes[..])
            );
            self.modules[mi].writable.push(rejected.code);
            self.count("foreign writable");
        } else if let Some((p, bytes)) = self.modules[mi].published.pop() {
            let rejected = self.modules[other].alloc.free(p).unwrap_err();
            assert_eq!(rejected.error, CodeError::ForeignCode);
            self.modules[mi].published.push((rejected.code, bytes));
            self.count("foreign published");
        }
        self.assert_unchanged();
    }

    /// Drops a writable handle without discarding it: the range stays allocated.
    fn leak(&mut self, mi: usize) {
        if let Some(w) = self.modules[mi].writable.pop() {
            self.modules[mi].leaked.push(w.range());
            self.count("leak");
        }
    }

    /// Drops module `mi`'s allocator and makes a new one with the same configuration.
    fn recreate(&mut self, mi: usize) {
        let config = self.modules[mi].config;
        let fresh = Module {
            config,
            alloc: CodeAllocator::new(&self.manager, config).unwrap(),
            writable: Vec::new(),
            published: Vec::new(),
            leaked: Vec::new(),
        };
        let old = std::mem::replace(&mut self.modules[mi], fresh);
        let spaces = old.alloc.code_spaces().to_vec();
        let mut ranges: Vec<AddressRange> = old.leaked.clone();
        ranges.extend(old.writable.iter().map(WritableCode::range));
        ranges.extend(old.published.iter().map(|(p, _)| p.range()));
        // Keep a few handles to try on live allocators later.
        let Module {
            alloc,
            mut writable,
            mut published,
            ..
        } = old;
        drop(alloc);
        if let Some(w) = writable.pop() {
            self.stale.push(Stale::Writable(w));
        }
        if let Some((p, _)) = published.pop() {
            self.stale.push(Stale::Published(p));
        }
        for r in &ranges {
            assert_eq!(self.live.remove(&r.start()), Some((r.end(), mi)));
            self.allocated[mi] -= r.size();
        }
        assert_eq!(self.allocated[mi], 0);
        assert!(
            self.live.values().all(|&(_, m)| m != mi),
            "every live range of the dropped module was accounted for"
        );
        for space in spaces {
            self.touched.extend(space.pages());
            let dead: Vec<usize> = self
                .pages
                .range(space.start()..space.end())
                .map(|(&p, _)| p)
                .collect();
            for p in dead {
                self.pages.remove(&p);
            }
        }
        // The fresh allocator of a fixed module reserved its space already.
        self.count("recreate");
    }

    // ---- the model ----

    fn add_live(&mut self, range: AddressRange, mi: usize) {
        if let Some((&s, &(e, _))) = self.live.range(..range.end()).next_back() {
            assert!(
                e <= range.start(),
                "step {}: {range:?} overlaps [{s:#x}, {e:#x})",
                self.step
            );
        }
        self.live.insert(range.start(), (range.end(), mi));
        self.touched.extend(range.pages());
        self.allocated[mi] += range.size();
        for page in range.pages() {
            self.pages.entry(page).or_insert_with(|| ShadowPage {
                executable: false,
                bytes: vec![None; PAGE],
            });
        }
    }

    /// Whether some live range touches `page`.
    fn page_in_use(&self, page: usize) -> bool {
        let page_end = page + PAGE;
        self.live
            .range(..page_end)
            .next_back()
            .is_some_and(|(_, &(end, _))| end > page)
    }

    /// V8's rule as the model states it: a page dies when no live code touches it; freed bytes
    /// on pages that live on become INT3.
    fn remove_live(&mut self, range: AddressRange) {
        let (end, mi) = self.live.remove(&range.start()).expect("live");
        self.touched.extend(range.pages());
        assert_eq!(end, range.end());
        self.allocated[mi] -= range.size();
        for page in range.pages() {
            if self.page_in_use(page) {
                let shadow = self.pages.get_mut(&page).unwrap();
                let part = range.overlap(&AddressRange::new(page, page + PAGE));
                for addr in part.start()..part.end() {
                    shadow.bytes[addr - page] = Some(INT3);
                }
            } else {
                self.pages.remove(&page);
            }
        }
    }

    // ---- checks ----

    /// A failed operation: counters, audit and every committed page's entry are as before.
    fn assert_unchanged(&self) {
        let now = counters(&self.manager, &self.allocators());
        assert_eq!(
            Some(&now),
            self.last.as_ref(),
            "step {}: a failed op changed state",
            self.step
        );
        self.verify_pages(self.pages.keys().copied());
    }

    /// Each page is mapped with the protection the model expects, or unmapped if the model has
    /// no such page.
    fn verify_pages(&self, pages: impl IntoIterator<Item = usize>) {
        for page in pages {
            let entry = leaf(&self.manager, page).unwrap_or(0);
            let expected = match self.pages.get(&page) {
                Some(shadow) if shadow.executable => R_X,
                Some(_) => RW_NX,
                None => 0,
            };
            let step = self.step;
            assert_eq!(
                entry & !PTE_ADDR_MASK,
                expected,
                "step {step} page {page:#x}"
            );
        }
    }

    /// After every operation: the audit is clean and counts exactly the pages live code touches,
    /// the pages the operation touched have the expected entries, and the counters agree. Every
    /// 100 steps all committed pages are compared with the model, every 2000 all their bytes.
    fn check(&mut self) {
        let snap = counters(&self.manager, &self.allocators());
        let audit = snap.audit;
        let step = self.step;
        assert!(audit.is_clean(), "step {step} ({:?}): {audit:?}", self.mode);
        assert_eq!(audit.mapped_pages * PAGE, snap.manager.committed);
        assert_eq!(audit.mapped_pages, self.pages.len(), "step {step}");
        let touched = std::mem::take(&mut self.touched);
        self.verify_pages(touched);
        if step.is_multiple_of(100) {
            self.verify_pages(self.pages.keys().copied());
        }
        assert!(snap.manager.committed <= RUN_MAX_COMMITTED);
        let reserved: usize = snap.allocators.iter().map(|s| s.reserved).sum();
        let spaces: usize = snap.allocators.iter().map(|s| s.code_spaces).sum();
        assert_eq!(snap.manager.reserved, reserved);
        assert_eq!(snap.manager.code_spaces, spaces);
        for (mi, stats) in snap.allocators.iter().enumerate() {
            assert_eq!(
                stats.allocated, self.allocated[mi],
                "step {step} module {mi}"
            );
        }
        self.last = Some(snap);
        if step.is_multiple_of(2_000) {
            self.check_bytes();
        }
    }

    /// Every byte the model knows reads back through the MMU, and live ranges are disjoint and
    /// inside their module's code spaces.
    fn check_bytes(&self) {
        let mut buf = vec![0; PAGE];
        for (&page, shadow) in &self.pages {
            self.manager
                .with_mmu(|mmu| mmu.read(page, &mut buf))
                .unwrap();
            for (offset, (&got, want)) in buf.iter().zip(&shadow.bytes).enumerate() {
                if let Some(want) = *want {
                    assert_eq!(got, want, "step {} at {:#x}", self.step, page + offset);
                }
            }
        }
        for module in &self.modules {
            for (code, bytes) in &module.published {
                let back = read(&self.manager, code.start(), bytes.len());
                assert_eq!(&back, bytes, "step {}: {:?}", self.step, code.range());
            }
        }
        let mut prev_end = 0;
        for (&start, &(end, mi)) in &self.live {
            assert!(prev_end <= start, "live ranges overlap at {start:#x}");
            let range = AddressRange::new(start, end);
            let spaces = self.modules[mi].alloc.code_spaces();
            assert!(spaces.iter().any(|s| s.contains_range(&range)));
            prev_end = end;
        }
    }
}

fn random_run(mode: ProtectionMode, seed: u64) {
    let started = Instant::now();
    let mut run = Run::new(mode, seed);
    run.check();
    for _ in 0..RUN_STEPS {
        run.step();
    }
    run.check_bytes();
    assert!(
        !run.manager.with_mmu(|mmu| mmu.wx_ever_observed()),
        "{mode:?}"
    );
    for what in [
        "allocate",
        "allocate failed",
        "publish",
        "free",
        "discard",
        "over_limit",
        "recreate",
    ] {
        assert!(
            run.counts.get(what).copied().unwrap_or(0) > 0,
            "{mode:?}: no {what}"
        );
    }
    // Dropping every allocator gives everything back.
    let Run {
        manager,
        modules,
        counts,
        ..
    } = run;
    drop(modules);
    assert_eq!(manager.committed(), 0);
    assert_eq!(manager.audit().mapped_pages, 0);
    assert_eq!(manager.stats().window_free, RUN_WINDOW - ALIAS_PAGES * PAGE);
    eprintln!(
        "{mode:?}: {RUN_STEPS} steps in {:?}: {counts:?}",
        started.elapsed()
    );
}

#[test]
fn random_run_flip() {
    random_run(ProtectionMode::Flip, 0x5EED_0001);
}

#[test]
fn random_run_alias() {
    random_run(ProtectionMode::Alias, 0x5EED_0002);
}
