//! Rows of wasmtime on codespace (the module `kernel/tests/wasm/basic.wat`, precompiled on the
//! host and handed over as a Multiboot module): loading and instantiating it (image placed,
//! text published, trap sites registered; then dropped and reclaimed untimed), a call into wasm,
//! and a trap round trip (fault in wasm, trap-table lookup in the exception, landing pad,
//! wasmtime's handler, back in the caller with the trap code).

use codespace_wasmtime::wasmtime::{Instance, Module, Store};

use super::{start, stop, Report};
use crate::code::{self, GRACE};
use crate::{println, wasm};

pub(super) fn run(r: &Report) {
    let Some(cwasm) = crate::boot_info().module("basic.cwasm").map(|m| m.bytes()) else {
        println!(
            "  (wasm rows skipped: no basic.cwasm Multiboot module; run `cargo run -- bench`)"
        );
        return;
    };
    let manager = super::memory_rows::manager(104);
    let rt = wasm::runtime_in(&manager, wasm::config()).expect("wasm runtime");
    // SAFETY (every `load` below): the engine was built with `rt.code`; the container comes from
    // the host tool and is checked before wasmtime reads it.
    let load = || unsafe { rt.code.load(&rt.engine, cwasm) }.expect("basic.cwasm loads");
    let flushes = manager.flush_stats().expect("stats");
    let mut modules = 0u64;
    r.measure(
        "wasm: load + instantiate basic.cwasm (12 KiB image)",
        1,
        || {
            let t0 = start();
            let module: Module = load();
            let mut store = Store::new(&rt.engine, ());
            let instance = Instance::new(&mut store, &module, &[]).expect("instantiate");
            let cycles = stop() - t0;
            core::hint::black_box(instance);
            drop(store);
            drop(module);
            modules += 1;
            // Untimed: the dropped image's pages come back after a grace period.
            // SAFETY: no wasm runs on this CPU and no lookup reference is held here.
            unsafe { code::synchronize() };
            GRACE.reclaim();
            rt.code.module().reclaim().expect("reclaim");
            cycles
        },
    );
    let after = manager.flush_stats().expect("stats");
    let per = |a: u64, b: u64| (a - b) as f64 / modules as f64;
    println!(
        "  {:<58} {:.1} shootdown + {:.1} sync rounds, {:.1} alias sessions, {:.1} invlpg per module (load + drop)",
        "",
        per(after.shootdowns, flushes.shootdowns),
        per(after.syncs, flushes.syncs),
        per(after.pokes, flushes.pokes),
        per(after.single_pages, flushes.single_pages),
    );

    let module = load();
    let mut store = Store::new(&rt.engine, ());
    let instance = Instance::new(&mut store, &module, &[]).expect("instantiate");
    let add = instance
        .get_typed_func::<(i32, i32), i32>(&mut store, "add")
        .expect("add");
    let div_u = instance
        .get_typed_func::<(i32, i32), i32>(&mut store, "div_u")
        .expect("div_u");
    r.measure(
        "wasm: call add(i32, i32) (typed, from the kernel)",
        1,
        || {
            let t0 = start();
            let v = add.call(&mut store, (40, 2));
            let cycles = stop() - t0;
            assert_eq!(v.ok(), Some(42));
            cycles
        },
    );
    let hits = code::trap_hits(0);
    r.measure(
        "wasm: trap round trip div_u(7, 0): #DE, trap table, wasmtime",
        1,
        || {
            let t0 = start();
            let v = div_u.call(&mut store, (7, 0));
            let cycles = stop() - t0;
            assert!(v.is_err(), "div_u(7, 0) traps");
            cycles
        },
    );
    assert!(
        code::trap_hits(0) > hits,
        "the traps went through the trap table"
    );
}
