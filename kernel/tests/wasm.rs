//! wasmtime's runtime on codespace in this kernel: SSE on every CPU, wasmtime's memory hooks
//! (reservation, commit, grow, release) on the kernel's wasm slot, and the checked `.cwasm`
//! containers the host tool writes (handed over as Multiboot modules by the launcher).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::ToString;

use alloc::vec::Vec;
use codespace_kernel::code::{self, test_window};
use codespace_kernel::memory;
use codespace_kernel::wasm::{self, memory as wasm_memory, Runtime};
use codespace_wasmtime::image::{self, ImageError};
use codespace_wasmtime::settings;
use codespace_wasmtime::wasmtime::{
    Engine, Instance, Memory, MemoryType, Module, Store, Trap, TypedFunc, WasmParams, WasmResults,
};
use codespace_wasmtime::LoadError;

codespace_kernel::kernel_tests![
    sse_is_enabled_on_every_cpu,
    linear_memory_commits_grows_and_gives_everything_back,
    precompiled_container_is_checked_before_wasmtime_sees_it,
    module_runs_from_codespace_with_only_its_text_executable,
    traps_reach_wasmtime_through_the_trap_table,
    dropped_module_leaves_nothing_published,
    bad_containers_leave_nothing_placed,
    module_for_other_tunables_or_cpu_is_refused_by_wasmtime,
];

/// Executable pages in `[start, end)` of the live page table.
fn executable_pages(start: usize, end: usize) -> Vec<usize> {
    (start..end)
        .step_by(4096)
        .filter(|&va| {
            memory::leaf_entry(va as u64).is_some_and(|e| e & 1 != 0 && e & (1 << 63) == 0)
        })
        .collect()
}

fn runtime(window: usize) -> Runtime {
    wasm::runtime(test_window(100 + window)).expect("a wasmtime runtime over codespace")
}

fn load(rt: &Runtime) -> Module {
    // SAFETY: the engine was built with `rt.code`; the container comes from the host tool.
    unsafe { rt.code.load(&rt.engine, basic_cwasm()) }.expect("basic.cwasm loads")
}

fn func<P: WasmParams, R: WasmResults>(
    store: &mut Store<()>,
    instance: &Instance,
    name: &str,
) -> TypedFunc<P, R> {
    instance
        .get_typed_func::<P, R>(&mut *store, name)
        .expect("export with that signature")
}

/// The trap `call` ended with (it must trap).
fn trap_of<T: core::fmt::Debug>(result: Result<T, codespace_wasmtime::wasmtime::Error>) -> Trap {
    let err = result.expect_err("the call traps");
    *err.downcast_ref::<Trap>()
        .unwrap_or_else(|| panic!("a wasm trap, not {err:?}"))
}

/// The container the launcher precompiled from `kernel/tests/wasm/basic.wat`.
fn basic_cwasm() -> &'static [u8] {
    codespace_kernel::boot_info()
        .module("basic.cwasm")
        .expect(
            "Multiboot module basic.cwasm missing: run through `cargo test` (the launcher \
             precompiles kernel/tests/wasm/*.wat), or set CODESPACE_QEMU_MODULES",
        )
        .bytes()
}

fn engine() -> Engine {
    Engine::new(&wasm::config()).expect("the kernel's wasmtime config builds an engine")
}

/// CR0/CR4 allow SSE and CPUID has every feature of the precompiled code, on each CPU (QEMU's
/// `-cpu` flags in run-qemu.sh must match `settings::QEMU_CPU_FLAGS`).
fn sse_is_enabled_on_every_cpu() {
    assert_eq!(wasm::check_cpu(), Ok(()), "boot CPU");
    codespace_kernel::smp::on_each_cpu(|cpu| {
        assert_eq!(wasm::check_cpu(), Ok(()), "CPU {cpu}");
    })
    .expect("every CPU ran the check");
    // wasmtime's own probe agrees for every flag the modules are compiled with.
    for feature in ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"] {
        assert_eq!(wasm::detect_host_feature(feature), Some(true), "{feature}");
    }
}

