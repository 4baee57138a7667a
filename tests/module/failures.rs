//! Backend failures in module operations: what they leave behind is safe and later operations
//! finish it (frees that could not start, CPUs that did not serialize after a slot change).

use codespace::code_object::CodeKind;
use codespace::mmu::soft::CallKind;
use codespace::module::{ModuleError, NewCode};
use codespace::CodeError;

use super::rig_in;
use crate::common::*;

/// A retired object whose free cannot start (its INT3 fill fails) is not lost: the next reclaim
/// frees it, and nothing stays committed.
#[test]
fn a_free_that_cannot_start_is_retried_by_the_next_reclaim() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        a_free_that_cannot_start_is_retried_by_the_next_reclaim_in(mode);
    }
}

fn a_free_that_cannot_start_is_retried_by_the_next_reclaim_in(mode: Mode) {
    let (machine, m) = rig_in(mode);
    let regs = registries();
    let module = module(&m, regs, mode.module(functions(2)));
    module
        .add_code(&NewCode::function(0, &body(64, 0x90)))
        .unwrap();
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &body(64, 0x91)))
        .unwrap();
    let stats = module.stats().unwrap();
    module.free_code(w.instruction_start()).unwrap();
    pass_grace(regs);
    machine.fail_nth(CallKind::Poke, 0);
    assert_eq!(
        module.reclaim().unwrap(),
        1,
        "unregistered and retired for good"
    );
    assert!(regs.lookup_code(w.instruction_start()).is_none());
    assert_eq!(
        module.stats().unwrap().allocated,
        stats.allocated,
        "not freed yet"
    );
    module.reclaim().unwrap();
    assert_eq!(module.stats().unwrap().allocated, stats.allocated - 64);
    assert_eq!(read(&m, w.instruction_start(), 64), [INT3; 64]);
    assert_sound(&machine, &m);
}

/// A slot change whose serialization round fails leaves some CPU running the old slot bytes:
/// the replaced code must not be freed until every CPU serialized, or that CPU jumps into
/// freed memory. The next reclaim serializes first.
#[test]
fn replaced_code_outlives_a_failed_serialization() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        replaced_code_outlives_a_failed_serialization_in(mode);
    }
}

fn replaced_code_outlives_a_failed_serialization_in(mode: Mode) {
    let (machine, m) = rig_in(mode);
    let regs = registries();
    let module = module(&m, regs, mode.module(functions(2)));
    let t = first_table(&module);
    // Whole pages each: publishing writes no live page, so the slot patch is the only sync
    // (in the ROX mode every page is live: the publish's own sync comes first).
    let v1 = module
        .add_code(&NewCode::function(0, &body(PAGE, 0x90)))
        .unwrap();
    machine.fail_nth(CallKind::Sync, u64::from(mode.rox));
    let r = module.add_code(&NewCode::function(0, &body(PAGE, 0x91)));
    assert!(
        matches!(r, Err(ModuleError::Code(CodeError::SyncFailed(_)))),
        "{r:?}"
    );
    let v2 = module.function_code(0).unwrap().unwrap();
    assert_eq!(
        executed_slot_target(&machine, 1, &t, 0),
        Some(v1.instruction_start()),
        "CPU 1 did not serialize"
    );
    pass_grace(regs);
    assert_eq!(
        module.reclaim().unwrap(),
        1,
        "freed once every CPU serialized"
    );
    for cpu in 0..4 {
        assert_eq!(
            executed_slot_target(&machine, cpu, &t, 0),
            Some(v2),
            "CPU {cpu}"
        );
    }
    assert!(regs.lookup_code(v1.instruction_start()).is_none());
    assert_sound_no_leak(&machine, &m);
}

/// A batch whose slot serialization fails installs its functions (the slots point at them),
/// and does not keep anonymous code nobody can name: the error returns no handle for it.
#[test]
fn a_batch_with_a_failed_serialization_keeps_no_unnamed_code() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        a_batch_with_a_failed_serialization_keeps_no_unnamed_code_in(mode);
    }
}

fn a_batch_with_a_failed_serialization_keeps_no_unnamed_code_in(mode: Mode) {
    let (machine, m) = rig_in(mode);
    let regs = registries();
    let module = module(&m, regs, mode.module(functions(2)));
    let before = module.stats().unwrap();
    let (f_bytes, w_bytes) = (body(PAGE, 0x90), body(PAGE, 0x91));
    let batch = [
        NewCode::function(1, &f_bytes),
        NewCode::new(CodeKind::Wrapper, &w_bytes),
    ];
    // The slot serialization: in the ROX mode after the publish's own.
    machine.fail_nth(CallKind::Sync, u64::from(mode.rox));
    let r = module.add_code_batch(&batch).map(|v| v.len());
    assert!(
        matches!(r, Err(ModuleError::Code(CodeError::SyncFailed(_)))),
        "{r:?}"
    );
    let f = module.function_code(1).unwrap().expect("installed");
    assert!(regs.lookup_code(f).is_some());
    assert_eq!(
        module.code_count().unwrap(),
        (2, 0),
        "the table and function 1"
    );
    assert_eq!(module.stats().unwrap().allocated, before.allocated + PAGE);
    assert_sound_no_leak(&machine, &m);
}

