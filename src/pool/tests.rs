use super::*;
use alloc::string::ToString;
use alloc::vec;
use proptest::prelude::*;

fn r(start: usize, end: usize) -> AddressRange {
    AddressRange::new(start, end)
}

fn ranges(pool: &DisjointAllocationPool) -> Vec<AddressRange> {
    pool.ranges().collect()
}

fn pool_of(rs: &[(usize, usize)]) -> DisjointAllocationPool {
    let mut pool = DisjointAllocationPool::new();
    for &(s, e) in rs {
        pool.merge(r(s, e)).unwrap();
    }
    check_invariants(&pool);
    pool
}

/// Checks the treap and the counters against each other; returns the tree height.
fn check_invariants(pool: &DisjointAllocationPool) -> usize {
    // Returns (count, sum, max, height) of subtree `t`, checking heap order and maxima.
    fn walk(
        pool: &DisjointAllocationPool,
        t: u32,
        out: &mut Vec<AddressRange>,
    ) -> (usize, usize, usize, usize) {
        if t == NIL {
            return (0, 0, 0, 0);
        }
        let n = pool.node(t);
        for child in [n.left, n.right] {
            if child != NIL {
                assert!(pool.node(child).prio <= n.prio, "heap order");
            }
        }
        let (lc, ls, lm, lh) = walk(pool, n.left, out);
        out.push(n.range);
        let (rc, rs, rm, rh) = walk(pool, n.right, out);
        let max = n.range.size().max(lm).max(rm);
        assert_eq!(n.max, max, "subtree maximum of {:?}", n.range);
        (lc + 1 + rc, ls + n.range.size() + rs, max, 1 + lh.max(rh))
    }
    let mut in_order = Vec::new();
    let (count, sum, _, height) = walk(pool, pool.root, &mut in_order);
    assert_eq!(count, pool.len());
    assert_eq!(sum, pool.total_size());
    assert_eq!(pool.is_empty(), count == 0);
    assert_eq!(in_order, ranges(pool));
    assert_eq!(pool.ranges().len(), count);
    for range in &in_order {
        assert!(!range.is_empty(), "empty free range");
    }
    for w in in_order.windows(2) {
        assert!(
            w[0].end() < w[1].start(),
            "unsorted, overlapping or adjacent: {w:?}"
        );
    }
    // Every arena slot is either in the tree or on the free list.
    let mut free_slots = 0;
    let mut s = pool.free_slot;
    while s != NIL {
        free_slots += 1;
        s = pool.node(s).left;
    }
    assert_eq!(count + free_slots, pool.nodes.len());
    height
}

// ---- Construction ----

#[test]
fn construct_empty() {
    let pool = DisjointAllocationPool::new();
    assert!(pool.is_empty());
    assert_eq!(pool.len(), 0);
    assert_eq!(pool.total_size(), 0);
    assert_eq!(pool.largest(), None);
    assert_eq!(ranges(&pool), []);
    assert!(DisjointAllocationPool::default().is_empty());
    check_invariants(&pool);
}

#[test]
fn construct_with_range() {
    let pool = DisjointAllocationPool::from_range(r(100, 200));
    assert_eq!(ranges(&pool), [r(100, 200)]);
    assert_eq!(pool.total_size(), 100);
    assert_eq!(pool.largest(), Some(r(100, 200)));
    check_invariants(&pool);
}

#[test]
fn construct_with_empty_range_is_empty() {
    let pool = DisjointAllocationPool::from_range(r(100, 100));
    assert!(pool.is_empty());
    check_invariants(&pool);
}

// ---- Merge ----

#[test]
fn merge_into_empty_pool() {
    let mut pool = DisjointAllocationPool::new();
    assert_eq!(pool.merge(r(10, 20)), Ok(r(10, 20)));
    assert_eq!(ranges(&pool), [r(10, 20)]);
    assert_eq!(pool.len(), 1);
    assert_eq!(pool.total_size(), 10);
    check_invariants(&pool);
}

#[test]
fn merge_coalesces_left() {
    let mut pool = pool_of(&[(10, 20), (40, 50)]);
    assert_eq!(pool.merge(r(20, 30)), Ok(r(10, 30)));
    assert_eq!(ranges(&pool), [r(10, 30), r(40, 50)]);
    assert_eq!(pool.total_size(), 30);
    check_invariants(&pool);
}

#[test]
fn merge_coalesces_right() {
    let mut pool = pool_of(&[(10, 20), (40, 50)]);
    assert_eq!(pool.merge(r(30, 40)), Ok(r(30, 50)));
    assert_eq!(ranges(&pool), [r(10, 20), r(30, 50)]);
    check_invariants(&pool);
}

