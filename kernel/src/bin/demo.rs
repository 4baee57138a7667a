//! The demo kernel that `cargo run` boots: a narrated tour of codespace on real page tables.
//!
//! `cargo run -- bench` runs the in-kernel benchmarks instead; `cargo run -- stress [SECONDS]
//! [rox]` the SMP stress mode (`codespace_kernel::stress`; `rox`: code on 2 MiB ROX pages).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use codespace::code_events::PerfMapListener;
use codespace::code_object::{CodeKind, RelocKind, Relocation};
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{AddressRange, CodeManager, ManagerConfig, ProtectionMode, PAGE_SIZE};
use codespace_kernel::code::{self, KernelMmu, CODE_WINDOW, REGISTRIES};
use codespace_kernel::cpu::serial::SerialWriter;
use codespace_kernel::memory::{self, SCRATCH_BASE};
use codespace_kernel::{bench, entry_point, println, BootInfo, ExitCode};
use x86_64::structures::paging::PageTableFlags as F;

#[path = "demo/cranelift.rs"]
mod cranelift;
#[path = "demo/wasm.rs"]
mod wasm;

entry_point!(main);

static PERF_MAP: PerfMapListener<SerialWriter> = PerfMapListener::new(SerialWriter);

/// The demo's linear memory: 64 KiB, then unmapped guard pages.
const MEMORY: u64 = SCRATCH_BASE + (2 << 30);
const MEMORY_SIZE: u64 = 64 << 10;

