//! Interrupt context: a module call made with interrupts already disabled while another CPU holds
//! the module's lock answers `Busy` instead of spinning (spinning there could deadlock: the
//! holder may be waiting for this CPU to acknowledge a TLB shootdown it cannot take with
//! interrupts off). With interrupts enabled the same call waits and succeeds.

use std::cell::Cell;
use std::sync::{Arc, Barrier, OnceLock};

use codespace::code_events::{CodeEvent, CodeEventListener};
use codespace::code_object::CodeKind;
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::InterruptControl;
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{AddressRange, CodeManager, ManagerConfig};

const WINDOW: AddressRange = AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_4000_0000);

thread_local! {
    /// This simulated CPU's interrupt flag (true: enabled).
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

fn disable() -> bool {
    ENABLED.with(|e| e.replace(false))
}

fn restore(enabled: bool) {
    if enabled {
        ENABLED.with(|e| e.set(true));
    }
}

/// Blocks the publishing thread inside `add_code` (under the module lock) until released.
struct Gate {
    inside: Barrier,
    release: Barrier,
}

impl CodeEventListener for Gate {
    fn code_published(&self, _: &CodeEvent<'_>) {
        self.inside.wait();
        self.release.wait();
    }
    fn code_freed(&self, _: &CodeEvent<'_>) {}
}

#[test]
fn a_call_with_interrupts_off_answers_busy_instead_of_spinning_on_a_held_module_lock() {
    static GRACE: GraceDomain = GraceDomain::new();
    static REGISTRIES: OnceLock<&'static Registries> = OnceLock::new();
    let registries = *REGISTRIES.get_or_init(|| Box::leak(Box::new(Registries::new(&GRACE))));
    let machine = SoftMmu::new(1024);
    machine.set_interrupt_control(InterruptControl { disable, restore });
    let manager = CodeManager::new(machine.clone(), WINDOW, ManagerConfig::default()).unwrap();
    let module = Arc::new(
        CodeModule::new(
            &manager,
            registries,
            ModuleConfig {
                functions: 2,
                ..ModuleConfig::default()
            },
        )
        .unwrap(),
    );
    let target = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap()
        .instruction_start();
    let gate: &'static Gate = Box::leak(Box::new(Gate {
        inside: Barrier::new(2),
        release: Barrier::new(2),
    }));
    module.set_listener(Some(gate)).unwrap();

    // CPU A: adds a function and stops inside, holding the module lock.
    let holder = {
        let module = Arc::clone(&module);
        std::thread::spawn(move || {
            module
                .add_code(&NewCode::function(1, &[0x31, 0xC0, 0xC3]))
                .unwrap();
        })
    };
    gate.inside.wait();

    // CPU B in an interrupt handler: interrupts are off. It must answer at once; a call that
    // spins instead is reported (and released below, so the test ends).
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let module = Arc::clone(&module);
        std::thread::spawn(move || {
            ENABLED.with(|e| e.set(false));
            let patched = module.patch_slot(0, target);
            let read = module.slot_target(0);
            let _ = tx.send((patched, read));
        });
    }
    let answer = rx.recv_timeout(std::time::Duration::from_secs(10));

    // CPU B with interrupts on: waits for A, then patches.
    let waiter = {
        let module = Arc::clone(&module);
        std::thread::spawn(move || module.patch_slot(0, target))
    };
    gate.release.wait();
    holder.join().unwrap();
    let (patched, read) = answer.expect("with interrupts off the call spun on the held lock");
    assert_eq!(patched, Err(ModuleError::Busy));
    assert_eq!(read, Err(ModuleError::Busy));
    module.set_listener(None).unwrap();
    assert_eq!(waiter.join().unwrap(), Ok(()));
    assert_eq!(module.slot_target(0), Ok(Some(target)));
    assert!(machine.violations().is_empty());
}

static CRITICAL_INSIDE: Barrier = Barrier::new(2);
static CRITICAL_RELEASE: Barrier = Barrier::new(2);

/// The critical-threshold hook runs with the manager's lock held: it parks the first thread
/// that crosses the threshold there.
fn park_in_manager_lock(_committed: usize) {
    static PARKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !PARKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        CRITICAL_INSIDE.wait();
        CRITICAL_RELEASE.wait();
    }
}

#[test]
fn a_module_whose_manager_lock_is_held_elsewhere_waits_when_its_caller_can() {
    static GRACE: GraceDomain = GraceDomain::new();
    static REGISTRIES: OnceLock<&'static Registries> = OnceLock::new();
    let registries = *REGISTRIES.get_or_init(|| Box::leak(Box::new(Registries::new(&GRACE))));
    let machine = SoftMmu::new(1024);
    machine.set_interrupt_control(InterruptControl { disable, restore });
    // A's commit of 2 pages crosses the critical threshold (half of 4 pages).
    let config = ManagerConfig {
        max_committed: 4 * 4096,
        on_critical: Some(park_in_manager_lock),
        ..ManagerConfig::default()
    };
    let manager = CodeManager::new(machine.clone(), WINDOW, config).unwrap();
    let module = |functions| {
        CodeModule::new(
            &manager,
            registries,
            ModuleConfig {
                functions,
                initial_reservation: 2 * 4096,
                ..ModuleConfig::default()
            },
        )
    };
    let (a, b) = (Arc::new(module(0).unwrap()), Arc::new(module(0).unwrap()));
    let holder = {
        let a = Arc::clone(&a);
        std::thread::spawn(move || {
            a.add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3; 5000]))
                .unwrap()
        })
    };
    CRITICAL_INSIDE.wait();
    // Module B's lock is free; the manager's is held by A. B's caller has interrupts on, so it
    // must wait for the manager lock, not answer Busy.
    let waiter = {
        let b = Arc::clone(&b);
        std::thread::spawn(move || b.add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3])))
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    CRITICAL_RELEASE.wait();
    holder.join().unwrap();
    let added = waiter.join().unwrap();
    assert!(added.is_ok(), "waited for the manager lock: {added:?}");
    assert!(machine.violations().is_empty());
}