#[test]
fn merge_coalesces_both() {
    let mut pool = pool_of(&[(10, 20), (30, 40), (50, 60)]);
    assert_eq!(pool.merge(r(20, 30)), Ok(r(10, 40)));
    assert_eq!(ranges(&pool), [r(10, 40), r(50, 60)]);
    assert_eq!(pool.len(), 2);
    assert_eq!(pool.total_size(), 40);
    assert_eq!(pool.merge(r(40, 50)), Ok(r(10, 60)));
    assert_eq!(ranges(&pool), [r(10, 60)]);
    check_invariants(&pool);
}

#[test]
fn merge_with_gaps_does_not_coalesce() {
    // V8's MergingSkipLargerSrcWithGap: neighbours that do not touch stay separate.
    let mut pool = pool_of(&[(10, 15), (30, 40)]);
    assert_eq!(pool.merge(r(20, 25)), Ok(r(20, 25)));
    assert_eq!(pool.merge(r(0, 5)), Ok(r(0, 5)));
    assert_eq!(pool.merge(r(45, 50)), Ok(r(45, 50)));
    assert_eq!(
        ranges(&pool),
        [r(0, 5), r(10, 15), r(20, 25), r(30, 40), r(45, 50)]
    );
    check_invariants(&pool);
}

#[test]
fn merge_overlap_leaves_pool_unchanged() {
    let mut pool = pool_of(&[(10, 20), (30, 40)]);
    let before = ranges(&pool);
    for (bad, existing) in [
        (r(15, 25), r(10, 20)),
        (r(5, 12), r(10, 20)),
        (r(25, 35), r(30, 40)),
        (r(0, 100), r(10, 20)),
        (r(12, 18), r(10, 20)),
        (r(10, 20), r(10, 20)),
        (r(39, 41), r(30, 40)),
    ] {
        assert_eq!(
            pool.merge(bad),
            Err(PoolError::Overlap {
                range: bad,
                existing
            })
        );
        assert_eq!(ranges(&pool), before);
        assert_eq!(pool.total_size(), 20);
        check_invariants(&pool);
    }
}

#[test]
fn merge_empty_range_is_error() {
    let mut pool = pool_of(&[(10, 20)]);
    assert_eq!(pool.merge(r(5, 5)), Err(PoolError::EmptyRange));
    assert_eq!(pool.merge(r(15, 15)), Err(PoolError::EmptyRange));
    assert_eq!(ranges(&pool), [r(10, 20)]);
}

#[test]
fn error_display() {
    let e = PoolError::Overlap {
        range: r(0x10, 0x20),
        existing: r(0x18, 0x30),
    };
    assert_eq!(
        e.to_string(),
        "range [0x10, 0x20) overlaps free range [0x18, 0x30)"
    );
    assert_eq!(
        PoolError::EmptyRange.to_string(),
        "cannot merge an empty range"
    );
}

// ---- Allocate ----

#[test]
fn allocate_splits() {
    // V8's SimpleExtract.
    let mut pool = pool_of(&[(1, 101)]);
    assert_eq!(pool.allocate(50), Some(r(1, 51)));
    assert_eq!(ranges(&pool), [r(51, 101)]);
    assert_eq!(pool.total_size(), 50);
    check_invariants(&pool);
    // Giving it back restores the original range.
    assert_eq!(pool.merge(r(1, 51)), Ok(r(1, 101)));
    assert_eq!(ranges(&pool), [r(1, 101)]);
}

#[test]
fn allocate_exact_fit_removes_range() {
    // V8's ExtractAll.
    let mut pool = pool_of(&[(1, 101)]);
    assert_eq!(pool.allocate(100), Some(r(1, 101)));
    assert!(pool.is_empty());
    assert_eq!(pool.total_size(), 0);
    check_invariants(&pool);
}

#[test]
fn allocate_too_big_changes_nothing() {
    // V8's FailToExtract and FailToExtractExact.
    let mut pool = pool_of(&[(1, 101), (200, 250)]);
    assert_eq!(pool.allocate(101), None);
    assert_eq!(pool.allocate(usize::MAX), None);
    assert_eq!(ranges(&pool), [r(1, 101), r(200, 250)]);
    assert_eq!(pool.total_size(), 150);
    check_invariants(&pool);
}

