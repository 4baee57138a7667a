//! The lazy-slot race: every CPU calls the same lazy slot at the same moment. Each call that
//! finds the slot lazy enters the kernel's lazy-compile entry, whose compiler "compiles" (a
//! delay, then code returning a tag naming the compiling CPU) and installs with
//! `CodeModule::install_if_absent`. Exactly one installation may happen per function; every
//! other compilation gets the winner's code back and its own bytes are never allocated, so
//! every CPU returns the winner's tag, and the module's books grow by one function per round.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use codespace::module::{CodeModule, Installed, ModuleConfig, NewCode};

use super::common::{self, call0, ret_const, settle, Phase};
use crate::code::{self, KernelMmu, REGISTRIES};
use crate::smp;

/// The module the lazy compiler installs into while a run is under way.
static MODULE: spin::Mutex<Option<Arc<CodeModule<KernelMmu>>>> = spin::Mutex::new(None);
static COMPILATIONS: AtomicU64 = AtomicU64::new(0);
static INSTALLS: AtomicU64 = AtomicU64::new(0);
static EXISTING: AtomicU64 = AtomicU64::new(0);
/// How long a compilation takes, in microseconds: long enough that every CPU of a round is
/// compiling before the first one installs.
static COMPILE_MICROS: AtomicU64 = AtomicU64::new(0);

/// The tag function `index` compiled on `cpu` returns.
fn tag(index: u32, cpu: usize) -> u32 {
    0x1A2E_0000 | (index << 8) | cpu as u32
}

/// The lazy compiler (`code::set_lazy_compiler`).
fn compile(index: u32) -> usize {
    COMPILATIONS.fetch_add(1, Ordering::SeqCst);
    let module = MODULE.lock().clone().expect("a lazy module is set");
    crate::cpu::time::spin_for(Duration::from_micros(COMPILE_MICROS.load(Ordering::SeqCst)));
    let bytes = ret_const(tag(index, smp::current_cpu()));
    match module.install_if_absent(&NewCode::function(index, &bytes)) {
        Ok(Installed::New(object)) => {
            INSTALLS.fetch_add(1, Ordering::SeqCst);
            object.instruction_start()
        }
        Ok(Installed::Existing(start)) => {
            EXISTING.fetch_add(1, Ordering::SeqCst);
            start
        }
        Err(e) => panic!("cpu {}: install_if_absent: {e}", smp::current_cpu()),
    }
}

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct LazyStats {
    /// Rounds (functions).
    pub rounds: u64,
    /// Compilations (calls into the lazy compiler), all rounds.
    pub compilations: u64,
    /// Rounds in which two or more CPUs compiled the same function.
    pub races: u64,
}

/// `rounds` rounds (one fresh lazy function each) on code-window slice `window`, compilations
/// taking `compile_micros`.
///
/// # Panics
/// On a second installation, a CPU that got another CPU's losing code, or books that do not
/// add up.
pub fn run(window: usize, rounds: u32, compile_micros: u64) -> LazyStats {
    let mgr = common::manager(window);
    let m = Arc::new(
        CodeModule::new(
            &mgr,
            &REGISTRIES,
            code::module_config(
                &mgr,
                ModuleConfig {
                    functions: rounds,
                    lazy_entry: Some(code::lazy_compile_entry()),
                    ..ModuleConfig::default()
                },
            ),
        )
        .expect("lazy module"),
    );
    code::assert_rox_in_use(&mgr);
    let table = m.jump_tables().expect("tables")[0];
    let allocated_before = m.stats().expect("stats").allocated;
    let live_before = m.code_count().expect("counts").0;
    let map_before = REGISTRIES.code.len();
    *MODULE.lock() = Some(Arc::clone(&m));
    COMPILE_MICROS.store(compile_micros, Ordering::SeqCst);
    code::set_lazy_compiler(Some(compile));
    let n = smp::online_cpus();
    let mut stats = LazyStats::default();
    for r in 0..rounds {
        let slot = table.near_slot_addr(r).expect("slot");
        for c in [&COMPILATIONS, &INSTALLS, &EXISTING] {
            c.store(0, Ordering::SeqCst);
        }
        let results: alloc::vec::Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let arrived = Phase::new();
        common::on_each_cpu(|cpu| {
            // Everyone calls at once.
            arrived.arrive();
            arrived.wait(n as u32);
            results[cpu].store(call0(slot), Ordering::SeqCst);
        });
        let (compiled, installed, existing) = (
            COMPILATIONS.load(Ordering::SeqCst),
            INSTALLS.load(Ordering::SeqCst),
            EXISTING.load(Ordering::SeqCst),
        );
        assert_eq!(
            installed, 1,
            "round {r}: {installed} installations ({compiled} compilations)"
        );
        assert_eq!(
            compiled,
            installed + existing,
            "round {r}: every compilation installed or found the winner"
        );
        let start = m.function_code(r).expect("books").expect("installed");
        let winner = call0(start);
        for (cpu, v) in results.iter().enumerate() {
            let v = v.load(Ordering::SeqCst);
            assert_eq!(
                v, winner,
                "round {r}: cpu {cpu} returned {v:#x}, not the installed code's {winner:#x}"
            );
        }
        assert_eq!(
            call0(slot),
            winner,
            "round {r}: the slot now runs the winner"
        );
        stats.compilations += compiled;
        stats.races += u64::from(compiled >= 2);
    }
    code::set_lazy_compiler(None);
    *MODULE.lock() = None;
    stats.rounds = u64::from(rounds);
    let per_function = codespace::manager::CODE_ALIGNMENT;
    let (live, retired) = m.code_count().expect("counts");
    assert_eq!(
        (live, retired),
        (live_before + rounds as usize, 0),
        "one code object per function, nothing retired"
    );
    assert_eq!(
        m.stats().expect("stats").allocated,
        allocated_before + rounds as usize * per_function,
        "no loser's code was allocated"
    );
    assert_eq!(REGISTRIES.code.len(), map_before + rounds as usize);
    if n > 1 {
        assert!(
            stats.races > 0,
            "no round had two CPUs compiling at once: the race never happened"
        );
    }
    drop(m);
    settle(&mgr);
    stats
}
