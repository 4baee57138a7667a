//! Issue 18 items of this area (code pointers, trap registrations, code references); see
//! `main.rs`.
//!
//! Items 13–15 are fixed by making raw entry points `unsafe`: their tests show the hazard once,
//! through `unsafe`, on the software machine, and check the validated path a module offers.
//! Item 9 (interrupt-safe locks) is tested where the locks are: the unit tests
//! `item_09_code_pointer_table_lock_is_held_with_interrupts_off` and
//! `item_09_deferred_list_lock_is_held_with_interrupts_off`.

use std::sync::Arc;

use codespace::code_object::{CodeKind, CodeObject, CodeObjectError, DecRef};
use codespace::code_pointer_table::{CodePointerError, CodePointerTable};
use codespace::module::{ModuleError, NewCode};
use codespace::AddressRange;

use crate::common::*;

/// A 4-CPU machine with a direct map and 64 MiB of frames, and a manager over the whole slot.
fn default_rig() -> (
    codespace::mmu::soft::SoftMmu,
    codespace::CodeManager<codespace::mmu::soft::SoftMmu>,
) {
    rig(1 << 14, codespace::ManagerConfig::default())
}

/// An address in kernel text: outside the code window, nobody's generated code.
const KERNEL_TEXT: usize = 0xFFFF_FFFF_8000_1000;

/// `ret` after `len - 1` bytes of `nop`-like filler `fill`: a distinguishable body.
fn code(len: usize, fill: u8) -> Vec<u8> {
    let mut b = vec![fill; len];
    b[len - 1] = 0xC3;
    b
}

fn wrapper(bytes: &[u8]) -> NewCode<'_> {
    NewCode::new(CodeKind::Wrapper, bytes)
}

/// A code pointer table on the registries' grace domain, leaked (modules want `'static`).
fn pointer_table(
    capacity: usize,
    regs: &codespace::module::Registries,
) -> &'static CodePointerTable {
    Box::leak(Box::new(CodePointerTable::with_capacity(
        capacity,
        regs.grace(),
    )))
}

/// Item 4: a wrapper's pointer freed with the wrapper is reset to the trap at once, and the
/// handle goes to no other code before a grace period: a CPU that read the handle from a
/// function table before the free and calls through it afterwards reaches the trap, not the
/// next wrapper (of another signature). Before the fix the next wrapper got the same handle at
/// once, so the stale call entered it.
#[test]
fn item_04_a_freed_code_pointer_is_not_handed_to_other_code_within_the_grace_period() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(1));
    let table = pointer_table(4, regs);
    module.set_code_pointer_table(Some(table)).unwrap();

    let first = module.add_code(&wrapper(&code(32, 0x90))).unwrap();
    let handle = module
        .code_pointer(first.instruction_start())
        .unwrap()
        .expect("a wrapper gets a handle");
    assert_eq!(table.get(handle), first.instruction_start());
    // CPU 1 reads `handle` from a function table, about to call through it.
    let held = handle;
    module.free_code(first.instruction_start()).unwrap();
    assert_eq!(table.get(held), table.trap_address(), "reset at once");

    // An unrelated wrapper comes in before CPU 1 passed a quiescent state.
    let second = module.add_code(&wrapper(&code(48, 0x66))).unwrap();
    let second_handle = module
        .code_pointer(second.instruction_start())
        .unwrap()
        .unwrap();
    assert_ne!(
        second_handle, held,
        "the freed handle went to other code within its grace period"
    );
    assert_eq!(
        table.get(held),
        table.trap_address(),
        "CPU 1's stale call traps"
    );
    assert_eq!(table.freed(), 1);

    // After a grace period the handle is reused, and the first wrapper's memory is reclaimed.
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    let third = module.add_code(&wrapper(&code(16, 0x90))).unwrap();
    let third_handle = module
        .code_pointer(third.instruction_start())
        .unwrap()
        .unwrap();
    assert_eq!(third_handle, held, "reused once the grace period is over");
    assert_eq!(table.get(third_handle), third.instruction_start());
    assert_sound(&machine, &m);
}

/// Item 13: a raw code pointer entry can aim anywhere and outlive its code, so `allocate` and
/// `update` with an address are `unsafe`. Shown once: an entry made through `unsafe` for a
/// module's wrapper keeps its address after the module retires and frees the wrapper, and a
/// call through it then executes reused memory. The module's own pointer, the validated path,
/// only ever holds the wrapper's start while it is live and the trap address after; and a table
/// whose handles are reused after another domain's grace periods is refused.
#[test]
fn item_13_raw_code_pointer_entries_are_unsafe_and_module_pointers_follow_their_code() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(1));
    let table = pointer_table(8, regs);
    module.set_code_pointer_table(Some(table)).unwrap();

    let body = code(64, 0x90);
    let w = module.add_code(&wrapper(&body)).unwrap();
    let start = w.instruction_start();
    let ours = module.code_pointer(start).unwrap().unwrap();
    // SAFETY: deliberately broken contract (the hazard): nobody keeps `start` alive for this
    // entry. Nothing executes the simulated machine's code but `exec_as` below.
    let raw = unsafe { table.allocate(start) }.unwrap();
    let mut fetched = vec![0; 64];
    machine.exec_as(1, table.get(ours), &mut fetched).unwrap();
    assert_eq!(fetched, body, "the validated pointer leads to the wrapper");

    module.free_code(start).unwrap();
    assert_eq!(table.get(ours), table.trap_address(), "reset on retirement");
    assert_eq!(table.get(raw), start, "the raw entry still leads there");
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    // The range is reused by other code: the raw entry now leads into it.
    let other = code(64, 0x66);
    let reused = module.add_code(&wrapper(&other)).unwrap();
    assert_eq!(
        reused.instruction_start(),
        start,
        "the freed range is reused"
    );
    machine.exec_as(1, table.get(raw), &mut fetched).unwrap();
    assert_eq!(
        fetched, other,
        "a call through the raw entry runs unrelated code"
    );

    // A table on another grace domain is refused: its handles could be reused while a CPU of
    // the registries' domain still holds them.
    let foreign = pointer_table(4, registries());
    assert_eq!(
        module.set_code_pointer_table(Some(foreign)),
        Err(ModuleError::CodePointer(CodePointerError::OtherGraceDomain))
    );
    // SAFETY: the test owns `raw` and nothing calls through it.
    unsafe { table.free(raw) }.unwrap();
    assert_sound(&machine, &m);
}

