//! codespace on every CPU at once (issue 9's tests): live jump-slot patching under calls,
//! replacing and freeing code that other CPUs are running, stale TLB entries after a decommit,
//! W^X and the private patching alias across CPUs, concurrent traps, the lazy-slot race, one
//! module used from every CPU, and the per-CPU WP check.
//!
//! Each test runs one scenario of `codespace_kernel::stress` (where the checks live, so that
//! `cargo run -- stress` runs the very same code) with fixed sizes and checks its counts. With
//! one CPU each scenario is a reduced check of the same property, run on CPU 0 alone. Under
//! QEMU's TCG, scenarios that check which target a call through a just-patched slot reaches
//! patch it a second time first (`stress` module docs: "TCG and cross-modifying code").
//!
//! Each safety check was run once against a broken variant and failed: the slot store split in
//! two 4-byte stores (torn slot read), no grace period (the replaced version freed under a
//! running CPU, INT3 executed), no TLB shootdown (stale-TLB read of the reused frame; a write
//! through a stale writable direct-map translation), the alias also mapped in the shared page
//! table (alias readable on other CPUs), no reader drain in the trap table's latch (a fault
//! handler reading a freed table), `add_code` instead of `install_if_absent` (4 installs of one
//! lazy function), no module/manager lock exclusion (corrupted books), no per-CPU check (a
//! CPU without WP accepted) and no cross-CPU serialization after a patch (a call reached the
//! previous target after `patch_slot` returned).
#![no_std]
#![no_main]

use codespace_kernel::code;
use codespace_kernel::cpu::time::{duration, rdtsc};
use codespace_kernel::println;
use codespace_kernel::smp;
use codespace_kernel::stress::{
    cpu_check, jit, lazy, mixed, module_api, patching, replace, tlb, traps, wx,
};

codespace_kernel::kernel_tests![
    jump_table_patching_stress,
    replace_and_free_under_execution,
    stale_tlb_detector,
    wx_across_cpus,
    concurrent_traps,
    lazy_slot_race,
    concurrent_module_api,
    cpu_without_write_protect_is_refused,
    jit_enter_on_every_cpu_at_once,
    jit_linear_memory_drop_shoots_down_every_cpu,
    jit_compiles_on_every_cpu_at_once,
    all_scenarios_mixed_at_once,
    rox_wx_across_cpus,
    rox_replace_and_free_under_execution,
    rox_jump_table_patching_stress,
    rox_concurrent_traps,
    rox_lazy_slot_race,
    rox_concurrent_module_api,
    rox_all_scenarios_mixed_at_once,
];

fn cpus() -> usize {
    smp::online_cpus()
}

/// Runs `f` and says how long it took (TCG time: emulated, for keeping tests short).
fn timed<T>(f: impl FnOnce() -> T) -> T {
    let start = rdtsc();
    let r = f();
    println!("    ({:.1} s)", duration(rdtsc() - start).as_secs_f32());
    r
}

/// One slot, four implementations (two below the table, two above: a torn store would show),
/// patched 600 times by CPU 0 while the other CPUs call through it and read it.
fn jump_table_patching_stress() {
    println!(
        "    under TCG: {}",
        codespace_kernel::stress::common::under_tcg()
    );
    let s = timed(|| patching::run(70, 150));
    println!(
        "    {} patches, {} calls, {} slot reads ({} too close to patches to check recency), \
         calls per implementation {:?}",
        s.patches, s.calls, s.reads, s.unchecked, s.per_impl
    );
    assert!(s.calls >= s.patches, "a call after every patch at least");
    if cpus() > 1 {
        assert!(
            s.reads >= 4 * s.calls.min(s.patches),
            "the observers read the slot"
        );
        let seen = s.per_impl.iter().filter(|&&c| c > 0).count();
        assert!(
            seen >= 2,
            "calls reached several implementations: {:?}",
            s.per_impl
        );
        assert!(
            s.unchecked < s.calls + s.reads,
            "some results were checked for recency"
        );
    }
}

