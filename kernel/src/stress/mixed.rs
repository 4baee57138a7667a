//! Everything at once on one manager: CPU 0 patches a jump slot, replaces a long-running
//! function and registers and releases protected code, in turn, while the other CPUs take one
//! role each (by CPU index): call the patched slot and read its bytes, run the long-running
//! function, or fault in protected code. The checks are those of the single scenarios: every
//! call returns a current implementation or version, every read is a whole slot, every fault
//! lands; retired versions are freed only after the CPUs running them passed a quiescent
//! state (the run ends with every object reclaimed and the manager empty).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use codespace::code_object::CodeKind;
use codespace::jump_table;
use codespace::module::{CodeModule, ModuleConfig, NewCode};

use super::common::{self, call0, call1, load_u64, quiescent, ret_const, settle, Stop};
use super::replace::long_running;
use super::traps::{load_function, map_memory};
use crate::code::{self, REGISTRIES};
use crate::smp;

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct MixedStats {
    /// Driver rounds (one patch, one replacement, one protected add and free each).
    pub rounds: u64,
    /// Calls of the patched slot and of the long-running function, all CPUs.
    pub calls: u64,
    /// Faults that landed.
    pub faults: u64,
}

/// `rounds` driver rounds on code-window slice `window`; the function loops `iterations` times.
///
/// # Panics
/// On any violation, naming the CPU.
pub fn run(window: usize, rounds: u32, iterations: u32) -> MixedStats {
    map_memory();
    let mgr = common::manager(window);
    let config = code::module_config(
        &mgr,
        ModuleConfig {
            functions: 2,
            ..ModuleConfig::default()
        },
    );
    let m = CodeModule::new(&mgr, &REGISTRIES, config).expect("module");
    let traps = CodeModule::new(
        &mgr,
        &REGISTRIES,
        code::module_config(&mgr, ModuleConfig::default()),
    )
    .expect("module");
    code::assert_rox_in_use(&mgr);
    let impls: Vec<usize> = (0..3u32)
        .map(|v| {
            m.add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(v)))
                .expect("implementation")
                .instruction_start()
        })
        .collect();
    let table = m.jump_tables().expect("tables")[0];
    let (patched, replaced) = (
        table.near_slot_addr(0).expect("slot"),
        table.near_slot_addr(1).expect("slot"),
    );
    let encodings: Vec<u64> = impls
        .iter()
        .map(|&t| jump_table::near_slot(patched, t).expect("reach"))
        .collect();
    m.patch_slot(0, impls[0]).expect("patch");
    let inside = AtomicU64::new(0);
    m.add_code(&NewCode::function(1, &long_running(&inside, iterations, 0)))
        .expect("version 0");
    let bytes = load_function();
    let faulting = traps
        .add_code(&NewCode {
            protected: &[10],
            landing_pad: Some(14),
            ..NewCode::new(CodeKind::Wrapper, &bytes)
        })
        .expect("protected code")
        .instruction_start();
    let n = smp::online_cpus();
    let published = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let faults = AtomicU64::new(0);
    let stop = Stop::new();
    let cpu = smp::current_cpu;

    common::on_each_cpu(|me| {
        if me == 0 {
            for r in 1..=u64::from(rounds) {
                m.patch_slot(0, impls[(r % 3) as usize]).expect("patch");
                common::settle_slot(&m, 0);
                m.add_code(&NewCode::function(
                    1,
                    &long_running(&inside, iterations, r as u32),
                ))
                .expect("replace");
                common::settle_slot(&m, 1);
                published.store(r, Ordering::SeqCst);
                // The old version goes as soon as the CPU running it passed a quiescent state.
                // SAFETY: CPU 0 runs no generated code here and holds no lookup.
                unsafe { quiescent() };
                m.reclaim().expect("reclaim");
                let protected = traps
                    .add_code(&NewCode {
                        protected: &[10],
                        landing_pad: Some(14),
                        ..NewCode::new(CodeKind::Wrapper, &bytes)
                    })
                    .expect("protected code");
                let start = protected.instruction_start();
                drop(protected);
                assert_eq!(call1(start, 8192), (start + 10) as u64, "cpu 0: a new trap");
                traps.free_code(start).expect("free");
                // SAFETY: CPU 0 runs no generated code here and holds no lookup.
                unsafe { quiescent() };
                m.reclaim().expect("reclaim");
                traps.reclaim().expect("reclaim");
                if n == 1 {
                    assert_eq!(call0(patched), r % 3, "cpu 0: the patched slot");
                    assert_eq!(call0(replaced), r, "cpu 0: the new version");
                    calls.fetch_add(2, Ordering::Relaxed);
                }
            }
            stop.stop();
            return;
        }
        while !stop.stopped() {
            // SAFETY: between calls: no generated code running, no lookup reference held.
            unsafe { quiescent() };
            let p = published.load(Ordering::SeqCst);
            match (me - 1) % 3 {
                0 => {
                    let bytes = load_u64(patched);
                    assert!(
                        encodings.contains(&bytes),
                        "cpu {}: slot bytes {bytes:#018x} jump to no implementation",
                        cpu()
                    );
                    let v = call0(patched);
                    let p2 = published.load(Ordering::SeqCst);
                    let fresh = (p..=p2 + 1).any(|q| q % 3 == v);
                    assert!(
                        fresh || p2 + 1 - p >= 2,
                        "cpu {}: the slot ran implementation {v} after patch {p} returned",
                        cpu()
                    );
                }
                1 => {
                    let v = call0(replaced);
                    let p2 = published.load(Ordering::SeqCst);
                    assert!(
                        (p..=p2 + 1).contains(&v),
                        "cpu {}: version {v} ran after version {p} was installed",
                        cpu()
                    );
                }
                _ => {
                    let r = call1(faulting, 4096);
                    assert_eq!(r, (faulting + 10) as u64, "cpu {}: a trap", cpu());
                    faults.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            calls.fetch_add(1, Ordering::Relaxed);
        }
    });
    let stats = MixedStats {
        rounds: u64::from(rounds),
        calls: calls.load(Ordering::SeqCst),
        faults: faults.load(Ordering::SeqCst) + u64::from(rounds),
    };
    assert_eq!(inside.load(Ordering::SeqCst), 0);
    drop(m);
    drop(traps);
    settle(&mgr);
    stats
}
