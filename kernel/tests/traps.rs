//! Guard-page bounds checks: protected loads in generated code fault into the trap table and
//! resume at their landing pad with the faulting PC in r10.
#![no_std]
#![no_main]

extern crate alloc;

use codespace::{AllocatorConfig, CodeAllocator, ManagerConfig, ProtectionMode, PublishedCode};
use codespace_kernel::code::{self, manager, test_window, KernelMmu, REGISTRIES};
use codespace_kernel::memory::{self, SCRATCH_BASE};
use codespace_kernel::test::{ExpectFault, PF_PRESENT};
use x86_64::structures::paging::PageTableFlags as F;

codespace_kernel::kernel_tests![
    protected_load_lands_with_r10_and_cr2,
    unprotected_fault_is_not_handled,
    fault_during_half_done_registration_resolves,
    released_code_no_longer_resolves,
    freed_module_code_resolves_in_neither_lookup,
];

/// A 64 KiB "linear memory" in the scratch slot, followed by unmapped guard pages.
const MEMORY_PAGES: u64 = 16;
const MEMORY: u64 = SCRATCH_BASE + (1 << 30);

fn map_linear_memory() {
    static MAPPED: spin::Once<()> = spin::Once::new();
    MAPPED.call_once(|| {
        for i in 0..MEMORY_PAGES {
            memory::map_fresh_page(MEMORY + i * 4096, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)
                .expect("linear memory page");
        }
        // SAFETY: the page was just mapped writable.
        unsafe { ((MEMORY + 0x100) as *mut u32).write_volatile(0xC0DE) };
    });
}

/// `u32 load(u64 index)`: `mov rax, MEMORY; mov eax, [rax + rdi]; ret`, and at `LANDING`
/// the landing pad `mov rax, r10; ret` (returns the faulting PC).
fn load_function() -> ([u8; 20], u32, usize) {
    let mut code = [0u8; 20];
    code[0] = 0x48;
    code[1] = 0xB8; // mov rax, imm64
    code[2..10].copy_from_slice(&MEMORY.to_le_bytes());
    code[10..13].copy_from_slice(&[0x8B, 0x04, 0x38]); // mov eax, [rax + rdi]
    code[13] = 0xC3; // ret
    code[14..17].copy_from_slice(&[0x4C, 0x89, 0xD0]); // mov rax, r10
    code[17] = 0xC3; // ret
    code[18] = 0xCC;
    code[19] = 0xCC;
    (code, 10, 14)
}

fn allocator(window: usize) -> CodeAllocator<KernelMmu> {
    let m = manager(
        test_window(20 + window),
        ManagerConfig {
            protection: ProtectionMode::Alias,
            ..ManagerConfig::default()
        },
    )
    .expect("manager");
    CodeAllocator::new(&m, AllocatorConfig::default()).expect("allocator")
}

fn publish_load(a: &mut CodeAllocator<KernelMmu>) -> PublishedCode {
    let (bytes, _, _) = load_function();
    let mut w = a.allocate(bytes.len()).expect("allocate");
    w.as_mut_slice().copy_from_slice(&bytes);
    a.publish(w).expect("publish")
}

fn call(code: &PublishedCode, index: u64) -> u64 {
    // SAFETY: published code following the C ABI: one u64 argument, u64 result.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(code.start()) };
    f(index)
}

fn protected_load_lands_with_r10_and_cr2() {
    map_linear_memory();
    let mut a = allocator(0);
    let code = publish_load(&mut a);
    let (_, load_at, landing_at) = load_function();
    let handle = REGISTRIES
        .traps
        .register(code.range(), &[load_at], code.start() + landing_at)
        .expect("register");
    assert_eq!(call(&code, 0x100), 0xC0DE, "in-bounds load");
    let before = code::last_trap().map_or(0, |t| t.count);
    let oob = MEMORY_PAGES * 4096 + 8;
    let r10 = call(&code, oob);
    let pc = (code.start() + load_at as usize) as u64;
    assert_eq!(r10, pc, "landing pad sees the faulting PC in r10");
    let trap = code::last_trap().expect("trap recorded");
    assert_eq!(trap.count, before + 1);
    assert_eq!(trap.pc, pc);
    assert_eq!(trap.cr2, MEMORY + oob, "CR2 is the out-of-bounds address");
    REGISTRIES.traps.release(handle).expect("release");
    a.free(code).expect("free");
}