/// 12 replacements of a function the other CPUs are running (each call 2^23 loop iterations).
fn replace_and_free_under_execution() {
    let s = timed(|| replace::run(71, 12, 1 << 23));
    println!(
        "    {} replacements, {} calls, {} polls saw a CPU inside retired code (still registered), \
         {} versions reclaimed",
        s.replacements, s.calls, s.inside_while_retired, s.reclaimed
    );
    assert_eq!(s.replacements, 12);
    assert_eq!(s.reclaimed, 12, "every old version was freed in the end");
    if cpus() > 1 {
        assert!(
            s.inside_while_retired > 0,
            "a CPU was running a retired version while it was polled"
        );
    }
}

/// B caches a code page's translations, A decommits it and reuses the frame: B must fault.
fn stale_tlb_detector() {
    let rounds = 2 * cpus().max(2) as u32;
    let s = timed(|| tlb::run(72, rounds));
    println!(
        "    {} rounds, {} accesses through freed translations faulted",
        s.rounds, s.faults
    );
    assert_eq!(s.faults, 2 * s.rounds, "a read and a call per round");
    if code::rox() {
        // Freed code on a page that stays mapped: the old code until the grace period, INT3
        // after the refill, the new code after its publish — one of each per round.
        println!(
            "    ROX: {} rounds on a kept page: {} old-code runs before the refill, {} INT3 \
             traps after it, {} new-code runs after the publish",
            s.rox_rounds, s.old_before_refill, s.int3_after_refill, s.new_after_publish
        );
        assert_eq!(s.rox_rounds, u64::from(rounds));
        let each = (
            s.old_before_refill,
            s.int3_after_refill,
            s.new_after_publish,
        );
        assert_eq!(each, (s.rox_rounds, s.rox_rounds, s.rox_rounds));
    }
}

/// Published code cannot be written through any mapping by any CPU; the alias is private.
fn wx_across_cpus() {
    let p = timed(|| wx::publish(73, 3));
    println!(
        "    {} pages published: {} writes refused (3 mappings x {} cpus each)",
        p.pages,
        p.refused_writes,
        cpus()
    );
    // ROX (`wx::publish` runs `publish_rox`): a page is never writable, so every CPU's writes
    // are refused before each publish as well as after it.
    let checks = if code::rox() { 2 } else { 1 };
    assert_eq!(p.refused_writes, checks * 3 * p.pages * cpus() as u64);
    let a = timed(|| wx::alias(74, 200));
    println!(
        "    {} patches through the alias ({} sessions), {} probes of the alias and the slot \
         faulted",
        a.patches, a.pokes, a.probes
    );
    assert!(a.probes > 0, "the alias was probed");
}

/// Every CPU but 0 faults in protected code while CPU 0 registers and releases code.
fn concurrent_traps() {
    concurrent_traps_on(75);
}

fn concurrent_traps_on(window: usize) {
    let s = timed(|| traps::run(window, 40, 300));
    println!(
        "    {}{} faults landed, {} protected objects registered and released meanwhile",
        mode(),
        s.faults,
        s.churned
    );
    assert!(s.churned >= 40);
    let others = cpus() as u64 - 1;
    assert!(s.faults >= 300 * others, "each faulting CPU faulted enough");
}

/// Every CPU calls the same lazy slot at once: one installation per function.
fn lazy_slot_race() {
    lazy_slot_race_on(76);
}

fn lazy_slot_race_on(window: usize) {
    let s = timed(|| lazy::run(window, 8, 3000));
    println!(
        "    {}{} rounds, {} compilations, {} rounds with a race (one install each)",
        mode(),
        s.rounds,
        s.compilations,
        s.races
    );
    assert_eq!(s.rounds, 8);
    assert!(s.compilations >= s.rounds);
}

/// Every CPU adds, patches and frees code of one module at once.
fn concurrent_module_api() {
    concurrent_module_api_on(77);
}

