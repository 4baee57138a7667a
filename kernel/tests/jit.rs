//! The Cranelift JIT glue (`codespace_kernel::jit`): programs compiled in the kernel and run from
//! the code window, guard-page traps unwinding to the caller, calls through jump-table slots,
//! tier-up under a timer interrupt, lazy compilation, and bad input refused; then the same on
//! every CPU at once: compiling, calling and trapping on all CPUs, tier-up from one CPU while the
//! others call, and one lazy function first called by every CPU at once. With one CPU the SMP
//! tests run their single-CPU form (said in each).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use codespace::code_object::{CodeObject, RelocKind};
use codespace::{CodeManager, ManagerConfig};
use codespace_kernel::code::{self, test_window, KernelMmu, REGISTRIES};
use codespace_kernel::cpu::interrupts::{self, TrapFrame};
use codespace_kernel::cpu::pic;
use codespace_kernel::cpu::time::Deadline;
use codespace_kernel::jit::ir::{callee, define, signature};
use codespace_kernel::jit::lazy::{self, FunctionSource};
use codespace_kernel::jit::programs::{self, *};
use codespace_kernel::jit::{
    self as jit, Compiler, JitConfig, JitError, JitModule, LinearMemory, OptLevel, TierUp, Trap,
};
use codespace_kernel::test::ExpectFault;
use codespace_kernel::{memory, println, smp};
use cranelift_codegen::ir::types::{F64, I32, I64};
use cranelift_codegen::ir::{Function, InstBuilder, TrapCode};
use x86_64::instructions::port::Port;

codespace_kernel::kernel_tests![
    cranelift_programs_compile_and_run,
    jit_out_of_bounds_access_traps_back_to_the_caller,
    jit_calls_between_functions_go_through_jump_slots,
    jit_tier_up_from_timer_interrupt_while_called,
    jit_lazy_slots_compile_on_first_call,
    jit_bad_input_gives_typed_errors_and_installs_nothing,
    jit_compile_call_and_trap_on_every_cpu_at_once,
    jit_tier_up_from_another_cpu_while_called_on_all_cpus,
    jit_lazy_function_first_called_on_every_cpu_at_once_installs_once,
];

fn manager(window: usize, config: ManagerConfig) -> CodeManager<KernelMmu> {
    code::manager(test_window(60 + window), config).expect("manager")
}

fn program_module(mgr: &CodeManager<KernelMmu>) -> JitModule<KernelMmu> {
    JitModule::new(
        mgr,
        &REGISTRIES,
        JitConfig {
            functions: programs::FUNCTIONS,
            host: programs::host_functions(),
            lazy_entry: None,
        },
    )
    .expect("module")
}

/// Compiles `build()` at `opt` and installs it as `index`.
fn compile_install(
    m: &JitModule<KernelMmu>,
    c: &mut Compiler,
    index: u32,
    build: fn() -> Result<Function, JitError>,
    opt: OptLevel,
) {
    let code = c
        .compile(build().expect("build"), opt, &m.linkage())
        .expect("compile");
    m.install(index, &code, None).expect("install");
}

/// Deterministic pseudo-random words.
fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn cranelift_programs_compile_and_run() {
    let mgr = manager(0, ManagerConfig::default());
    for opt in [OptLevel::None, OptLevel::Speed] {
        let m = program_module(&mgr);
        let mut c = Compiler::new();
        for (index, source) in (0..).zip(&programs::SOURCES) {
            compile_install(&m, &mut c, index, source.build, opt);
        }
        // The launcher's ROX pass: the compiled code is on ROX pages.
        code::assert_rox_in_use(&mgr);
        let mut mem = LinearMemory::new(1 << 20).expect("memory");

        for n in [0i64, 1, 2, 10, 20] {
            assert_eq!(m.call(FIB, &[n as u64]), Ok(fib_ref(n) as u64), "fib({n})");
        }
        for n in [0u32, 1, 2, 3, 100, 65_521] {
            let r = m.call_with_memory(SIEVE, &mut mem, &[u64::from(n)]);
            assert_eq!(r, Ok(u64::from(sieve_ref(n))), "sieve({n}) at {opt:?}");
        }
        mem.write(0x100, b"123456789").expect("write");
        let check = m.call_with_memory(CRC32, &mut mem, &[0x100, 9]);
        assert_eq!(check, Ok(0xCBF4_3926), "the CRC-32 check value");
        let mut seed = 0x1234_5678_9ABC_DEF1;
        let data: Vec<u8> = (0..4096).map(|_| xorshift(&mut seed) as u8).collect();
        mem.write(0x3000, &data).expect("write");
        let crc = m.call_with_memory(CRC32, &mut mem, &[0x3000, 4096]);
        assert_eq!(crc, Ok(u64::from(crc32_ref(&data))));

        let n = 12usize;
        let a: Vec<i32> = (0..n * n).map(|_| xorshift(&mut seed) as i32).collect();
        let b: Vec<i32> = (0..n * n)
            .map(|_| (xorshift(&mut seed) % 2001) as i32 - 1000)
            .collect();
        let (oa, ob, oc) = (0x8000u64, 0x9000u64, 0xA000u64);
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            mem.write_u32(oa + 4 * k as u64, *x as u32).expect("a");
            mem.write_u32(ob + 4 * k as u64, *y as u32).expect("b");
        }
        let sum = m.call_with_memory(MATMUL, &mut mem, &[oa, ob, oc, n as u64]);
        let expected = matmul_ref(&a, &b, n);
        let expected_sum = expected.iter().fold(0i32, |s, &x| s.wrapping_add(x));
        assert_eq!(sum, Ok(u64::from(expected_sum as u32)), "sum of C");
        for (k, &x) in expected.iter().enumerate() {
            assert_eq!(mem.read_u32(oc + 4 * k as u64), Ok(x as u32), "C[{k}]");
        }

        assert_eq!(
            m.call(MIX, &[7, 1000]),
            Ok(mix_ref(7, 1000)),
            "mix calls the kernel"
        );
        mem.write_u32(0, 0).expect("counter");
        assert_eq!(
            m.call_with_memory(COUNTED_FIB, &mut mem, &[15]),
            Ok(fib_ref(15) as u64)
        );
        let calls = 2 * fib_ref(16) - 1;
        assert_eq!(mem.read_u32(0), Ok(calls as u32), "one count per call");
        println!("    {opt:?}: all programs match their Rust references");
    }

    // What one compilation needs in this (unoptimised) build: a fresh compiler, matmul.
    let m = program_module(&mgr);
    jit::stack::reset_peak();
    let before = memory::reset_heap_peak();
    let code = Compiler::new()
        .compile(matmul().expect("build"), OptLevel::Speed, &m.linkage())
        .expect("compile");
    let (heap, stack) = (memory::heap_peak() - before, jit::stack::peak());
    println!(
        "    one compilation of matmul: heap peak {} KiB, compile stack {} KiB of {}",
        heap.div_ceil(1024),
        stack.div_ceil(1024),
        jit::stack::SIZE >> 10
    );
    assert!(code.code_size() > 0);
    assert!(stack < jit::stack::SIZE, "the guard page was never reached");
}

