//! Host tests of the index's reclamation: retired memory outlives its grace period only, and
//! readers on other threads never see a freed node or value.

use super::node::Node;
use super::tests::{domain, find, probe, Index, Lcg};
use super::*;
use alloc::sync::Arc;
use std::boxed::Box;
use std::sync::atomic::AtomicBool;
use std::vec::Vec;

#[test]
fn retired_values_live_until_the_grace_period_ends() {
    let grace = domain(2);
    let index = Index::new(grace);
    let p = probe(20, 1);
    index.update().insert(10, Arc::clone(&p));
    assert_eq!(Arc::strong_count(&p), 2);
    assert!(index.update().remove(10));
    assert_eq!(find(&index, 15), None);
    // SAFETY (all quiescent calls): the test's CPUs hold nothing from a lookup.
    unsafe { grace.quiescent(0) };
    index.reclaim();
    assert_eq!(
        Arc::strong_count(&p),
        2,
        "CPU 1 has not passed a quiescent state"
    );
    assert!(index.retired_count() > 0);
    let retired = index.update().memory().retired;
    assert!(retired >= core::mem::size_of::<Node>());
    for _ in 0..2 {
        // SAFETY: the test's CPUs hold nothing from a lookup.
        unsafe {
            grace.quiescent(0);
            grace.quiescent(1);
        }
        index.reclaim();
    }
    assert_eq!(Arc::strong_count(&p), 1, "freed after the grace period");
    assert_eq!(index.retired_count(), 0);
}

#[test]
fn drop_frees_values_and_retired_memory() {
    let index = Index::new(domain(3));
    let a = probe(2, 1);
    let b = probe(4, 2);
    index.update().insert(1, Arc::clone(&a));
    index.update().insert(3, Arc::clone(&b));
    index.update().remove(1);
    assert_eq!(Arc::strong_count(&a), 2, "retired, waiting");
    drop(index);
    assert_eq!(Arc::strong_count(&a), 1);
    assert_eq!(Arc::strong_count(&b), 1);
}

/// Readers on other threads look up permanent entries and churned ones, reporting quiescent
/// states between lookups; the writer inserts, removes and batches, and reclaims as it goes.
/// A value freed too early shows as poisoned (or as a wrong entry).
#[test]
fn stress_readers_against_writer_with_reclamation() {
    const READERS: usize = 2;
    let grace = domain(READERS + 1);
    let index: &'static Index = Box::leak(Box::new(Index::new(grace)));
    // Permanent entries at multiples of 1000, id = start.
    {
        let mut update = index.update();
        for k in 0..64 {
            update.insert(k * 1000, probe(k * 1000 + 10, (k * 1000) as u64));
        }
    }
    let done: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let readers: Vec<_> = (1..=READERS)
        .map(|cpu| {
            std::thread::spawn(move || {
                let mut rng = Lcg(cpu as u64);
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) || n < 10_000 {
                    let k = rng.below(64) * 1000;
                    let key = k + rng.below(10);
                    assert_eq!(
                        find(index, key).map(|(s, _, id)| (s, id)),
                        Some((k, k as u64))
                    );
                    // Churned entries live in [k + 100, k + 900): whatever is found is whole.
                    if let Some((s, e, id)) = find(index, k + 100 + rng.below(800)) {
                        assert!(s == k && id == k as u64 || id >= 1_000_000 && e == s + 5);
                    }
                    // SAFETY: this reader holds nothing from a lookup here.
                    unsafe { grace.quiescent(cpu) };
                    n += 1;
                }
                // SAFETY: this reader looks nothing up any more.
                unsafe { grace.cpu_offline(cpu) };
                n
            })
        })
        .collect();
    let mut rng = Lcg(99);
    let mut live: Vec<usize> = Vec::new();
    let mut id = 1_000_000u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(600);
    while std::time::Instant::now() < deadline {
        let batch = 1 + rng.below(8);
        let mut update = index.update();
        for _ in 0..batch {
            let start = rng.below(64) * 1000 + 100 + rng.below(160) * 5;
            if update
                .first_overlap(AddressRange::new(start, start + 5))
                .is_none()
            {
                id += 1;
                update.insert(start, probe(start + 5, id));
                live.push(start);
            } else if let Some(i) = live.iter().position(|&s| s == start) {
                assert!(update.remove(live.swap_remove(i)));
            }
        }
        if live.len() > 400 {
            for _ in 0..100 {
                let s = live.swap_remove(rng.below(live.len()));
                assert!(update.remove(s));
            }
        }
        drop(update);
        // SAFETY: the writer holds nothing from a lookup.
        unsafe { grace.quiescent(0) };
    }
    done.store(true, Ordering::Relaxed);
    let total: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(total >= 20_000);
    for _ in 0..2 {
        // SAFETY: as above; the readers are offline.
        unsafe { grace.quiescent(0) };
        index.reclaim();
    }
    assert_eq!(index.retired_count(), 0, "every grace period ended");
}
