//! Guard-page bounds checks: protected loads in generated code fault into the trap table and
//! resume at their landing pad with the faulting PC in r10.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use codespace::index::UpdateStep;
use codespace::trap::TrapRegistration;
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, ManagerConfig, ProtectionMode, PublishedCode,
};
use codespace_kernel::code::{self, manager, test_window, KernelMmu, REGISTRIES};
use codespace_kernel::cpu::catch::catch;
use codespace_kernel::memory::{self, SCRATCH_BASE};
use codespace_kernel::test::{ExpectFault, PF_PRESENT};
use x86_64::structures::paging::PageTableFlags as F;

codespace_kernel::kernel_tests![
    protected_load_lands_with_r10_and_cr2,
    unprotected_fault_is_not_handled,
    faults_at_every_step_of_updates_and_batches_resolve,
    protected_load_outside_its_memory_is_an_unexpected_fault,
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
    let config = code::allocator_config(&m, AllocatorConfig::default());
    CodeAllocator::new(&m, config).expect("allocator")
}

/// Frees `code` of `a`.
///
/// These tests run code only on the boot CPU, synchronously (a call that returned or a fault
/// that landed), and never hand its address to a slot, a pointer or another CPU: when a test
/// frees code, nothing runs it or leads to it any more.
fn free(a: &mut CodeAllocator<KernelMmu>, code: PublishedCode) {
    // SAFETY: see above: every call into `code` returned, and nothing leads into it.
    unsafe { a.free(code) }.expect("free");
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
    // The launcher's ROX pass: this code is on a ROX page.
    code::assert_rox_in_use(a.manager());
    let (_, load_at, landing_at) = load_function();
    // SAFETY: `code` is this test's published code (the load and its landing pad), kept until
    // the handle is released below.
    let handle = unsafe {
        REGISTRIES
            .traps
            .register(code.range(), &[load_at], code.start() + landing_at)
    }
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
    free(&mut a, code);
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
    free(&mut a, code);
}

/// What the step hook checks: a fault in `stable` lands at every step; a fault in each of
/// `changing` lands exactly when the table the update is building is published (`appears`) or
/// not yet replaced (`!appears`).
struct StepProbe {
    stable: usize,
    changing: [usize; 4],
    count: usize,
    appears: bool,
    published: bool,
    steps: [usize; 5],
    failures: usize,
    first_failure: Option<(UpdateStep, &'static str)>,
}

static STEP_PROBE: spin::Mutex<StepProbe> = spin::Mutex::new(StepProbe {
    stable: 0,
    changing: [0; 4],
    count: 0,
    appears: false,
    published: false,
    steps: [0; 5],
    failures: 0,
    first_failure: None,
});

fn step_index(step: UpdateStep) -> usize {
    match step {
        UpdateStep::Allocate => 0,
        UpdateStep::Modify => 1,
        UpdateStep::Publish => 2,
        UpdateStep::Retire => 3,
        _ => 4,
    }
}

/// A protected load of `start`'s code past the linear memory: `Some(r10)` when the #PF path
/// resumed it at the landing pad, `None` when the fault went unhandled (caught here).
fn fault_in(start: usize) -> Option<u64> {
    let mut r10 = None;
    let caught = catch(|| {
        // SAFETY: `start` is published load code (see the test), C ABI, one u64 argument.
        let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(start) };
        r10 = Some(f(MEMORY_PAGES * 4096 + 16));
    });
    caught.ok().and(r10)
}

/// Runs inside the trap table's updates, after every step: raises real page faults and checks
/// how the #PF path (`lookup_fault`) resolved them. Never panics (the writer lock is held):
/// failures are counted and checked by the test.
fn fault_at_every_step(step: UpdateStep) {
    let (_, load_at, _) = load_function();
    let mut p = STEP_PROBE.lock();
    if step == UpdateStep::Publish {
        p.published = true;
    }
    p.steps[step_index(step)] += 1;
    let fail = |p: &mut StepProbe, why| {
        p.failures += 1;
        p.first_failure.get_or_insert((step, why));
    };
    if fault_in(p.stable) != Some((p.stable + load_at as usize) as u64) {
        fail(&mut p, "a fault in registered code did not land");
    }
    let registered = p.appears == p.published;
    for i in 0..p.count {
        let start = p.changing[i];
        let want = registered.then_some((start + load_at as usize) as u64);
        if fault_in(start) != want {
            fail(
                &mut p,
                if registered {
                    "a fault in code of the published table did not land"
                } else {
                    "a fault in code the published table lacks landed"
                },
            );
        }
    }
}