fn jit_out_of_bounds_access_traps_back_to_the_caller() {
    let mgr = manager(1, ManagerConfig::default());
    let m = program_module(&mgr);
    let mut c = Compiler::new();
    compile_install(&m, &mut c, LOAD, load, OptLevel::Speed);
    compile_install(&m, &mut c, LOAD_PLUS_ONE, load_plus_one, OptLevel::None);
    let mut mem = LinearMemory::new(64 << 10).expect("memory");
    let len = mem.len();
    mem.write_u32(len - 4, 0xC0DE).expect("write");
    assert_eq!(m.call_with_memory(LOAD, &mut mem, &[len - 4]), Ok(0xC0DE));

    let traps_before = code::last_trap().map_or(0, |t| t.count);
    for index in [len, len + 4096 * 7, 0xFFFF_FFFC] {
        let r = m.call_with_memory(LOAD, &mut mem, &[index]);
        let Err(JitError::Trapped(Trap::OutOfBounds { pc, address })) = r else {
            panic!("load({index:#x}) gave {r:?}, expected a trap");
        };
        assert_eq!(address, mem.base() + index, "CR2 is base + 32-bit index");
        let (lo, hi) = mem.reservation();
        assert!((lo..hi).contains(&address), "inside the reservation");
        let object = m.lookup(pc).expect("faulting pc is generated code");
        let offset = (pc - object.instruction_start()) as u32;
        assert_eq!(object.index(), Some(LOAD));
        assert!(object.is_protected(offset), "fault at a protected load");
        assert_eq!(
            object.source_position_before(offset),
            Some(1),
            "source statement 1"
        );
        let last = code::last_trap().expect("trap path ran");
        assert_eq!((last.pc, last.cr2), (pc as u64, address));
        assert!(!jit::active(), "the landing popped the entry record");
    }
    assert_eq!(code::last_trap().map_or(0, |t| t.count), traps_before + 3);

    // Through two generated frames: load_plus_one -> slot -> load, faulting in load.
    let r = m.call_with_memory(LOAD_PLUS_ONE, &mut mem, &[len + 8]);
    assert!(
        matches!(r, Err(JitError::Trapped(Trap::OutOfBounds { address, .. })) if address == mem.base() + len + 8),
        "{r:?}"
    );
    // The caller's frame and registers survived: calls keep working.
    assert_eq!(
        m.call_with_memory(LOAD_PLUS_ONE, &mut mem, &[len - 4]),
        Ok(0xC0DF)
    );

    // Generated code called around `enter` has no entry to return to: the landing stops with
    // #UD instead of running on a bogus stack.
    let code = m.code(LOAD).expect("load");
    let base = mem.base();
    let info = ExpectFault::vector(6).run(|| {
        // SAFETY: deliberately bypasses `enter`; `load` is System V `(i64, i32) -> i32`.
        let f: extern "C" fn(u64, u32) -> u32 = unsafe { core::mem::transmute(code) };
        f(base, len as u32);
    });
    let stub = jit::trap_landing_address();
    assert!(
        (stub..stub + 64).contains(&(info.rip as usize)),
        "the landing stub's ud2"
    );
}

