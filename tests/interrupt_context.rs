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
