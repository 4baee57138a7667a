//! The two page modes side by side (issue 20): a 10^4-function module loaded on 4 KiB pages
//! and on 2 MiB ROX pages. Counts are exact: page-table leaves covering the code (the audit's
//! walk; each leaf is one iTLB entry, a 2 MiB one covering 512 pages), shootdown and
//! serialization rounds and alias sessions for the load and for one publish after it.

use alloc::vec::Vec;

use codespace::mmu::FlushStats;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{CodeManager, ManagerConfig, ProtectionMode};

use super::{start, stop, Report};
use crate::code::{self, test_window, KernelMmu, REGISTRIES};
use crate::println;

/// Functions in the module, and bytes of each.
const FUNCTIONS: u32 = 10_000;
const SIZE: usize = 128;

pub(super) fn manager(window: usize, rox: bool) -> CodeManager<KernelMmu> {
    code::manager(
        test_window(window),
        ManagerConfig {
            protection: ProtectionMode::Alias,
            max_committed: 256 << 20,
            rox_code: rox,
            ..ManagerConfig::default()
        },
    )
    .expect("manager")
}

/// `after - before` as (shootdown rounds, serialization rounds, alias sessions, invlpg, full).
pub(super) fn work(before: FlushStats, after: FlushStats) -> (u64, u64, u64, u64, u64) {
    (
        after.shootdowns - before.shootdowns,
        after.syncs - before.syncs,
        after.pokes - before.pokes,
        after.single_pages - before.single_pages,
        after.full - before.full,
    )
}

/// Loads the module in one mode and prints its rows.
fn one_mode(r: &Report, window: usize, rox: bool) {
    let mode = if rox { "ROX 2 MiB" } else { "4 KiB" };
    let manager = manager(window, rox);
    // Counted from before the module exists: creating it maps its first pages (in the ROX
    // mode its 2 MiB page, sealing the aliases) and publishes its jump table.
    let before = manager.flush_stats().expect("stats");
    let module = CodeModule::new(
        &manager,
        &REGISTRIES,
        ModuleConfig {
            functions: FUNCTIONS,
            rox,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let mut body = [0x90u8; SIZE];
    body[SIZE - 1] = 0xC3;
    let batch: Vec<NewCode<'_>> = (0..FUNCTIONS)
        .map(|i| NewCode::function(i, &body))
        .collect();
    let t0 = start();
    let objects = module.add_code_batch(&batch).expect("load");
    let cycles = stop() - t0;
    let load = work(before, manager.flush_stats().expect("stats"));
    let audit = manager.audit().expect("audit");
    assert!(audit.is_clean(), "{audit:?}");
    let stats = manager.stats();
    if rox {
        assert!(
            stats.rox_spaces > 0 && stats.rox_fallbacks == 0,
            "{stats:?}"
        );
    }
    let mib = manager.committed() as f64 / f64::from(1 << 20);
    let leaves = audit.small_leaves + audit.huge_leaves;
    println!(
        "  {:<58} {cycles:>10} cycles, {:.0} us",
        alloc::format!("[{mode}] load 10^4 functions (one batch; counts: module too)"),
        cycles as f64 / r.ticks_per_us
    );
    println!(
        "  {:<58} {} shootdown + {} sync rounds, {} alias sessions, {} invlpg + {} full",
        "", load.0, load.1, load.2, load.3, load.4
    );
    println!(
        "  {:<58} {:.2} MiB committed: {} leaves ({} of 4 KiB, {} of 2 MiB) = {} iTLB \
         entries, {:.1} leaves per MiB; {} ROX spaces, {} fallbacks",
        "",
        mib,
        leaves,
        audit.small_leaves,
        audit.huge_leaves,
        leaves,
        leaves as f64 / mib,
        stats.rox_spaces,
        stats.rox_fallbacks
    );
    // One more publish once the module is loaded: replace function 0.
    let mut other = body;
    other[0] = 0xCC;
    let before = manager.flush_stats().expect("stats");
    let t0 = start();
    let replaced = module
        .add_code(&NewCode::function(0, &other))
        .expect("replace");
    let cycles = stop() - t0;
    let one = work(before, manager.flush_stats().expect("stats"));
    println!(
        "  {:<58} {cycles:>10} cycles; {} shootdown + {} sync rounds, {} alias sessions",
        alloc::format!("[{mode}] publish one function into the loaded module"),
        one.0,
        one.1,
        one.2
    );
    drop(replaced);
    drop(objects);
    drop(module);
    super::give_back(&[&manager]);
}

pub(super) fn run(r: &Report) {
    println!(
        "\n  4 KiB pages vs 2 MiB ROX pages (ManagerConfig::rox_code, ModuleConfig::rox), {} CPU(s)",
        crate::smp::online_cpus()
    );
    one_mode(r, 105, false);
    one_mode(r, 106, true);
}