fn concurrent_module_api_on(window: usize) {
    const ITERATIONS: u32 = 15;
    let s = timed(|| module_api::run(window, ITERATIONS, 1 << 22));
    println!(
        "    {}{} objects added, {} patches, {} frees, {} calls of other CPUs' slots",
        mode(),
        s.added,
        s.patches,
        s.freed,
        s.cross_calls
    );
    let n = cpus() as u64;
    assert_eq!(s.cross_calls, 2 * u64::from(ITERATIONS) * n);
    // Iteration k (from 4 on) frees a wrapper when k % 3 == 1.
    let wrappers = (4..4 + ITERATIONS).filter(|k| k % 3 == 1).count() as u64;
    assert_eq!(
        s.freed,
        wrappers * n,
        "one wrapper freed every third iteration"
    );
    assert_eq!(s.patches, 2 * s.freed, "to the wrapper and back");
}

/// An AP with CR0.WP off is refused on its first use of a manager (one CPU: when creating one).
fn cpu_without_write_protect_is_refused() {
    let cpu = timed(|| cpu_check::run(78));
    if cpu == 0 {
        println!("    cpu 0 without WP could not create a manager");
    } else {
        println!("    cpu {cpu} without WP refused by a manager made on cpu 0, accepted with WP");
    }
}

/// Every CPU calls Cranelift code through `jit::enter` at once, trapping and returning.
fn jit_enter_on_every_cpu_at_once() {
    let s = timed(|| jit::run(79, 200));
    println!(
        "    {} calls trapped back to their own caller, {} returned",
        s.traps, s.returns
    );
    assert_eq!(s.traps, 200 * cpus() as u64);
    assert_eq!(s.returns, s.traps);
}

/// A dropped linear memory's frame, reused, is not reachable through another CPU's TLB.
fn jit_linear_memory_drop_shoots_down_every_cpu() {
    let rounds = 2 * cpus().max(2) as u32;
    let faults = timed(|| jit::memory_drop(rounds));
    println!("    {rounds} memories dropped and their frames reused: {faults} reads faulted");
    assert_eq!(faults, u64::from(rounds));
}

/// Every CPU compiles with Cranelift at the same time and gets the same code.
fn jit_compiles_on_every_cpu_at_once() {
    let checked = timed(|| jit::compile_everywhere(81, 1));
    println!("    {checked} concurrent compilations matched the one-CPU result");
    assert_eq!(checked, 2 * cpus() as u64);
}

/// The stress mode's mixed round: patching, replacing and trap churn at once.
fn all_scenarios_mixed_at_once() {
    all_scenarios_mixed_at_once_on(80);
}

fn all_scenarios_mixed_at_once_on(window: usize) {
    let s = timed(|| mixed::run(window, 20, 1 << 24));
    println!(
        "    {}{} rounds, {} calls, {} faults landed",
        mode(),
        s.rounds,
        s.calls,
        s.faults
    );
    assert!(s.calls > 0);
}

/// The ROX mode (issue 20): code on 2 MiB pages that are R+X from the start. No CPU can write a
/// byte of a code page through any of its three addresses, before or after the publish, and a
/// publish shoots nothing down; patching goes through the private alias as in 4 KiB mode.
fn rox_wx_across_cpus() {
    if ran_in_the_rox_pass("wx_across_cpus") {
        return;
    }
    let p = timed(|| wx::publish_rox(110, 3));
    println!(
        "    {} pages published on ROX pages: {} writes refused (3 mappings x {} cpus, before \
         and after each publish)",
        p.pages,
        p.refused_writes,
        cpus()
    );
    assert_eq!(p.refused_writes, 2 * 3 * p.pages * cpus() as u64);
    // Fewer patches than `wx_across_cpus`: the alias protocol is the same, only the page differs.
    let a = in_rox_mode(|| timed(|| wx::alias(111, 50)));
    println!(
        "    {} patches of a slot on a ROX page through the alias ({} sessions), {} probes \
         faulted",
        a.patches, a.pokes, a.probes
    );
    assert!(a.probes > 0, "the alias was probed");
}