fn unprotected_fault_is_not_handled() {
    map_linear_memory();
    let mut a = allocator(1);
    let code = publish_load(&mut a);
    let (_, load_at, _) = load_function();
    let oob = MEMORY + MEMORY_PAGES * 4096;
    let traps_before = code::last_trap().map_or(0, |t| t.count);
    let info = ExpectFault::page_fault(oob)
        .without_bits(PF_PRESENT)
        .run(|| {
            call(&code, MEMORY_PAGES * 4096);
        });
    assert_eq!(
        info.rip,
        (code.start() + load_at as usize) as u64,
        "reported at the load"
    );
    assert!(!REGISTRIES.traps.is_protected(info.rip as usize));
    assert_eq!(
        code::last_trap().map_or(0, |t| t.count),
        traps_before,
        "the trap path did not take it"
    );
    a.free(code).expect("free");
}

static HOOK_CODE: spin::Mutex<usize> = spin::Mutex::new(0);
static HOOK_RESULT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Runs inside `register`, between the latch's two slot updates: a protected fault now.
fn fault_inside_writer() {
    let start = *HOOK_CODE.lock();
    // SAFETY: `start` is published load code (see the test), C ABI, one u64 argument.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(start) };
    HOOK_RESULT.store(
        f(MEMORY_PAGES * 4096 + 16),
        core::sync::atomic::Ordering::SeqCst,
    );
}

fn fault_during_half_done_registration_resolves() {
    map_linear_memory();
    let mut a = allocator(2);
    let code = publish_load(&mut a);
    let other = publish_load(&mut a);
    let (_, load_at, landing_at) = load_function();
    let handle = REGISTRIES
        .traps
        .register(code.range(), &[load_at], code.start() + landing_at)
        .expect("register");
    *HOOK_CODE.lock() = code.start();
    REGISTRIES.traps.set_writer_hook(Some(fault_inside_writer));
    let second = REGISTRIES
        .traps
        .register(other.range(), &[load_at], other.start() + landing_at);
    REGISTRIES.traps.set_writer_hook(None);
    let second = second.expect("second registration completes");
    assert_eq!(
        HOOK_RESULT.load(core::sync::atomic::Ordering::SeqCst),
        (code.start() + load_at as usize) as u64,
        "the fault inside the writer landed"
    );
    // And the half-registered range resolves once registration is done.
    assert_eq!(
        call(&other, MEMORY_PAGES * 4096),
        (other.start() + load_at as usize) as u64
    );
    REGISTRIES.traps.release(second).expect("release");
    REGISTRIES.traps.release(handle).expect("release");
    a.free(code).expect("free");
    a.free(other).expect("free");
}

fn released_code_no_longer_resolves() {
    let mut a = allocator(3);
    let code = publish_load(&mut a);
    let (_, load_at, landing_at) = load_function();
    let pc = code.start() + load_at as usize;
    let handle = REGISTRIES
        .traps
        .register(code.range(), &[load_at], code.start() + landing_at)
        .expect("register");
    assert!(REGISTRIES.traps.lookup(pc).is_some());
    REGISTRIES.traps.release(handle).expect("release");
    assert!(REGISTRIES.traps.lookup(pc).is_none());
    a.free(code).expect("free");
}

fn freed_module_code_resolves_in_neither_lookup() {
    use codespace::module::{CodeModule, ModuleConfig, NewCode};
    map_linear_memory();
    let m = manager(
        test_window(24),
        ManagerConfig {
            protection: ProtectionMode::Alias,
            ..ManagerConfig::default()
        },
    )
    .expect("manager");
    let module = CodeModule::new(
        &m,
        &REGISTRIES,
        ModuleConfig {
            functions: 1,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let (bytes, load_at, landing_at) = load_function();
    let load = NewCode {
        protected: &[load_at],
        landing_pad: Some(landing_at as u32),
        ..NewCode::function(0, &bytes)
    };
    let code = module.add_code(&load).expect("add");
    let start = code.instruction_start();
    let pc = start + load_at as usize;
    // SAFETY: published code, C ABI, one u64 argument.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(start) };
    assert_eq!(
        f(MEMORY_PAGES * 4096),
        pc as u64,
        "registered through the module, the trap lands"
    );
    assert!(REGISTRIES.lookup_code(pc).is_some());
    drop(code);
    drop(module);
    assert!(
        REGISTRIES.traps.lookup(pc).is_some(),
        "a dropped module's code stays registered until its grace period is over"
    );
    // SAFETY: this CPU runs no generated code and holds no lookup reference here.
    unsafe { code::synchronize() };
    assert_eq!(REGISTRIES.grace().reclaim(), 1, "the module's teardown ran");
    assert!(REGISTRIES.traps.lookup(pc).is_none(), "trap entry released");
    assert!(REGISTRIES.lookup_code(pc).is_none(), "code lookup removed");
    assert_eq!(m.committed(), 0);
    assert!(m.audit().expect("audit").is_clean());
}
