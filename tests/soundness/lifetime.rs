//! Issue 18 items of this area (module lifetimes: drop, external entries, replaced code, code
//! pointer tables, failed constructors); see `main.rs`.

use codespace::code_object::{CodeKind, CodeObject};
use codespace::code_pointer_table::CodePointerTable;
use codespace::mmu::soft::SoftMmu;
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode, Registries};
use codespace::{AllocatorConfig, CodeAllocator, CodeError, CodeManager, ManagerConfig};
use std::sync::Arc;

use crate::common::*;

/// What a code-pointer table's free entries hold in these tests (think: a trap stub).
const TRAP: usize = 0xFFFF_FFFF_8000_0CC0;
/// A runtime stub in kernel text, outside the code window.
const STUB: usize = 0xFFFF_FFFF_8010_0000;

fn default_rig() -> (SoftMmu, CodeManager<SoftMmu>) {
    rig(1 << 14, ManagerConfig::default())
}

/// A table whose freed handles wait for grace periods of `regs`' domain (as modules require).
fn pointer_table(regs: &'static Registries) -> &'static CodePointerTable {
    // SAFETY: `TRAP` stands for a trap stub; the software machine never executes it here.
    Box::leak(Box::new(unsafe {
        CodePointerTable::with_capacity_and_trap(16, regs.grace(), TRAP)
    }))
}

fn wrapper(module: &CodeModule<SoftMmu>, len: usize) -> Arc<CodeObject> {
    module
        .add_code(&NewCode::new(CodeKind::Wrapper, &body(len, 0x90)))
        .expect("wrapper")
}

fn function(module: &CodeModule<SoftMmu>, index: u32, nop: u8) -> usize {
    module
        .add_code(&NewCode::function(index, &body(32, nop)))
        .expect("function")
        .instruction_start()
}

/// Item 1: a CPU that already passed its quiescent state after the drop must not find a way into
/// the dropped module's code: the shared code-pointer table stops leading there at the drop,
/// not at the end of the grace period (when the spaces are released).
#[test]
fn item_01_dropping_a_module_resets_its_code_pointers_before_the_grace_period() {
    let (machine, m) = default_rig();
    let regs = registries();
    let table = pointer_table(regs);
    let module = module(&m, regs, functions(2));
    module.set_code_pointer_table(Some(table)).unwrap();
    let f = function(&module, 1, 0x90);
    let w = wrapper(&module, 64).instruction_start();
    let fh = module
        .function_pointer(1)
        .unwrap()
        .expect("function pointer");
    let wh = module.code_pointer(w).unwrap().expect("wrapper pointer");
    assert_eq!((table.get(fh), table.get(wh)), (f, w));
    // Another module on the same table keeps its pointer.
    let other = module_with_table(&m, regs, table);
    let o = wrapper(&other, 64).instruction_start();
    let oh = other.code_pointer(o).unwrap().expect("other pointer");

    drop(module);
    // A CPU may still be running the module's code: it stays mapped and registered...
    for pc in [f, w] {
        assert!(is_mapped(&m, pc), "{pc:#x}");
        assert!(regs.lookup_code(pc).is_some(), "{pc:#x}");
    }
    // ...but a call through the shared table from now on goes to the trap, not into code that
    // is decommitted once the grace period ends (the old code answered `f` and `w` here).
    assert_eq!(
        table.get(fh),
        TRAP,
        "function pointer still leads into the module"
    );
    assert_eq!(
        table.get(wh),
        TRAP,
        "wrapper pointer still leads into the module"
    );
    assert_eq!(table.get(oh), o);

    assert_eq!(settle(regs), 1);
    assert!(!is_mapped(&m, f) && !is_mapped(&m, w));
    assert!(regs.lookup_code(f).is_none());
    assert_eq!(table.get(oh), o);
    drop(other);
    assert_eq!(settle(regs), 1);
    assert_eq!((m.committed(), m.stats().code_spaces), (0, 0));
    assert_sound_no_leak(&machine, &m);
}

fn module_with_table(
    m: &CodeManager<SoftMmu>,
    regs: &'static Registries,
    table: &'static CodePointerTable,
) -> CodeModule<SoftMmu> {
    let module = module(m, regs, functions(1));
    module.set_code_pointer_table(Some(table)).unwrap();
    module
}

/// Item 11: an external entry is a promise the module cannot check (that the code there stays
/// callable while slots target it), so `register_external` is `unsafe`. The hazard, shown once
/// through that `unsafe`: another module's code registered and targeted, that module dropped;
/// after its grace period the slot jumps into whatever reuses the range. The validated part
/// refuses what cannot be code.
#[test]
fn item_11_external_entries_are_unsafe_and_what_can_be_checked_is() {
    let (machine, m) = default_rig();
    let regs = registries();
    let a = module(&m, regs, functions(2));
    let b = module(&m, regs, ModuleConfig::default());
    let x = wrapper(&b, 64).instruction_start();
    // SAFETY: none — this registration breaks the contract on purpose (`b` is dropped below
    // while slot 0 targets its code), to show the hazard on the software machine.
    unsafe { a.register_external(x) }.expect("another module's code is a valid entry");
    a.patch_slot(0, x).unwrap();
    let t = first_table(&a);
    drop(b);
    assert_eq!(settle(regs), 1);
    let c = module(&m, regs, ModuleConfig::default());
    let reuse = wrapper(&c, 64);
    assert_eq!(
        reuse.instruction_start(),
        x,
        "the range went to unrelated code"
    );
    for cpu in 0..4 {
        assert_eq!(executed_destination(&machine, cpu, &t, 0), Some(x));
    }
    assert!(
        finds(regs, x, &reuse),
        "slot 0 now enters another module's code"
    );

    // The validated part: an address in the code window outside every code space is nothing
    // (unmapped, or a future code space's), never code that stays callable.
    let spaces = m.code_spaces().unwrap();
    let nowhere = spaces.last().unwrap().end() + 64 * PAGE;
    assert!(m.space_of(nowhere).unwrap().is_none());
    // SAFETY: refused before anything is recorded.
    let r = unsafe { a.register_external(nowhere) };
    assert_eq!(r, Err(ModuleError::BadExternal { entry: nowhere }));
    assert_eq!(
        a.patch_slot(1, nowhere),
        Err(ModuleError::UnknownTarget { target: nowhere })
    );
    // SAFETY: STUB stands for kernel text that lives as long as the kernel.
    unsafe { a.register_external(STUB) }.unwrap();
    a.patch_slot(1, STUB).unwrap();
    assert_eq!(executed_destination(&machine, 0, &t, 1), Some(STUB));
    assert_sound(&machine, &m);
}

/// Item 17: once nothing targets replaced code it is retired, whichever call moved the last
/// slot away from it (the adversarial run's sequence, then the same with `patch_slot`).
#[test]
fn item_17_replaced_code_is_retired_when_its_last_slot_moves_away() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(2));
    let v1 = function(&module, 0, 0x90);
    module.patch_slot(1, v1).unwrap();
    let v2 = function(&module, 0, 0x66);
    assert_eq!(
        module.code_count().unwrap(),
        (3, 0),
        "table, v1 (slot 1 targets it), v2"
    );
    let g = function(&module, 1, 0x90);
    // Slot 1 left v1: nothing reaches it, so it waits for its grace period (old code: (4, 0),
    // and v1 stayed live until a `free_dead_code`).
    assert_eq!(
        module.code_count().unwrap(),
        (3, 1),
        "table, v2, g; v1 retired"
    );
    assert_eq!(
        module.free_code(v1),
        Err(ModuleError::UnknownCode { start: v1 })
    );
    assert_eq!(module.free_dead_code().unwrap(), 0);
    assert!(
        regs.lookup_code(v1).is_some(),
        "registered until the grace period"
    );
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(regs.lookup_code(v1).is_none());
    assert_eq!(read(&m, v1, 32), vec![INT3; 32]);

    // The same with the last slot moved by `patch_slot`.
    module.patch_slot(1, v2).unwrap();
    let v3 = function(&module, 0, 0x90);
    assert_eq!(module.code_count().unwrap(), (4, 0), "table, v2, g, v3");
    module.patch_slot(1, g).unwrap();
    assert_eq!(module.code_count().unwrap(), (3, 1), "v2 retired");
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(regs.lookup_code(v2).is_none());
    assert_eq!(module.slot_target(0).unwrap(), Some(v3));
    assert_eq!(module.slot_target(1).unwrap(), Some(g));
    assert_sound(&machine, &m);
}

