//! In-kernel benchmarks (`cargo run -- bench`): what codespace operations cost on real page
//! tables, measured with the TSC.
//!
//! The TSC is calibrated against PIT channel 2. Each figure is `REPS` timed repetitions after
//! `WARMUP` untimed ones; the median and the 99th percentile are printed in cycles and ns. Each
//! repetition is bracketed by `lfence; rdtsc` and `lfence; rdtsc; lfence`, so the timed work can
//! neither start before the first read nor finish after the second.

mod jit;
mod memory_rows;
mod module_rows;
mod rox_rows;
mod smp;
mod spec_rows;
mod wasm_rows;

use alloc::vec::Vec;
use core::arch::x86_64::{_mm_lfence, _rdtsc};

use codespace::CodeManager;

use crate::code::{self, KernelMmu, REGISTRIES};
use crate::cpu::qemu::ExitCode;
use crate::{memory, println};

/// Ends rows that dropped their modules: two grace periods (a dropped module's teardown is
/// itself deferred once) with everything due reclaimed, then the code spaces the dropped
/// modules only queued are released — the bench runs in task context with interrupts off,
/// where dropping only queues them, and a manager dropped with them queued leaves them mapped.
///
/// # Panics
/// When a manager of `managers` still has pages committed.
fn give_back(managers: &[&CodeManager<KernelMmu>]) {
    for _ in 0..2 {
        // SAFETY: between rows: no generated code runs on this CPU and no lookup reference is
        // held.
        unsafe { code::synchronize() };
        REGISTRIES.reclaim();
    }
    for manager in managers {
        manager.release_pending().expect("release");
        assert_eq!(manager.committed(), 0, "every space given back");
    }
}

pub(super) const WARMUP: usize = 100;
pub(super) const REPS: usize = 1000;

/// Time stamp, ordered after everything before it.
fn start() -> u64 {
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        _mm_lfence();
        _rdtsc()
    }
}

/// Time stamp, ordered after the timed work and before everything after it.
fn stop() -> u64 {
    // rdtscp is missing from QEMU's qemu64 model: lfence before and after rdtsc orders it the
    // same way (the timed work retires before the read, later work starts after it).
    // SAFETY: lfence and rdtsc have no preconditions on x86-64.
    unsafe {
        _mm_lfence();
        let t = _rdtsc();
        _mm_lfence();
        t
    }
}

/// TSC ticks per microsecond, measured over 20 ms of PIT channel 2.
fn calibrate() -> f64 {
    crate::cpu::time::pit_ticks(20) as f64 / 20_000.0
}

/// "KVM", "TCG" or another hypervisor signature from CPUID 0x4000_0000; "bare metal" without.
fn hypervisor() -> &'static str {
    match crate::code::hypervisor_signature() {
        None => "bare metal",
        Some(sig) if &sig == b"KVMKVMKVM\0\0\0" => "KVM",
        Some(sig) if &sig == b"TCGTCGTCGTCG" => "TCG",
        Some(_) => "other hypervisor",
    }
}

struct Report {
    ticks_per_us: f64,
}

impl Report {
    /// Runs `rep` `WARMUP + REPS` times; each run returns the cycles of its timed part.
    fn measure(&self, name: &str, per: usize, mut rep: impl FnMut() -> u64) {
        let mut samples = Vec::with_capacity(REPS);
        for i in 0..WARMUP + REPS {
            let cycles = rep();
            if i >= WARMUP {
                samples.push(cycles);
            }
        }
        samples.sort_unstable();
        let median = samples[samples.len() / 2];
        let p99 = samples[samples.len() * 99 / 100];
        let ns = |c: u64| c as f64 * 1000.0 / self.ticks_per_us;
        let per_item = if per > 1 {
            alloc::format!("{:>9.0} ns/page", ns(median) / per as f64)
        } else {
            alloc::string::String::new()
        };
        println!(
            "  {name:<58} {median:>10} {p99:>10} {:>11.0} {:>11.0} {per_item}",
            ns(median),
            ns(p99)
        );
    }
}

/// A tiny xorshift generator: reproducible sizes and addresses without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs every benchmark and prints the table; with `smp_only`, the rows that depend on the
/// number of CPUs only (the launcher boots the bench again with 2 and 4 CPUs for those).
#[must_use]
pub fn run(smp_only: bool) -> ExitCode {
    let hv = hypervisor();
    let ticks = calibrate();
    println!(
        "\ncodespace in-kernel benchmarks, {} CPU(s) online",
        crate::smp::online_cpus()
    );
    println!("  running under: {hv}; TSC {ticks:.0} MHz (calibrated on PIT channel 2)");
    if hv == "TCG" {
        println!("  NOTE: TCG emulates the CPU: these figures are NOT representative of hardware.");
    }
    println!("  {REPS} repetitions after {WARMUP} warm-up runs each\n");
    println!(
        "  {:<58} {:>10} {:>10} {:>11} {:>11}",
        "operation", "median cyc", "p99 cyc", "median ns", "p99 ns"
    );
    let r = Report {
        ticks_per_us: ticks,
    };
    if smp_only {
        smp::run(&r);
        // Shootdown and sync rounds exist only with other CPUs online.
        rox_rows::run(&r);
        spec_rows::run(&r);
        return ExitCode::Success;
    }
    let manager = memory_rows::manager(100);
    let flushes_before = manager.flush_stats().expect("flush stats");
    memory_rows::run(&r, &manager);
    module_rows::run(&r);
    rox_rows::run(&r);
    smp::run(&r);
    jit::run(&r);
    wasm_rows::run(&r);
    spec_rows::run(&r);

    let flushes = manager.flush_stats().expect("flush stats");
    println!(
        "\n  TLB invalidations issued: {} invlpg, {} full flushes; audit clean: {}",
        flushes.single_pages - flushes_before.single_pages,
        flushes.full - flushes_before.full,
        manager.audit().expect("audit").is_clean()
    );
    println!("  free frames: {}", memory::frames().free_frames());
    ExitCode::Success
}
