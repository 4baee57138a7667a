//! First fit with a fragmented free list: `DisjointAllocationPool` (O(log n) augmented treap)
//! against `linked_list_allocator::Heap` (linear walk of the hole list).
//!
//! Both hold `n` small free fragments followed by one large free range, and the benchmarked
//! request only fits the large one, so a linear first fit walks all `n` fragments. Each iteration
//! allocates and frees that block, which leaves the free list as it was.

use core::alloc::Layout;
use core::mem::MaybeUninit;
use std::hint::black_box;
use std::time::Duration;

use codespace::pool::DisjointAllocationPool;
use codespace::AddressRange;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use linked_list_allocator::Heap;

/// Size of each small fragment, and of each hole between two fragments.
const FRAGMENT: usize = 64;
/// Size of the large free range at the end.
const LARGE: usize = 64 * 1024;
/// The request: too big for any fragment, so only the large range fits.
const REQUEST: usize = 256;

const FRAGMENT_COUNTS: [usize; 3] = [1_000, 10_000, 100_000];

/// `n` fragments of `FRAGMENT` bytes at stride `2 * FRAGMENT`, then `LARGE` bytes.
fn fragmented_pool(n: usize) -> DisjointAllocationPool {
    let base = 0x1000_0000;
    let mut pool = DisjointAllocationPool::new();
    for i in 0..n {
        let start = base + i * 2 * FRAGMENT;
        pool.merge(AddressRange::new(start, start + FRAGMENT))
            .expect("fragments are disjoint");
    }
    let large = base + n * 2 * FRAGMENT;
    pool.merge(AddressRange::new(large, large + LARGE))
        .expect("large range is disjoint");
    assert_eq!(pool.len(), n + 1);
    pool
}

/// A heap whose hole list is `n` holes of `FRAGMENT` bytes separated by live blocks, then a
/// hole of at least `LARGE` bytes.
fn fragmented_heap(n: usize) -> Heap {
    let small = Layout::from_size_align(FRAGMENT, 8).unwrap();
    let large = Layout::from_size_align(LARGE, 8).unwrap();
    // Slack for aligning the heap bottom; the heap outlives the benchmark, so leak it.
    let memory = vec![MaybeUninit::<u8>::uninit(); 2 * n * FRAGMENT + LARGE + 64];
    let mut heap = Heap::from_slice(Box::leak(memory.into_boxed_slice()));
    // First fit from one initial hole hands out consecutive blocks.
    let blocks: Vec<_> = (0..2 * n)
        .map(|_| {
            heap.allocate_first_fit(small)
                .expect("heap sized for the blocks")
        })
        .collect();
    let tail = heap
        .allocate_first_fit(large)
        .expect("heap sized for the tail");
    for &block in blocks.iter().step_by(2) {
        // SAFETY: `block` came from `allocate_first_fit(small)` on this heap and is freed once.
        unsafe { heap.deallocate(block, small) };
    }
    // SAFETY: as above, for the large block.
    unsafe { heap.deallocate(tail, large) };
    heap
}

fn bench_first_fit(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    for n in FRAGMENT_COUNTS {
        let mut pool = fragmented_pool(n);
        group.bench_with_input(BenchmarkId::new("codespace", n), &n, |b, _| {
            b.iter(|| {
                let block = pool.allocate(black_box(REQUEST)).expect("large range fits");
                pool.merge(black_box(block))
                    .expect("block was just allocated")
            });
        });
        assert_eq!(pool.len(), n + 1, "the pool is restored every iteration");

        let mut heap = fragmented_heap(n);
        let request = Layout::from_size_align(REQUEST, 8).unwrap();
        let free_before = heap.free();
        group.bench_with_input(BenchmarkId::new("linked_list_allocator", n), &n, |b, _| {
            b.iter(|| {
                let block = heap
                    .allocate_first_fit(black_box(request))
                    .expect("large hole fits");
                // SAFETY: `block` was just allocated from `heap` with `request`.
                unsafe { heap.deallocate(black_box(block), request) };
            });
        });
        assert_eq!(
            heap.free(),
            free_before,
            "the heap is restored every iteration"
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    targets = bench_first_fit
}
criterion_main!(benches);