/// Runs `op` on the registries' trap table with the hook checking every step; `appears`: the
/// update registers `changing` (else it releases them).
fn probe_every_step<R>(changing: &[usize], appears: bool, op: impl FnOnce() -> R) -> R {
    {
        let mut p = STEP_PROBE.lock();
        p.changing[..changing.len()].copy_from_slice(changing);
        p.count = changing.len();
        p.appears = appears;
        p.published = false;
    }
    // Memory retired by the previous update may be freed inside this one: probe that too. With
    // more than one CPU that takes a whole grace period (every CPU reports), so wait for one.
    // SAFETY: the test holds nothing from a lookup and runs no generated code here.
    unsafe { code::synchronize() };
    REGISTRIES.traps.set_step_hook(Some(fault_at_every_step));
    let r = op();
    REGISTRIES.traps.set_step_hook(None);
    let p = STEP_PROBE.lock();
    assert!(p.published, "the update published");
    assert_eq!(
        p.failures, 0,
        "first failure after step {:?}",
        p.first_failure
    );
    r
}

fn faults_at_every_step_of_updates_and_batches_resolve() {
    map_linear_memory();
    let mut a = allocator(2);
    let stable = publish_load(&mut a);
    let changing: [PublishedCode; 4] = core::array::from_fn(|_| publish_load(&mut a));
    let (_, load_at, landing_at) = load_function();
    let accepted = AddressRange::new(MEMORY as usize, (MEMORY + 2 * MEMORY_PAGES * 4096) as usize);
    let registration = |c: &PublishedCode| TrapRegistration {
        code: c.range(),
        protected: core::slice::from_ref(&load_at),
        sites: &[],
        landing_pad: c.start() + landing_at,
        fault_ranges: core::slice::from_ref(&accepted),
    };
    // SAFETY: `stable` is this test's published code, kept until the handle is released.
    let stable_handle =
        unsafe { REGISTRIES.traps.register_with(&registration(&stable)) }.expect("register");
    // Fill the leaf holding the code: 7 ranges just below it and 7 above, then more above, so
    // the updates below split a full leaf (never executed: only their addresses matter).
    let below = stable.start() - 7 * 0x1000;
    let above = stable.start() + (1 << 30);
    let dummy: Vec<AddressRange> = (0..7)
        .map(|i| below + i * 0x1000)
        .chain((0..40).map(|i| above + i * 0x1000))
        .map(|s| AddressRange::new(s, s + 0x100))
        .collect();
    let dummies: Vec<_> = dummy
        .iter()
        .map(|&c| TrapRegistration {
            code: c,
            protected: &[],
            sites: &[],
            landing_pad: c.start(),
            fault_ranges: &[],
        })
        .collect();
    // SAFETY: no CPU executes the dummy ranges (nothing is mapped or allocated there during
    // this test, and they register no protected instruction), so no fault consults them; they
    // are released before the test ends.
    let dummy_handles = unsafe { REGISTRIES.traps.register_batch(&dummies) }.expect("dummies");
    STEP_PROBE.lock().stable = stable.start();
    let starts: Vec<usize> = changing.iter().map(PublishedCode::start).collect();

    // A single registration and release, then a batch of three and its batch release.
    let h = probe_every_step(&starts[..1], true, || {
        // SAFETY: `changing` is this test's published code, kept until released below.
        unsafe { REGISTRIES.traps.register_with(&registration(&changing[0])) }
    })
    .expect("register");
    probe_every_step(&starts[..1], false, || REGISTRIES.traps.release(h)).expect("release");
    let batch: Vec<_> = changing[1..].iter().map(registration).collect();
    let hs = probe_every_step(&starts[1..], true, || {
        // SAFETY: as above.
        unsafe { REGISTRIES.traps.register_batch(&batch) }
    })
    .expect("batch");
    probe_every_step(&starts[1..], false, || REGISTRIES.traps.release_batch(&hs))
        .expect("release batch");

    let steps = STEP_PROBE.lock().steps;
    for (kind, n) in ["allocate", "modify", "publish", "retire", "free"]
        .iter()
        .zip(steps)
    {
        assert!(n > 0, "no {kind} step was probed");
    }
    assert_eq!(steps[2], 4, "one publication per update");
    REGISTRIES
        .traps
        .release_batch(&dummy_handles)
        .expect("dummies");
    REGISTRIES.traps.release(stable_handle).expect("release");
    free(&mut a, stable);
    for c in changing {
        free(&mut a, c);
    }
}

