//! The spec suite's modules in both page modes, side by side (issue 20): every module of the v1
//! spec suite (the `spec.bundle` Multiboot module the launcher builds) loaded at once by
//! wasmtime into a module on 4 KiB pages, then into a ROX module of a ROX manager. Counts are
//! exact: shootdown and serialization rounds, alias sessions and invlpg per module load (place
//! the image, publish its text), and the page-table leaves covering the code — each an iTLB
//! entry, counted by querying every page of every text.
//!
//! A wasmtime image is one contiguous mapping whose text lies between parts that must stay
//! R+NX, so in the ROX mode images take 4 KiB code spaces of their own (the crate's rule, see
//! `AllocatorConfig::rox`): these rows show what that costs the suite, measured, not assumed.

use alloc::sync::Arc;
use alloc::vec::Vec;

use codespace::module::{CodeModule, ModuleConfig};
use codespace::PAGE_SIZE;
use codespace_wasmtime::settings;
use codespace_wasmtime::spec::bundle;
use codespace_wasmtime::wasmtime::Module;

use super::rox_rows::work;
use super::{start, stop, Report};
use crate::code::REGISTRIES;
use crate::{memory, println, wasm};

pub(super) fn run(r: &Report) {
    let Some(bytes) = crate::boot_info().module("spec.bundle").map(|m| m.bytes()) else {
        println!(
            "  (spec rows skipped: no spec.bundle Multiboot module; run `cargo run -- bench`)"
        );
        return;
    };
    // Only the containers (borrowed from the Multiboot module): the decoded commands are
    // dropped file by file, so the heap holds the loaded modules' metadata only.
    let containers: Vec<&[u8]> = bundle::decode(bytes, settings::fingerprint())
        .expect("the launcher's bundle is valid")
        .files
        .into_iter()
        .flat_map(|f| f.modules)
        .collect();
    println!(
        "\n  the spec suite's {} modules, loaded at once: 4 KiB pages vs a ROX manager",
        containers.len()
    );
    one_mode(r, &containers, 107, false);
    one_mode(r, &containers, 108, true);
}

/// Loads every container into a runtime whose module asks for ROX spaces or not, prints its
/// rows and gives everything back.
fn one_mode(r: &Report, containers: &[&[u8]], window: usize, rox: bool) {
    let mode = if rox { "ROX manager" } else { "4 KiB" };
    let manager = super::rox_rows::manager(window, rox);
    let module = CodeModule::new(
        &manager,
        &REGISTRIES,
        ModuleConfig {
            rox,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let rt = wasm::runtime_of(Arc::new(module), wasm::config()).expect("wasm runtime");
    let before = manager.flush_stats().expect("stats");
    let t0 = start();
    let modules: Vec<Module> = containers
        .iter()
        .map(|cwasm| {
            // SAFETY: the engine was built with `rt.code`; the container comes from the host
            // tool and is checked before wasmtime reads it.
            unsafe { rt.code.load(&rt.engine, cwasm) }.expect("every spec module loads")
        })
        .collect();
    let cycles = stop() - t0;
    let load = work(before, manager.flush_stats().expect("stats"));
    let n = modules.len() as f64;
    let (mut text_bytes, mut small, mut huge) = (0usize, 0usize, 0usize);
    for m in &modules {
        let text = m.text();
        text_bytes += text.len();
        let first = text.as_ptr() as usize & !(PAGE_SIZE - 1);
        let end = text.as_ptr() as usize + text.len();
        let mut last_huge = None;
        for page in (first..end).step_by(PAGE_SIZE) {
            let leaf = manager.query(page).expect("query").expect("text is mapped");
            assert!(leaf.executable && !leaf.writable, "text page {page:#x}");
            match memory::leaf_size(page as u64) {
                Some(4096) => small += 1,
                Some(size) => {
                    let base = page as u64 & !(size - 1);
                    if last_huge != Some(base) {
                        huge += 1;
                        last_huge = Some(base);
                    }
                }
                None => unreachable!("a mapped page has a leaf"),
            }
        }
    }
    let audit = manager.audit().expect("audit");
    assert!(audit.is_clean(), "{audit:?}");
    let stats = manager.stats();
    let mib = text_bytes as f64 / f64::from(1 << 20);
    println!(
        "  {:<58} {cycles:>10} cycles, {:.0} us per module",
        alloc::format!("[{mode}] load {} modules (image + publish)", modules.len()),
        cycles as f64 / r.ticks_per_us / n
    );
    println!(
        "  {:<58} {:.2} shootdown + {:.2} sync rounds, {:.2} alias sessions, {:.1} invlpg per load",
        "",
        load.0 as f64 / n,
        load.1 as f64 / n,
        load.2 as f64 / n,
        load.3 as f64 / n
    );
    println!(
        "  {:<58} {:.2} MiB of text: {} leaves ({} of 4 KiB, {} of 2 MiB) = {} iTLB entries, \
         {:.1} per MiB; window: {} + {} leaves; {} ROX spaces, {} fallbacks",
        "",
        mib,
        small + huge,
        small,
        huge,
        small + huge,
        (small + huge) as f64 / mib,
        audit.small_leaves,
        audit.huge_leaves,
        stats.rox_spaces,
        stats.rox_fallbacks
    );
    assert_eq!(stats.rox_fallbacks, 0, "images are not fallbacks");
    drop(modules);
    assert_eq!(rt.code.images(), 0, "every image unpublished");
    drop(rt);
    super::give_back(&[&manager]);
}