/// A wasmtime `Memory` goes through `wasmtime_mmap_new` (a 4 GiB + guard reservation in the wasm
/// slot), `wasmtime_mprotect` (commit of the accessible pages only), growth, and
/// `wasmtime_munmap` when the store drops: afterwards the slot holds exactly what it held before.
fn linear_memory_commits_grows_and_gives_everything_back() {
    let engine = engine();
    let before = (wasm_memory::reservations(), wasm_memory::committed_pages());
    {
        let mut store = Store::new(&engine, ());
        let ty = MemoryType::new(1, Some(4));
        let memory = Memory::new(&mut store, ty).expect("a one-page linear memory");
        let (count, bytes) = wasm_memory::reservations();
        assert!(count > before.0 .0, "the memory reserved address space");
        assert!(
            bytes - before.0 .1 >= settings::MEMORY_RESERVATION as usize,
            "the reservation covers 4 GiB ({bytes:#x} bytes reserved)"
        );
        let committed = wasm_memory::committed_pages() - before.1;
        assert_eq!(
            committed, 16,
            "one wasm page committed (16 frames), not the reservation"
        );
        let data = memory.data_mut(&mut store);
        assert!(data.iter().all(|&b| b == 0), "fresh memory reads zero");
        data[65535] = 0xA5;
        assert_eq!(memory.grow(&mut store, 2).expect("grow to 3 pages"), 1);
        assert_eq!(wasm_memory::committed_pages() - before.1, 48);
        let data = memory.data(&store);
        assert_eq!(data.len(), 3 << 16);
        assert_eq!(data[65535], 0xA5, "growth keeps contents");
        assert!(
            data[65536..].iter().all(|&b| b == 0),
            "grown pages read zero"
        );
        assert!(
            memory.grow(&mut store, 2).is_err(),
            "growth past the maximum fails"
        );
        assert_eq!(memory.size(&store), 3, "a failed grow changes nothing");
    }
    assert_eq!(
        (wasm_memory::reservations(), wasm_memory::committed_pages()),
        before,
        "dropping the store released every reservation and frame"
    );
}

/// The container's checks: the real module passes; truncated, corrupted, re-targeted (other
/// settings fingerprint) and trailing-garbage copies each get their typed error.
fn precompiled_container_is_checked_before_wasmtime_sees_it() {
    let cwasm = basic_cwasm();
    let fp = settings::fingerprint();
    let payload = image::payload(cwasm, fp).expect("the launcher's container is valid");
    assert_eq!(
        &payload[..4],
        b"\x7fELF",
        "the payload is wasmtime's ELF image"
    );
    assert_eq!(
        image::payload(&cwasm[..cwasm.len() / 2], fp),
        Err(ImageError::Truncated)
    );
    assert_eq!(image::payload(&cwasm[..20], fp), Err(ImageError::Truncated));
    let mut corrupt: Vec<u8> = cwasm.to_vec();
    let mid = image::HEADER_LEN + payload.len() / 2;
    corrupt[mid] ^= 0x40;
    assert_eq!(
        image::payload(&corrupt, fp),
        Err(ImageError::PayloadChecksum)
    );
    assert_eq!(
        image::payload(cwasm, fp ^ 1),
        Err(ImageError::SettingsMismatch {
            expected: fp ^ 1,
            found: fp
        })
    );
    let mut trailing = cwasm.to_vec();
    trailing.extend_from_slice(&[0; 8]);
    assert_eq!(
        image::payload(&trailing, fp),
        Err(ImageError::TrailingBytes)
    );
}