thread_local! {
    /// Index steps this thread ran with its simulated interrupts enabled.
    static STEPS_WITH_INTERRUPTS_ON: Cell<usize> = const { Cell::new(0) };
    /// Index steps this thread ran.
    static STEPS: Cell<usize> = const { Cell::new(0) };
}

fn record_interrupt_state(_: codespace::index::UpdateStep) {
    STEPS.with(|s| s.set(s.get() + 1));
    if ENABLED.with(Cell::get) {
        STEPS_WITH_INTERRUPTS_ON.with(|s| s.set(s.get() + 1));
    }
}

/// With interrupt control, every step of every registry update (allocate, modify, publish,
/// retire, free) runs with interrupts off: an interrupt handler that installs code can then
/// never interrupt its own CPU's holder of the registry's writer lock and spin on it forever.
/// Interrupts come back on afterwards.
#[test]
fn registries_with_interrupt_control_update_with_interrupts_off() {
    static GRACE: GraceDomain = GraceDomain::new();
    let pass_grace = || {
        for _ in 0..2 {
            // SAFETY: this thread (CPU 0) holds nothing from a lookup and runs no generated code.
            unsafe { GRACE.quiescent(0) };
            GRACE.try_advance();
        }
    };
    static REGISTRIES: Registries =
        Registries::new(&GRACE).with_interrupt_control(InterruptControl { disable, restore });
    // SAFETY: only this thread (CPU 0) looks up these registries or runs their code.
    unsafe { GRACE.set_possible_cpus(1) };
    REGISTRIES.traps.set_step_hook(Some(record_interrupt_state));
    REGISTRIES.code.set_step_hook(Some(record_interrupt_state));
    let machine = SoftMmu::new(1024);
    let manager = CodeManager::new(machine.clone(), WINDOW, ManagerConfig::default()).unwrap();
    let module = CodeModule::new(
        &manager,
        &REGISTRIES,
        ModuleConfig {
            functions: 4,
            ..ModuleConfig::default()
        },
    )
    .unwrap();
    let body = [0x90, 0x90, 0x31, 0xC0, 0xC3];
    let guarded = |index| NewCode {
        protected: &[0, 1],
        landing_pad: Some(4),
        ..NewCode::function(index, &body)
    };
    for index in 0..4 {
        module.add_code(&guarded(index)).unwrap();
    }
    // Replacements retire the old entries and code objects; reclaiming frees them once every
    // CPU (this thread) has passed a quiescent state.
    for index in 0..4 {
        module.add_code(&guarded(index)).unwrap();
    }
    pass_grace();
    assert_eq!(module.reclaim().unwrap(), 4);
    // The dropped module's code leaves the registries after a grace period.
    drop(module);
    pass_grace();
    assert_eq!(GRACE.reclaim(), 1);
    pass_grace();
    REGISTRIES.traps.reclaim();
    REGISTRIES.code.reclaim();

    let steps = STEPS.with(Cell::get);
    assert_eq!(REGISTRIES.traps.retired_count(), 0, "frees were seen too");
    assert!(steps > 40, "the hook saw the updates: {steps} steps");
    assert_eq!(
        STEPS_WITH_INTERRUPTS_ON.with(Cell::get),
        0,
        "of {steps} steps"
    );
    assert!(ENABLED.with(Cell::get), "interrupts are back on");
    assert!(REGISTRIES.traps.is_empty());
    assert!(machine.violations().is_empty());
}

/// An allocator dropped with interrupts off (in an interrupt handler, say) never unmaps or frees
/// frames there, even when the manager's lock is free: that takes the kernel's allocator locks,
/// which the interrupted code may hold. Its spaces wait in the lock-free queue, and the
/// manager's next operation with interrupts on releases them.
#[test]
fn an_allocator_dropped_with_interrupts_off_leaves_its_release_to_the_next_interrupts_on_call() {
    use codespace::mmu::soft::CallKind;
    use codespace::{AllocatorConfig, CodeAllocator};
    let machine = SoftMmu::new(1024);
    machine.set_interrupt_control(InterruptControl { disable, restore });
    let manager = CodeManager::new(machine.clone(), WINDOW, ManagerConfig::default()).unwrap();
    let mut allocator = CodeAllocator::new(&manager, AllocatorConfig::default()).unwrap();
    // Allocated, never published: dropping the allocator may release its space.
    let _code = allocator.allocate(100).unwrap();
    let committed = manager.committed();
    assert!(committed > 0, "the allocator's space holds committed pages");
    let before = machine.snapshot();

    let enabled = disable();
    drop(allocator);
    assert_eq!(
        manager.committed(),
        committed,
        "released with interrupts off"
    );
    assert_eq!(
        machine.calls(CallKind::Unmap),
        0,
        "unmapped with interrupts off"
    );
    assert_eq!(
        machine.snapshot(),
        before,
        "page tables changed with interrupts off"
    );
    // Task context that runs with interrupts off asks for the release explicitly (the next
    // operation with interrupts on would do it too: tests/soundness/api.rs).
    manager.release_pending().unwrap();
    assert_eq!(manager.committed(), 0, "released on request");
    restore(enabled);

    manager.query(WINDOW.start()).unwrap();
    assert_eq!(manager.committed(), 0);
    assert!(machine.calls(CallKind::Unmap) > 0);
    assert!(machine.violations().is_empty());
}