fn jit_calls_between_functions_go_through_jump_slots() {
    let mgr = manager(2, ManagerConfig::default());
    let m = program_module(&mgr);
    let mut c = Compiler::new();
    compile_install(&m, &mut c, FIB, fib, OptLevel::Speed);
    compile_install(&m, &mut c, LOAD, load, OptLevel::None);
    compile_install(&m, &mut c, LOAD_PLUS_ONE, load_plus_one, OptLevel::None);
    compile_install(&m, &mut c, MIX, mix, OptLevel::None);

    // fib's two recursive calls are CallSlot relocations whose rel32 lands on fib's slot.
    let fib_code = m.code(FIB).expect("fib");
    let object = m.lookup(fib_code).expect("object");
    let mut bytes = alloc::vec![0u8; object.instructions().size()];
    mgr.read(fib_code, &mut bytes).expect("read");
    let slot = m.entry(FIB).expect("slot");
    let calls: Vec<_> = object.relocations().collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for r in &calls {
        assert_eq!(r.kind, RelocKind::CallSlot { slot: FIB });
        let at = r.offset as usize;
        assert_eq!(bytes[at - 1], 0xE8, "a rel32 call");
        let rel = i32::from_le_bytes(bytes[at..at + 4].try_into().expect("rel32"));
        let target = (fib_code + at + 4).wrapping_add_signed(rel as isize);
        assert_eq!(target, slot, "the call goes to the slot, not to fib's code");
    }
    assert_ne!(slot, fib_code);
    assert_eq!(m.call(FIB, &[18]), Ok(fib_ref(18) as u64));

    // Replace `load` only: load_plus_one, unchanged, reaches the new code through the slot.
    let mut mem = LinearMemory::new(4096).expect("memory");
    mem.write_u32(0, 9).expect("write");
    assert_eq!(m.call_with_memory(LOAD_PLUS_ONE, &mut mem, &[0]), Ok(10));
    let caller = m.code(LOAD_PLUS_ONE);
    let old_load = m.code(LOAD).expect("load");
    let forty_one = || {
        define(LOAD, signature(&[I64, I32], &[I32]), |b, _| {
            let v = b.ins().iconst(I32, 41);
            b.ins().return_(&[v]);
        })
    };
    let code = c
        .compile(forty_one().expect("build"), OptLevel::None, &m.linkage())
        .expect("compile");
    m.install(LOAD, &code, Some("forty_one")).expect("install");
    assert_eq!(m.call_with_memory(LOAD_PLUS_ONE, &mut mem, &[0]), Ok(42));
    assert_eq!(m.code(LOAD_PLUS_ONE), caller, "the caller was not touched");
    assert!(
        REGISTRIES.lookup_code(old_load).is_some(),
        "old load retired, not freed"
    );
    // Every CPU passes a quiescent state (idle CPUs are woken to report).
    // SAFETY: no generated code runs on this CPU and no lookup reference is held.
    unsafe { code::synchronize() };
    assert_eq!(
        m.reclaim(),
        1,
        "freed once every CPU passed a quiescent state"
    );
    assert!(REGISTRIES.lookup_code(old_load).is_none());
    assert!(
        !REGISTRIES.traps.is_protected(old_load + 4),
        "its trap entry released"
    );

    // Calls into the kernel: the absolute address is in the code, no codespace relocation.
    let mix_code = m.code(MIX).expect("mix");
    let object = m.lookup(mix_code).expect("object");
    let mut bytes = alloc::vec![0u8; object.instructions().size()];
    mgr.read(mix_code, &mut bytes).expect("read");
    let host = (host_mix as *const () as u64).to_le_bytes();
    assert!(bytes.windows(8).any(|w| w == host), "movabs of host_mix");
    assert_eq!(object.relocations().count(), 0);
    assert_eq!(m.call(MIX, &[3, 50]), Ok(mix_ref(3, 50)));
}

/// The module, function and bookkeeping the timer handler tiers up.
struct Tiering {
    module: JitModule<KernelMmu>,
    tier: TierUp,
    /// Starts of every installed version, in order.
    versions: Vec<usize>,
    /// Ticks that found the interrupted code outside the running version (no step then).
    outside: u64,
    /// Outer calls completed when the last step ran.
    calls_at_step: u64,
    error: Option<JitError>,
}

static TIERING: spin::Mutex<Option<Tiering>> = spin::Mutex::new(None);
static LOOP_CALLS: AtomicU64 = AtomicU64::new(0);
const TIER_STEPS: usize = 8;

fn tier_tick(frame: &mut TrapFrame) {
    let Some(mut guard) = TIERING.try_lock() else {
        return;
    };
    let Some(t) = guard.as_mut() else { return };
    let calls = LOOP_CALLS.load(Ordering::SeqCst);
    // Let the loop run each version a few times before the next switch.
    if t.error.is_some() || t.versions.len() > TIER_STEPS || calls < t.calls_at_step + 3 {
        return;
    }
    // Switch only under a running call of the version being replaced: the interrupted PC is in
    // it, and returns into it after the switch.
    let running = t.module.code(COUNTED_FIB).and_then(|s| t.module.lookup(s));
    if !running.is_some_and(|o| o.contains(frame.rip as usize)) {
        t.outside += 1;
        return;
    }
    match t.tier.step(&t.module) {
        Ok(_) => {
            t.versions.extend(t.module.code(COUNTED_FIB));
            t.calls_at_step = calls;
        }
        Err(e) => t.error = Some(e),
    }
}

