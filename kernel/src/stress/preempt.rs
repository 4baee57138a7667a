//! Preemption inside generated code (issue 18, item 3): on every CPU a small preemptive
//! scheduler ([`crate::sched`]) runs worker tasks that call a long-running function through its
//! jump slot, so timer ticks keep switching tasks out while their RIP is in the code window.
//! Meanwhile a replacer task on CPU 0 replaces the function (`add_code` for the same index,
//! which retires the old version) and reclaims each old version as soon as its grace period is
//! over. The scheduler reports every CPU quiescent at every switch.
//!
//! Each version counts the tasks inside it (`lock inc` on entry, `lock dec` before `ret`, see
//! [`long_running`]); freed code is filled with INT3 by codespace (a stale execution faults
//! loudly, and the task's `catch` reports it). What must hold: a version is freed only once no
//! task is inside it — checked by the replacer right after each version leaves the PC lookup —
//! no worker faults, and every call returns a version no older than the one published before
//! it. Under [`QuiescentRule::Tasks`] it does (a task preempted inside a version holds its
//! grace period); under [`QuiescentRule::Switch`] ("report between tasks") it does not: a
//! version is freed while a preempted task is parked inside it, which [`run`] reports as
//! `Err`.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use codespace::code_object::CodeObject;
use codespace::module::{CodeModule, NewCode};

use super::common::{self, call0, settle, Stop};
use super::replace::long_running;
use crate::code::REGISTRIES;
use crate::cpu::catch::{catch, Caught};
use crate::cpu::time::{self, Deadline};
use crate::sched::{self, QuiescentRule};
use crate::smp;

/// Worker tasks on each CPU (CPU 0 also runs the replacer).
pub const WORKERS: usize = 3;
/// A call's length, in timer periods of running time: long enough that a call is preempted
/// several times, and parked for several switches of its CPU each time.
const CALL_PERIODS: u32 = 8;

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreemptStats {
    /// Versions installed after the first.
    pub replacements: u64,
    /// Old versions freed (each checked: no task inside).
    pub freed: u64,
    /// Calls that completed, all CPUs.
    pub calls: u64,
    /// Timer ticks that preempted a task with its RIP in the code window, all CPUs.
    pub preempted_in_code: u64,
    /// Holds taken for tasks switched out in generated code, all CPUs.
    pub holds: u64,
    /// Timer ticks and task switches, all CPUs.
    pub ticks: u64,
    /// Task switches, all CPUs.
    pub switches: u64,
}

/// What the tasks share.
struct Shared<'a> {
    m: &'a CodeModule<crate::code::KernelMmu>,
    slot: usize,
    inside: &'a [AtomicU64],
    published: AtomicU64,
    calls: AtomicU64,
    stop: Stop,
    /// Violations seen, in the order they were seen.
    violations: spin::Mutex<Vec<String>>,
}

impl Shared<'_> {
    fn violation(&self, why: String) {
        self.stop.stop();
        // Interrupts off: a task must not be switched out holding this lock.
        x86_64::instructions::interrupts::without_interrupts(|| self.violations.lock().push(why));
    }
}

/// Replaces the function `rounds` times on code-window slice `window` while worker tasks on
/// every CPU call it under preemption; `rule` says what covers a preempted task.
///
/// # Errors
/// Every violation seen (see the module docs), one line each: what `QuiescentRule::Switch`
/// produces.
///
/// # Panics
/// When the scenario cannot be set up (no manager or module), a version is never freed under
/// `QuiescentRule::Tasks` within [`common::PHASE_TIMEOUT`], or the manager does not end empty.
pub fn run(window: usize, rule: QuiescentRule, rounds: u32) -> Result<PreemptStats, String> {
    let period = Duration::from_millis(1);
    let mgr = common::manager(window);
    let m = common::one_function_module(&mgr);
    let inside: Vec<AtomicU64> = (0..=rounds).map(|_| AtomicU64::new(0)).collect();
    let slot = m.jump_tables().expect("tables")[0]
        .near_slot_addr(0)
        .expect("slot 0");
    let (first, iterations) = calibrate(&m, slot, &inside[0], period);
    let first = spin::Mutex::new(Some(first));
    let shared = Shared {
        m: &m,
        slot,
        inside: &inside,
        published: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        stop: Stop::new(),
        violations: spin::Mutex::new(Vec::new()),
    };
    let mut stats = PreemptStats::default();
    let totals = spin::Mutex::new(PreemptStats::default());
    let enabled = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::enable();
    let result = smp::on_each_cpu(|cpu| {
        let shared = &shared;
        let mut jobs: Vec<alloc::boxed::Box<dyn FnOnce() + Send + '_>> = Vec::new();
        for _ in 0..WORKERS {
            jobs.push(alloc::boxed::Box::new(move || {
                // A fault here (INT3 of freed code, a decommitted page) stops the scenario at
                // once; the scheduler would report it only when the run ends.
                if let Err(caught) = catch(|| worker(shared)) {
                    let why = match caught {
                        Caught::Fault(info) => alloc::format!("{info}"),
                        Caught::Panic(msg) => String::from(msg.as_str()),
                        Caught::Stopped => String::from("stopped"),
                    };
                    shared.violation(alloc::format!(
                        "cpu {}: a worker task failed: {why}",
                        smp::current_cpu()
                    ));
                }
            }));
        }
        if let Some(first) = (cpu == 0).then(|| first.lock().take()).flatten() {
            jobs.push(alloc::boxed::Box::new(move || {
                replacer(shared, first, rule, rounds, iterations);
                shared.stop.stop();
            }));
        }
        let report = sched::run(jobs, sched::Config { rule, period });
        for (job, caught) in &report.failures {
            shared.violation(alloc::format!("cpu {cpu}: task {job} failed: {caught:?}"));
        }
        let s = report.stats;
        let mut t = totals.lock();
        t.preempted_in_code += s.preempted_in_code;
        t.holds += s.holds;
        t.ticks += s.ticks;
        t.switches += s.switches;
    });
    if !enabled {
        x86_64::instructions::interrupts::disable();
    }
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = *totals.lock();
    stats.preempted_in_code = t.preempted_in_code;
    stats.holds = t.holds;
    stats.ticks = t.ticks;
    stats.switches = t.switches;
    stats.calls = shared.calls.load(Ordering::SeqCst);
    stats.replacements = shared.published.load(Ordering::SeqCst);
    stats.freed = FREED.swap(0, Ordering::SeqCst);
    let violations = core::mem::take(&mut *shared.violations.lock());
    drop(shared);
    drop(m);
    settle(&mgr);
    if violations.is_empty() {
        Ok(stats)
    } else {
        Err(violations.join("\n"))
    }
}

