//! Rows whose cost depends on how many CPUs are online: publishing (one shootdown round),
//! patching live slots (one serialization round; three under the INT3 protocol), decommitting (one shootdown round, frames
//! freed after it). `cargo run -- bench` boots the bench with 1 CPU, then again with 2 and 4
//! CPUs for these rows only.
//!
//! Under TCG every CPU is a host thread and an IPI round trip is emulated, so the cycle figures
//! are not hardware's; the counts per operation are the figure: shootdown and serialization
//! rounds, IPIs sent, invalidations on this CPU and on the others.

use codespace::code_object::CodeKind;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig};

use super::{start, stop, Report, REPS, WARMUP};
use crate::code::{self, KernelMmu, REGISTRIES};
use crate::println;
use crate::smp;

/// The counters a timed operation moves, on this CPU (the backend's) and on the others (the
/// kernel's IPI layer).
#[derive(Default)]
struct Counts {
    shootdowns: u64,
    syncs: u64,
    ipis: u64,
    local_invlpg: u64,
    local_full: u64,
    remote_invlpg: u64,
    remote_full: u64,
    remote_serialize: u64,
}

/// Times `op` once and adds what it did to `counts` (snapshots taken outside the timed part).
fn timed(m: &CodeManager<KernelMmu>, counts: &mut Counts, op: impl FnOnce()) -> u64 {
    let (flushes, ipis) = (m.flush_stats().expect("stats"), smp::ipi_stats());
    let t0 = start();
    op();
    let cycles = stop() - t0;
    let after = m.flush_stats().expect("stats");
    let remote = (smp::ipi_stats() - ipis).total();
    counts.shootdowns += after.shootdowns - flushes.shootdowns;
    counts.syncs += after.syncs - flushes.syncs;
    counts.ipis += remote.sent;
    counts.local_invlpg += after.single_pages - flushes.single_pages;
    counts.local_full += after.full - flushes.full;
    counts.remote_invlpg += remote.pages;
    counts.remote_full += remote.full_flushes;
    counts.remote_serialize += remote.serializations;
    cycles
}

/// Prints what each timed operation of a row did.
fn print_counts(c: &Counts) {
    let n = (WARMUP + REPS) as f64;
    let per = |v: u64| v as f64 / n;
    println!(
        "  {:<58} per op: {:.1} shootdown + {:.1} sync rounds, {:.1} IPIs; invlpg {:.1} here + {:.1} on others; full flushes {:.1} + {:.1}; {:.1} serializations on others",
        "",
        per(c.shootdowns),
        per(c.syncs),
        per(c.ipis),
        per(c.local_invlpg),
        per(c.remote_invlpg),
        per(c.local_full),
        per(c.remote_full),
        per(c.remote_serialize)
    );
}

/// The rows, on a manager of their own.
pub(super) fn run(r: &Report) {
    let cpus = smp::online_cpus();
    println!("\n  -- SMP rows, {cpus} CPU(s) online --");
    let m = super::memory_rows::manager(102);
    let mut a = CodeAllocator::new(
        &m,
        AllocatorConfig {
            initial_reservation: 4 << 20,
            ..AllocatorConfig::default()
        },
    )
    .expect("allocator");
    for pages in [1usize, 8] {
        let mut c = Counts::default();
        let name = alloc::format!("[{cpus} cpu] publish {pages} page(s)");
        r.measure(&name, pages, || {
            let w = a.allocate(pages * 4096).expect("allocate");
            let mut code = None;
            let cycles = timed(&m, &mut c, || code = Some(a.publish(w).expect("publish")));
            // SAFETY: never run, and its address was never handed out.
            unsafe { a.free(code.expect("published")) }.expect("free");
            cycles
        });
        print_counts(&c);
    }
    let mut c = Counts::default();
    let name = alloc::format!("[{cpus} cpu] free + decommit 1 published page");
    r.measure(&name, 1, || {
        let mut w = a.allocate(4096).expect("allocate");
        w.as_mut_slice().fill(0xC3);
        let code = a.publish(w).expect("publish");
        // SAFETY: never run, and its address was never handed out.
        timed(&m, &mut c, || unsafe { a.free(code) }.expect("free"))
    });
    print_counts(&c);
    drop(a);

    patch_rows(r, &m, "store, every CPU serializes");
    // The same rows under the INT3 protocol (`PatchProtocol::Int3`): three rounds per patch.
    let int3 = code::manager(
        code::test_window(104),
        ManagerConfig {
            patch_protocol: code::int3_protocol(),
            ..ManagerConfig::default()
        },
    )
    .expect("manager");
    patch_rows(r, &int3, "INT3 protocol");
    // Dropping the managers with the modules' spaces queued would leave them mapped (a later
    // manager over the window then meets `AlreadyMapped`, as the wasm rows did).
    super::give_back(&[&m, &int3]);
}

/// `patch_slot` and an 8-slot `patch_slots` on a module of `m`, under `m`'s patch protocol.
fn patch_rows(r: &Report, m: &CodeManager<KernelMmu>, protocol: &str) {
    let cpus = smp::online_cpus();
    let module = CodeModule::new(
        m,
        &REGISTRIES,
        ModuleConfig {
            functions: 8,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let targets = [0xC3u8, 0x90].map(|b| {
        module
            .add_code(&NewCode::new(CodeKind::Wrapper, &[b, 0xC3]))
            .expect("target")
            .instruction_start()
    });
    let mut flip = 0;
    let mut c = Counts::default();
    let name = alloc::format!("[{cpus} cpu] patch_slot ({protocol})");
    r.measure(&name, 1, || {
        flip ^= 1;
        timed(m, &mut c, || {
            module.patch_slot(0, targets[flip]).expect("patch")
        })
    });
    print_counts(&c);
    let mut c = Counts::default();
    let name = alloc::format!("[{cpus} cpu] patch_slots, 8 slots at once ({protocol})");
    r.measure(&name, 8, || {
        flip ^= 1;
        let patches: [(u32, usize); 8] = core::array::from_fn(|i| (i as u32, targets[flip]));
        timed(m, &mut c, || module.patch_slots(&patches).expect("patch"))
    });
    print_counts(&c);
    drop(module);
}