#[test]
fn allocate_zero_is_none() {
    let mut pool = pool_of(&[(1, 101)]);
    assert_eq!(pool.allocate(0), None);
    assert_eq!(pool.allocate_in_region(0, r(0, 200)), None);
    assert_eq!(ranges(&pool), [r(1, 101)]);
}

#[test]
fn allocate_is_first_fit_at_lowest_address() {
    let mut pool = pool_of(&[(0, 10), (20, 50), (60, 70), (100, 200)]);
    assert_eq!(pool.allocate(10), Some(r(0, 10)));
    assert_eq!(pool.allocate(20), Some(r(20, 40)));
    assert_eq!(pool.allocate(20), Some(r(100, 120)));
    assert_eq!(pool.allocate(10), Some(r(40, 50)));
    assert_eq!(ranges(&pool), [r(60, 70), r(120, 200)]);
    check_invariants(&pool);
}

#[test]
fn largest_prefers_lowest_address_on_ties() {
    let pool = pool_of(&[(0, 10), (20, 50), (60, 70), (100, 130), (140, 141)]);
    assert_eq!(pool.largest(), Some(r(20, 50)));
}

#[test]
fn contains_free_addresses_only() {
    let pool = pool_of(&[(10, 20), (30, 40)]);
    for (addr, free) in [
        (9, false),
        (10, true),
        (19, true),
        (20, false),
        (35, true),
        (40, false),
    ] {
        assert_eq!(pool.contains(addr), free, "{addr}");
    }
    assert!(!pool.contains(usize::MAX));
}

// ---- Allocate in region ----

#[test]
fn allocate_in_region_front_split() {
    // The result sits at the end of the free range; its front stays free.
    let mut pool = pool_of(&[(0, 100)]);
    assert_eq!(pool.allocate_in_region(20, r(80, 200)), Some(r(80, 100)));
    assert_eq!(ranges(&pool), [r(0, 80)]);
    check_invariants(&pool);
}

#[test]
fn allocate_in_region_back_split() {
    // The result sits at the start of the free range; its back stays free.
    let mut pool = pool_of(&[(50, 100)]);
    assert_eq!(pool.allocate_in_region(20, r(0, 200)), Some(r(50, 70)));
    assert_eq!(ranges(&pool), [r(70, 100)]);
    check_invariants(&pool);
}

#[test]
fn allocate_in_region_both_sides_split() {
    let mut pool = pool_of(&[(0, 100)]);
    assert_eq!(pool.allocate_in_region(10, r(40, 60)), Some(r(40, 50)));
    assert_eq!(ranges(&pool), [r(0, 40), r(50, 100)]);
    assert_eq!(pool.len(), 2);
    assert_eq!(pool.total_size(), 90);
    check_invariants(&pool);
}

#[test]
fn allocate_in_region_exact_removes_range() {
    let mut pool = pool_of(&[(0, 10), (20, 30), (40, 50)]);
    assert_eq!(pool.allocate_in_region(10, r(15, 35)), Some(r(20, 30)));
    assert_eq!(ranges(&pool), [r(0, 10), r(40, 50)]);
    check_invariants(&pool);
}

#[test]
fn allocate_in_region_straddling_two_ranges_takes_second() {
    // The region meets [0, 100) in [90, 100) (too small) and [120, 200) in [120, 150).
    let mut pool = pool_of(&[(0, 100), (120, 200)]);
    assert_eq!(pool.allocate_in_region(20, r(90, 150)), Some(r(120, 140)));
    assert_eq!(ranges(&pool), [r(0, 100), r(140, 200)]);
    check_invariants(&pool);
}

#[test]
fn allocate_in_region_prefers_inside_range_over_end_straddler() {
    // Address order: [10, 12) is too small, [20, 40) is inside and fits, [60, 100) too.
    let mut pool = pool_of(&[(0, 12), (20, 40), (60, 100)]);
    assert_eq!(pool.allocate_in_region(15, r(10, 80)), Some(r(20, 35)));
    assert_eq!(pool.allocate_in_region(15, r(10, 80)), Some(r(60, 75)));
    assert_eq!(ranges(&pool), [r(0, 12), r(35, 40), r(75, 100)]);
    check_invariants(&pool);
}

