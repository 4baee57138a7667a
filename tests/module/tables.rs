//! Jump tables per code space, lazy slots and their trampoline, relocations resolved to the own
//! space's table, the far path between spaces more than 2 GiB apart, and patching slots through
//! the private alias only.

use codespace::code_object::{CodeKind, RelocKind, Relocation};
use codespace::jump_table::JumpTableLayout;
use codespace::manager::CODE_ALIGNMENT;
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::Mmu;
use codespace::module::{ModuleConfig, NewCode};
use codespace::{CodeManager, ManagerConfig};
use iced_x86::{Code, Mnemonic};

use super::{default_rig, rig_with};
use crate::common::*;

#[test]
fn tables_in_the_first_space_trap_without_lazy_compilation() {
    let (machine, m) = default_rig();
    let regs = registries();
    for n in [1u32, 4, 5, 8, 64] {
        let module = module(&m, regs, functions(n));
        assert_eq!(module.jump_tables().unwrap().len(), 1);
        let t = first_table(&module);
        assert_eq!(t.slots(), n);
        assert!(t.lazy().is_none());
        let space = module.code_spaces().unwrap()[0];
        assert!(space.contains(t.base()) && t.range().end() <= space.end());
        assert_eq!(
            module.code_count().unwrap(),
            (1, 0),
            "the table is the only code"
        );

        // Published R+X: the leaf of every table page is present, not writable, executable.
        for page in t.range().pages() {
            assert_eq!(leaf_flags(&machine, page), R_X, "n={n} page {page:#x}");
        }
        // Registered for PC lookup as a jump table, over the whole table region.
        for pc in [t.base(), t.far().start(), t.range().end() - 1] {
            let o = regs.lookup_code(pc).expect("table in the code map");
            assert_eq!(o.kind(), CodeKind::JumpTable);
            assert_eq!(o.instruction_start(), t.base());
            assert_eq!(format!("{}", o.debug_name()), "jump-table");
        }
        assert!(regs.lookup_code(t.base() - 1).is_none());

        // Every uncompiled slot is INT3 (eight of them), end to end, on every CPU.
        let near = read(&m, t.base(), t.near().size());
        let instrs = decode(&near, t.base());
        assert_eq!(instrs.len(), 8 * n as usize);
        assert!(instrs.iter().all(|i| i.mnemonic() == Mnemonic::Int3));
        for i in 0..n {
            assert_eq!(near_slot_target(&m, &t, i), None);
            for cpu in 0..4 {
                assert_eq!(executed_slot_target(&machine, cpu, &t, i), None);
            }
        }
        assert_sound(&machine, &m);
    }
    assert_eq!(settle(regs), 5, "the five dropped modules");
    assert_eq!(m.committed(), 0);
    assert_eq!(regs.code.len(), 0);
    assert_sound_no_leak(&machine, &m);
}

/// Checks the lazy path of slot `i` of `t`: near slot → lazy slot i → trampoline → `entry`.
/// With `fresh` (a table as emitted) the far slot must hold the lazy slot too.
fn check_lazy_slot(
    m: &CodeManager<SoftMmu>,
    t: &JumpTableLayout,
    i: u32,
    entry: usize,
    fresh: bool,
) {
    let lazy = t.lazy().expect("lazy table");
    let slot = t.lazy_slot_addr(i).unwrap();
    assert_eq!(near_slot_target(m, t, i), Some(slot), "near slot {i}");
    if fresh {
        assert_eq!(far_slot_target(m, t, i), slot, "far slot {i}");
    }
    // The trampoline follows the tables, inside the table object, and jumps to the entry.
    let trampoline = lazy_slot_trampoline(m, t, i);
    assert!(trampoline >= lazy.end());
    assert_eq!(trampoline % 16, 0);
    let instrs = decode(&read(m, trampoline, 6), trampoline);
    assert_eq!(instrs.len(), 1);
    assert_eq!(
        indirect_jmp_operand(&instrs[0]),
        trampoline + 6,
        "jmp [rip+0]"
    );
    assert_eq!(
        read_u64(m, trampoline + 6),
        entry as u64,
        "trampoline target"
    );
}

