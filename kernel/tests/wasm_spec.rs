//! The WebAssembly spec testsuite in the kernel: the bundle the host tool wrote (every module of
//! every `.wast` file precompiled, the commands, the host wasmtime's outcome of each) runs on this
//! kernel's wasmtime on codespace, on every CPU at once, and every command's outcome must equal
//! the host's (values bit for bit, NaNs by pattern, trap kinds by name).
//!
//! Files run concurrently: each file's whole state (its `Store` with every instance, its linker,
//! its loaded modules) is one job in a shared queue; a CPU takes the oldest job, runs a batch of
//! its commands and puts it back, so a store moves between CPUs between commands, modules
//! instantiated on one CPU are called from others, and a finished file's modules are dropped
//! while the other CPUs keep calling theirs.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use core::time::Duration;

use codespace_kernel::code::{self, test_window};
use codespace_kernel::cpu::percpu::MAX_CPUS;
use codespace_kernel::memory::wx_audit;
use codespace_kernel::wasm::{self, Runtime};
use codespace_kernel::{println, smp};
use codespace_wasmtime::settings;
use codespace_wasmtime::spec::bundle::{self, Bundle};
use codespace_wasmtime::spec::run::FileRun;
use codespace_wasmtime::spec::{self, File, Outcome};
use codespace_wasmtime::wasmtime::Module;

#[path = "wasm_spec/suite.rs"]
mod suite;

use suite::Suite;

codespace_kernel::kernel_tests![
    spec_suite_matches_the_host_command_by_command_on_every_cpu,
    every_cpu_traps_at_once_through_the_trap_table,
    every_spec_module_loaded_at_once_keeps_w_xor_x,
];

/// Deadline for every CPU's share of the suite (debug builds under TCG are slow).
const DEADLINE: Duration = Duration::from_secs(1800);

/// The bundle the launcher built (`codespace-wasm-precompile spec`), decoded.
fn bundle() -> Bundle<'static> {
    let bytes = codespace_kernel::boot_info()
        .module("spec.bundle")
        .expect(
            "Multiboot module spec.bundle missing: run through `cargo test` (the launcher builds \
             it with `codespace-wasm-precompile spec`), or set CODESPACE_QEMU_MODULES",
        )
        .bytes();
    bundle::decode(bytes, settings::fingerprint()).expect("the launcher's bundle is valid")
}

fn runtime(window: usize) -> Runtime {
    wasm::runtime(test_window(window)).expect("a wasmtime runtime over codespace")
}

/// Loads every module of `file`.
fn load_all(rt: &Runtime, file: &File<'_>) -> Result<Vec<Module>, String> {
    file.modules
        .iter()
        .enumerate()
        .map(|(i, cwasm)| {
            // SAFETY: the engine was built with `rt.code`; the containers come from the host
            // tool, checked by their header and checksum before wasmtime reads them.
            unsafe { rt.code.load(&rt.engine, cwasm) }
                .map_err(|e| alloc::format!("loading module {i}: {e:?}"))
        })
        .collect()
}