/// Issue 10: a protected load whose registration accepts faults only in its linear memory (and
/// guard region) is not resumed when it faults anywhere else: the kernel's usual fault handling
/// sees it (here, as the fault the test expects).
fn protected_load_outside_its_memory_is_an_unexpected_fault() {
    map_linear_memory();
    let mut a = allocator(5);
    let code = publish_load(&mut a);
    let (_, load_at, landing_at) = load_function();
    let pc = (code.start() + load_at as usize) as u64;
    let accepted = AddressRange::new(MEMORY as usize, (MEMORY + 2 * MEMORY_PAGES * 4096) as usize);
    // SAFETY: `code` is this test's published code, kept until the handle is released.
    let handle = unsafe {
        REGISTRIES.traps.register_with(&TrapRegistration {
            code: code.range(),
            protected: &[load_at],
            sites: &[],
            landing_pad: code.start() + landing_at,
            fault_ranges: core::slice::from_ref(&accepted),
        })
    }
    .expect("register");
    assert_eq!(
        call(&code, MEMORY_PAGES * 4096 + 8),
        pc,
        "its guard region: lands"
    );
    let traps_before = code::last_trap().map_or(0, |t| t.count);
    // Just below the memory, in the unmapped lower half past the 4 GiB identity map (this
    // kernel's "near null": page 0 is identity-mapped), and far past the guard region.
    for addr in [MEMORY - 0x1000, 0x1_0000_0010, MEMORY + (64 << 20)] {
        let info = ExpectFault::page_fault(addr)
            .without_bits(PF_PRESENT)
            .run(|| {
                call(&code, addr.wrapping_sub(MEMORY));
            });
        assert_eq!(info.rip, pc, "reported at the load");
    }
    assert_eq!(
        code::last_trap().map_or(0, |t| t.count),
        traps_before,
        "the trap path resumed none of them"
    );
    assert!(
        REGISTRIES.traps.lookup(pc as usize).is_some(),
        "the PC is protected"
    );
    REGISTRIES.traps.release(handle).expect("release");
    free(&mut a, code);
}

fn released_code_no_longer_resolves() {
    let mut a = allocator(3);
    let code = publish_load(&mut a);
    let (_, load_at, landing_at) = load_function();
    let pc = code.start() + load_at as usize;
    // SAFETY: `code` is this test's published code, kept until the handle is released.
    let handle = unsafe {
        REGISTRIES
            .traps
            .register(code.range(), &[load_at], code.start() + landing_at)
    }
    .expect("register");
    assert!(REGISTRIES.traps.lookup(pc).is_some());
    REGISTRIES.traps.release(handle).expect("release");
    assert!(REGISTRIES.traps.lookup(pc).is_none());
    free(&mut a, code);
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
        code::module_config(
            &m,
            ModuleConfig {
                functions: 1,
                ..ModuleConfig::default()
            },
        ),
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
    // Task context, interrupts off: the dropped module's spaces were only queued.
    m.release_pending().expect("release");
    assert_eq!(m.committed(), 0);
    assert!(m.audit().expect("audit").is_clean());
}