#[test]
fn lazy_slots_push_the_index_and_jump_through_the_trampoline() {
    let (machine, m) = default_rig();
    let regs = registries();
    // Slot counts whose table size is and is not a multiple of 16 (the trampoline is aligned).
    for n in [1u32, 2, 3, 4, 5, 8, 13, 16, 64] {
        let module = module(
            &m,
            regs,
            ModuleConfig {
                functions: n,
                lazy_entry: Some(LAZY_ENTRY),
                ..ModuleConfig::default()
            },
        );
        let t = first_table(&module);
        for i in 0..n {
            check_lazy_slot(&m, &t, i, LAZY_ENTRY, true);
        }
        // The whole table region, trampoline included, is the jump-table object.
        let trampoline = t.range().end().next_multiple_of(16);
        let o = regs
            .lookup_code(trampoline + 13)
            .expect("trampoline is code");
        assert_eq!(o.kind(), CodeKind::JumpTable);
        assert_sound(&machine, &m);
    }
}

#[test]
fn add_code_installs_the_function_in_its_slot_and_lookup_finds_it() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(8));
    let t = first_table(&module);

    let bytes = body(100, 0x90);
    let mut code = NewCode::function(3, &bytes);
    code.protected = &[10, 20];
    code.landing_pad = Some(90);
    let o = module.add_code(&code).expect("add");
    let start = o.instruction_start();
    assert_eq!(
        o.instructions(),
        codespace::AddressRange::new(start, start + 100)
    );
    assert_eq!(o.kind(), CodeKind::Function);
    assert_eq!(o.index(), Some(3));
    assert_eq!(start % CODE_ALIGNMENT, 0);
    assert_eq!(module.function_code(3).unwrap(), Some(start));
    assert_eq!(module.slot_target(3).unwrap(), Some(start));
    assert_eq!(module.code_count().unwrap(), (2, 0));
    assert_eq!(read(&m, start, 100), bytes);
    assert_eq!(read(&m, start + 100, 28), vec![INT3; 28], "padding");

    // Slot 3 jumps to the code on every CPU; the others still trap.
    assert_eq!(near_slot_target(&m, &t, 3), Some(start));
    for cpu in 0..4 {
        assert_eq!(executed_slot_target(&machine, cpu, &t, 3), Some(start));
    }
    for i in (0..8).filter(|&i| i != 3) {
        assert_eq!(near_slot_target(&m, &t, i), None, "slot {i}");
    }
    assert_eq!(
        module.slot_address_for(3, start).unwrap(),
        t.near_slot_addr(3)
    );

    // PC lookup: first, middle and last byte; not the end.
    for pc in [start, start + 50, start + 99] {
        assert!(finds(regs, pc, &o), "pc {pc:#x}");
        assert!(module.lookup_code(pc).is_some());
    }
    assert!(regs.lookup_code(start + 100).is_none());

    // Trap data.
    let hit = regs.traps.lookup(start + 20).expect("protected");
    assert_eq!(hit.landing_pad(), start + 90);
    assert_eq!(hit.code(), o.instructions());
    assert!(regs.traps.lookup(start + 21).is_none());
    assert_sound(&machine, &m);
}

#[test]
fn call_slot_relocations_resolve_to_the_own_table() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(8));
    let t = first_table(&module);

    // Two calls (slots 2 and 7) and a jmp (slot 0): e8 rel32; e8 rel32; e9 rel32; ret.
    let bytes = [0xE8, 0, 0, 0, 0, 0xE8, 0, 0, 0, 0, 0xE9, 0, 0, 0, 0, 0xC3];
    let reloc = |offset, slot| Relocation {
        offset,
        kind: RelocKind::CallSlot { slot },
    };
    let relocs = [reloc(1, 2), reloc(6, 7), reloc(11, 0)];
    let mut code = NewCode::function(1, &bytes);
    code.relocations = &relocs;
    let o = module.add_code(&code).expect("add");
    let start = o.instruction_start();
    let instrs = decode(&read(&m, start, bytes.len()), start);
    assert_eq!(instrs.len(), 4);
    for (i, (code, slot)) in [
        (Code::Call_rel32_64, 2),
        (Code::Call_rel32_64, 7),
        (Code::Jmp_rel32_64, 0),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(instrs[i].code(), code);
        assert_eq!(
            instrs[i].near_branch_target() as usize,
            t.near_slot_addr(slot).unwrap()
        );
    }
    assert_eq!(instrs[3].code(), Code::Retnq);
    // The object keeps its relocations.
    assert_eq!(o.relocations().collect::<Vec<_>>(), relocs);
    assert_sound(&machine, &m);
}