fn jit_tier_up_from_timer_interrupt_while_called() {
    let mgr = manager(3, ManagerConfig::default());
    let module = program_module(&mgr);
    let mut tier = TierUp::new(COUNTED_FIB, "counted_fib", counted_fib);
    let first = tier.install(&module, OptLevel::None).expect("baseline");
    let slot = module.entry(COUNTED_FIB).expect("slot");
    let mem = LinearMemory::new(4096).expect("memory");
    *TIERING.lock() = Some(Tiering {
        module,
        tier,
        versions: alloc::vec![first],
        outside: 0,
        calls_at_step: 0,
        error: None,
    });
    LOOP_CALLS.store(0, Ordering::SeqCst);

    // PIT channel 0 at ~1 kHz.
    let divisor: u16 = 1193;
    // SAFETY: programs the PIT, which only this test uses now.
    unsafe {
        Port::<u8>::new(0x43).write(0x34);
        Port::<u8>::new(0x40).write(divisor as u8);
        Port::<u8>::new(0x40).write((divisor >> 8) as u8);
    }
    interrupts::set_irq_handler(0, Some(tier_tick));
    pic::set_masked(0, false);
    x86_64::instructions::interrupts::enable();

    // Allocation-free and lock-free while interrupts are on: the handler compiles.
    const N: u64 = 16;
    let expected = fib_ref(N as i64) as u64;
    let (mut right, mut wrong) = (0u64, 0u64);
    let args = [mem.base(), N];
    while LOOP_CALLS.load(Ordering::SeqCst) < 200_000 {
        // SAFETY: the slot of COUNTED_FIB, `(i64, i64) -> i64` compiled by the glue; the module
        // lives in TIERING until after the loop.
        match unsafe { jit::enter(slot, &args) } {
            Ok(v) if v == expected => right += 1,
            _ => wrong += 1,
        }
        LOOP_CALLS.fetch_add(1, Ordering::SeqCst);
        let done = TIERING
            .try_lock()
            .is_some_and(|t| t.as_ref().is_some_and(|t| t.versions.len() > TIER_STEPS));
        if done {
            break;
        }
    }

    x86_64::instructions::interrupts::disable();
    pic::set_masked(0, true);
    interrupts::set_irq_handler(0, None);
    let Tiering {
        module,
        tier,
        versions,
        outside,
        error,
        ..
    } = TIERING.lock().take().expect("tiering");
    let (baseline_calls, optimised_calls) = (
        mem.read_u32(0).expect("counter"),
        mem.read_u32(4).expect("counter"),
    );
    println!(
        "    {right} calls; {} versions installed from IRQ0, each while the interrupted code ran \
         the version it replaced ({outside} ticks elsewhere skipped); calls counted: \
         {baseline_calls} baseline, {optimised_calls} optimised",
        tier.installs()
    );
    assert_eq!(error, None);
    assert_eq!(
        wrong, 0,
        "every call returned fib({N}): never a broken slot"
    );
    assert!(
        versions.len() > TIER_STEPS,
        "the timer tiered up {} times",
        versions.len() - 1
    );
    assert!(baseline_calls > 0 && optimised_calls > 0, "both tiers ran");

    // Old versions stayed alive while calls could be inside them; now they are freed.
    let current = module.code(COUNTED_FIB).expect("installed");
    assert_eq!(Some(&current), versions.last());
    for &old in &versions[..versions.len() - 1] {
        assert!(
            REGISTRIES.lookup_code(old).is_some(),
            "retired, not yet freed"
        );
    }
    // SAFETY: no generated code runs on this CPU and no lookup reference is held.
    unsafe { code::synchronize() };
    assert_eq!(module.reclaim(), versions.len() - 1);
    for &old in &versions[..versions.len() - 1] {
        assert!(REGISTRIES.lookup_code(old).is_none(), "freed at {old:#x}");
    }
    assert_eq!(
        module.call_with_memory(COUNTED_FIB, &mut { mem }, &[10]),
        Ok(55)
    );
    drop(module);
    assert!(mgr.audit().expect("audit").is_clean(), "{:?}", mgr.audit());
}

fn bad_verifier() -> Result<Function, JitError> {
    define(0, signature(&[I32, I64], &[I32]), |b, p| {
        let v = b.ins().iadd(p[0], p[1]); // i32 + i64: the verifier refuses
        b.ins().return_(&[v]);
    })
}

fn returns_seven() -> Result<Function, JitError> {
    define(1, signature(&[], &[I64]), |b, _| {
        let v = b.ins().iconst(I64, 7);
        b.ins().return_(&[v]);
    })
}

static FAILING_SOURCES: [FunctionSource; 2] = [
    FunctionSource {
        name: "bad",
        params: 2,
        build: bad_verifier,
    },
    FunctionSource {
        name: "seven",
        params: 0,
        build: returns_seven,
    },
];

fn read_slot_target(mgr: &CodeManager<KernelMmu>, slot: usize) -> usize {
    let mut near = [0u8; 8];
    mgr.read(slot, &mut near).expect("read");
    assert_eq!(near[0], 0xE9, "a near jump");
    let rel = i32::from_le_bytes([near[1], near[2], near[3], near[4]]);
    (slot + 5).wrapping_add_signed(rel as isize)
}

