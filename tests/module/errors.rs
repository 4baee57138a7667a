//! Refused input and failed adds change nothing: bad indices, landing pads, metadata and
//! relocations, a full fixed module, overlapping code, and flip mode around jump tables.

use codespace::code_object::{CodeKind, CodeObjectError, RelocKind, Relocation};
use codespace::code_pointer_table::CodePointerTable;
use codespace::mmu::soft::SoftMmu;
use codespace::module::{ModuleConfig, ModuleError, NewCode};
use codespace::{AddressRange, CodeError, CodeManager, ManagerConfig, ProtectionMode};

use super::{default_rig, rig_with, state};
use crate::common::*;

#[test]
fn invalid_code_is_refused_and_changes_nothing() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(4));
    module
        .add_code(&NewCode::function(1, &body(100, 0x90)))
        .unwrap();
    let before = state(&machine, &m, regs, &module);
    let bytes = body(64, 0x90);

    // Index out of range, or given twice in one batch.
    for index in [4, u32::MAX] {
        assert_eq!(
            module
                .add_code(&NewCode::function(index, &bytes))
                .map(|o| o.instruction_start()),
            Err(ModuleError::BadIndex { index })
        );
        assert_eq!(
            module.patch_slot(index, 0x1000),
            Err(ModuleError::BadIndex { index })
        );
        assert_eq!(state(&machine, &m, regs, &module), before);
    }
    let twice = [NewCode::function(2, &bytes), NewCode::function(2, &bytes)];
    assert_eq!(
        module.add_code_batch(&twice).map(|v| v.len()),
        Err(ModuleError::BadIndex { index: 2 })
    );
    // A slot may target only code of the module or a registered external entry.
    assert_eq!(
        module.patch_slot(0, 0x1000),
        Err(ModuleError::UnknownTarget { target: 0x1000 })
    );
    assert_eq!(state(&machine, &m, regs, &module), before);

    // Protected instructions without a landing pad inside the code.
    for pad in [None, Some(64), Some(1000)] {
        let mut code = NewCode::function(2, &bytes);
        code.protected = &[3];
        code.landing_pad = pad;
        assert_eq!(
            module.add_code(&code).map(|o| o.instruction_start()),
            Err(ModuleError::BadLandingPad),
            "{pad:?}"
        );
        assert_eq!(state(&machine, &m, regs, &module), before);
    }

    // Invalid metadata: checked after allocating, which must be undone.
    let relocs = [Relocation {
        offset: 62,
        kind: RelocKind::CallSlot { slot: 0 },
    }];
    let internal = [Relocation {
        offset: 0,
        kind: RelocKind::InternalReference { target_offset: 64 },
    }];
    type Case<'a> = (
        &'a [u32],
        &'a [Relocation],
        &'a [(u32, u32)],
        CodeObjectError,
    );
    let cases: [Case<'_>; 6] = [
        (
            &[3, 3],
            &[],
            &[],
            CodeObjectError::DuplicateProtectedOffset { offset: 3 },
        ),
        (
            &[3, 64],
            &[],
            &[],
            CodeObjectError::ProtectedOffsetOutOfRange { offset: 64 },
        ),
        (
            &[],
            &relocs,
            &[],
            CodeObjectError::RelocationOutOfRange { offset: 62 },
        ),
        (
            &[],
            &internal,
            &[],
            CodeObjectError::RelocationTargetOutOfRange {
                offset: 0,
                target_offset: 64,
            },
        ),
        (
            &[],
            &[],
            &[(5, 1), (4, 2)],
            CodeObjectError::UnsortedSourcePositions { index: 1 },
        ),
        (
            &[],
            &[],
            &[(64, 1)],
            CodeObjectError::SourcePositionOutOfRange { pc_offset: 64 },
        ),
    ];
    for (protected, relocations, positions, error) in cases {
        let mut code = NewCode::function(2, &bytes);
        code.protected = protected;
        code.landing_pad = Some(10);
        code.relocations = relocations;
        code.source_positions = positions;
        assert_eq!(
            module.add_code(&code).map(|o| o.instruction_start()),
            Err(ModuleError::Metadata(error))
        );
        assert_eq!(state(&machine, &m, regs, &module), before, "{error:?}");
    }
    // Code large enough to need pages of its own: committed, then decommitted again.
    let long = body(3 * PAGE, 0x90);
    let mut code = NewCode::function(2, &long);
    code.source_positions = &[(9, 0), (8, 0)];
    assert_eq!(
        module.add_code(&code).map(|o| o.instruction_start()),
        Err(ModuleError::Metadata(
            CodeObjectError::UnsortedSourcePositions { index: 1 }
        ))
    );
    assert_eq!(state(&machine, &m, regs, &module), before);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn bad_relocations_are_refused_and_change_nothing() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(4));
    module
        .add_code(&NewCode::function(0, &body(32, 0x90)))
        .unwrap();
    let before = state(&machine, &m, regs, &module);

    let call = |offset, slot| Relocation {
        offset,
        kind: RelocKind::CallSlot { slot },
    };
    let cases: [(&[u8], Relocation); 4] = [
        // Not a call or jmp opcode before the field.
        (&[0x90, 0, 0, 0, 0, 0xC3], call(1, 1)),
        // No opcode byte at all.
        (&[0, 0, 0, 0, 0xC3], call(0, 1)),
        // A slot the table does not have.
        (&CALL, call(1, 4)),
        // A rel8 jmp (eb) is not a rel32 branch.
        (&[0xEB, 0, 0, 0, 0, 0xC3], call(1, 0)),
    ];
    for (bytes, reloc) in cases {
        let relocs = [reloc];
        for index in [Some(2), None] {
            let mut code = NewCode::new(CodeKind::Function, bytes);
            code.index = index;
            code.relocations = &relocs;
            assert_eq!(
                module.add_code(&code).map(|o| o.instruction_start()),
                Err(ModuleError::BadRelocation {
                    offset: reloc.offset
                }),
                "{reloc:?}"
            );
            assert_eq!(state(&machine, &m, regs, &module), before, "{reloc:?}");
        }
    }
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_full_fixed_module_refuses_code_and_changes_nothing() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 4,
            growable: false,
            initial_reservation: 2 * PAGE,
            ..ModuleConfig::default()
        },
    );
    fill_free_space(&module);
    let before = state(&machine, &m, regs, &module);
    assert_eq!(
        module
            .add_code(&NewCode::function(0, &CALL))
            .map(|o| o.instruction_start()),
        Err(ModuleError::Code(CodeError::NotGrowable))
    );
    assert_eq!(state(&machine, &m, regs, &module), before);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_failed_add_leaves_no_code_pointer_behind() {
    let regs = registries();
    let table: &'static CodePointerTable =
        Box::leak(Box::new(CodePointerTable::with_capacity(4, regs.grace())));
    // Two managers over windows one page apart share the registries: b's first function lands
    // on a's code, which PC lookup refuses.
    let (machine, m1) = default_rig();
    let shifted = AddressRange::new(BASE - PAGE, BASE - PAGE + GIB);
    let machine2 = SoftMmu::new(1 << 12);
    let m2 = CodeManager::new(machine2.clone(), shifted, ManagerConfig::default()).unwrap();
    let a = module(&m1, regs, functions(0));
    let wrapper = a
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3; 64]))
        .unwrap();
    let b = module(&m2, regs, functions(1));
    b.set_code_pointer_table(Some(table)).unwrap();
    let before = state(&machine2, &m2, regs, &b);
    let r = b.add_code(&NewCode::function(0, &[0xC3; 64]));
    assert!(
        matches!(r, Err(ModuleError::CodeMap(_))),
        "{:?}",
        r.map(|o| o.instruction_start())
    );
    assert_eq!(b.function_pointer(0).unwrap(), None);
    assert_eq!(table.len(), 0);
    assert_eq!(b.function_code(0).unwrap(), None);
    assert_eq!(state(&machine2, &m2, regs, &b), before);
    assert!(
        finds(regs, wrapper.instruction_start(), &wrapper),
        "a's code untouched"
    );
    assert_sound(&machine, &m1);
    assert_sound_no_leak(&machine2, &m2);
}