#[test]
fn internal_references_resolve_to_the_code_start_plus_offset() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(2));
    // mov rax, imm64; jmp rax; int3; ret  (imm64 = address of the ret)
    let bytes = [0x48, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xE0, 0xCC, 0xC3];
    let relocs = [Relocation {
        offset: 2,
        kind: RelocKind::InternalReference { target_offset: 13 },
    }];
    let mut code = NewCode::function(0, &bytes);
    code.relocations = &relocs;
    let o = module.add_code(&code).expect("add");
    let start = o.instruction_start();
    assert_eq!(read_u64(&m, start + 2), (start + 13) as u64);
    let instrs = decode(&read(&m, start, bytes.len()), start);
    assert_eq!(instrs[0].code(), Code::Mov_r64_imm64);
    assert_eq!(instrs[0].immediate64(), (start + 13) as u64);
    assert_eq!(instrs[3].ip() as usize, start + 13);
    assert_eq!(instrs[3].code(), Code::Retnq);
    assert_sound(&machine, &m);
}

#[test]
fn a_far_code_space_gets_its_own_tables_and_slots_use_the_far_path() {
    for mode in [Mode::ALIAS, Mode::ROX] {
        a_far_code_space_gets_its_own_tables_and_slots_use_the_far_path_in(mode);
    }
}

