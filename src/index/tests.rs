//! Host tests of the range index: a random model test against a `BTreeMap`, structural
//! invariants, reclamation, and readers on other threads.

use super::node::{Node, CAP};
use super::*;
use alloc::sync::Arc;
use std::boxed::Box;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::vec::Vec;

const LIVE: u64 = 0x11FE_11FE;
const DEAD: u64 = 0xDEAD_DEAD;

/// A stored range: poisoned when dropped, so a reader that sees a freed value notices.
pub(super) struct Probe {
    end: usize,
    id: u64,
    magic: AtomicU64,
}

impl HasRange for Probe {
    fn range_end(&self, _start: usize) -> usize {
        self.end
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.magic.store(DEAD, Ordering::SeqCst);
    }
}

pub(super) fn probe(end: usize, id: u64) -> Arc<Probe> {
    Arc::new(Probe {
        end,
        id,
        magic: AtomicU64::new(LIVE),
    })
}

pub(super) type Index = RangeIndex<Arc<Probe>>;

/// A domain of `cpus` CPUs, leaked (indexes keep a `&'static`).
pub(super) fn domain(cpus: usize) -> &'static GraceDomain {
    let d: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
    // SAFETY: the tests' CPUs are the indices they report for.
    unsafe { d.set_possible_cpus(cpus) };
    d
}

/// Lets every grace period taken so far end on a 1-CPU domain, and reclaims.
fn settle(index: &Index) {
    for _ in 0..3 {
        // SAFETY: the test thread holds nothing from a lookup.
        unsafe { index.grace().quiescent(0) };
        index.reclaim();
    }
}

/// `(start, end, id)` of the entry with the greatest start `<= key`, through the reader path.
pub(super) fn find(index: &Index, key: usize) -> Option<(usize, usize, u64)> {
    index.find(key, |s, p| {
        assert_eq!(
            p.magic.load(Ordering::SeqCst),
            LIVE,
            "reader saw a freed value"
        );
        (s, p.end, p.id)
    })
}

fn model_find(model: &BTreeMap<usize, (usize, u64)>, key: usize) -> Option<(usize, usize, u64)> {
    model
        .range(..=key)
        .next_back()
        .map(|(&s, &(e, id))| (s, e, id))
}

/// Checks the tree's shape: sorted keys, exact separators, fill bounds, levels, padding, no
/// fresh node left, node and entry counts. Returns the number of nodes.
fn check_node(node: *const Node, level: Option<u8>, keys: &mut Vec<usize>) -> usize {
    // SAFETY: the test holds the writer lock (through `Update`), so the tree is stable.
    let n = unsafe { &*node };
    assert!(!n.fresh, "fresh node published");
    if let Some(l) = level {
        assert_eq!(n.level, l, "all leaves at one depth");
    }
    assert!(n.len() <= CAP);
    assert!(n.len() >= 1, "empty node in the tree");
    assert!(
        n.keys[n.len()..].iter().all(|&k| k == usize::MAX),
        "padding"
    );
    assert!(n.keys[..n.len()].windows(2).all(|w| w[0] < w[1]), "sorted");
    if n.level == 0 {
        keys.extend_from_slice(&n.keys[..n.len()]);
        return 1;
    }
    let mut count = 1;
    for i in 0..n.len() {
        let child = n.slots[i].cast::<Node>();
        // SAFETY: as above.
        assert_eq!(n.keys[i], unsafe { (*child).min_key() }, "exact separator");
        count += check_node(child, Some(n.level - 1), keys);
    }
    count
}

fn check_invariants(index: &Index, model: &BTreeMap<usize, (usize, u64)>) {
    let update = index.update();
    let mut keys = Vec::new();
    let nodes = if update.w.draft.is_null() {
        0
    } else {
        check_node(update.w.draft, None, &mut keys)
    };
    assert_eq!(update.w.nodes, nodes);
    assert_eq!(update.memory().nodes, nodes * core::mem::size_of::<Node>());
    assert_eq!(keys, model.keys().copied().collect::<Vec<_>>());
    assert_eq!(index.root.load(Ordering::SeqCst), update.w.draft);
    assert_eq!(index.len(), model.len());
    drop(update);
}

