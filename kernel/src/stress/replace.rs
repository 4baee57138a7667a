//! Replace-and-free under execution: every other CPU runs a long-running function (a loop of
//! `iterations`) through its jump slot while CPU 0 replaces the function with a new version
//! (`add_code` for the same index), which retires the old one, and reclaims it.
//!
//! Each version counts the CPUs inside it (`lock inc` on entry, `lock dec` before `ret`) and
//! returns its version number. What must hold:
//! - right after the replacement CPU 0 has not passed a quiescent state, so `reclaim` frees
//!   nothing, and the old version stays registered (`REGISTRIES.lookup_code`) and counted as
//!   retired (`code_count`) for as long as a CPU is inside it;
//! - it is freed (unregistered, its range reusable — the next version usually lands there) only
//!   once every CPU passed a quiescent state, and then no CPU is inside it;
//! - every call returns the version it entered, which is no older than the version published
//!   before the call (no CPU runs INT3 or reused bytes: that would fault or return garbage).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use codespace::code_object::CodeObject;
use codespace::module::{CodeModule, NewCode};

use super::common::{self, call0, quiescent, settle, Stop};
use crate::code::REGISTRIES;
use crate::smp;

/// Most versions one run can make (one counter each).
pub const MAX_VERSIONS: usize = 64;

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplaceStats {
    /// Versions installed after the first.
    pub replacements: u64,
    /// Calls that completed (every CPU).
    pub calls: u64,
    /// Polls that saw a CPU inside a retired version, which was still registered.
    pub inside_while_retired: u64,
    /// Retired versions freed.
    pub reclaimed: u64,
}

/// The long-running function: counts itself in `inside`, loops `iterations` times, counts
/// itself out, returns `version`.
///
/// ```text
/// movabs rax, inside ; lock inc qword [rax] ; mov ecx, iterations
/// 1: dec ecx ; jnz 1b ; lock dec qword [rax] ; mov eax, version ; ret
/// ```
#[must_use]
pub fn long_running(inside: &AtomicU64, iterations: u32, version: u32) -> Vec<u8> {
    let mut code = Vec::with_capacity(40);
    code.extend_from_slice(&[0x48, 0xB8]);
    code.extend_from_slice(&(inside.as_ptr() as u64).to_le_bytes());
    code.extend_from_slice(&[0xF0, 0x48, 0xFF, 0x00]);
    code.push(0xB9);
    code.extend_from_slice(&iterations.max(1).to_le_bytes());
    code.extend_from_slice(&[0xFF, 0xC9, 0x75, 0xFC]);
    code.extend_from_slice(&[0xF0, 0x48, 0xFF, 0x08]);
    code.push(0xB8);
    code.extend_from_slice(&version.to_le_bytes());
    code.push(0xC3);
    code
}