/// Every command of the v1 suite (or whatever directory the bundle was built from) runs here and
/// ends as it did on the host; with several CPUs, all of them run commands and trap at once,
/// and each trap vector (#PF, #UD, #DE) reached wasmtime through codespace's trap table.
fn spec_suite_matches_the_host_command_by_command_on_every_cpu() {
    let bundle = bundle();
    let files = &bundle.files[..];
    let rt = runtime(110);
    let hits = |v| code::trap_hits(v);
    let before = [hits(14), hits(6), hits(0)];
    let cpus = smp::online_cpus();
    let suite = Suite::new(&rt, files);
    let heap_before = codespace_kernel::memory::reset_heap_peak();
    let start = codespace_kernel::cpu::time::rdtsc();
    smp::on_each_cpu_timeout(DEADLINE, |_| suite.work()).expect("every CPU ran its share");
    let elapsed =
        codespace_kernel::cpu::time::duration(codespace_kernel::cpu::time::rdtsc() - start);

    let results = suite.results.lock().clone();
    println!();
    println!(
        "    {:<28} {:>6} {:>6} {:>5} {:>5}  module/register/invoke/return/trap/exhaust/unlink",
        "file", "passed", "failed", "skip", "mods"
    );
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (file, tally) in files.iter().zip(&results) {
        let t = tally.as_ref().expect("every file ran");
        let k = &t.by_kind;
        println!(
            "    {:<28} {:>6} {:>6} {:>5} {:>5}  {}/{}/{}/{}/{}/{}/{}",
            file.name,
            t.passed,
            t.failed,
            t.skipped,
            file.modules.len(),
            k[0],
            k[1],
            k[2],
            k[3],
            k[4],
            k[5],
            k[6]
        );
        for f in &t.failures {
            println!("      FAILED {}:{f}", file.name);
        }
        for s in &t.skips {
            println!("      skipped {}:{s}", file.name);
        }
        passed += t.passed;
        failed += t.failed;
        skipped += t.skipped;
    }
    let moved = results
        .iter()
        .flatten()
        .filter(|t| t.cpus.count_ones() > 1)
        .count();
    println!(
        "    {moved} of {} files ran on more than one CPU (store and instances made on one, \
         called from others)",
        files.len()
    );
    let after = [hits(14), hits(6), hits(0)];
    let vectors = [
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
    ];
    for cpu in 0..cpus {
        println!(
            "    cpu {cpu}: {} commands, {} traps",
            suite.commands[cpu].load(Ordering::Relaxed),
            suite.traps[cpu].load(Ordering::Relaxed)
        );
    }
    println!(
        "    trap-table hits: #PF {}, #UD {}, #DE {}; {} CPUs in {} ms; heap peak {} KiB over \
         the {} KiB in use before",
        vectors[0],
        vectors[1],
        vectors[2],
        cpus,
        elapsed.as_millis(),
        codespace_kernel::memory::heap_peak().saturating_sub(heap_before) / 1024,
        heap_before / 1024
    );
    println!(
        "spec: {passed} passed, {failed} failed, {skipped} skipped; host reference: {}",
        bundle.host_summary
    );
    assert_eq!(failed, 0, "every command ends as on the host");
    assert!(passed > 0, "the bundle has commands");
    assert!(
        skipped * 100 <= passed + failed + skipped,
        "at most 1% skipped ({skipped})"
    );
    for cpu in 0..cpus {
        assert!(
            suite.commands[cpu].load(Ordering::Relaxed) > 0,
            "cpu {cpu} ran commands"
        );
    }
    for (name, n) in ["#PF", "#UD", "#DE"].iter().zip(vectors) {
        assert!(n > 0, "{name} trap sites were hit through the trap table");
    }
    assert!(
        cpus == 1 || moved > 0,
        "with several CPUs, files move between them"
    );
    drop(suite);
    assert_eq!(rt.code.images(), 0, "every module's image was unpublished");
}

/// Files that together hold every trap kind of the bundle's host outcomes: greedily the file
/// adding the most kinds not yet covered, the shorter file on a tie.
fn trap_cover<'a>(files: &'a [File<'a>]) -> Vec<&'a File<'a>> {
    let kinds = |f: &'a File<'a>| -> Vec<&'a str> {
        let mut k: Vec<&str> = f
            .steps
            .iter()
            .filter_map(|s| match &s.host {
                Outcome::Trap(code) => Some(code.as_str()),
                _ => None,
            })
            .collect();
        k.sort_unstable();
        k.dedup();
        k
    };
    let mut covered: Vec<&str> = Vec::new();
    let mut chosen = Vec::new();
    loop {
        let best = files
            .iter()
            .map(|f| {
                (
                    kinds(f)
                        .into_iter()
                        .filter(|k| !covered.contains(k))
                        .count(),
                    f,
                )
            })
            .filter(|(new, _)| *new > 0)
            .max_by_key(|(new, f)| (*new, core::cmp::Reverse(f.steps.len())));
        let Some((_, f)) = best else {
            return chosen;
        };
        covered.extend(kinds(f));
        covered.sort_unstable();
        covered.dedup();
        chosen.push(f);
    }
}