fn main(boot: &'static BootInfo) -> ExitCode {
    println!("codespace test kernel");
    let frames = memory::frames();
    println!(
        "usable RAM: {} KiB; frames free: {} of {}",
        boot.usable_bytes() / 1024,
        frames.free_frames(),
        frames.usable_frames()
    );
    drop(frames);
    if boot.has_arg("bench") {
        return bench::run(boot.has_arg("smp-only"));
    }
    if boot.has_arg("stress") {
        return codespace_kernel::stress::run(boot);
    }
    match tour() {
        Ok(()) => {
            println!("\ntour complete");
            ExitCode::Success
        }
        Err(e) => {
            println!("\ntour failed: {e}");
            ExitCode::Failure
        }
    }
}

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn tour() -> Result<(), String> {
    let err = |e: &dyn core::fmt::Display| alloc::format!("{e}");

    step(
        1,
        "a code manager over the code window (PML4 slot 384), alias protection mode",
    );
    let manager = code::manager(
        CODE_WINDOW,
        ManagerConfig {
            protection: ProtectionMode::Alias,
            max_committed: 64 << 20,
            ..ManagerConfig::default()
        },
    )
    .map_err(|e| err(&e))?;
    println!(
        "    window {:?}; EFER.NXE and CR0.WP checked",
        manager.window()
    );
    let module = CodeModule::new(
        &manager,
        &REGISTRIES,
        ModuleConfig {
            functions: 4,
            ..ModuleConfig::default()
        },
    )
    .map_err(|e| err(&e))?;
    println!("    module with 4 functions; code perf-map lines follow as code is published:");
    module.set_listener(Some(&PERF_MAP)).map_err(|e| err(&e))?;

    step(
        2,
        "emit real functions: add(a, b) and load(index) from a 64 KiB linear memory",
    );
    map_linear_memory()?;
    // add: lea eax, [rdi + rsi]; ret
    let add = module
        .add_code(&NewCode {
            name: Some("add"),
            ..NewCode::function(0, &[0x8D, 0x04, 0x37, 0xC3])
        })
        .map_err(|e| err(&e))?;
    let (load_bytes, load_at, landing_at) = load_function();
    let load = module
        .add_code(&NewCode {
            name: Some("load"),
            protected: &[load_at],
            landing_pad: Some(landing_at),
            source_positions: &[(0, 10), (load_at, 12)],
            ..NewCode::function(1, &load_bytes)
        })
        .map_err(|e| err(&e))?;
    print_code(&manager, &add);
    print_code(&manager, &load);
    let leaf = memory::leaf_entry(add.instruction_start() as u64).unwrap_or(0);
    println!("    published page PTE {leaf:#018x}: present, not writable, executable");

    step(3, "call them");
    println!("    add(40, 2) = {}", call2(add.instruction_start(), 40, 2));
    println!(
        "    load(0x100) = {:#x}",
        call1(load.instruction_start(), 0x100)
    );

    step(4, "an out-of-bounds load hits the guard page and lands");
    let r = call1(load.instruction_start(), MEMORY_SIZE + 0x10);
    let trap = code::last_trap().ok_or("no trap recorded")?;
    let hit = REGISTRIES
        .lookup_code(trap.pc as usize)
        .ok_or("faulting pc not in code map")?;
    let offset = trap.pc as usize - hit.instruction_start();
    println!(
        "    load({:#x}) trapped in {} at +{offset:#x} (source {:?}), CR2={:#x}; landing pad returned r10={r:#x}",
        MEMORY_SIZE + 0x10,
        hit.debug_name(),
        hit.source_position_before(offset as u32),
        trap.cr2
    );

    step(
        5,
        "patch a jump slot to switch implementations (through the writable alias)",
    );
    let (caller_bytes, relocs) = caller_of_slot(3);
    let caller = module
        .add_code(&NewCode {
            relocations: &relocs,
            name: Some("caller"),
            ..NewCode::function(2, &caller_bytes)
        })
        .map_err(|e| err(&e))?;
    module
        .add_code(&NewCode {
            name: Some("impl_a"),
            ..NewCode::function(3, &ret_const(1))
        })
        .map_err(|e| err(&e))?;
    println!(
        "    caller() via slot 3 = {}",
        call1(caller.instruction_start(), 0)
    );
    let b = module
        .add_code(&NewCode {
            name: Some("impl_b"),
            ..NewCode::new(CodeKind::Wrapper, &ret_const(2))
        })
        .map_err(|e| err(&e))?;
    module
        .patch_slot(3, b.instruction_start())
        .map_err(|e| err(&e))?;
    println!(
        "    after patching slot 3: caller() = {}",
        call1(caller.instruction_start(), 0)
    );

    step(
        6,
        "free: replace load with a new version; the old one is freed in the safe order",
    );
    let old = load.instruction_start();
    drop(load);
    module
        .add_code(&NewCode {
            name: Some("load_v2"),
            protected: &[load_at],
            landing_pad: Some(landing_at),
            ..NewCode::function(1, &load_bytes)
        })
        .map_err(|e| err(&e))?;
    println!(
        "    old load at {old:#x}: trap lookup {:?}, code lookup {:?}",
        REGISTRIES
            .traps
            .lookup(old + load_at as usize)
            .map(|h| h.offset()),
        REGISTRIES.lookup_code(old).map(|c| c.instruction_start())
    );

    step(
        7,
        "a function compiled by Cranelift in the kernel: IR, machine code, call, trap",
    );
    cranelift::tour(&manager)?;

    step(
        8,
        "WebAssembly: a module precompiled on the host, run by wasmtime from codespace",
    );
    wasm::tour(&manager)?;

    step(9, "statistics");
    print_stats(&manager);
    step(10, "map of the code window (one character per page)");
    print_map(&manager);
    drop(module);
    // The dropped module's code is freed after a grace period: this CPU is quiescent here.
    // SAFETY: no generated code is running on this CPU and no lookup reference is held.
    unsafe { code::synchronize() };
    REGISTRIES.grace().reclaim();
    // Task context, interrupts off: the dropped module's spaces were only queued.
    manager
        .release_pending()
        .map_err(|e| alloc::format!("{e}"))?;
    let audit = manager.audit().map_err(|e| alloc::format!("{e}"))?;
    println!(
        "\n    module dropped: committed {} bytes, audit clean: {}",
        manager.committed(),
        audit.is_clean()
    );
    if !audit.is_clean() {
        return Err(alloc::format!("audit: {audit:?}"));
    }
    Ok(())
}

fn map_linear_memory() -> Result<(), String> {
    for i in 0..MEMORY_SIZE / 4096 {
        memory::map_fresh_page(MEMORY + i * 4096, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)?;
    }
    // SAFETY: the page was just mapped writable.
    unsafe { ((MEMORY + 0x100) as *mut u32).write_volatile(0xC0FFEE) };
    Ok(())
}

/// `mov rax, MEMORY; mov eax, [rax + rdi]; ret` then the landing pad `mov rax, r10; ret`.
fn load_function() -> ([u8; 20], u32, u32) {
    let mut code = [0xCC; 20];
    code[..2].copy_from_slice(&[0x48, 0xB8]);
    code[2..10].copy_from_slice(&MEMORY.to_le_bytes());
    code[10..14].copy_from_slice(&[0x8B, 0x04, 0x38, 0xC3]);
    code[14..18].copy_from_slice(&[0x4C, 0x89, 0xD0, 0xC3]);
    (code, 10, 14)
}

