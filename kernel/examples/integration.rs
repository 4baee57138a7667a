//! The integration guide as a kernel: how a kernel that already has an `OffsetPageTable`, a frame
//! allocator and an IDT wires codespace in. `cargo test` boots it; it must print
//! `integration example: ok`.
//!
//! The pieces a blog_os-style kernel brings are the `codespace_kernel` ones here: the page table
//! and the frame allocator each behind a `lock_api::Mutex<codespace::mmu::x86::IrqSpin, _>` in a
//! static, and page-fault and breakpoint handlers that can edit the interrupted RIP and registers:
//! on stable Rust, assembly stubs that save the registers and pass them to Rust — the ones
//! codespace ships with feature `exception-stubs`, which this kernel's IDT uses for #DE, #BP, #UD
//! and #PF.
#![no_std]
#![no_main]

extern crate alloc;

use codespace::breakpoint::BreakpointSites;
use codespace::code_object::CodeKind;
use codespace::mmu::x86::{PhysOffset, X86Mmu};
use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{AddressRange, CodeManager, ManagerConfig, PatchProtocol, ProtectionMode};
use codespace_kernel::cpu::interrupts::{self, FaultInfo, TrapFrame};
use codespace_kernel::memory::{self, FrameBitmap, PHYS_OFFSET};
use codespace_kernel::{entry_point, println, BootInfo, ExitCode};

entry_point!(main);

// Step 1: the registries live in a static, so the page-fault handler reaches them lock-free. The
// memory they replace is freed after a grace period of `GRACE`: the kernel reports quiescent
// states (idle loop, between tasks) with `GRACE.quiescent(cpu)`.
static GRACE: GraceDomain = GraceDomain::new();
static CODE: Registries = Registries::new(&GRACE);

// Step 2: a code window nobody else maps. One PML4 slot (512 GiB) keeps every code space within
// one top-level entry; here slot 385, next to the test kernel's own window.
const WINDOW: AddressRange = AddressRange::new(0xFFFF_C080_0000_0000, 0xFFFF_C100_0000_0000);

// Step 3: the page-fault handler asks the trap table first, with the faulting PC and address, for
// a plain not-present or protection fault (no reserved-bit violation, no instruction fetch). A
// hit resumes at the landing pad with the faulting PC in r10 (V8's convention); a miss is the
// kernel's usual fault.
//
// With the INT3 patch protocol (step 4's `patch_protocol`), the #BP handler asks `BREAKPOINTS`
// first, likewise: an INT3 that a patch placed over a jump slot resumes at the slot's new target
// (RIP only: the slot is a `jmp`). The handler runs with interrupts off (an interrupt gate), which
// the protocol relies on. A miss is the kernel's usual breakpoint.
static BREAKPOINTS: BreakpointSites = BreakpointSites::new();

fn fault_hooks(frame: &mut TrapFrame, info: &FaultInfo) -> bool {
    // The crate's hooks (`codespace::mmu::x86::exception`, feature `exception-stubs`) over the
    // frame its entry stubs save: they check the vector, the #PF error code and CR2 themselves.
    CODE.traps.handle_protected_fault(frame, info.cr2).is_some()
        || BREAKPOINTS.handle_breakpoint(frame)
}