/// A real module, compiled on the host, runs from the code window: calls (wasm to wasm too),
/// memory, SSE4.1 float rounding. Only the text's pages are executable, none writable.
fn module_runs_from_codespace_with_only_its_text_executable() {
    let rt = runtime(0);
    let module = load(&rt);
    let mut store = Store::new(&rt.engine, ());
    let instance = Instance::new(&mut store, &module, &[]).expect("instantiate");
    let add = func::<(i32, i32), i32>(&mut store, &instance, "add");
    assert_eq!(add.call(&mut store, (40, 2)).expect("add"), 42);
    assert_eq!(add.call(&mut store, (i32::MAX, 1)).expect("add"), i32::MIN);
    let fac = func::<i64, i64>(&mut store, &instance, "fac");
    assert_eq!(
        fac.call(&mut store, 20).expect("fac"),
        2_432_902_008_176_640_000
    );
    let nearest = func::<f64, f64>(&mut store, &instance, "nearest");
    for (x, want) in [(2.5, 2.0), (3.5, 4.0), (-0.5, -0.0), (1.25, 1.0)] {
        let got = nearest.call(&mut store, x).expect("nearest");
        assert_eq!(got.to_bits(), f64::to_bits(want), "nearest({x})");
    }
    let store_fn = func::<(i32, i32), ()>(&mut store, &instance, "store");
    let load_fn = func::<i32, i32>(&mut store, &instance, "load");
    store_fn
        .call(&mut store, (65532, 0x1234_5678))
        .expect("store");
    assert_eq!(load_fn.call(&mut store, 65532).expect("load"), 0x1234_5678);

    // Only the text is executable: every executable page of the image lies in the text.
    let text = module.text();
    let (t0, t1) = (text.as_ptr() as usize, text.as_ptr() as usize + text.len());
    let images = rt.code.image_ranges();
    assert_eq!(images.len(), 1, "one image placed");
    let image = images[0];
    assert!(
        image.start() <= t0 && t1 <= image.end(),
        "the text lies in the image"
    );
    let exec = executable_pages(image.start() & !0xFFF, image.end());
    assert!(!exec.is_empty(), "the text is executable");
    for va in &exec {
        assert!(
            (t0..t1).contains(va),
            "page {va:#x} is executable but outside the text {t0:#x}..{t1:#x}"
        );
    }
    assert_eq!(
        exec.len(),
        text.len().div_ceil(4096),
        "every text page is executable"
    );
    if code::rox() {
        // The ROX pass: the runtime's module asks for ROX pages, but a wasm module is one image
        // (data R+NX beside its text R+X), and an image's pages change protection, which ROX
        // pages never do: it goes to a 4 KiB code space of its own — no ROX space, no
        // fallback counted, and the text mapped by 4 KiB leaves.
        let stats = rt.code.module().manager().stats();
        assert_eq!(
            (stats.rox_spaces, stats.rox_fallbacks, stats.code_spaces),
            (0, 0, 1),
            "{stats:?}"
        );
        for va in &exec {
            assert!(
                memory::raw_entries(*va as u64)[3].is_some(),
                "text page {va:#x} is a 4 KiB leaf"
            );
        }
    }
    // Writes to the image through the window fault (R+X / R+NX pages).
    for va in [t0, t0 & !0xFFF] {
        let e = memory::leaf_entry(va as u64).expect("mapped");
        assert_eq!(e & 2, 0, "image page {va:#x} is not writable");
    }
}