/// In the ROX mode both spaces are on 2 MiB pages: the reach rules are the same.
fn a_far_code_space_gets_its_own_tables_and_slots_use_the_far_path_in(mode: Mode) {
    let (machine, m) = rig_with(mode.manager(ManagerConfig {
        max_code_space_size: GIB,
        ..ManagerConfig::default()
    }));
    let regs = registries();
    let module = module(
        &m,
        regs,
        mode.module(ModuleConfig {
            functions: 8,
            initial_reservation: 16 * PAGE,
            ..ModuleConfig::default()
        }),
    );
    let first_space = module.code_spaces().unwrap()[0];
    let t1 = first_table(&module);

    // Function 0 in the first space, calling slot 1.
    let relocs = [Relocation {
        offset: 1,
        kind: RelocKind::CallSlot { slot: 1 },
    }];
    let mut near_fn = NewCode::function(0, &CALL);
    near_fn.relocations = &relocs;
    let f0 = module.add_code(&near_fn).expect("f0");
    assert!(first_space.contains(f0.instruction_start()));

    let fillers = far_fillers(&m);
    fill_free_space(&module);

    // Function 5 no longer fits: a new code space, > 2 GiB away, with its own tables.
    let mut far_fn = NewCode::function(5, &CALL);
    far_fn.relocations = &relocs;
    let f5 = module.add_code(&far_fn).expect("f5");
    let spaces = module.code_spaces().unwrap();
    assert_eq!(spaces.len(), 2);
    let far_space = spaces[1];
    assert!(far_space.contains(f5.instruction_start()));
    assert!(far_space.start() - first_space.end() > 2 * GIB);
    assert_eq!(module.jump_tables().unwrap().len(), 2);
    assert_eq!(table_in(&module, first_space), t1);
    let t2 = table_in(&module, far_space);
    assert_eq!(
        regs.lookup_code(t2.base()).map(|o| o.kind()),
        Some(CodeKind::JumpTable)
    );

    // Each code's call goes to its own space's table.
    let call_target = |start: usize| {
        let instrs = decode(&read(&m, start, CALL.len()), start);
        assert_eq!(instrs[0].code(), Code::Call_rel32_64);
        instrs[0].near_branch_target() as usize
    };
    assert_eq!(
        call_target(f0.instruction_start()),
        t1.near_slot_addr(1).unwrap()
    );
    assert_eq!(
        call_target(f5.instruction_start()),
        t2.near_slot_addr(1).unwrap()
    );
    assert_eq!(
        module.slot_address_for(1, f5.instruction_start()).unwrap(),
        t2.near_slot_addr(1)
    );

    // Slot 5: near jump in the far table, far path in the first one.
    let f5_start = f5.instruction_start();
    assert_eq!(near_slot_target(&m, &t2, 5), Some(f5_start));
    assert_eq!(near_slot_target(&m, &t1, 5), t1.far_slot_addr(5));
    assert_eq!(far_slot_target(&m, &t1, 5), f5_start);
    // Slot 0 (compiled before the far table existed): the far table goes through its far slot.
    let f0_start = f0.instruction_start();
    assert_eq!(near_slot_target(&m, &t1, 0), Some(f0_start));
    assert_eq!(near_slot_target(&m, &t2, 0), t2.far_slot_addr(0));
    assert_eq!(far_slot_target(&m, &t2, 0), f0_start);
    // Uncompiled slots trap in both tables.
    for t in [&t1, &t2] {
        assert_eq!(near_slot_target(&m, t, 3), None);
    }
    // Every CPU ends up where the slots say.
    for cpu in 0..4 {
        for t in [&t1, &t2] {
            assert_eq!(executed_destination(&machine, cpu, t, 5), Some(f5_start));
            assert_eq!(executed_destination(&machine, cpu, t, 0), Some(f0_start));
        }
    }

    // Patching slot 2 to code in the far space: far path in t1, direct in t2.
    let target = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap()
        .instruction_start();
    assert!(far_space.contains(target));
    module.patch_slot(2, target).expect("patch");
    assert_eq!(near_slot_target(&m, &t1, 2), t1.far_slot_addr(2));
    assert_eq!(far_slot_target(&m, &t1, 2), target);
    assert_eq!(read_u64(&m, t1.far_target_addr(2).unwrap()), target as u64);
    assert_eq!(near_slot_target(&m, &t2, 2), Some(target));
    // And back to code in the first space.
    module.patch_slot(2, f0_start).expect("patch back");
    assert_eq!(near_slot_target(&m, &t1, 2), Some(f0_start));
    assert_eq!(near_slot_target(&m, &t2, 2), t2.far_slot_addr(2));
    assert_eq!(far_slot_target(&m, &t2, 2), f0_start);
    for cpu in 0..4 {
        for t in [&t1, &t2] {
            assert_eq!(executed_destination(&machine, cpu, t, 2), Some(f0_start));
        }
    }

    // More code in the far space reuses its table.
    let f6 = module.add_code(&NewCode::function(6, &CALL)).unwrap();
    assert!(far_space.contains(f6.instruction_start()));
    assert_eq!(module.jump_tables().unwrap().len(), 2);
    assert_sound(&machine, &m);

    drop(module);
    assert_eq!(settle(regs), 1);
    assert_eq!(m.committed(), 0);
    assert_eq!(regs.code.len(), 0);
    drop(fillers);
    assert_eq!(m.stats().code_spaces, 0);
    assert_sound_no_leak(&machine, &m);
    mode.assert_claimed(&m);
}

#[test]
fn a_far_lazy_table_gets_its_own_trampoline() {
    let (machine, m) = rig_with(ManagerConfig {
        max_code_space_size: GIB,
        ..ManagerConfig::default()
    });
    let regs = registries();
    let module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 5,
            lazy_entry: Some(LAZY_ENTRY),
            initial_reservation: 4 * PAGE,
            ..ModuleConfig::default()
        },
    );
    let _fillers = far_fillers(&m);
    fill_free_space(&module);
    let f = module.add_code(&NewCode::function(4, &CALL)).unwrap();
    let spaces = module.code_spaces().unwrap();
    let far_space = spaces[1];
    assert!(far_space.contains(f.instruction_start()));
    let t1 = table_in(&module, spaces[0]);
    let t2 = table_in(&module, far_space);
    assert_eq!(near_slot_target(&m, &t1, 4), t1.far_slot_addr(4));
    assert_eq!(near_slot_target(&m, &t2, 4), Some(f.instruction_start()));
    // The uncompiled slots of both tables take their own table's lazy path, each table with a
    // trampoline of its own.
    for t in [&t1, &t2] {
        for i in 0..4 {
            check_lazy_slot(&m, t, i, LAZY_ENTRY, true);
        }
    }
    assert_ne!(
        lazy_slot_trampoline(&m, &t1, 0),
        lazy_slot_trampoline(&m, &t2, 0)
    );
    assert_sound(&machine, &m);
}