/// [`replace_and_free_under_execution`] with the module's code on ROX pages: freed code is
/// refilled with INT3 through the alias, never decommitted under a running CPU.
fn rox_replace_and_free_under_execution() {
    if ran_in_the_rox_pass("replace_and_free_under_execution") {
        return;
    }
    let s = in_rox_mode(|| timed(|| replace::run(112, 12, 1 << 23)));
    println!(
        "    ROX: {} replacements, {} calls, {} polls inside retired code, {} reclaimed",
        s.replacements, s.calls, s.inside_while_retired, s.reclaimed
    );
    assert_eq!(s.replacements, 12);
    assert_eq!(s.reclaimed, 12, "every old version was freed in the end");
    if cpus() > 1 {
        assert!(s.inside_while_retired > 0, "a CPU ran a retired version");
    }
}

/// [`jump_table_patching_stress`] with the jump table and the implementations on ROX pages.
fn rox_jump_table_patching_stress() {
    if ran_in_the_rox_pass("jump_table_patching_stress") {
        return;
    }
    let s = in_rox_mode(|| timed(|| patching::run(113, 50)));
    println!(
        "    ROX: {} patches, {} calls, {} slot reads, calls per implementation {:?}",
        s.patches, s.calls, s.reads, s.per_impl
    );
    assert!(s.calls >= s.patches, "a call after every patch at least");
    if cpus() > 1 {
        let seen = s.per_impl.iter().filter(|&&c| c > 0).count();
        assert!(
            seen >= 2,
            "calls reached several implementations: {:?}",
            s.per_impl
        );
    }
}

/// `"ROX: "` while the scenarios run in the ROX mode, else nothing: the prefix of a result line.
fn mode() -> &'static str {
    if code::rox() {
        "ROX: "
    } else {
        ""
    }
}

/// In the launcher's ROX pass (the kernel booted with `rox`) a `rox_*` test is its 4 KiB twin
/// run again in the same mode: it says so and is skipped (the twin ran in the ROX mode already,
/// with the mode-specific checks), which keeps the pass ~15 s shorter.
fn ran_in_the_rox_pass(twin: &str) -> bool {
    let booted_rox = codespace_kernel::boot_info().has_arg("rox");
    if booted_rox {
        println!("    skipped in the ROX pass: `{twin}` ran in the ROX mode already");
    }
    booted_rox
}

/// Runs `f` with the scenarios in the ROX mode, then puts back the mode that was on before (the
/// launcher's ROX pass boots this kernel with the mode on). A failing `f` does not come back
/// here (the test framework's catch does not run destructors); the framework resets the mode
/// to the command line's before each test.
fn in_rox_mode<T>(f: impl FnOnce() -> T) -> T {
    let before = code::rox();
    code::set_rox(true);
    let r = f();
    code::set_rox(before);
    r
}

/// `concurrent_traps` with the faulting code on ROX pages: its trap entries churn while every
/// CPU faults, as in 4 KiB mode.
fn rox_concurrent_traps() {
    if ran_in_the_rox_pass("concurrent_traps") {
        return;
    }
    in_rox_mode(|| concurrent_traps_on(114));
}

/// `lazy_slot_race` with the lazy slots and the installed code on ROX pages.
fn rox_lazy_slot_race() {
    if ran_in_the_rox_pass("lazy_slot_race") {
        return;
    }
    in_rox_mode(|| lazy_slot_race_on(115));
}

/// `concurrent_module_api` on ROX pages: every CPU adds, patches and frees code of one module.
fn rox_concurrent_module_api() {
    if ran_in_the_rox_pass("concurrent_module_api") {
        return;
    }
    in_rox_mode(|| concurrent_module_api_on(116));
}

/// `all_scenarios_mixed_at_once` with its modules on ROX pages.
fn rox_all_scenarios_mixed_at_once() {
    if ran_in_the_rox_pass("all_scenarios_mixed_at_once") {
        return;
    }
    in_rox_mode(|| all_scenarios_mixed_at_once_on(117));
}