/// An add that reserved a new code space and published its jump tables, then failed, gives
/// both back: all or nothing, as promised (and no empty space with tables is left in the way).
#[test]
fn a_failed_add_gives_back_the_space_and_tables_it_created() {
    let (machine, m) = rig(1 << 14, codespace::ManagerConfig::default());
    let regs = registries();
    let module = module(
        &m,
        regs,
        codespace::module::ModuleConfig {
            functions: 4,
            initial_reservation: 2 * PAGE,
            ..Default::default()
        },
    );
    fill_free_space(&module);
    let _fillers = far_fillers(&m);
    let spaces = m.stats().code_spaces;
    let committed = m.committed();
    let code_map = regs.code.len();
    // Protect 0 makes the new tables executable; protect 1, the code's page, fails.
    machine.fail_nth(CallKind::Protect, 1);
    let r = module.add_code(&NewCode::function(1, &body(100, 0x90)));
    assert!(
        matches!(r, Err(ModuleError::Code(CodeError::Mmu(_)))),
        "{r:?}"
    );
    assert_eq!(module.jump_tables().unwrap().len(), 1);
    assert_eq!(module.code_spaces().unwrap().len(), 1);
    assert_eq!(m.stats().code_spaces, spaces);
    assert_eq!(m.committed(), committed);
    assert_eq!(regs.code.len(), code_map);
    // The same add works afterwards, with tables of its own again.
    module
        .add_code(&NewCode::function(1, &body(100, 0x90)))
        .unwrap();
    assert_eq!(module.jump_tables().unwrap().len(), 2);
    assert_sound_no_leak(&machine, &m);
}

/// `SyncFailed` from an add means its functions were installed. When the serialization that
/// fails is the publish's own (its bytes share a live page), the add is rolled back and says
/// so with an error that means nothing changed.
#[test]
fn an_add_rolled_back_after_a_failed_publish_sync_reports_nothing_changed() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        an_add_rolled_back_after_a_failed_publish_sync_reports_nothing_changed_in(mode);
    }
}

fn an_add_rolled_back_after_a_failed_publish_sync_reports_nothing_changed_in(mode: Mode) {
    let (machine, m) = rig_in(mode);
    let regs = registries();
    let module = module(&m, regs, mode.module(functions(4)));
    let old = module
        .add_code(&NewCode::function(2, &body(64, 0x90)))
        .unwrap();
    let stats = module.stats().unwrap();
    // The new version lands on the live page after the old one: publishing it writes a live
    // page, which makes other CPUs serialize (the first sync), before the slot patch (the
    // second).
    machine.fail_nth(CallKind::Sync, 0);
    let r = module.add_code(&NewCode::function(2, &body(64, 0x91)));
    assert!(
        matches!(
            r,
            Err(ModuleError::Code(CodeError::Mmu(
                codespace::mmu::MmuError::Injected
            )))
        ),
        "{r:?}"
    );
    assert_eq!(
        module.function_code(2).unwrap(),
        Some(old.instruction_start())
    );
    assert_eq!(module.stats().unwrap().allocated, stats.allocated);
    assert_eq!(module.code_count().unwrap(), (2, 0));
    assert_sound_no_leak(&machine, &m);
}

/// A failed first add of a function whose slot was already patched elsewhere leaves no code
/// pointer behind (one aimed at the trap address while the slot jumps to the stub would send
/// indirect calls elsewhere than direct ones).
#[test]
fn a_failed_first_add_leaves_no_code_pointer_even_for_a_patched_slot() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        a_failed_first_add_leaves_no_code_pointer_even_for_a_patched_slot_in(mode);
    }
}

fn a_failed_first_add_leaves_no_code_pointer_even_for_a_patched_slot_in(mode: Mode) {
    let (machine, m) = rig_in(mode);
    let regs = registries();
    let table: &'static codespace::code_pointer_table::CodePointerTable = Box::leak(Box::new(
        codespace::code_pointer_table::CodePointerTable::with_capacity(8, regs.grace()),
    ));
    let module = module(&m, regs, mode.module(functions(2)));
    module.set_code_pointer_table(Some(table)).unwrap();
    let stub = 0xFFFF_FFFF_8000_1000;
    // SAFETY: nothing executes on the software machine; `stub` stands for kernel text.
    unsafe { module.register_external(stub) }.unwrap();
    module.patch_slot(1, stub).unwrap();
    assert_eq!(module.function_pointer(1).unwrap(), None, "no code yet");
    // The slot patch of the add (its only alias session: the code is on a fresh page) fails.
    machine.fail_nth(CallKind::Poke, 0);
    let r = module.add_code(&NewCode::function(1, &body(PAGE, 0x90)));
    assert!(
        matches!(r, Err(ModuleError::Code(CodeError::Mmu(_)))),
        "{r:?}"
    );
    assert_eq!(module.function_pointer(1).unwrap(), None);
    assert_eq!(table.len(), 0);
    assert_eq!(module.slot_target(1).unwrap(), Some(stub));
    let f = module
        .add_code(&NewCode::function(1, &body(PAGE, 0x90)))
        .unwrap();
    let p = module
        .function_pointer(1)
        .unwrap()
        .expect("now it has code");
    assert_eq!(table.get(p), f.instruction_start());
    assert_sound_no_leak(&machine, &m);
}