/// Item 14: a trap registration decides where a faulting CPU resumes, so registering is
/// `unsafe`. Shown once: through `unsafe`, a registration over kernel text makes a fault there
/// resolve to a "landing pad" in kernel text. The validated path, a module's `add_code`, only
/// registers protected offsets and landing pads inside the code being added and refuses the
/// rest with a typed error, changing nothing.
#[test]
fn item_14_trap_registrations_are_unsafe_and_modules_register_only_their_own_code() {
    let (machine, m) = default_rig();
    let regs = registries();
    let text = AddressRange::new(KERNEL_TEXT, KERNEL_TEXT + 0x100);
    // SAFETY: deliberately broken contract (the hazard); no fault handler consults these
    // registries, and the registration is released below.
    let h = unsafe { regs.traps.register(text, &[0x10], KERNEL_TEXT + 0x80) }.unwrap();
    let hit = regs.traps.lookup_fault(KERNEL_TEXT + 0x10, 0).unwrap();
    assert_eq!(
        hit.landing_pad(),
        KERNEL_TEXT + 0x80,
        "a fault in kernel text would resume inside kernel text"
    );
    regs.traps.release(h).unwrap();

    let module = module(&m, regs, functions(1));
    let body = code(64, 0x90);
    let outside = NewCode {
        protected: &[8],
        landing_pad: Some(64),
        ..NewCode::function(0, &body)
    };
    let err = module.add_code(&outside).unwrap_err();
    assert_eq!(err, ModuleError::BadLandingPad);
    let past_end = NewCode {
        protected: &[64],
        landing_pad: Some(32),
        ..NewCode::function(0, &body)
    };
    let err = module.add_code(&past_end).unwrap_err();
    assert_eq!(
        err,
        ModuleError::Metadata(CodeObjectError::ProtectedOffsetOutOfRange { offset: 64 })
    );
    assert!(regs.traps.is_empty(), "a refused add registers nothing");
    assert_eq!(module.function_code(0).unwrap(), None);

    let inside = NewCode {
        protected: &[8],
        landing_pad: Some(32),
        ..NewCode::function(0, &body)
    };
    let f = module.add_code(&inside).unwrap();
    let hit = regs
        .traps
        .lookup_fault(f.instruction_start() + 8, 0)
        .unwrap();
    assert!(
        f.contains(hit.landing_pad()),
        "the landing pad is the module's code"
    );
    assert_eq!(regs.traps.len(), 1);
    assert_sound(&machine, &m);
}

/// Item 15: an unbalanced `dec_ref` lets a module retire and free code another holder still
/// runs, so `dec_ref` is `unsafe`. Shown once: a holder took a reference (code on its stack);
/// another party's extra `dec_ref` (through `unsafe`) kills the object, and the code is freed
/// under the holder. The validated path, a `CodeRef` from `CodeObject::hold`, gives its
/// reference back exactly once (on drop or `release`), and keeps the code until then.
#[test]
fn item_15_dec_ref_is_unsafe_and_a_code_ref_keeps_code_until_it_drops() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(1));
    let body = code(64, 0x90);

    // The hazard.
    let w = module.add_code(&wrapper(&body)).unwrap();
    let start = w.instruction_start();
    assert!(w.inc_ref(), "a holder runs the code (its reference)");
    module.free_code(start).unwrap();
    assert_eq!(module.free_dead_code().unwrap(), 0, "held");
    // SAFETY: deliberately unbalanced (the hazard): this call gives up a reference it never
    // took. Nothing executes the simulated machine's code.
    assert_eq!(unsafe { w.dec_ref() }, DecRef::Dead);
    assert_eq!(module.free_dead_code().unwrap(), 1);
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(
        regs.lookup_code(start).is_none(),
        "freed while its holder still holds a reference"
    );

    // The validated path.
    let w = module.add_code(&wrapper(&body)).unwrap();
    let start = w.instruction_start();
    let held = CodeObject::hold(&w).expect("live");
    assert_eq!(w.ref_count(), 2);
    module.free_code(start).unwrap();
    assert_eq!(module.free_dead_code().unwrap(), 0);
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 0);
    assert!(Arc::ptr_eq(&regs.lookup_code(start).unwrap(), &w));
    assert_eq!(read(&m, start, body.len()), body, "still there while held");
    assert_eq!(held.release(), DecRef::Dead, "the last reference");
    assert_eq!(module.free_dead_code().unwrap(), 1);
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(regs.lookup_code(start).is_none());
    // A dying object gives no new reference, and a dropped guard releases exactly once.
    assert!(CodeObject::hold(&w).is_none());
    let f = module.add_code(&NewCode::function(0, &body)).unwrap();
    drop(CodeObject::hold(&f).expect("live"));
    assert_eq!(f.ref_count(), 1, "the module's reference is untouched");
    assert_sound(&machine, &m);
}