/// Item 18: an external entry inside the module's own code spaces would outlive the code there
/// (freed and reused while the slot still jumps to it): refused, with a typed error.
#[test]
fn item_18_an_external_entry_inside_the_modules_code_is_refused() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(2));
    let ws = wrapper(&module, 64).instruction_start();
    let table = first_table(&module).base();
    let space = module.code_spaces().unwrap()[0];
    for entry in [ws + 16, ws, table, space.start(), space.end() - 1] {
        // SAFETY: refused before anything is recorded (the old code accepted all of them).
        let r = unsafe { module.register_external(entry) };
        assert_eq!(r, Err(ModuleError::BadExternal { entry }), "{entry:#x}");
    }
    assert_eq!(
        module.patch_slot(0, ws + 16),
        Err(ModuleError::UnknownTarget { target: ws + 16 })
    );
    module.free_code(ws).unwrap();
    settle(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert_eq!(module.slot_target(0).unwrap(), None);
    assert_sound(&machine, &m);
}

/// Item 18: an entry registered while it lay outside the module stops being a target once the
/// module's own code space grows over it (the range was given back and reserved again): only the
/// module's live code starts are targets inside its spaces.
#[test]
fn item_18_an_external_entry_inside_a_later_code_space_is_no_target() {
    let (machine, m) = default_rig();
    let regs = registries();
    let a = module(&m, regs, functions(2));
    let b = module(&m, regs, ModuleConfig::default());
    wrapper(&b, 64);
    let x = wrapper(&b, 64).instruction_start();
    // SAFETY: no slot is patched to `x` while `b` lives; after `b` is gone the module must
    // refuse it (what this test checks).
    unsafe { a.register_external(x) }.unwrap();
    drop(b);
    assert_eq!(settle(regs), 1);
    // `a` grows into the range `b` gave back: its new code covers `x`.
    let big = a
        .add_code(&NewCode::new(CodeKind::Wrapper, &body(4 * PAGE, 0x90)))
        .unwrap();
    assert!(big.contains(x), "the new space lies where `b`'s was");
    assert_eq!(
        a.patch_slot(0, x),
        Err(ModuleError::UnknownTarget { target: x }),
        "a slot would jump into the middle of the module's own code"
    );
    assert_eq!(a.slot_target(0).unwrap(), None);
    assert_sound(&machine, &m);
}

