//! Rows of a large module: loading 10^4 functions in one batch (publish, trap registration, PC
//! registration, slot patches), then lookups over its code as the page-fault handler and a
//! profiler do them.

use alloc::vec::Vec;

use codespace::code_object::CodeObject;
use codespace::module::{CodeModule, ModuleConfig, NewCode};

use super::{start, stop, Report, XorShift};
use crate::code::{self, REGISTRIES};
use crate::println;

/// Functions in the module.
const FUNCTIONS: u32 = 10_000;
/// Bytes of each function, and its protected instructions (every 4th byte).
const SIZE: usize = 128;
const PROTECTED: u32 = 32;

pub(super) fn run(r: &Report) {
    let manager = super::memory_rows::manager(103);
    let module = CodeModule::new(
        &manager,
        &REGISTRIES,
        ModuleConfig {
            functions: FUNCTIONS,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let mut body = [0x90u8; SIZE];
    body[SIZE - 1] = 0xC3;
    let protected: Vec<u32> = (0..PROTECTED).map(|k| k * 4).collect();
    let batch: Vec<NewCode<'_>> = (0..FUNCTIONS)
        .map(|i| NewCode {
            protected: &protected,
            landing_pad: Some(SIZE as u32 - 1),
            ..NewCode::function(i, &body)
        })
        .collect();

    // One load, timed once: it is the module a program brings.
    let (flushes, heap) = (
        manager.flush_stats().expect("stats"),
        crate::memory::heap_usage(),
    );
    let t0 = start();
    let objects = module.add_code_batch(&batch).expect("load");
    let cycles = stop() - t0;
    let after = manager.flush_stats().expect("stats");
    let ns = cycles as f64 * 1000.0 / r.ticks_per_us;
    println!(
        "  {:<58} {cycles:>10} cycles, {:.0} us; per function {:.0} cycles",
        "load a 10^4-function module (publish + traps + PC map + slots)",
        ns / 1000.0,
        cycles as f64 / f64::from(FUNCTIONS)
    );
    println!(
        "  {:<58} {} shootdown + {} sync rounds, {} invlpg + {} full flushes here, {} alias sessions; {} KiB of heap",
        "",
        after.shootdowns - flushes.shootdowns,
        after.syncs - flushes.syncs,
        after.single_pages - flushes.single_pages,
        after.full - flushes.full,
        after.pokes - flushes.pokes,
        (crate::memory::heap_usage().0.saturating_sub(heap.0)) / 1024
    );
    let mem = REGISTRIES.traps.memory();
    println!(
        "  {:<58} {} ranges, {} protected instructions: {:.1} B per instruction, {:.1} B per range of index",
        "trap table",
        mem.ranges,
        mem.protected,
        mem.offsets as f64 / mem.protected.max(1) as f64,
        (mem.index + mem.headers) as f64 / mem.ranges.max(1) as f64
    );

    let starts: Vec<usize> = objects.iter().map(|o| o.instruction_start()).collect();
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    r.measure(
        "TrapTable::lookup_fault, 10^4 ranges x 32 offsets",
        1,
        || {
            let pc = starts[rng.next() as usize % starts.len()] + 4 * (rng.next() as usize % 32);
            let t0 = start();
            let hit = REGISTRIES.traps.lookup_fault(pc, 0);
            let t1 = stop();
            assert!(hit.is_some());
            t1 - t0
        },
    );
    r.measure(
        "lookup_code (CodeMap::lookup_with), 10^4 functions",
        1,
        || {
            let pc = starts[rng.next() as usize % starts.len()] + 100;
            let t0 = start();
            let hit = REGISTRIES
                .code
                .lookup_with(pc, CodeObject::instruction_start);
            let t1 = stop();
            assert!(hit.is_some());
            t1 - t0
        },
    );

    // Teardown: the module's code goes after a grace period (this CPU is quiescent here), its
    // trap and PC-map entries in one update each, then the index nodes they replaced after
    // another.
    let flushes = manager.flush_stats().expect("stats");
    let t0 = start();
    drop(objects);
    drop(module);
    for _ in 0..2 {
        // SAFETY: no generated code runs on this CPU and no lookup reference is held.
        unsafe { code::synchronize() };
        REGISTRIES.reclaim();
    }
    let cycles = stop() - t0;
    let after = manager.flush_stats().expect("stats");
    assert!(REGISTRIES.traps.is_empty() && REGISTRIES.code.is_empty());
    println!(
        "  {:<58} {cycles:>10} cycles, {:.0} us; per function {:.0} cycles",
        "drop it (grace periods, unregister, release code spaces)",
        cycles as f64 / r.ticks_per_us,
        cycles as f64 / f64::from(FUNCTIONS)
    );
    println!(
        "  {:<58} {} shootdown + {} sync rounds, {} invlpg + {} full flushes here; heap back to {} KiB above the start",
        "",
        after.shootdowns - flushes.shootdowns,
        after.syncs - flushes.syncs,
        after.single_pages - flushes.single_pages,
        after.full - flushes.full,
        (crate::memory::heap_usage().0.saturating_sub(heap.0)) / 1024
    );
}