fn jit_lazy_slots_compile_on_first_call() {
    let mgr = manager(4, ManagerConfig::default());
    let host = programs::host_functions();
    lazy::start(&mgr, &REGISTRIES, &programs::SOURCES, host, OptLevel::None).expect("start");
    let m = lazy::module().expect("module");
    assert_eq!(m.code(FIB), None, "nothing compiled yet");
    let fib_slot = m.entry(FIB).expect("slot");
    let lazy_target = read_slot_target(m.manager(), fib_slot);
    assert!(REGISTRIES
        .lookup_code(lazy_target)
        .is_some_and(|o| o.index().is_none()));

    let before = lazy::stats().installed;
    assert_eq!(lazy::call(FIB, &[15]), Ok(fib_ref(15) as u64));
    assert_eq!(
        lazy::stats().installed,
        before + 1,
        "compiled once, then recursed through the slot"
    );
    let code = m.code(FIB).expect("installed");
    assert_eq!(
        read_slot_target(&mgr, fib_slot),
        code,
        "the slot now jumps to the code"
    );
    assert_eq!(lazy::call(FIB, &[20]), Ok(fib_ref(20) as u64));
    assert_eq!(lazy::stats().installed, before + 1, "no second compilation");

    // load_plus_one compiles on its call, and load compiles when load_plus_one's code calls its
    // lazy slot: a compilation from inside generated code, resumed with the original arguments.
    let mut mem = LinearMemory::new(4096).expect("memory");
    mem.write_u32(12, 99).expect("write");
    assert_eq!(lazy::call(LOAD_PLUS_ONE, &[mem.base(), 12]), Ok(100));
    assert_eq!(lazy::stats().installed, before + 3);
    let r = lazy::call(LOAD, &[mem.base(), 4096]);
    assert!(
        matches!(r, Err(JitError::Trapped(Trap::OutOfBounds { .. }))),
        "{r:?}"
    );
    drop(m);
    drop(lazy::stop().expect("module"));

    // A function whose IR fails to compile: the call returns an error, the slot stays lazy, and
    // the module's other functions still compile and run.
    lazy::start(&mgr, &REGISTRIES, &FAILING_SOURCES, host, OptLevel::Speed).expect("start");
    let slot = lazy::module().and_then(|m| m.entry(0)).expect("slot");
    let lazy_target = read_slot_target(&mgr, slot);
    assert_eq!(
        lazy::call(0, &[1, 2]),
        Err(JitError::Trapped(Trap::LazyCompileFailed))
    );
    assert!(
        matches!(lazy::last_error(), Some(JitError::Verifier(_))),
        "{:?}",
        lazy::last_error()
    );
    assert_eq!(read_slot_target(&mgr, slot), lazy_target, "still lazy");
    assert!(!jit::active());
    assert_eq!(lazy::call(1, &[]), Ok(7));
    let m = lazy::stop().expect("module");
    assert_eq!(m.code(0), None);
    drop(m);
    assert!(mgr.audit().expect("audit").is_clean());
}

/// What must not change when an operation is refused.
fn snapshot(m: &JitModule<KernelMmu>, mgr: &CodeManager<KernelMmu>) -> [usize; 5] {
    [
        m.code_count(),
        mgr.committed(),
        REGISTRIES.traps.len(),
        REGISTRIES.code.len(),
        m.code(0).unwrap_or(0),
    ]
}

fn jit_bad_input_gives_typed_errors_and_installs_nothing() {
    let mgr = manager(
        5,
        ManagerConfig {
            max_code_space_size: 16 << 10,
            ..ManagerConfig::default()
        },
    );
    let m = program_module(&mgr);
    let mut c = Compiler::new();
    compile_install(&m, &mut c, 0, load, OptLevel::None);
    let before = snapshot(&m, &mgr);
    let link = m.linkage();
    let compile = |c: &mut Compiler, f: Result<Function, JitError>| {
        c.compile(f.expect("build"), OptLevel::None, &link)
    };

    let r = compile(&mut c, bad_verifier());
    assert!(matches!(r, Err(JitError::Verifier(_))), "{r:?}");

    let call_of = |namespace: u32, index: u32| {
        define(0, signature(&[], &[I64]), move |b, _| {
            let f = callee(b, namespace, index, signature(&[], &[I64]));
            let call = b.ins().call(f, &[]);
            let v = b.inst_results(call)[0];
            b.ins().return_(&[v]);
        })
    };
    for (namespace, index) in [(jit::MODULE, FUNCTIONS), (jit::HOST, 1), (7, 0)] {
        let r = compile(&mut c, call_of(namespace, index));
        assert_eq!(r, Err(JitError::UnknownFunction { namespace, index }));
    }
    let address_of = define(0, signature(&[], &[I64]), |b, _| {
        let f = callee(b, jit::MODULE, FIB, signature(&[I64], &[I64]));
        let v = b.ins().func_addr(I64, f);
        b.ins().return_(&[v]);
    });
    let r = compile(&mut c, address_of);
    assert!(
        matches!(r, Err(JitError::UnsupportedRelocation { .. })),
        "{r:?}"
    );
    let float = define(0, signature(&[F64, F64], &[F64]), |b, p| {
        let v = b.ins().fadd(p[0], p[1]);
        b.ins().return_(&[v]);
    });
    let r = compile(&mut c, float);
    assert!(matches!(r, Err(JitError::UnsupportedType { .. })), "{r:?}");
    let explicit_trap = define(0, signature(&[], &[]), |b, _| {
        b.ins().trap(TrapCode::unwrap_user(1));
    });
    let r = compile(&mut c, explicit_trap);
    assert!(matches!(r, Err(JitError::UnsupportedTrap { .. })), "{r:?}");

    // Compiles fine, but is larger than a 16 KiB code space.
    let huge = define(0, signature(&[I64], &[I64]), |b, p| {
        let mut x = p[0];
        for k in 0..1800 {
            x = b.ins().imul_imm_s(x, 0x1234_5679 + k);
            x = b.ins().iadd_imm_s(x, 0x0765_4321 - k);
        }
        b.ins().return_(&[x]);
    });
    let code = compile(&mut c, huge).expect("a large function compiles");
    assert!(
        code.bytes().len() > 16 << 10,
        "{} bytes",
        code.bytes().len()
    );
    let r = m.install(0, &code, None);
    assert!(
        matches!(r, Err(JitError::CodeTooLarge { max, .. }) if max == 16 << 10),
        "{r:?}"
    );

    let small = compile(&mut c, returns_seven()).expect("compile");
    let r = m
        .install(FUNCTIONS, &small, None)
        .map(|o| o.instruction_start());
    assert_eq!(r, Err(JitError::BadIndex { index: FUNCTIONS }));
    assert_eq!(
        snapshot(&m, &mgr),
        before,
        "nothing was installed or changed"
    );

    // Calls are checked against the function too.
    assert_eq!(
        m.call(0, &[]),
        Err(JitError::ArgumentCount {
            expected: 2,
            given: 0
        })
    );
    assert_eq!(
        m.call(SIEVE, &[1, 2]),
        Err(JitError::NotCompiled { index: SIEVE })
    );
    assert_eq!(
        m.call(FUNCTIONS, &[]),
        Err(JitError::BadIndex { index: FUNCTIONS })
    );
    let mut mem = LinearMemory::new(4096).expect("memory");
    assert_eq!(
        m.call_with_memory(0, &mut mem, &[0]),
        Ok(0),
        "the installed load still works"
    );
    assert_eq!(
        LinearMemory::new(0).map(|_| ()),
        Err(JitError::LinearMemory("size must be 1 byte..4 GiB"))
    );
}