/// #PF (out-of-bounds load), #UD (`unreachable`, the stack-overflow check) and #DE (division by
/// zero) at wasm trap sites go through codespace's lookups and come back as wasmtime's trap
/// codes; the store keeps working afterwards.
fn traps_reach_wasmtime_through_the_trap_table() {
    let rt = runtime(1);
    assert!(
        codespace_wasmtime::traps::handler_registered(),
        "wasmtime registered its handler"
    );
    let module = load(&rt);
    let mut store = Store::new(&rt.engine, ());
    let instance = Instance::new(&mut store, &module, &[]).expect("instantiate");
    let load_fn = func::<i32, i32>(&mut store, &instance, "load");
    let unreachable = func::<(), ()>(&mut store, &instance, "unreachable");
    let div = func::<(i32, i32), i32>(&mut store, &instance, "div_s");
    let div_u = func::<(i32, i32), i32>(&mut store, &instance, "div_u");
    let deep = func::<i32, i32>(&mut store, &instance, "deep");
    let add = func::<(i32, i32), i32>(&mut store, &instance, "add");

    let hits = |v| code::trap_hits(v);
    let (pf, ud, de) = (hits(14), hits(6), hits(0));
    let irq = x86_64::instructions::interrupts::are_enabled();
    assert_eq!(
        trap_of(load_fn.call(&mut store, 65533)),
        Trap::MemoryOutOfBounds
    );
    assert_eq!(
        trap_of(load_fn.call(&mut store, -4)),
        Trap::MemoryOutOfBounds
    );
    assert_eq!(
        hits(14),
        pf + 2,
        "both out-of-bounds loads were #PF trap-table hits"
    );
    assert_eq!(
        trap_of(unreachable.call(&mut store, ())),
        Trap::UnreachableCodeReached
    );
    assert_eq!(hits(6), ud + 1, "unreachable was a #UD trap-table hit");
    assert_eq!(
        trap_of(div_u.call(&mut store, (7, 0))),
        Trap::IntegerDivisionByZero
    );
    assert_eq!(
        hits(0),
        de + 1,
        "unsigned division by zero was a #DE trap-table hit"
    );
    assert_eq!(
        trap_of(div.call(&mut store, (i32::MIN, -1))),
        Trap::IntegerOverflow
    );
    assert_eq!(hits(0), de + 2, "INT_MIN / -1 was a #DE trap-table hit");
    assert_eq!(
        trap_of(div.call(&mut store, (7, 0))),
        Trap::IntegerDivisionByZero
    );
    assert_eq!(
        hits(6),
        ud + 2,
        "the signed zero-divisor check was a #UD trap-table hit"
    );
    assert_eq!(trap_of(deep.call(&mut store, 0)), Trap::StackOverflow);
    assert_eq!(hits(6), ud + 3, "the stack check was a #UD trap-table hit");
    assert_eq!(hits(14), pf + 2, "no other trap was a #PF");
    assert_eq!(div.call(&mut store, (-7, 2)).expect("div"), -3);
    assert_eq!(
        add.call(&mut store, (1, 2)).expect("the store still works"),
        3
    );
    assert_eq!(
        x86_64::instructions::interrupts::are_enabled(),
        irq,
        "interrupts as before the traps"
    );
    assert_eq!(
        codespace_wasmtime::locks_held_here(),
        0,
        "no wasmtime lock (which holds interrupts off) was left held by a trap"
    );
}

/// Dropping the module (and its store) unpublishes the image: nothing left placed, and after a
/// grace period the module's code pages are freed.
fn dropped_module_leaves_nothing_published() {
    let rt = runtime(2);
    let before = rt.code.module().stats().expect("stats");
    let window = test_window(102);
    {
        let module = load(&rt);
        let mut store = Store::new(&rt.engine, ());
        let instance = Instance::new(&mut store, &module, &[]).expect("instantiate");
        let add = func::<(i32, i32), i32>(&mut store, &instance, "add");
        assert_eq!(add.call(&mut store, (2, 3)).expect("add"), 5);
        assert_eq!(rt.code.images(), 1);
        let live = rt.code.module().stats().expect("stats");
        assert_eq!(
            live.freed, before.freed,
            "nothing freed while the module lives"
        );
    }
    assert_eq!(
        rt.code.images(),
        0,
        "the image was unpublished with the module"
    );
    // SAFETY: no wasm runs on this CPU and no lookup is held here.
    unsafe { code::synchronize() };
    code::GRACE.reclaim();
    rt.code.module().reclaim().expect("reclaim");
    let after = rt.code.module().stats().expect("stats");
    assert_eq!(after.allocated, before.allocated, "no code allocated");
    assert!(after.reserved > 0, "the image's pages were reserved");
    assert_eq!(
        after.reserved, after.freed,
        "and all of them freed after the grace period"
    );
    assert!(
        executable_pages(window.start(), window.start() + (64 << 20)).is_empty(),
        "no executable page left in the window"
    );
}

