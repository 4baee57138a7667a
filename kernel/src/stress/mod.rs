//! SMP scenarios for codespace — many CPUs executing, faulting and patching generated code at
//! once — and the stress mode that runs them mixed for a while (`cargo run -- stress [SECONDS] [rox]`,
//! `rox`: code on 2 MiB ROX pages).
//!
//! Each scenario is a function that sets up a manager on its own slice of the code window,
//! runs CPUs against each other through `smp::on_each_cpu`, checks its safety property on every
//! CPU as it goes (a violation panics, naming the CPU), tears everything down (the manager ends
//! empty and its audit clean) and returns counts. `kernel/tests/smp_code.rs` runs each once with
//! fixed sizes; [`run`] runs them in turn, plus [`mixed`] rounds, until the time is up. Each
//! also works with one CPU, as a reduced check of the same property.
//!
//! | scenario | property |
//! | --- | --- |
//! | [`patching`] | calls through a slot patched live see a whole, current target |
//! | [`replace`] | replaced code is freed only after the CPUs running it passed a quiescent state |
//! | [`tlb`] | a decommitted page's translation is gone on every CPU before its frame is reused |
//! | [`wx`] | published code is writable through no mapping on any CPU; the patching alias is private |
//! | [`traps`] | protected faults land while the trap table is rewritten |
//! | [`lazy`] | a lazy slot hit by every CPU at once installs one function |
//! | [`module_api`] | a module used from every CPU at once keeps its books |
//! | [`cpu_check`] | a CPU without CR0.WP is refused |
//! | [`preempt`] | code a task was preempted inside (by the timer, under a preemptive scheduler) is freed only after the task left it |
//! | [`jit`] | `jit::enter`'s entry records, trap landings and compile stacks are per CPU; a dropped linear memory leaves every TLB |
//!
//! # TCG and cross-modifying code
//!
//! `patch_slot` stores the new slot with one aligned 8-byte store and then makes every other
//! CPU execute a serializing instruction; once that returned, a CPU's next fetch of the slot
//! sees the new bytes (Intel SDM vol. 3, "cross-modifying code"). QEMU's multi-threaded TCG
//! does not model that: it caches translations of guest code (translation blocks) shared by
//! all vCPUs and drops those of a page when a store to the page is noticed, but a vCPU that is
//! translating the slot *while* another vCPU stores to it can link a block translated from the
//! old bytes after the store — the page is write-protected for code only once the block is
//! linked — and that block then runs the old target until the page is written again;
//! serializing instructions do not touch it. Seen here as a call returning the previous
//! target right after `patch_slot` returned, while the slot's bytes in memory were already new.
//!
//! The scenarios that check which target calls reach therefore follow such a patch, under TCG
//! only, with a second `patch_slot` to the same target ([`common::settle_slot`]): every vCPU
//! acknowledged the first patch's serialization IPI, so any block translated from the old bytes
//! is linked by then and the second store removes it, while a translation racing with the
//! second store reads bytes that are already the new ones. Reads of the slot's bytes (memory,
//! not translations) are checked against the first patch, without help.

pub mod common;
pub mod cpu_check;
pub mod jit;
pub mod lazy;
pub mod mixed;
pub mod module_api;
pub mod patching;
pub mod preempt;
pub mod replace;
pub mod tlb;
pub mod traps;
pub mod wx;

use alloc::string::String;
use core::time::Duration;

use crate::cpu::catch::{catch, Caught};
use crate::cpu::time::{rdtsc, Deadline};
use crate::{println, smp, BootInfo, ExitCode};

/// Seconds of stress when the command line names none.
pub const DEFAULT_SECONDS: u64 = 60;
/// Seconds between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Code-window slices of the stress scenarios (tests use others).
const WINDOW: usize = 110;

/// What the stress run did so far.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    rounds: u64,
    patches: u64,
    calls: u64,
    slot_reads: u64,
    replacements: u64,
    reclaimed: u64,
    tlb_checks: u64,
    wx_probes: u64,
    traps: u64,
    lazy_rounds: u64,
    lazy_races: u64,
    module_ops: u64,
    cpu_checks: u64,
    jit_calls: u64,
    jit_compilations: u64,
    preempted_in_code: u64,
    mixed: u64,
}

impl Totals {
    fn line(&self) -> String {
        alloc::format!(
            "{} rounds; patches {}, calls {}, slot reads {}, replacements {} (reclaimed {}), \
             stale-TLB checks {}, W^X probes {}, traps {}, lazy rounds {} (races {}), module ops \
             {}, CPU checks {}, JIT calls {} (concurrent compilations {}), preemptions in code {}, \
             mixed rounds {}",
            self.rounds,
            self.patches,
            self.calls,
            self.slot_reads,
            self.replacements,
            self.reclaimed,
            self.tlb_checks,
            self.wx_probes,
            self.traps,
            self.lazy_rounds,
            self.lazy_races,
            self.module_ops,
            self.cpu_checks,
            self.jit_calls,
            self.jit_compilations,
            self.preempted_in_code,
            self.mixed
        )
    }
}

/// Scenarios in the order the stress run cycles through them.
const SCENARIOS: [&str; 12] = [
    "patching",
    "replace",
    "preempt",
    "tlb",
    "wx-publish",
    "wx-alias",
    "traps",
    "lazy",
    "module-api",
    "cpu-check",
    "jit",
    "mixed",
];