#[test]
fn patch_slot_writes_only_through_the_alias_and_every_cpu_runs_the_new_target() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(64));
    let t = first_table(&module);
    let a = module
        .add_code(&NewCode::function(10, &body(64, 0x90)))
        .unwrap();
    let b = module
        .add_code(&NewCode::function(11, &body(64, 0x90)))
        .unwrap();

    let snapshot_before = machine.snapshot();
    let stats_before = machine.flush_stats();
    let stores_before = machine.leaf_stores();

    for (k, target) in [
        (3u32, a.instruction_start()),
        (3, b.instruction_start()),
        (63, b.instruction_start()),
    ] {
        module.patch_slot(k, target).expect("patch");
        assert_eq!(near_slot_target(&m, &t, k), Some(target));
        assert_eq!(module.slot_target(k).unwrap(), Some(target));
        // When patch_slot returns, no CPU runs the old slot any more.
        for cpu in 0..4 {
            assert_eq!(executed_slot_target(&machine, cpu, &t, k), Some(target));
        }
    }

    // No leaf changed anywhere, nothing got mapped, unmapped or allocated.
    let after = machine.snapshot();
    assert_eq!(after.leaves, snapshot_before.leaves);
    assert_eq!(after.data_frames, snapshot_before.data_frames);
    assert_eq!(machine.leaf_stores(), stores_before);
    // One alias session and one serialization round per patch; no TLB work.
    let stats = machine.flush_stats();
    assert_eq!(stats.pokes - stats_before.pokes, 3);
    assert_eq!(stats.syncs - stats_before.syncs, 3);
    assert_eq!(stats.shootdowns, stats_before.shootdowns);
    assert_eq!(stats.single_pages, stats_before.single_pages);
    assert_sound(&machine, &m);
}

/// Adding anonymous code changes no slot: it costs no alias session and no serialization
/// round of every CPU (publishing it on fresh pages needs neither).
#[test]
fn adding_anonymous_code_patches_no_slot_and_serializes_nothing() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(4));
    let before = machine.flush_stats();
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &body(PAGE, 0x90)))
        .unwrap();
    let after = machine.flush_stats();
    assert_eq!((after.pokes, after.syncs), (before.pokes, before.syncs));
    assert!(finds(regs, w.instruction_start(), &w));
    module.patch_slots(&[]).unwrap();
    assert_eq!(machine.flush_stats().syncs, before.syncs);
    assert_sound(&machine, &m);
}

#[test]
fn entry_is_the_functions_slot_in_the_first_table_and_survives_redefinition() {
    let (_machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(3));
    let slot = first_table(&module).near_slot_addr(1).unwrap();
    assert_eq!(module.entry_address(1), Ok(slot));

    let first = module.add_code(&NewCode::function(1, &[0xC3])).unwrap();
    let second = module
        .add_code(&NewCode::function(1, &[0x90, 0xC3]))
        .unwrap();
    assert_eq!(module.slot_target(1), Ok(Some(second.instruction_start())));
    assert_ne!(first.instruction_start(), second.instruction_start());
    // Callers keep entering at the slot: redefinition patched it, it did not move.
    assert_eq!(module.entry_address(1), Ok(slot));
    // SAFETY: the pointer is only compared, never called.
    let f: extern "C" fn() -> u64 = unsafe { module.entry(1) }.unwrap();
    assert_eq!(f as usize, slot);

    assert_eq!(
        module.entry_address(3),
        Err(codespace::module::ModuleError::BadIndex { index: 3 })
    );
}