#[test]
fn aligned_allocation_finds_the_lowest_aligned_fit() {
    // Free: [0x1040, 0x1100) too small once aligned to 0x100... and [0x2040, 0x4000).
    let mut p = pool_of(&[(0x1040, 0x1100), (0x2040, 0x4000)]);
    let got = p.allocate_aligned_in_region(0x100, 0x1000, r(0, 0x10000));
    assert_eq!(got, Some(r(0x3000, 0x3100)));
    assert_eq!(
        ranges(&p),
        vec![r(0x1040, 0x1100), r(0x2040, 0x3000), r(0x3100, 0x4000)]
    );
    // Region clipping: inside [0x2000, 0x3000) only 64-byte alignment can fit.
    assert_eq!(
        p.allocate_aligned_in_region(0x100, 0x1000, r(0x2000, 0x3000)),
        None
    );
    assert_eq!(
        p.allocate_aligned_in_region(0x40, 0x40, r(0x2003, 0x3000)),
        Some(r(0x2040, 0x2080))
    );
    assert_eq!(
        p.allocate_aligned_in_region(0x40, 3, r(0, 0x10000)),
        None,
        "not a power of two"
    );
    check_invariants(&p);
}

#[test]
fn allocate_in_region_no_fit_changes_nothing() {
    let mut pool = pool_of(&[(0, 100), (120, 200)]);
    let before = ranges(&pool);
    assert_eq!(pool.allocate_in_region(30, r(90, 140)), None);
    assert_eq!(pool.allocate_in_region(10, r(100, 120)), None);
    assert_eq!(pool.allocate_in_region(10, r(300, 400)), None);
    assert_eq!(pool.allocate_in_region(50, r(0, 40)), None);
    assert_eq!(pool.allocate_in_region(1, r(50, 50)), None);
    assert_eq!(ranges(&pool), before);
    check_invariants(&pool);
}

#[test]
fn top_of_address_space_does_not_overflow() {
    let top = r(usize::MAX - 100, usize::MAX);
    let mut pool = DisjointAllocationPool::from_range(top);
    assert_eq!(
        pool.allocate_in_region(10, r(usize::MAX - 5, usize::MAX)),
        None
    );
    assert_eq!(
        pool.allocate_in_region(5, r(usize::MAX - 5, usize::MAX)),
        Some(r(usize::MAX - 5, usize::MAX))
    );
    assert_eq!(pool.allocate(95), Some(r(usize::MAX - 100, usize::MAX - 5)));
    assert!(pool.is_empty());
    assert_eq!(pool.merge(top), Ok(top));
    assert_eq!(pool.merge(r(0, usize::MAX - 100)), Ok(r(0, usize::MAX)));
    assert_eq!(pool.total_size(), usize::MAX);
    assert_eq!(pool.allocate(usize::MAX), Some(r(0, usize::MAX)));
    check_invariants(&pool);
}

#[test]
fn height_stays_logarithmic_for_sorted_input() {
    // Ascending and descending insertions are the worst case for an unbalanced tree.
    let mut pool = DisjointAllocationPool::new();
    for i in 0..10_000 {
        pool.merge(r(i * 4, i * 4 + 2)).unwrap();
    }
    for i in (10_000..20_000).rev() {
        pool.merge(r(i * 4, i * 4 + 2)).unwrap();
    }
    let height = check_invariants(&pool);
    assert!(height < 60, "height {height} for {} nodes", pool.len());
    // Slots freed by coalescing are reused rather than growing the arena.
    let slots = pool.nodes.len();
    for i in 0..20_000 {
        pool.merge(r(i * 4 + 2, i * 4 + 4)).unwrap();
    }
    assert_eq!(ranges(&pool), [r(0, 80_000)]);
    for i in 0..1000 {
        pool.allocate_in_region(1, r(i * 8, i * 8 + 4)).unwrap();
    }
    assert_eq!(pool.nodes.len(), slots);
    check_invariants(&pool);
}

#[test]
fn clone_is_independent() {
    let mut a = pool_of(&[(0, 100)]);
    let b = a.clone();
    a.allocate(10).unwrap();
    assert_eq!(ranges(&b), [r(0, 100)]);
    assert_eq!(ranges(&a), [r(10, 100)]);
    assert_eq!(
        alloc::format!("{b:?}"),
        "DisjointAllocationPool [[0x0, 0x64)]"
    );
}

// ---- Property tests against a linear model (a transcription of V8's code) ----

/// Sorted, disjoint, coalesced free ranges, searched linearly as V8 does.
#[derive(Default)]
struct Model {
    ranges: Vec<AddressRange>,
}