/// Runs scenario `which` once with stress sizes (varied by `round`) and adds its counts.
fn scenario(which: usize, round: u64, t: &mut Totals) {
    let vary = (round % 3) as u32;
    match SCENARIOS[which] {
        "patching" => {
            let s = patching::run(WINDOW, 40 + 20 * u64::from(vary));
            t.patches += s.patches;
            t.calls += s.calls;
            t.slot_reads += s.reads;
        }
        "replace" => {
            let s = replace::run(WINDOW + 1, 4 + 2 * vary, 1 << (20 + vary));
            t.replacements += s.replacements;
            t.reclaimed += s.reclaimed;
            t.calls += s.calls;
        }
        "tlb" => {
            let s = tlb::run(WINDOW + 2, 3 + vary);
            t.tlb_checks += s.faults;
        }
        "wx-publish" => {
            let s = wx::publish(WINDOW + 3, 2);
            t.wx_probes += s.refused_writes;
        }
        "wx-alias" => {
            let s = wx::alias(WINDOW + 4, 40 + 20 * u64::from(vary));
            t.patches += s.patches;
            t.wx_probes += s.probes;
        }
        "traps" => {
            let s = traps::run(WINDOW + 5, 10 + 5 * vary, 100);
            t.traps += s.faults + s.churned;
        }
        "lazy" => {
            let s = lazy::run(WINDOW + 6, 3, 2000);
            t.lazy_rounds += s.rounds;
            t.lazy_races += s.races;
        }
        "module-api" => {
            let s = module_api::run(WINDOW + 7, 6 + 3 * vary, 1 << 20);
            t.module_ops += s.added + s.patches + s.freed + s.cross_calls;
        }
        "cpu-check" => {
            cpu_check::run(WINDOW + 8);
            t.cpu_checks += 1;
        }
        "jit" => {
            let s = jit::run(WINDOW + 11, 50 + 25 * vary);
            t.jit_calls += s.traps + s.returns;
            t.tlb_checks += jit::memory_drop(2 + vary);
            if vary == 0 {
                t.jit_compilations += jit::compile_everywhere(WINDOW + 12, 1);
            }
        }
        "preempt" => {
            let s = preempt::run(
                WINDOW + 13,
                crate::sched::QuiescentRule::Tasks,
                4 + 2 * vary,
            )
            .unwrap_or_else(|e| panic!("preempt: {e}"));
            t.replacements += s.replacements;
            t.reclaimed += s.freed;
            t.calls += s.calls;
            t.preempted_in_code += s.preempted_in_code;
        }
        _ => {
            let s = mixed::run(WINDOW + 10, 6 + 3 * vary, 1 << 22);
            t.calls += s.calls;
            t.traps += s.faults;
            t.mixed += 1;
        }
    }
}

/// Seconds the command line asks for: the word after `stress`, else [`DEFAULT_SECONDS`].
#[must_use]
pub fn seconds(boot: &BootInfo) -> u64 {
    let mut words = boot.command_line().split_ascii_whitespace();
    words
        .by_ref()
        .find(|&w| w == "stress")
        .and_then(|_| words.find(|&w| w != "rox"))
        .and_then(|w| w.parse().ok())
        .unwrap_or(DEFAULT_SECONDS)
}

/// The stress mode: every scenario in turn until the time is up; a progress line every few
/// seconds, then a final line with the counts and `failures: N`. Stops at the first failure
/// (its state is abandoned: a caught panic unwinds nothing), which fails the run.
pub fn run(boot: &BootInfo) -> ExitCode {
    let seconds = seconds(boot);
    // `stress [SECONDS] rox`: every scenario's code on 2 MiB ROX pages (the kernel-wide code
    // mode; each scenario asserts it really got them).
    crate::code::set_rox(boot.has_arg("rox"));
    println!(
        "stress: {} cpus, {seconds} s of: {}; code on {}",
        smp::online_cpus(),
        SCENARIOS.join(", "),
        if crate::code::rox() {
            "2 MiB ROX pages"
        } else {
            "4 KiB pages"
        }
    );
    let start = rdtsc();
    let end = Deadline::after(Duration::from_secs(seconds));
    let mut progress = Deadline::after(PROGRESS_EVERY);
    let mut totals = Totals::default();
    let mut failures = 0u64;
    let elapsed = || crate::cpu::time::duration(rdtsc() - start).as_secs_f32();
    while !end.expired() {
        let which = (totals.rounds % SCENARIOS.len() as u64) as usize;
        let round = totals.rounds / SCENARIOS.len() as u64;
        let mut t = totals;
        let result = catch(|| {
            scenario(which, round, &mut t);
            // Nothing a scenario did may leave a W+X leaf or a writable alias of code behind.
            let audit = crate::memory::wx_audit::audit_active();
            assert!(
                audit.is_clean(),
                "page-table audit after the round: {audit}"
            );
        });
        if let Err(caught) = result {
            failures += 1;
            let why = match caught {
                Caught::Panic(msg) => String::from(msg.as_str()),
                Caught::Fault(info) => alloc::format!("unexpected fault: {info}"),
                Caught::Stopped => String::from("stopped"),
            };
            println!(
                "stress: {:.1} s: scenario {} (round {round}) FAILED:\n{why}",
                elapsed(),
                SCENARIOS[which]
            );
            break;
        }
        totals = t;
        totals.rounds += 1;
        if progress.expired() {
            progress = Deadline::after(PROGRESS_EVERY);
            println!("stress: {:.1} s: {}", elapsed(), totals.line());
        }
    }
    println!(
        "stress: done after {:.1} s: {}; failures: {failures}",
        elapsed(),
        totals.line()
    );
    if failures == 0 {
        ExitCode::Success
    } else {
        ExitCode::Failure
    }
}