/// Item 19: switching a module's code-pointer table once it holds pointers would make it free
/// them in the wrong table (another module's live pointer) and leave the old ones aimed at
/// retired code: refused.
#[test]
fn item_19_the_code_pointer_table_cannot_change_under_existing_pointers() {
    let (machine, m) = default_rig();
    let regs = registries();
    let (t1, t2) = (pointer_table(regs), pointer_table(regs));
    let a = module_with_table(&m, regs, t1);
    let b = module_with_table(&m, regs, t2);
    let wa = wrapper(&a, 64).instruction_start();
    let wb = wrapper(&b, 64).instruction_start();
    let (ha, hb) = (
        a.code_pointer(wa).unwrap().unwrap(),
        b.code_pointer(wb).unwrap().unwrap(),
    );
    assert_eq!(ha.index(), hb.index(), "same index in two tables");
    assert_eq!(
        a.set_code_pointer_table(Some(t2)),
        Err(ModuleError::CodePointersExist)
    );
    assert_eq!(
        a.set_code_pointer_table(None),
        Err(ModuleError::CodePointersExist)
    );
    a.set_code_pointer_table(Some(t1))
        .expect("the same table is no switch");
    a.free_code(wa).unwrap();
    assert_eq!(t1.get(ha), TRAP, "a's pointer reset in a's table");
    assert_eq!(t2.get(hb), wb, "b's pointer untouched");
    let wb2 = wrapper(&b, 64).instruction_start();
    assert_ne!(b.code_pointer(wb2).unwrap().unwrap(), hb);
    // A module whose code has no pointers yet may still choose its table.
    let c = module(&m, regs, functions(1));
    function(&c, 0, 0x90);
    c.set_code_pointer_table(Some(t1)).unwrap();
    assert_sound(&machine, &m);
}