/// Small deterministic generator.
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One random change inside `update`, mirrored in `model`.
fn random_change(
    rng: &mut Lcg,
    update: &mut Update<'_, Arc<Probe>>,
    model: &mut BTreeMap<usize, (usize, u64)>,
    space: usize,
    insert_bias: usize,
    next_id: &mut u64,
) {
    if rng.below(100) < insert_bias || model.is_empty() {
        let start = rng.below(space);
        let end = start + 1 + rng.below(6);
        let expected = model_find(model, end - 1)
            .filter(|&(_, e, _)| e > start)
            .map(|(s, _, _)| s);
        // The lowest overlapping entry, if any: the one holding `start`, or the first after it.
        let lowest = model_find(model, start)
            .filter(|&(_, e, _)| e > start)
            .or_else(|| {
                model
                    .range(start + 1..end)
                    .next()
                    .map(|(&s, &(e, id))| (s, e, id))
            })
            .map(|(s, e, _)| AddressRange::new(s, e));
        let got = update.first_overlap(AddressRange::new(start, end));
        assert_eq!(got, lowest, "first_overlap [{start}, {end})");
        assert_eq!(got.is_some(), expected.is_some());
        if got.is_none() {
            *next_id += 1;
            update.insert(start, probe(end, *next_id));
            model.insert(start, (end, *next_id));
        }
    } else {
        let start = if rng.below(8) == 0 {
            rng.below(space)
        } else {
            let from = rng.below(space);
            let mut after = model.range(from..).map(|(&s, _)| s);
            after
                .next()
                .or_else(|| model.keys().next().copied())
                .unwrap_or(0)
        };
        assert_eq!(update.remove(start), model.remove(&start).is_some());
    }
}

/// A batch of up to `max` new ranges with distinct starts, inserted with `insert_batch` and
/// mirrored in `model`; half the batches may overlap the table or themselves, and must then be
/// refused naming the lowest range that overlaps another.
fn random_batch(
    rng: &mut Lcg,
    update: &mut Update<'_, Arc<Probe>>,
    model: &mut BTreeMap<usize, (usize, u64)>,
    space: usize,
    max: usize,
    next_id: &mut u64,
) {
    let careful = rng.below(2) == 0;
    let mut batch: BTreeMap<usize, (usize, u64)> = BTreeMap::new();
    for _ in 0..1 + rng.below(max) {
        let start = rng.below(space);
        let end = start + 1 + rng.below(6);
        let clashes = |m: &BTreeMap<usize, (usize, u64)>| {
            model_find(m, end - 1).is_some_and(|(_, e, _)| e > start)
        };
        if !careful || !clashes(model) && !clashes(&batch) {
            *next_id += 1;
            batch.insert(start, (end, *next_id));
        }
    }
    // Reference: table first on equal starts, then the first neighbours that overlap.
    let mut all: Vec<(usize, usize, bool)> =
        model.iter().map(|(&s, &(e, _))| (s, e, false)).collect();
    all.extend(batch.iter().map(|(&s, &(e, _))| (s, e, true)));
    all.sort_by_key(|&(s, _, from_batch)| (s, from_batch));
    let expected = all
        .windows(2)
        .find(|w| w[0].1 > w[1].0)
        .map(|w| AddressRange::new(w[0].0, w[0].1));
    let values = batch
        .iter()
        .map(|(&s, &(e, id))| (s, probe(e, id)))
        .collect();
    assert_eq!(update.insert_batch(values), expected.map_or(Ok(()), Err));
    if expected.is_none() {
        model.extend(batch);
    }
}