#[test]
fn flip_mode_never_touches_jump_table_pages() {
    let (machine, m) = rig_with(config(ProtectionMode::Flip));
    let regs = registries();
    let module = module(&m, regs, functions(4));
    let table = first_table(&module).range().page_expand();
    let entries =
        || -> Vec<[Option<u64>; 4]> { table.pages().map(|p| machine.raw_entries(p)).collect() };
    let before = entries();
    let stores = machine.leaf_stores();
    let f = module
        .add_code(&NewCode::function(0, &[0x90; 100]))
        .unwrap();
    let g = module
        .add_code(&NewCode::function(1, &[0x90; 100]))
        .unwrap();
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap();
    module.free_code(w.instruction_start()).unwrap();
    module.add_code(&NewCode::function(1, &[0xC3])).unwrap();
    settle(regs);
    module.reclaim().unwrap();
    assert!(machine.leaf_stores() > stores, "code pages were flipped");
    assert_eq!(entries(), before, "table pages' entries never changed");
    assert!(!table.contains(f.instruction_start()) && !table.contains(g.instruction_start()));
    assert_sound(&machine, &m);
}

/// Issue 17: code added with #UD and #DE sites resolves for those vectors only, needs a landing
/// pad for them as for #PF sites, and its sites go with the code after a grace period.
#[test]
fn trap_sites_of_every_vector_register_with_the_code() {
    use codespace::trap::TrapVector::{DivideError, InvalidOpcode, PageFault};
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(1));
    let bytes = body(128, 0x90);
    let before = state(&machine, &m, regs, &module);
    let mut code = NewCode::function(0, &bytes);
    code.sites = &[(8, InvalidOpcode)];
    assert_eq!(
        module.add_code(&code).map(|o| o.instruction_start()),
        Err(ModuleError::BadLandingPad)
    );
    assert_eq!(state(&machine, &m, regs, &module), before);
    code.sites = &[(8, InvalidOpcode), (16, DivideError), (24, PageFault)];
    code.landing_pad = Some(120);
    let o = module.add_code(&code).unwrap();
    let s = o.instruction_start();
    let t = &regs.traps;
    assert_eq!(
        t.lookup_trap(InvalidOpcode, s + 8).unwrap().landing_pad(),
        s + 120
    );
    assert!(t.lookup_trap(DivideError, s + 8).is_none());
    assert!(t.lookup_fault(s + 8, 0).is_none());
    assert!(t.lookup_trap(DivideError, s + 16).is_some());
    assert!(t.lookup_fault(s + 24, 0).is_some());
    // Replaced: the old code's sites stay until a grace period passed.
    module.add_code(&NewCode::function(0, &bytes)).unwrap();
    assert!(t.lookup_trap(InvalidOpcode, s + 8).is_some());
    pass_grace(regs);
    module.reclaim().unwrap();
    assert!(t.lookup_trap(InvalidOpcode, s + 8).is_none());
    assert!(t.lookup_trap(DivideError, s + 16).is_none());
    assert_sound(&machine, &m);
}