/// What a failed `CodeModule::new` must leave exactly as it was: the manager's counters, code
/// spaces and audit, the grace domain's deferred values, PC lookup, and every page-table leaf
/// and frame of the machine.
struct Before {
    books: (
        codespace::manager::ManagerStats,
        Vec<codespace::AddressRange>,
        codespace::AuditReport,
        usize,
        usize,
    ),
    snapshot: codespace::mmu::soft::Snapshot,
}

impl Before {
    fn take(machine: &SoftMmu, m: &CodeManager<SoftMmu>, regs: &Registries) -> Self {
        Before {
            books: (
                m.stats(),
                m.code_spaces().unwrap(),
                m.audit().unwrap(),
                regs.grace().deferred(),
                regs.code.len(),
            ),
            snapshot: machine.snapshot(),
        }
    }

    fn assert_unchanged(&self, machine: &SoftMmu, m: &CodeManager<SoftMmu>, regs: &Registries) {
        let now = Before::take(machine, m, regs);
        assert_eq!(
            now.books, self.books,
            "counters, spaces, audit, deferred, PC lookup"
        );
        assert!(
            now.snapshot == self.snapshot,
            "page tables or frames changed"
        );
    }
}

/// Item 20: a constructor whose jump tables do not fit the initial reservation changes nothing
/// (the old code kept the reserved space, handed to the grace domain, until a grace period and
/// a `GraceDomain::reclaim`).
#[test]
fn item_20_a_module_whose_tables_do_not_fit_its_reservation_changes_nothing() {
    let (machine, m) = default_rig();
    let regs = registries();
    let keep = module(&m, regs, functions(2));
    function(&keep, 0, 0x90);
    let was = Before::take(&machine, &m, regs);
    let config = ModuleConfig {
        functions: 2000,
        initial_reservation: PAGE,
        ..ModuleConfig::default()
    };
    let r = CodeModule::new(&m, regs, config).map(drop);
    was.assert_unchanged(&machine, &m, regs);
    // Refused before anything is reserved.
    assert_eq!(r, Err(ModuleError::TooManyFunctions { functions: 2000 }));
    assert_sound(&machine, &m);
}

/// Item 20: a constructor whose jump tables hit the commit limit changes nothing: its initial
/// reservation is given back at once, and nothing waits in the grace domain.
#[test]
fn item_20_a_module_whose_tables_hit_the_commit_limit_changes_nothing() {
    let (machine, m) = rig(
        1 << 14,
        ManagerConfig {
            max_committed: 4 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let regs = registries();
    // Every committable page is taken by another allocator.
    let mut other = CodeAllocator::new(&m, AllocatorConfig::default()).unwrap();
    let code = other.allocate(4 * PAGE).unwrap();
    let was = Before::take(&machine, &m, regs);
    let config = ModuleConfig {
        functions: 8,
        initial_reservation: 16 * PAGE,
        ..ModuleConfig::default()
    };
    let r = CodeModule::new(&m, regs, config).map(drop);
    was.assert_unchanged(&machine, &m, regs);
    assert!(
        matches!(r, Err(ModuleError::Code(CodeError::CommitLimit { .. }))),
        "{r:?}"
    );
    other.discard(code).map_err(|e| e.error()).unwrap();
    drop(other);
    // Works afterwards; a module that existed goes through the grace domain.
    let module = module(&m, regs, functions(8));
    function(&module, 0, 0x90);
    assert_eq!(settle(regs), 0);
    drop(module);
    assert_eq!(settle(regs), 1);
    assert_sound_no_leak(&machine, &m);
}