fn ret_const(v: u32) -> [u8; 6] {
    let b = v.to_le_bytes();
    [0xB8, b[0], b[1], b[2], b[3], 0xC3]
}

/// `sub rsp, 8; call slot; add rsp, 8; ret`
fn caller_of_slot(slot: u32) -> ([u8; 14], [Relocation; 1]) {
    let bytes = [
        0x48, 0x83, 0xEC, 0x08, 0xE8, 0, 0, 0, 0, 0x48, 0x83, 0xC4, 0x08, 0xC3,
    ];
    (
        bytes,
        [Relocation {
            offset: 5,
            kind: RelocKind::CallSlot { slot },
        }],
    )
}

fn call1(addr: usize, a: u64) -> u64 {
    // SAFETY: published code with the C ABI: one u64 argument, u64 result.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(addr) };
    f(a)
}

fn call2(addr: usize, a: u64, b: u64) -> u64 {
    // SAFETY: published code with the C ABI: two u64 arguments, u64 result.
    let f: extern "C" fn(u64, u64) -> u64 = unsafe { core::mem::transmute(addr) };
    f(a, b)
}

fn print_code(manager: &CodeManager<KernelMmu>, code: &codespace::code_object::CodeObject) {
    let mut bytes = alloc::vec![0u8; code.instructions().size()];
    if manager.read(code.instruction_start(), &mut bytes).is_err() {
        return;
    }
    let mut text = String::new();
    let _ = code.disassemble(&bytes, &mut text);
    for line in text.lines() {
        println!("      {line}");
    }
}

fn print_stats(manager: &CodeManager<KernelMmu>) {
    let s = manager.stats();
    let (Ok(audit), Ok(flushes)) = (manager.audit(), manager.flush_stats()) else {
        println!("    (manager busy)");
        return;
    };
    println!(
        "    code spaces: {}, reserved {} KiB, committed {} KiB (limit {} MiB)",
        s.code_spaces,
        s.reserved / 1024,
        s.committed / 1024,
        s.max_committed >> 20
    );
    println!("    free frames: {}", memory::frames().free_frames());
    println!(
        "    trap entries: {}, traps taken: {}, code objects: {}",
        REGISTRIES.traps.len(),
        code::last_trap().map_or(0, |t| t.count),
        REGISTRIES.code.len()
    );
    println!(
        "    TLB: {} invlpg, {} full flushes, {} shootdown rounds, {} alias writes",
        flushes.single_pages, flushes.full, flushes.shootdowns, flushes.pokes
    );
    println!(
        "    audit: {} mapped pages, {} W+X anywhere, {} writable aliases of code, {} outside code spaces -> {}",
        audit.mapped_pages,
        audit.writable_and_executable,
        audit.writable_aliases_of_executable,
        audit.outside_code_spaces,
        if audit.is_clean() {
            "clean"
        } else {
            "NOT CLEAN"
        }
    );
}

/// `X` R+X, `w` RW+NX, `.` reserved but uncommitted, `G` guard, ` ` free.
fn print_map(manager: &CodeManager<KernelMmu>) {
    let Ok(spaces) = manager.code_spaces() else {
        return;
    };
    let Some(last) = spaces.iter().map(AddressRange::end).max() else {
        return;
    };
    let window = manager.window();
    let end = (last + PAGE_SIZE).min(window.start() + 64 * 64 * PAGE_SIZE);
    let mut line = String::new();
    let mut rows: Vec<String> = Vec::new();
    for page in (window.start()..end).step_by(PAGE_SIZE) {
        let c = match manager.query(page).ok().flatten() {
            Some(m) if m.executable => 'X',
            Some(_) => 'w',
            None if spaces.iter().any(|s| s.contains(page)) => '.',
            None if spaces
                .iter()
                .any(|s| page + PAGE_SIZE == s.start() || page == s.end()) =>
            {
                'G'
            }
            None => ' ',
        };
        line.push(c);
        if line.len() == 64 {
            rows.push(core::mem::take(&mut line));
        }
    }
    if !line.is_empty() {
        rows.push(line);
    }
    for (i, row) in rows.iter().enumerate() {
        println!("    {:#x} |{row}|", window.start() + i * 64 * PAGE_SIZE);
    }
    println!("    X = R+X code, w = RW+NX, . = reserved, G = guard page");
}