fn main(_boot: &'static BootInfo) -> ExitCode {
    // Only CPU 0 uses codespace here (an SMP kernel counts every CPU that may run generated code
    // or lookups, and reports quiescent states from each CPU's idle loop).
    // SAFETY: no other CPU looks up these registries or runs their generated code.
    unsafe { GRACE.set_possible_cpus(1) };
    interrupts::set_fault_handler(Some(fault_hooks));

    // Step 4: the backend over the kernel's own page table and frame allocator, and the manager.
    // SAFETY: every CPU runs on this page table; the direct map at PHYS_OFFSET maps every frame
    // the allocator hands out and every table; PML4 slot 255 is unused; LINEAR_MAPS describes the
    // identity and direct maps (the kernel's own, which the
    // backend keeps free of writable aliases of code frames); the CPU hooks are the kernel's.
    let mmu = match unsafe {
        X86Mmu::new(
            memory::page_table_lock(),
            memory::frames_lock(),
            PhysOffset::new(PHYS_OFFSET),
            codespace_kernel::code::smp(),
            255,
        )
    } {
        // SAFETY: as above.
        Ok(mmu) => unsafe { mmu.with_linear_maps(&codespace_kernel::code::LINEAR_MAPS) }
            .with_free_count(FrameBitmap::free_frames),
        Err(e) => {
            println!("integration example: backend: {e}");
            return ExitCode::Failure;
        }
    };
    // Live jump slots change by the INT3 protocol here (the default, `AtomicStore`, needs no
    // #BP hook: README "How live jump slots change").
    let config = ManagerConfig {
        protection: ProtectionMode::Alias,
        patch_protocol: PatchProtocol::Int3(&BREAKPOINTS),
        ..ManagerConfig::default()
    };
    let manager = match CodeManager::new(mmu, WINDOW, config) {
        Ok(m) => m,
        Err(e) => {
            println!("integration example: manager: {e}");
            return ExitCode::Failure;
        }
    };

    // Step 5: a module per program; functions are called through its jump table.
    let Ok(module) = CodeModule::new(
        &manager,
        &CODE,
        ModuleConfig {
            functions: 1,
            ..ModuleConfig::default()
        },
    ) else {
        return ExitCode::Failure;
    };
    // `mov eax, [rdi]; ret` with the load protected, and `mov rax, r10; ret` as landing pad.
    let code = [0x8B, 0x07, 0xC3, 0x4C, 0x89, 0xD0, 0xC3];
    let load = NewCode {
        protected: &[0],
        landing_pad: Some(3),
        ..NewCode::function(0, &code)
    };
    let Ok(load) = module.add_code(&load) else {
        return ExitCode::Failure;
    };
    // Step 6: call through the slot; a load from an unmapped address lands instead of crashing.
    // SAFETY: the slot jumps to code with the C ABI and one pointer argument (both the load and
    // the code it is patched to below), and the module outlives every call through `f`.
    let Ok(f) = (unsafe { module.entry::<extern "C" fn(u64) -> u64>(0) }) else {
        return ExitCode::Failure;
    };
    let bad = 0xFFFF_C0FF_0000_0000u64; // in the window, never mapped
    let r10 = f(bad);
    let ok = r10 == load.instruction_start() as u64 && manager.audit().is_ok_and(|a| a.is_clean());
    println!("protected load of {bad:#x} landed; r10 = {r10:#x} (the load's PC)");

    // Step 6b: retarget the slot while code may run through it (INT3 protocol: three rounds).
    let Ok(seven) = module.add_code(&NewCode::new(
        CodeKind::Wrapper,
        &[0xB8, 7, 0, 0, 0, 0xC3], // mov eax, 7; ret
    )) else {
        return ExitCode::Failure;
    };
    let ok = ok && module.patch_slot(0, seven.instruction_start()).is_ok() && f(0) == 7;
    println!(
        "slot 0 patched under the INT3 protocol: a call returns {}",
        f(0)
    );

    // Step 7: dropping the module frees its code after a grace period (other CPUs may still run
    // it): trap entries first, then lookups, then memory. The registries free what they replaced
    // after a grace period of their own. This CPU is quiescent here (no lookup running, no
    // generated code on its stack); report it, and reclaim.
    drop(module);
    let pass_grace_period = || {
        for _ in 0..2 {
            // SAFETY: CPU 0 holds nothing from a lookup and runs no generated code here.
            unsafe { GRACE.quiescent(0) };
            GRACE.try_advance();
        }
        GRACE.reclaim();
        CODE.traps.reclaim();
        CODE.code.reclaim();
    };
    pass_grace_period(); // the module's teardown runs
    pass_grace_period(); // the index nodes it replaced go
                         // Task context, whatever the interrupt flag: the dropped module's spaces may only have
                         // been queued (the manager releases them from interrupt-off callers only when asked).
    let ok = ok && manager.release_pending().is_ok();
    let ok = ok && CODE.traps.is_empty() && manager.committed() == 0;
    let ok = ok && CODE.traps.retired_count() == 0 && CODE.code.memory().retired == 0;
    interrupts::set_fault_handler(None);
    if ok {
        println!("integration example: ok");
        ExitCode::Success
    } else {
        println!("integration example: FAILED");
        ExitCode::Failure
    }
}