/// Truncated, corrupt and re-targeted containers, and a well-formed container whose ELF is
/// corrupt, get typed errors; nothing stays placed and the module's pages are as before.
fn bad_containers_leave_nothing_placed() {
    let rt = runtime(3);
    let before = format_args!("{:?}", rt.code.module().stats().expect("stats")).to_string();
    let cwasm = basic_cwasm();
    let fp = settings::fingerprint();
    let payload = image::payload(cwasm, fp).expect("valid");
    let try_load = |bytes: &[u8]| {
        // SAFETY: the engine was built with `rt.code`; every container here is refused before
        // any of its code can run (asserted below).
        unsafe { rt.code.load(&rt.engine, bytes) }
    };
    assert!(matches!(
        try_load(&cwasm[..cwasm.len() - 100]),
        Err(LoadError::Image(ImageError::Truncated))
    ));
    let mut corrupt = cwasm.to_vec();
    corrupt[image::HEADER_LEN + 64] ^= 1;
    assert!(matches!(
        try_load(&corrupt),
        Err(LoadError::Image(ImageError::PayloadChecksum))
    ));
    let mut other = image::header(payload, fp ^ 0x10).to_vec();
    other.extend_from_slice(payload);
    assert!(matches!(
        try_load(&other),
        Err(LoadError::Image(ImageError::SettingsMismatch { .. }))
    ));
    let same = format_args!("{:?}", rt.code.module().stats().expect("stats")).to_string();
    assert_eq!(same, before, "header refusals touch nothing");
    // A correct header over a corrupt ELF (wasmtime's own checks): its section headers cut off.
    let mut elf = payload.to_vec();
    elf.truncate(elf.len() / 2);
    let mut bad_elf = image::header(&elf, fp).to_vec();
    bad_elf.extend_from_slice(&elf);
    assert!(matches!(try_load(&bad_elf), Err(LoadError::Wasmtime(_))));
    assert_eq!(rt.code.images(), 0, "nothing placed after the refusals");
    // SAFETY: no wasm runs on this CPU and no lookup is held here.
    unsafe { code::synchronize() };
    code::GRACE.reclaim();
    rt.code.module().reclaim().expect("reclaim");
    let after = rt.code.module().stats().expect("stats");
    assert_eq!(after.allocated, 0, "no code allocated");
    assert_eq!(
        after.reserved, after.freed,
        "every page of the refused image freed after the grace period"
    );
    let window = test_window(103);
    assert!(
        executable_pages(window.start(), window.start() + (64 << 20)).is_empty(),
        "nothing executable left in the window"
    );
}

/// The CPU without SSE4.1 this test pretends to run on.
fn no_sse41(feature: &str) -> Option<bool> {
    match feature {
        "sse4.1" => Some(false),
        other => wasm::detect_host_feature(other),
    }
}

/// A container whose header is right but whose code was compiled for other tunables, or for ISA
/// flags this CPU lacks: wasmtime's own compatibility check refuses it (a typed error), and
/// nothing stays placed or executable.
fn module_for_other_tunables_or_cpu_is_refused_by_wasmtime() {
    let mut other_guard = wasm::config();
    other_guard.memory_guard_size(settings::MEMORY_GUARD * 2);
    let mut other_cpu = wasm::config();
    // SAFETY: this engine only ever loads (and refuses) modules; nothing runs on it.
    unsafe {
        other_cpu.detect_host_feature(no_sse41);
    }
    for (i, config) in [other_guard, other_cpu].into_iter().enumerate() {
        let rt = wasm::runtime_with(test_window(104 + i), config).expect("runtime");
        // SAFETY: the engine was built with `rt.code`; the container comes from the host tool
        // and is refused before any of its code runs (asserted).
        let result = unsafe { rt.code.load(&rt.engine, basic_cwasm()) };
        match result {
            Err(LoadError::Wasmtime(e)) => {
                let msg = alloc::format!("{e:?}");
                let want = if i == 0 { "guard" } else { "has_sse41" };
                assert!(msg.contains(want), "refused for the {want} mismatch: {msg}");
            }
            other => panic!("case {i}: expected wasmtime's refusal, got {other:?}"),
        }
        assert_eq!(rt.code.images(), 0, "nothing placed");
        // SAFETY: no wasm runs on this CPU and no lookup is held here.
        unsafe { code::synchronize() };
        code::GRACE.reclaim();
        rt.code.module().reclaim().expect("reclaim");
        let stats = rt.code.module().stats().expect("stats");
        assert_eq!(
            (stats.allocated, stats.reserved),
            (0, stats.freed),
            "all freed"
        );
        let window = test_window(104 + i);
        assert!(
            executable_pages(window.start(), window.start() + (64 << 20)).is_empty(),
            "nothing executable left"
        );
    }
}