/// Runs `f(cpu)` on every online CPU at once, each with interrupts on, and fails with every
/// CPU's failure. Interrupts on matter: a CPU answers other CPUs' shootdown and serialization
/// IPIs only with interrupts on (or while it waits for them itself), and with interrupts off a
/// contended codespace lock answers `Busy` instead of waiting. The test framework runs the boot
/// CPU with interrupts off otherwise.
fn on_every_cpu(f: impl Fn(usize) + Sync) {
    let enabled = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::enable();
    let result = smp::on_each_cpu(|cpu| {
        x86_64::instructions::interrupts::enable();
        f(cpu);
    });
    if !enabled {
        x86_64::instructions::interrupts::disable();
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Waits until `n` CPUs arrived at `count` (each adds one), for at most 20 s.
fn all_arrive(count: &AtomicUsize, n: usize, what: &str) {
    count.fetch_add(1, Ordering::SeqCst);
    let deadline = Deadline::after(Duration::from_secs(20));
    while count.load(Ordering::SeqCst) < n {
        assert!(
            !deadline.expired(),
            "only {} of {n} CPUs {what}",
            count.load(Ordering::SeqCst)
        );
        core::hint::spin_loop();
    }
}

/// Out-of-bounds calls per CPU in the every-CPU trap test.
const TRAPS_PER_CPU: u64 = 200;

fn jit_compile_call_and_trap_on_every_cpu_at_once() {
    // Every CPU compiles two functions into a module of its own (all at once: one compile stack
    // per CPU), then calls them and makes them trap, alternately, while the other CPUs do the
    // same. A trap unwinds to the `enter` of its own CPU: with a shared entry record, one CPU's
    // landing would resume on another CPU's stack. All the modules share one manager: each
    // takes the manager's lock inside its own, and with interrupts on a contended lock is
    // waited for, never answered with `Busy`.
    let n = smp::online_cpus();
    let shared = manager(10, ManagerConfig::default());
    let (compiling, compiled) = (AtomicUsize::new(0), AtomicUsize::new(0));
    on_every_cpu(|cpu| {
        let mut mem = LinearMemory::new(8192).expect("memory");
        let len = mem.len();
        let value = 0x1000 * cpu as u32 + 7;
        mem.write_u32(len - 4, value).expect("write");
        all_arrive(&compiling, n, "started compiling");
        let m = program_module(&shared);
        let mut c = Compiler::new();
        compile_install(&m, &mut c, LOAD, load, OptLevel::Speed);
        compile_install(&m, &mut c, LOAD_PLUS_ONE, load_plus_one, OptLevel::None);
        all_arrive(&compiled, n, "compiled");
        let load_code = m.lookup(m.code(LOAD).expect("load")).expect("load object");
        for i in 0..TRAPS_PER_CPU {
            let r = m.call_with_memory(LOAD_PLUS_ONE, &mut mem, &[len - 4]);
            assert_eq!(r, Ok(u64::from(value + 1)), "cpu {cpu}, call {i}");
            // Through two generated frames, faulting in `load`, at an address of this CPU's
            // memory only.
            let index = len + 4096 * (i % 16) + 4 * (cpu as u64);
            let r = m.call_with_memory(LOAD_PLUS_ONE, &mut mem, &[index]);
            let Err(JitError::Trapped(Trap::OutOfBounds { pc, address })) = r else {
                panic!("cpu {cpu}: load_plus_one({index:#x}) gave {r:?}, expected a trap");
            };
            assert_eq!(
                address,
                mem.base() + index,
                "cpu {cpu}: CR2 of this CPU's fault"
            );
            assert!(
                load_code.contains(pc),
                "cpu {cpu}: the fault is in this module's load"
            );
            assert!(
                !jit::active(),
                "cpu {cpu}: the landing popped this CPU's record"
            );
        }
    });
    println!("    {n} CPUs compiled at once, then each trapped {TRAPS_PER_CPU} times through two generated frames");
}

/// Whether `object` is still registered for PC lookup: found at its start, and not a newer
/// object in reused memory.
fn registered(object: &Arc<CodeObject>) -> bool {
    REGISTRIES
        .lookup_code(object.instruction_start())
        .is_some_and(|o| Arc::ptr_eq(&o, object))
}

/// Tier-up steps in the cross-CPU tier-up test, and the `n` of `counted_fib(n)` its callers run.
const CROSS_STEPS: usize = 6;
const CROSS_N: u64 = 12;

/// What the callers of the cross-CPU tier-up test share with the tiering CPU.
struct Callers {
    stop: AtomicBool,
    /// Completed calls per CPU.
    calls: Vec<AtomicU64>,
    /// Calls that returned anything but `fib(CROSS_N)`, and the first such result.
    wrong: AtomicU64,
    /// Sum over tier-ups of the callers inside a call when it returned.
    inside_at_switch: AtomicU64,
    first_wrong: spin::Mutex<Option<Result<u64, Trap>>>,
}

impl Callers {
    /// Waits until every caller completed two more calls than in `since`, so each ran the
    /// installed version (a call that began before the install may have run the old one; the
    /// next one cannot). Returns the new counts.
    fn progress(&self, since: &[u64], tierer: usize) -> Vec<u64> {
        let deadline = Deadline::after(Duration::from_secs(20));
        loop {
            let now: Vec<u64> = self
                .calls
                .iter()
                .map(|c| c.load(Ordering::SeqCst))
                .collect();
            let lagging = (0..now.len()).find(|&c| c != tierer && now[c] < since[c] + 2);
            match lagging {
                None => return now,
                Some(c) if deadline.expired() => {
                    self.fail(format_args!("cpu {c} made no progress"))
                }
                Some(_) => {}
            }
            core::hint::spin_loop();
        }
    }

    /// Stops the callers, then fails (a panic abandons the tiering CPU's frames: nothing else
    /// would tell the callers).
    fn fail(&self, why: core::fmt::Arguments<'_>) -> ! {
        self.stop.store(true, Ordering::SeqCst);
        panic!("{why}");
    }
}

fn jit_tier_up_from_another_cpu_while_called_on_all_cpus() {
    // The last CPU recompiles counted_fib at the other level and installs it, again and again,
    // while every other CPU calls it in a loop through its slot. With one CPU, the CPU itself
    // alternates calls and tier-ups.
    let mgr = manager(7, ManagerConfig::default());
    let module = program_module(&mgr);
    let tier = spin::Mutex::new(TierUp::new(COUNTED_FIB, "counted_fib", counted_fib));
    let first = tier
        .lock()
        .install(&module, OptLevel::None)
        .expect("baseline");
    let slot = module.entry(COUNTED_FIB).expect("slot");
    let n = smp::online_cpus();
    let tierer = n - 1;
    // Each caller counts its calls per tier in its own 64 bytes of one memory.
    let mem = LinearMemory::new(4096).expect("memory");
    let counters = |cpu: usize| mem.base() + 64 * cpu as u64;
    let expected = fib_ref(CROSS_N as i64) as u64;
    let versions = spin::Mutex::new(alloc::vec![module.lookup(first).expect("baseline object")]);
    let callers = Callers {
        stop: AtomicBool::new(false),
        calls: (0..n).map(|_| AtomicU64::new(0)).collect(),
        wrong: AtomicU64::new(0),
        inside_at_switch: AtomicU64::new(0),
        first_wrong: spin::Mutex::new(None),
    };
    let call = |cpu: usize| {
        // SAFETY: COUNTED_FIB's slot, `(i64, i64) -> i64` compiled by the glue; `module` outlives
        // every call (the work framework returns only after every CPU finished).
        let r = unsafe { jit::enter(slot, &[counters(cpu), CROSS_N]) };
        if r != Ok(expected) {
            callers.wrong.fetch_add(1, Ordering::SeqCst);
            callers.first_wrong.lock().get_or_insert(r);
        }
        callers.calls[cpu].fetch_add(1, Ordering::SeqCst);
    };

    if n == 1 {
        // One CPU: tier-up between calls. The version just replaced stays registered; the ones
        // before it were freed by this install, which reported this CPU quiescent (no call is
        // running) and, the CPU being alone, ended their grace period.
        for _ in 0..CROSS_STEPS {
            for _ in 0..4 {
                call(0);
            }
            tier.lock().step(&module).expect("tier-up");
            let mut v = versions.lock();
            v.extend(module.code(COUNTED_FIB).and_then(|s| module.lookup(s)));
            let k = v.len();
            assert!(registered(&v[k - 2]), "just replaced: retired, not freed");
            assert!(
                v[..k - 2].iter().all(|o| !registered(o)),
                "older ones freed"
            );
            assert_eq!(module.retired(), 1);
        }
        call(0);
    } else {
        on_every_cpu(|cpu| {
            if cpu != tierer {
                let deadline = Deadline::after(Duration::from_secs(40));
                while !callers.stop.load(Ordering::SeqCst) && !deadline.expired() {
                    call(cpu);
                }
                return;
            }
            let mut seen = callers.progress(&alloc::vec![0; n], tierer);
            for step in 0..CROSS_STEPS {
                let result = tier.lock().step(&module);
                if let Err(e) = result {
                    callers.fail(format_args!("tier-up {step}: {e}"));
                }
                // Callers inside generated code right after the switch (a snapshot, for the report):
                // they run, or return into, a version just replaced.
                let inside = (0..n).filter(|&c| c != tierer && jit::active_on(c)).count();
                callers
                    .inside_at_switch
                    .fetch_add(inside as u64, Ordering::SeqCst);
                let mut v = versions.lock();
                v.extend(module.code(COUNTED_FIB).and_then(|s| module.lookup(s)));
                // No caller reported a quiescent state since it started calling: every replaced
                // version may still be running somewhere, so none is freed.
                if let Some(k) = v.iter().position(|o| !registered(o)) {
                    let n = v.len();
                    callers.fail(format_args!(
                        "version {k} of {n} left PC lookup under callers"
                    ));
                }
                let retired = module.retired();
                if retired != v.len() - 1 {
                    let n = v.len();
                    callers.fail(format_args!("{retired} of {n} versions retired, not freed"));
                }
                drop(v);
                seen = callers.progress(&seen, tierer);
            }
            callers.stop.store(true, Ordering::SeqCst);
        });
    }

    let versions = versions.into_inner();
    let calls: Vec<u64> = callers
        .calls
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .collect();
    println!(
        "    {} versions installed by cpu {tierer}; calls per CPU while it tiered up: {calls:?}; \
         callers inside a call as a tier-up returned: {} in all",
        versions.len(),
        callers.inside_at_switch.load(Ordering::SeqCst)
    );
    assert_eq!(
        callers.wrong.load(Ordering::SeqCst),
        0,
        "every call returned fib({CROSS_N}), never a broken slot; first wrong: {:?}",
        callers.first_wrong.lock()
    );
    assert_eq!(versions.len(), CROSS_STEPS + 1);
    let current = versions.last().expect("a version");
    assert_eq!(module.code(COUNTED_FIB), Some(current.instruction_start()));
    for cpu in (0..n).filter(|&c| c != tierer || n == 1) {
        let base = counters(cpu) - mem.base();
        let (baseline, optimised) = (mem.read_u32(base), mem.read_u32(base + 4));
        assert!(
            baseline.as_ref().is_ok_and(|&c| c > 0) && optimised.as_ref().is_ok_and(|&c| c > 0),
            "cpu {cpu} ran both tiers: {baseline:?} baseline, {optimised:?} optimised calls"
        );
    }

    // Callers stopped: after a grace period every replaced version is freed and leaves PC
    // lookup.
    // SAFETY: no generated code runs on this CPU and no lookup reference is held.
    unsafe { code::synchronize() };
    module.reclaim();
    assert_eq!(module.retired(), 0, "every replaced version freed");
    for old in &versions[..versions.len() - 1] {
        let start = old.instruction_start();
        assert!(!registered(old), "the version at {start:#x} left PC lookup");
    }
    assert!(registered(current));
    assert_eq!(
        module.call_with_memory(COUNTED_FIB, &mut { mem }, &[10]),
        Ok(55)
    );
    drop(module);
    assert!(mgr.audit().expect("audit").is_clean(), "{:?}", mgr.audit());
}

/// CPUs inside the build of [`fib_when_every_cpu_builds`].
static RACE_BUILDERS: AtomicUsize = AtomicUsize::new(0);

/// Builds fib once every online CPU is inside this function (or 20 s passed): so every CPU that
/// took the lazy slot compiles, and they all race to install.
fn fib_when_every_cpu_builds() -> Result<Function, JitError> {
    RACE_BUILDERS.fetch_add(1, Ordering::SeqCst);
    let deadline = Deadline::after(Duration::from_secs(20));
    while RACE_BUILDERS.load(Ordering::SeqCst) < smp::online_cpus() && !deadline.expired() {
        core::hint::spin_loop();
    }
    fib()
}

static RACE_SOURCES: [FunctionSource; 1] = [FunctionSource {
    name: "fib",
    params: 1,
    build: fib_when_every_cpu_builds,
}];

fn jit_lazy_function_first_called_on_every_cpu_at_once_installs_once() {
    let mgr = manager(8, ManagerConfig::default());
    let host = programs::host_functions();
    lazy::start(&mgr, &REGISTRIES, &RACE_SOURCES, host, OptLevel::None).expect("start");
    let m = lazy::module().expect("module");
    let slot = m.entry(FIB).expect("slot");
    let lazy_target = read_slot_target(&mgr, slot);
    let (objects, registered) = (m.code_count(), REGISTRIES.code.len());
    let n = smp::online_cpus();
    RACE_BUILDERS.store(0, Ordering::SeqCst);
    let before = lazy::stats();

    let arrived = AtomicUsize::new(0);
    on_every_cpu(|cpu| {
        all_arrive(&arrived, n, "arrived");
        let r = lazy::call(FIB, &[20]);
        assert_eq!(
            r,
            Ok(fib_ref(20) as u64),
            "cpu {cpu}: {:?}",
            lazy::last_error()
        );
    });
    let after = lazy::stats();
    let (compiled, installed, lost) = (
        after.compiled - before.compiled,
        after.installed - before.installed,
        after.lost_races - before.lost_races,
    );
    println!("    {n} CPUs called the lazy slot at once: {compiled} compiled, {installed} installed, {lost} lost the race");
    assert_eq!(
        compiled, n as u64,
        "every CPU took the lazy slot and compiled"
    );
    assert_eq!(installed, 1, "exactly one install");
    assert_eq!(
        lost,
        n as u64 - 1,
        "the others resumed in the winner's code"
    );
    assert_eq!(after.failed, before.failed);
    assert_eq!(m.code_count(), objects + 1, "one code object added");
    assert_eq!(m.retired(), 0, "no version replaced another");
    assert_eq!(
        REGISTRIES.code.len(),
        registered + 1,
        "one object registered"
    );
    let code = m.code(FIB).expect("installed");
    assert_ne!(read_slot_target(&mgr, slot), lazy_target);
    assert_eq!(
        read_slot_target(&mgr, slot),
        code,
        "the slot jumps to the winner"
    );

    // Installed: calls on every CPU go straight to the code, nothing compiles again.
    on_every_cpu(|cpu| {
        assert_eq!(lazy::call(FIB, &[15]), Ok(fib_ref(15) as u64), "cpu {cpu}");
    });
    assert_eq!(lazy::stats(), after);
    drop(m);
    drop(lazy::stop().expect("module"));
    assert!(mgr.audit().expect("audit").is_clean());
}