/// Runs `steps` random updates (single changes and batches of up to 40), with lookups from the
/// reader path during and after each; the insert bias swings so the tree grows and shrinks.
fn model_run(seed: u64, steps: usize, space: usize) {
    let index = Index::new(domain(1));
    let mut rng = Lcg(seed);
    let mut model = BTreeMap::new();
    let mut next_id = 0;
    for step in 0..steps {
        let bias = if (step / 2000) % 2 == 0 { 70 } else { 35 };
        let changes = if rng.below(4) == 0 {
            2 + rng.below(40)
        } else {
            1
        };
        // What readers must keep seeing until the batch is published.
        let before = if changes > 1 {
            model.clone()
        } else {
            BTreeMap::new()
        };
        {
            let mut update = index.update();
            for _ in 0..changes {
                // Batches check against an O(n) reference: rarer on the large tree.
                if rng.below(if space > 5_000 { 60 } else { 10 }) == 0 {
                    // Small batches take the one-by-one path, large ones the rebuild.
                    let max = if rng.below(2) == 0 { 4 } else { 200 };
                    random_batch(&mut rng, &mut update, &mut model, space, max, &mut next_id);
                } else {
                    random_change(&mut rng, &mut update, &mut model, space, bias, &mut next_id);
                }
                // A reader during a batch sees the table as it was.
                if changes > 1 {
                    let key = rng.below(space + 8);
                    assert_eq!(find(&index, key), model_find(&before, key), "mid-update");
                }
            }
        }
        for _ in 0..4 {
            let key = rng.below(space + 8);
            assert_eq!(find(&index, key), model_find(&model, key), "key {key}");
        }
        if step % 64 == 0 {
            check_invariants(&index, &model);
        }
        if step % 16 == 0 {
            // SAFETY: the test thread holds nothing from a lookup.
            unsafe { index.grace().quiescent(0) };
        }
    }
    check_invariants(&index, &model);
    for key in [0, 1, space / 2, space, usize::MAX] {
        assert_eq!(find(&index, key), model_find(&model, key));
    }
    // Empty it in one batch, then everything retired is freed after a grace period.
    {
        let mut update = index.update();
        for start in model.keys() {
            assert!(update.remove(*start));
        }
    }
    settle(&index);
    assert_eq!(index.retired_count(), 0);
    let m = index.update().memory();
    assert_eq!((m.nodes, m.values, m.retired), (0, 0, 0));
    assert!(m.spare <= 128 * core::mem::size_of::<Node>());
    assert!(index.root.load(Ordering::SeqCst).is_null());
}

#[test]
fn model_small_space_deep_churn() {
    model_run(1, 40_000, 600);
}

#[test]
fn model_large_space_many_levels() {
    model_run(2, 40_000, 20_000);
}

#[test]
fn model_dense_space_sequential_batches() {
    model_run(3, 30_000, 3_000);
}

#[test]
fn ascending_inserts_fill_leaves_and_descending_removals_merge() {
    let index = Index::new(domain(1));
    let mut model = BTreeMap::new();
    for i in 0..(CAP * CAP * 3) {
        index.update().insert(i * 2, probe(i * 2 + 1, i as u64));
        model.insert(i * 2, (i * 2 + 1, i as u64));
    }
    check_invariants(&index, &model);
    let nodes = index.update().w.nodes;
    // Full leaves (append splits), plus a few inner nodes.
    let leaves = model.len().div_ceil(CAP);
    assert!(nodes <= leaves + leaves.div_ceil(CAP) + 2, "{nodes} nodes");
    for i in (0..model.len()).rev() {
        assert!(index.update().remove(i * 2));
        model.remove(&(i * 2));
        if i % 50 == 0 {
            check_invariants(&index, &model);
        }
    }
    assert!(index.root.load(Ordering::SeqCst).is_null());
}

#[test]
fn a_large_removal_leaves_no_large_queue_or_scratch_list_behind() {
    let index = Index::new(domain(1));
    let batch: Vec<(usize, Arc<Probe>)> = (0..20_000)
        .map(|i| (i * 0x100, probe(i * 0x100 + 0x80, i as u64)))
        .collect();
    index.update().insert_batch(batch).unwrap();
    {
        let mut update = index.update();
        for i in 0..20_000 {
            assert!(update.remove(i * 0x100));
        }
    }
    assert!(index.retired_count() > 20_000, "values and nodes queued");
    settle(&index);
    assert_eq!(index.retired_count(), 0);
    let w = index.lock_writer();
    let capacity = w.retired.capacity();
    assert!(capacity <= 2 * 256, "{capacity} queue entries kept");
    let scratch = w.replaced.capacity() + w.removed.capacity();
    assert!(scratch <= 2 * 256, "{scratch} scratch entries kept");
}