/// Every CPU runs the same files — together holding every trap kind of the suite — at the same
/// time, each with its own stores: wasm traps (#PF, #UD, #DE) are taken on every CPU at once,
/// all reach wasmtime through the trap table, and every command still ends as on the host.
fn every_cpu_traps_at_once_through_the_trap_table() {
    let bundle = bundle();
    let chosen = trap_cover(&bundle.files);
    let names: Vec<&str> = chosen.iter().map(|f| f.name.as_str()).collect();
    let rt = runtime(112);
    let hits = |v| code::trap_hits(v);
    let before = [hits(14), hits(6), hits(0)];
    let traps: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
    smp::on_each_cpu_timeout(DEADLINE, |cpu| {
        let enabled = x86_64::instructions::interrupts::are_enabled();
        // Interrupts on, as in `Suite::work`: other CPUs' shootdowns need this one's answer.
        x86_64::instructions::interrupts::enable();
        for file in &chosen {
            let modules = load_all(&rt, file).expect("the file's modules load");
            let mut run = FileRun::new(&rt.engine).expect("a store");
            for step in &file.steps {
                let got = run.step(&step.action, &modules);
                if let Err(why) = spec::check(step, &got) {
                    panic!("{}:{} on cpu {cpu}: {why}", file.name, step.line);
                }
                if matches!(got, Outcome::Trap(_)) {
                    traps[cpu].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !enabled {
            x86_64::instructions::interrupts::disable();
        }
    })
    .expect("every CPU ran the files");
    let vectors = [
        hits(14) - before[0],
        hits(6) - before[1],
        hits(0) - before[2],
    ];
    let cpus = smp::online_cpus();
    println!();
    for (cpu, t) in traps.iter().enumerate().take(cpus) {
        println!(
            "    cpu {cpu}: {} traps running {names:?}",
            t.load(Ordering::Relaxed)
        );
        assert!(t.load(Ordering::Relaxed) > 0, "cpu {cpu} took traps");
    }
    println!(
        "    trap-table hits: #PF {}, #UD {}, #DE {}",
        vectors[0], vectors[1], vectors[2]
    );
    for (name, n) in ["#PF", "#UD", "#DE"].iter().zip(vectors) {
        assert!(n > 0, "{name} trap sites were hit through the trap table");
    }
    assert_eq!(rt.code.images(), 0, "every image unpublished");
}

/// With every module of the suite loaded at once: no page is writable and executable, no
/// executable frame has a writable alias, and every executable page of an image lies in a
/// module's text (headers, data, trap and unwind tables stay non-executable).
fn every_spec_module_loaded_at_once_keeps_w_xor_x() {
    // Only the containers (borrowed from the Multiboot module): the decoded commands would take
    // heap the page-table audit needs.
    let containers: Vec<&'static [u8]> =
        bundle().files.into_iter().flat_map(|f| f.modules).collect();
    let rt = runtime(111);
    let start = codespace_kernel::cpu::time::rdtsc();
    let modules: Vec<Module> = containers
        .iter()
        .map(|cwasm| {
            // SAFETY: as in `load_all`.
            unsafe { rt.code.load(&rt.engine, cwasm) }.expect("every module loads")
        })
        .collect();
    let images = rt.code.image_ranges();
    assert_eq!(images.len(), modules.len(), "one image per module");
    let texts: Vec<(usize, usize)> = modules
        .iter()
        .map(|m| {
            let t = m.text();
            (t.as_ptr() as usize, t.as_ptr() as usize + t.len())
        })
        .collect();
    let loaded =
        codespace_kernel::cpu::time::duration(codespace_kernel::cpu::time::rdtsc() - start);
    let report = wx_audit::audit_active();
    println!(
        "\n    {} modules loaded in {} ms: {} leaves, {} W+X, {} writable aliases of executable frames",
        modules.len(),
        loaded.as_millis(),
        report.leaves,
        report.writable_and_executable.len(),
        report.writable_aliases.len()
    );
    assert!(report.is_clean(), "W^X audit: {report}");
    let (mut exec_pages, mut image_pages) = (0, 0);
    for image in &images {
        for va in (image.start() & !0xFFF..image.end()).step_by(4096) {
            image_pages += 1;
            let Some(e) = codespace_kernel::memory::leaf_entry(va as u64) else {
                continue;
            };
            let executable = e & 1 != 0 && e & (1 << 63) == 0;
            assert_eq!(e & 2, 0, "image page {va:#x} is not writable");
            if executable {
                exec_pages += 1;
                assert!(
                    texts.iter().any(|&(t0, t1)| t0 <= va && va < t1),
                    "page {va:#x} is executable outside every module's text"
                );
            }
        }
    }
    println!("    image pages: {image_pages}, executable (all text): {exec_pages}");
    assert!(exec_pages > 0 && exec_pages < image_pages);
    drop(modules);
    assert_eq!(rt.code.images(), 0, "every image unpublished");
}
