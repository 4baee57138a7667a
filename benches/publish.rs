//! Publish throughput of the two page modes on the software machine (4 CPUs, TLB model): a
//! batch of 64 functions of 200 bytes published with one `publish_batch`.
//!
//! `publish/4k`: code on 4 KiB pages. The batch's fresh pages become R+X: one shootdown round
//! (the pages' leaves staged, invalidated on every CPU, stored), and pages already holding
//! published code are written through the private alias.
//! `publish/rox`: code on 2 MiB ROX pages (`ManagerConfig::rox_code`, `AllocatorConfig::rox`),
//! mapped R+X once: the batch is one alias session and one serialization round, no page-table
//! entry changes and no shootdown.
//!
//! Only the publish is timed (`iter_custom`); allocating the batch before and freeing it after
//! are not. Before measuring, each mode prints the exact work of one publish (leaf stores,
//! shootdown rounds, alias sessions, serialization rounds), read from the machine's counters.

use std::time::{Duration, Instant};

use codespace::mmu::soft::SoftMmu;
use codespace::mmu::FlushStats;
use codespace::{AddressRange, AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Start of a 512 GiB PML4 slot in the higher half.
const BASE: usize = 0xFFFF_C000_0000_0000;
const BATCH: usize = 64;
const SIZE: usize = 200;

fn setup(rox: bool) -> (SoftMmu, CodeManager<SoftMmu>, CodeAllocator<SoftMmu>) {
    let window = AddressRange::new(BASE, BASE + (512 << 30));
    let machine = SoftMmu::new(1 << 12).with_direct_map(0xFFFF_8000_0000_0000);
    let config = ManagerConfig {
        rox_code: rox,
        ..ManagerConfig::default()
    };
    let manager = CodeManager::new(machine.clone(), window, config).expect("manager");
    let allocator = CodeAllocator::new(
        &manager,
        AllocatorConfig {
            rox,
            initial_reservation: 2 << 20,
            ..AllocatorConfig::default()
        },
    )
    .expect("allocator");
    (machine, manager, allocator)
}

/// Allocates, publishes (timed) and frees one batch; returns the publish's duration.
fn one_batch(a: &mut CodeAllocator<codespace::mmu::soft::SoftMmu>) -> Duration {
    let codes: Vec<_> = (0..BATCH)
        .map(|i| {
            let mut w = a.allocate(SIZE).expect("allocate");
            w.as_mut_slice().fill(i as u8);
            w
        })
        .collect();
    let start = Instant::now();
    let published = a
        .publish_batch(codes)
        .map_err(|r| r.error)
        .expect("publish");
    let took = start.elapsed();
    for code in published {
        // SAFETY: nothing runs the code on the software machine.
        unsafe { a.free(code) }
            .map_err(|e| e.error())
            .expect("free");
    }
    took
}

fn report(
    mode: &str,
    machine: &SoftMmu,
    manager: &CodeManager<SoftMmu>,
    a: &mut CodeAllocator<SoftMmu>,
) {
    // Warm: the 2 MiB page (ROX) or the space's first pages exist already.
    one_batch(a);
    let codes: Vec<_> = (0..BATCH)
        .map(|_| a.allocate(SIZE).expect("allocate"))
        .collect();
    let (stores, before) = (machine.leaf_stores(), manager.flush_stats().expect("stats"));
    let published = a
        .publish_batch(codes)
        .map_err(|r| r.error)
        .expect("publish");
    let after: FlushStats = manager.flush_stats().expect("stats");
    eprintln!(
        "publish/{mode}: {BATCH} functions: {} leaf stores, {} shootdown rounds, {} alias \
         sessions, {} serialization rounds",
        machine.leaf_stores() - stores,
        after.shootdowns - before.shootdowns,
        after.pokes - before.pokes,
        after.syncs - before.syncs,
    );
    for code in published {
        // SAFETY: nothing runs the code on the software machine.
        unsafe { a.free(code) }
            .map_err(|e| e.error())
            .expect("free");
    }
}

fn publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (mode, rox) in [("4k", false), ("rox", true)] {
        let (machine, manager, mut a) = setup(rox);
        report(mode, &machine, &manager, &mut a);
        group.bench_function(mode, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| one_batch(&mut a)).sum());
        });
        assert!(machine.violations().is_empty());
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = publish
}
criterion_main!(benches);
