//! wasmtime's runtime on codespace in this kernel: SSE on every CPU, wasmtime's memory hooks
//! (reservation, commit, grow, release) on the kernel's wasm slot, and the checked `.cwasm`
//! containers the host tool writes (handed over as Multiboot modules by the launcher).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use codespace_kernel::wasm::{self, memory as wasm_memory};
use codespace_wasmtime::image::{self, ImageError};
use codespace_wasmtime::settings;
use codespace_wasmtime::wasmtime::{Engine, Memory, MemoryType, Store};

codespace_kernel::kernel_tests![
    sse_is_enabled_on_every_cpu,
    linear_memory_commits_grows_and_gives_everything_back,
    precompiled_container_is_checked_before_wasmtime_sees_it,
];

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