/// Old versions the replacer saw freed (read once by `run`).
static FREED: AtomicU64 = AtomicU64::new(0);

/// Installs version 0, times a call of it, and returns it with the iteration count of a call
/// that runs [`CALL_PERIODS`] timer periods.
fn calibrate(
    m: &CodeModule<crate::code::KernelMmu>,
    slot: usize,
    inside: &AtomicU64,
    period: Duration,
) -> (Arc<CodeObject>, u32) {
    const PROBE: u32 = 1 << 16;
    let first = m
        .add_code(&NewCode::function(0, &long_running(inside, PROBE, 0)))
        .expect("version 0");
    // The fastest of a few calls: the first pays for translation under TCG, and any may be
    // interrupted.
    let took = (0..4)
        .map(|_| {
            let t0 = time::rdtsc();
            let v = call0(slot);
            let took = time::rdtsc().saturating_sub(t0).max(1);
            assert_eq!(v, 0, "version 0 returns 0");
            took
        })
        .min()
        .unwrap_or(1);
    let want = time::ticks(period * CALL_PERIODS);
    let iterations = (u64::from(PROBE) * want / took).clamp(1 << 12, 1 << 28) as u32;
    (first, iterations)
}

/// A worker task: calls the function until told to stop, yielding between calls (a voluntary
/// switch outside generated code, where its hold, if any, is dropped).
fn worker(s: &Shared<'_>) {
    while !s.stop.stopped() {
        let p = s.published.load(Ordering::SeqCst);
        let v = call0(s.slot) & 0xFFFF_FFFF;
        let p2 = s.published.load(Ordering::SeqCst);
        if !(p..=p2 + 1).contains(&v) {
            s.violation(alloc::format!(
                "cpu {}: a call returned version {v}, but version {p} was published before it \
                 and at most version {} was being published after",
                smp::current_cpu(),
                p2 + 1
            ));
        }
        s.calls.fetch_add(1, Ordering::SeqCst);
        sched::yield_now();
    }
}

/// Whether `code` is still what PC lookup finds at its start.
fn registered(code: &Arc<CodeObject>) -> bool {
    REGISTRIES
        .lookup_code(code.instruction_start())
        .is_some_and(|found| Arc::ptr_eq(&found, code))
}

/// The replacer task (CPU 0): replaces the function `rounds` times; after each, reclaims
/// (yielding between polls, so the CPU switches and reports) until the old version is freed,
/// and checks that no task is inside it then.
fn replacer(
    s: &Shared<'_>,
    mut current: Arc<CodeObject>,
    rule: QuiescentRule,
    rounds: u32,
    iterations: u32,
) {
    for r in 1..=rounds {
        if s.stop.stopped() {
            return;
        }
        // Let the workers get inside the current version first.
        let deadline = Deadline::after(common::PHASE_TIMEOUT);
        while s.inside[r as usize - 1].load(Ordering::SeqCst) == 0 {
            if s.stop.stopped() {
                return;
            }
            if deadline.expired() {
                return s.violation(alloc::format!("no task entered version {}", r - 1));
            }
            sched::yield_now();
        }
        let old = current;
        current = match s.m.add_code(&NewCode::function(
            0,
            &long_running(&s.inside[r as usize], iterations, r),
        )) {
            Ok(new) => new,
            Err(e) => return s.violation(alloc::format!("replacement {r}: {e:?}")),
        };
        common::settle_slot(s.m, 0);
        s.published.store(u64::from(r), Ordering::SeqCst);
        let deadline = Deadline::after(common::PHASE_TIMEOUT);
        loop {
            if let Err(e) = s.m.reclaim() {
                return s.violation(alloc::format!("reclaim: {e:?}"));
            }
            // Read after the reclaim: a task inside now was inside while it was freed.
            let tasks_inside = s.inside[r as usize - 1].load(Ordering::SeqCst);
            if !registered(&old) {
                FREED.fetch_add(1, Ordering::SeqCst);
                if tasks_inside > 0 {
                    return s.violation(alloc::format!(
                        "version {} was freed while {tasks_inside} task(s) were inside it \
                         (preempted there), rule {rule:?}",
                        r - 1
                    ));
                }
                break;
            }
            if deadline.expired() {
                return s.violation(alloc::format!(
                    "version {} was never freed; the grace period waits for cpu {:?}, {} holds",
                    r - 1,
                    REGISTRIES.grace().waiting_for(),
                    REGISTRIES.grace().holds()
                ));
            }
            sched::yield_now();
        }
    }
}