impl Model {
    fn merge(&mut self, range: AddressRange) -> Result<AddressRange, PoolError> {
        if range.is_empty() {
            return Err(PoolError::EmptyRange);
        }
        if let Some(&existing) = self.ranges.iter().find(|f| !f.overlap(&range).is_empty()) {
            return Err(PoolError::Overlap { range, existing });
        }
        let i = self.ranges.partition_point(|f| f.start() < range.start());
        let mut merged = range;
        if i < self.ranges.len() && self.ranges[i].start() == range.end() {
            merged = r(merged.start(), self.ranges.remove(i).end());
        }
        if i > 0 && self.ranges[i - 1].end() == range.start() {
            merged = r(self.ranges.remove(i - 1).start(), merged.end());
            self.ranges.insert(i - 1, merged);
        } else {
            self.ranges.insert(i, merged);
        }
        Ok(merged)
    }

    fn allocate_in_region(&mut self, size: usize, region: AddressRange) -> Option<AddressRange> {
        if size == 0 {
            return None;
        }
        for i in 0..self.ranges.len() {
            let old = self.ranges[i];
            let overlap = old.overlap(&region);
            if overlap.size() < size {
                continue;
            }
            let ret = AddressRange::from_start_size(overlap.start(), size).unwrap();
            self.ranges.remove(i);
            let pieces = [r(old.start(), ret.start()), r(ret.end(), old.end())];
            for piece in pieces.into_iter().rev().filter(|p| !p.is_empty()) {
                self.ranges.insert(i, piece);
            }
            return Some(ret);
        }
        None
    }

    fn allocate(&mut self, size: usize) -> Option<AddressRange> {
        self.allocate_in_region(size, r(0, usize::MAX))
    }

    fn largest(&self) -> Option<AddressRange> {
        // `max_by_key` keeps the last maximum; scan in reverse so ties pick the lowest.
        self.ranges
            .iter()
            .rev()
            .copied()
            .max_by_key(AddressRange::size)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Merge(usize, usize),
    Allocate(usize),
    AllocateInRegion(usize, usize, usize),
    Contains(usize),
}

fn op() -> impl Strategy<Value = Op> {
    // Small addresses and sizes so that ranges collide, touch and coalesce often.
    prop_oneof![
        4 => (0usize..256, 0usize..24).prop_map(|(s, n)| Op::Merge(s, n)),
        2 => (0usize..40).prop_map(Op::Allocate),
        2 => (0usize..24, 0usize..256, 0usize..64)
            .prop_map(|(n, s, len)| Op::AllocateInRegion(n, s, len)),
        1 => (0usize..280).prop_map(Op::Contains),
    ]
}

fn run_against_model(base: usize, ops: &[Op]) {
    let mut pool = DisjointAllocationPool::new();
    let mut model = Model::default();
    // Offsets from `base`, saturating so that tests near the top of the address space stay
    // valid ranges.
    let at = |x: usize| base.saturating_add(x);
    for op in ops {
        match *op {
            Op::Merge(s, n) => {
                let range = r(at(s), at(s + n));
                assert_eq!(pool.merge(range), model.merge(range), "{op:?}");
            }
            Op::Allocate(n) => assert_eq!(pool.allocate(n), model.allocate(n), "{op:?}"),
            Op::AllocateInRegion(n, s, len) => {
                let region = r(at(s), at(s + len));
                assert_eq!(
                    pool.allocate_in_region(n, region),
                    model.allocate_in_region(n, region),
                    "{op:?}"
                );
            }
            Op::Contains(a) => {
                let expected = model.ranges.iter().any(|f| f.contains(at(a)));
                assert_eq!(pool.contains(at(a)), expected, "{op:?}");
            }
        }
        check_invariants(&pool);
        assert_eq!(ranges(&pool), model.ranges, "after {op:?}");
        assert_eq!(pool.len(), model.ranges.len());
        assert_eq!(
            pool.total_size(),
            model.ranges.iter().map(|f| f.size()).sum::<usize>()
        );
        assert_eq!(pool.largest(), model.largest());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn matches_model(
        top in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        // Either low addresses or the very top of the address space (overflow edges).
        let base = if top { usize::MAX - 256 } else { 0 };
        run_against_model(base, &ops);
    }
}

#[test]
fn model_agrees_on_v8_example() {
    // Sanity check of the model itself on a hand-worked case.
    let mut model = Model::default();
    model.merge(r(0, 100)).unwrap();
    assert_eq!(model.allocate_in_region(10, r(40, 60)), Some(r(40, 50)));
    assert_eq!(model.ranges, vec![r(0, 40), r(50, 100)]);
    run_against_model(
        0,
        &[
            Op::Merge(0, 20),
            Op::AllocateInRegion(5, 5, 20),
            Op::Allocate(3),
        ],
    );
}