/// Replaces the function `rounds` times (< [`MAX_VERSIONS`]) on code-window slice `window`,
/// each version looping `iterations` times, while the other CPUs call it.
///
/// # Panics
/// On any violation (see the module docs), naming the CPU.
pub fn run(window: usize, rounds: u32, iterations: u32) -> ReplaceStats {
    assert!(
        (rounds as usize) < MAX_VERSIONS,
        "at most {MAX_VERSIONS} versions"
    );
    let mgr = common::manager(window);
    let m = common::one_function_module(&mgr);
    let inside: Vec<AtomicU64> = (0..MAX_VERSIONS).map(|_| AtomicU64::new(0)).collect();
    let first = m
        .add_code(&NewCode::function(
            0,
            &long_running(&inside[0], iterations, 0),
        ))
        .expect("version 0");
    let slot = m.jump_tables().expect("tables")[0]
        .near_slot_addr(0)
        .expect("slot 0");
    let published = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let stop = Stop::new();
    let n = smp::online_cpus();
    let mut stats = ReplaceStats::default();
    let driver = spin::Mutex::new((first, &mut stats));

    common::on_each_cpu(|cpu| {
        if cpu != 0 {
            while !stop.stopped() {
                // SAFETY: between calls this CPU runs no generated code and holds no lookup.
                unsafe { quiescent() };
                let p = published.load(Ordering::SeqCst);
                let v = u64::from(call0(slot) as u32);
                let p2 = published.load(Ordering::SeqCst);
                assert!(
                    (p..=p2 + 1).contains(&v),
                    "cpu {cpu}: a call returned version {v}, but version {p} was installed \
                     before it and at most version {} was being installed after",
                    p2 + 1
                );
                calls.fetch_add(1, Ordering::SeqCst);
            }
            return;
        }
        let mut guard = driver.lock();
        let (current, stats) = &mut *guard;
        for r in 1..=rounds {
            if n > 1 && !common::wait_until(|| inside[r as usize - 1].load(Ordering::SeqCst) > 0) {
                stop.stop();
                panic!("cpu 0: no CPU entered version {}", r - 1);
            }
            let old: Arc<CodeObject> = current.clone();
            let new = m
                .add_code(&NewCode::function(
                    0,
                    &long_running(&inside[r as usize], iterations, r),
                ))
                .expect("replace");
            common::settle_slot(&m, 0);
            published.store(u64::from(r), Ordering::SeqCst);
            *current = new;
            stats.replacements += 1;
            if n == 1 {
                // One CPU: the driver calls the new version itself.
                assert_eq!(call0(slot), u64::from(r), "a call after replacement {r}");
            }
            let retired_now = m.code_count().expect("counts").1;
            // This CPU has not passed a quiescent state since the old version was retired.
            let freed_early = m.reclaim().expect("reclaim");
            if freed_early != 0 || retired_now == 0 || !registered(&old) {
                stop.stop();
                panic!(
                    "cpu 0: version {} was freed ({freed_early} objects, {retired_now} retired) \
                     before this CPU passed a quiescent state",
                    r - 1
                );
            }
            wait_for_reclaim(&m, &old, &inside[r as usize - 1], r - 1, &stop, stats);
        }
        stop.stop();
    });

    let calls = calls.load(Ordering::SeqCst);
    drop(driver);
    stats.calls = calls + u64::from(n == 1) * u64::from(rounds);
    drop(m);
    settle(&mgr);
    stats
}

/// Whether `code` is still what PC lookup finds at its start.
fn registered(code: &Arc<CodeObject>) -> bool {
    REGISTRIES
        .lookup_code(code.instruction_start())
        .is_some_and(|found| Arc::ptr_eq(&found, code))
}

/// Reports quiescent states and reclaims until `old` (version `v`) is freed, checking at every
/// poll that a version a CPU is inside of is still registered and retired.
fn wait_for_reclaim<M: codespace::mmu::Mmu + Send + 'static>(
    m: &CodeModule<M>,
    old: &Arc<CodeObject>,
    inside: &AtomicU64,
    v: u32,
    stop: &Stop,
    stats: &mut ReplaceStats,
) {
    let fail = |why: alloc::string::String| -> ! {
        stop.stop();
        panic!("cpu 0: version {v}: {why}");
    };
    let deadline = crate::cpu::time::Deadline::after(common::PHASE_TIMEOUT);
    let mut polls = 0u32;
    loop {
        // SAFETY: CPU 0 drives the scenario: no generated code on its stack, no lookup held.
        unsafe { quiescent() };
        polls += 1;
        if polls.is_multiple_of(64) {
            // Idle CPUs (none while every AP runs the function) report only when woken.
            smp::sync_cores();
        }
        let freed = m.reclaim().expect("reclaim");
        // Read after the reclaim: a CPU inside now was inside during it.
        let cpus_inside = inside.load(Ordering::SeqCst);
        let still = registered(old);
        let retired = m.code_count().expect("counts").1;
        if cpus_inside > 0 {
            if !still || retired == 0 {
                fail(alloc::format!(
                    "freed ({freed} objects reclaimed) while {cpus_inside} CPU(s) ran inside it"
                ));
            }
            stats.inside_while_retired += 1;
        }
        if !still {
            if freed == 0 || retired != 0 {
                fail(alloc::format!(
                    "unregistered without being reclaimed ({freed} freed, {retired} retired)"
                ));
            }
            stats.reclaimed += 1;
            return;
        }
        if deadline.expired() {
            fail(alloc::format!(
                "never reclaimed; the grace period waits for cpu {:?}",
                REGISTRIES.grace().waiting_for()
            ));
        }
        core::hint::spin_loop();
    }
}
