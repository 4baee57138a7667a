//! Regression tests for the bugs of issue 10 ("Bugs found when tried as a new user would"), one
//! per bug, named `bug_NN_<what>`. Bug 5 (a foreign trap handle) belongs to the trap table's own
//! tests. Each asserts the fixed behaviour: a typed error, or correct placement, and a sound
//! machine afterwards.

mod common;

use codespace::code_object::{CodeKind, DecRef, RelocKind, Relocation};
use codespace::code_pointer_table::CodePointerTable;
use codespace::manager::{CODE_ALIGNMENT, MAX_CODE_SPACE_SIZE};
use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::{Mmu, MmuError, MAX_POKE_PAGES};
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode};
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig,
    ProtectionMode,
};

use common::*;

fn allocator_with_space(m: &CodeManager<SoftMmu>, bytes: usize) -> CodeAllocator<SoftMmu> {
    let config = AllocatorConfig {
        initial_reservation: bytes,
        growable: false,
        ..AllocatorConfig::default()
    };
    CodeAllocator::new(m, config).expect("allocator")
}

/// Bug 1: a region starting off the code alignment must still give aligned code, and a later
/// page allocation must not overlap it.
#[test]
fn bug_01_allocate_in_region_keeps_the_code_alignment() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 4 * PAGE);
    let s = a.code_spaces()[0].start();

    // [s + 3, s + 131) holds 128 bytes, but no 64-aligned 128 bytes.
    let tight = AddressRange::new(s + 3, s + 3 + 128);
    assert_eq!(
        a.allocate_in_region(100, tight).map(|w| w.range()),
        Err(CodeError::WindowExhausted { size: 128 })
    );
    let mut w = a
        .allocate_in_region(100, AddressRange::new(s + 3, s + 4 * PAGE))
        .unwrap();
    assert_eq!(w.start(), s + CODE_ALIGNMENT);
    assert_eq!(w.start() % CODE_ALIGNMENT, 0);
    w.as_mut_slice().fill(0x11);
    let code = a.publish(w).unwrap();

    // A page allocation in the same space takes the next whole free page.
    let mut t = a.allocate_table(PAGE, Some(a.code_spaces()[0])).unwrap();
    assert_eq!(t.start(), s + PAGE);
    t.as_mut_slice().fill(0x22);
    let table = a.publish(t).unwrap();
    assert_eq!(read(&m, code.start(), 100), [0x11; 100], "neighbour intact");
    assert_eq!(a.stats().allocated, 128 + PAGE);
    free_published(&mut a, code).unwrap();
    assert_eq!(a.stats().allocated, PAGE);
    free_published(&mut a, table).unwrap();
    assert_eq!(a.stats().allocated, 0);
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

/// Bug 2: a holder's extra `dec_ref` must not get an installed function freed: the slot still
/// jumps there, so it stays until it is replaced, and a later replacement releases only its own
/// reference.
#[test]
fn bug_02_free_dead_code_keeps_an_installed_function_with_an_unbalanced_count() {
    let (machine, m) = rig(1 << 12, ManagerConfig::default());
    let regs = registries();
    let module = module(&m, regs, functions(2));
    let t = first_table(&module);
    let f = module
        .add_code(&NewCode::function(0, &body(64, 0x90)))
        .unwrap();
    let fs = f.instruction_start();
    assert_eq!(
        // SAFETY: deliberately unbalanced: the hazard this test checks the module contains
        // (nothing runs the simulated code).
        unsafe { f.dec_ref() },
        DecRef::Dead,
        "a holder released the module's reference"
    );
    assert_eq!(module.free_dead_code().unwrap(), 0);
    settle(regs);
    assert_eq!(module.reclaim().unwrap(), 0);
    assert_eq!(module.function_code(0).unwrap(), Some(fs));
    assert!(finds(regs, fs, &f));
    assert_eq!(read(&m, fs, 64), body(64, 0x90));
    for cpu in 0..4 {
        assert_eq!(executed_slot_target(&machine, cpu, &t, 0), Some(fs));
    }

    // Replacing it retires it; reclaimed after a grace period; its range is then reused by code
    // whose count the next replacement must not touch.
    let g = module
        .add_code(&NewCode::function(0, &body(64, 0x66)))
        .unwrap();
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(regs.lookup_code(fs).is_none());
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap();
    assert_eq!(w.instruction_start(), fs, "the freed range is reused");
    module
        .add_code(&NewCode::function(0, &body(64, 0x55)))
        .unwrap();
    assert!(g.is_dying());
    assert_eq!(w.ref_count(), 1);
    assert!(!w.is_dying());
    assert!(finds(regs, fs, &w));
    assert_sound(&machine, &m);
}

/// Bug 3: a wrapper a slot targets cannot be freed; tables created later copy the slot's
/// target, and the function's code pointer follows the slot.
#[test]
fn bug_03_a_slot_target_is_not_freed_and_later_tables_copy_it() {
    let (machine, m) = rig(1 << 14, ManagerConfig::default());
    let regs = registries();
    let pointers: &'static CodePointerTable =
        Box::leak(Box::new(CodePointerTable::with_capacity(8, regs.grace())));
    let module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 4,
            initial_reservation: 4 * PAGE,
            ..ModuleConfig::default()
        },
    );
    module.set_code_pointer_table(Some(pointers)).unwrap();
    let f = module
        .add_code(&NewCode::function(1, &body(64, 0x90)))
        .unwrap();
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap();
    let ws = w.instruction_start();
    module.patch_slot(1, ws).unwrap();
    let fp = module.function_pointer(1).unwrap().unwrap();
    assert_eq!(pointers.get(fp), ws);
    assert_eq!(
        module.free_code(ws),
        Err(ModuleError::StillTargeted { start: ws })
    );

    // A new table, in a code space more than 2 GiB away, starts with the slot's target.
    let _fillers = far_fillers(&m);
    fill_free_space(&module);
    let far = module
        .add_code(&NewCode::function(2, &body(64, 0x90)))
        .unwrap();
    let far_space = module.code_spaces().unwrap()[1];
    assert!(far_space.contains(far.instruction_start()));
    let t2 = table_in(&module, far_space);
    assert_eq!(near_slot_target(&m, &t2, 1), t2.far_slot_addr(1));
    assert_eq!(far_slot_target(&m, &t2, 1), ws);
    for cpu in 0..4 {
        assert_eq!(executed_destination(&machine, cpu, &t2, 1), Some(ws));
    }

    // Pointing the slot back at the function lets the wrapper go.
    module.patch_slot(1, f.instruction_start()).unwrap();
    assert_eq!(pointers.get(fp), f.instruction_start());
    module.free_code(ws).unwrap();
    pass_grace(regs);
    module.reclaim().unwrap();
    assert!(regs.lookup_code(ws).is_none());
    assert_sound(&machine, &m);
}

/// Bug 4: a code space of 2 GiB or more is refused; one of the largest allowed size reaches its
/// single jump table from everywhere, so adds never emit more tables.
#[test]
fn bug_04_code_spaces_stay_within_rel32_reach_of_their_tables() {
    let bad = Some(CodeError::InvalidConfig {
        setting: "max_code_space_size",
    });
    for size in [2 * GIB, MAX_CODE_SPACE_SIZE + PAGE, 0, PAGE + 1] {
        let config = ManagerConfig {
            max_code_space_size: size,
            ..ManagerConfig::default()
        };
        assert_eq!(
            CodeManager::new(SoftMmu::new(64), slot(), config).err(),
            bad,
            "{size:#x}"
        );
    }
    let (machine, m) = rig(
        1 << 12,
        ManagerConfig {
            max_code_space_size: MAX_CODE_SPACE_SIZE,
            ..ManagerConfig::default()
        },
    );
    let regs = registries();
    let module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 8,
            initial_reservation: MAX_CODE_SPACE_SIZE,
            ..ModuleConfig::default()
        },
    );
    assert_eq!(module.code_spaces().unwrap()[0].size(), MAX_CODE_SPACE_SIZE);
    let relocs = [Relocation {
        offset: 1,
        kind: RelocKind::CallSlot { slot: 7 },
    }];
    for i in 0..8 {
        let mut code = NewCode::function(i, &CALL);
        code.relocations = &relocs;
        module.add_code(&code).expect("a call slot resolves");
    }
    assert_eq!(module.jump_tables().unwrap().len(), 1);
    // Even the last page of the space reaches the table at its start.
    let mut a = CodeAllocator::new(&m, AllocatorConfig::default()).unwrap();
    let big = a.allocate(MAX_CODE_SPACE_SIZE + 1).map(|w| w.range());
    assert!(
        matches!(big, Err(CodeError::CodeSpaceTooLarge { .. })),
        "{big:?}"
    );
    assert_sound(&machine, &m);
}

/// Bug 6: guard pages that overflow, or leave no room, are an invalid setting, not a panic or a
/// wrapped zero-size guard.
#[test]
fn bug_06_guard_pages_that_overflow_are_refused() {
    let bad = Some(CodeError::InvalidConfig {
        setting: "guard_pages",
    });
    for guard_pages in [
        usize::MAX,
        usize::MAX / PAGE + 1,
        usize::MAX / (2 * PAGE) + 1,
        (512 << 30) / (2 * PAGE),
    ] {
        let config = ManagerConfig {
            guard_pages,
            ..ManagerConfig::default()
        };
        assert_eq!(
            CodeManager::new(SoftMmu::new(64), slot(), config).err(),
            bad,
            "{guard_pages:#x}"
        );
    }
    // The largest guard that leaves one usable page works, and keeps spaces apart.
    let guard_pages = (512 << 30) / (2 * PAGE) - 1;
    let config = ManagerConfig {
        guard_pages,
        ..ManagerConfig::default()
    };
    let machine = SoftMmu::new(64);
    let m = manager_on(&machine, slot(), config);
    let mut a = CodeAllocator::new(&m, AllocatorConfig::default()).unwrap();
    let w = a.allocate(PAGE).unwrap();
    assert_eq!(w.start(), BASE + guard_pages * PAGE);
    assert!(matches!(
        CodeAllocator::new(&m, AllocatorConfig::default())
            .unwrap()
            .allocate(1),
        Err(CodeError::WindowExhausted { .. })
    ));
    assert_sound(&machine, &m);
}

/// Bug 7: an add that reserves a new far space and then hits the commit limit on its jump
/// tables gives the empty space back, so later code of nearly that space's size gets a space
/// with room for its tables instead of failing with `WindowExhausted` forever.
#[test]
fn bug_07_an_empty_space_left_by_a_failed_add_is_released() {
    let (machine, m) = rig(
        1 << 14,
        ManagerConfig {
            max_code_space_size: GIB,
            max_committed: 16 * PAGE,
            ..ManagerConfig::default()
        },
    );
    let regs = registries();
    let module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 4,
            initial_reservation: 2 * PAGE,
            ..ModuleConfig::default()
        },
    );
    let fillers = far_fillers(&m);
    fill_free_space(&module);
    assert_eq!(m.committed(), 2 * PAGE, "a page of tables, a page of code");
    let mut ballast = CodeAllocator::new(&m, AllocatorConfig::default()).unwrap();
    let weight = ballast.allocate(9 * PAGE).unwrap();
    let spaces = m.stats().code_spaces;

    // Five pages of code in a new far space commit the last pages allowed; its tables fail.
    let five = body(5 * PAGE, 0x90);
    assert!(matches!(
        module
            .add_code(&NewCode::function(1, &five))
            .map(|o| o.instruction_start()),
        Err(ModuleError::Code(CodeError::CommitLimit { .. }))
    ));
    assert_eq!(
        module.code_spaces().unwrap().len(),
        1,
        "the new space went back"
    );
    assert_eq!(m.stats().code_spaces, spaces);
    assert_eq!(m.committed(), 11 * PAGE);
    assert_eq!(module.jump_tables().unwrap().len(), 1);

    // With room again, code of nearly the size that space had gets a space with its tables.
    ballast.discard(weight).unwrap();
    let mut big = body(7 * PAGE - 64, 0x90);
    big[..CALL.len()].copy_from_slice(&CALL);
    let relocs = [Relocation {
        offset: 1,
        kind: RelocKind::CallSlot { slot: 3 },
    }];
    let mut code = NewCode::function(2, &big);
    code.relocations = &relocs;
    let o = module
        .add_code(&code)
        .expect("a space with room for the tables");
    let far_space = module.code_spaces().unwrap()[1];
    assert!(far_space.contains(o.instruction_start()));
    let t2 = table_in(&module, far_space);
    let instrs = decode(&read(&m, o.instruction_start(), 5), o.instruction_start());
    assert_eq!(
        instrs[0].near_branch_target() as usize,
        t2.near_slot_addr(3).unwrap()
    );
    drop(fillers);
    assert_sound(&machine, &m);
}

/// Bug 8: a page allocation finds the free aligned page behind a small allocation.
#[test]
fn bug_08_a_page_allocation_finds_the_free_aligned_page() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = allocator_with_space(&m, 2 * PAGE);
    let space = a.code_spaces()[0];
    let small = a.allocate(128).unwrap();
    assert_eq!(small.start(), space.start());
    let table = a.allocate_table(100, Some(space)).unwrap();
    assert_eq!(
        table.range(),
        AddressRange::new(space.start() + PAGE, space.end())
    );
    assert_eq!(
        a.allocate_table(100, Some(space)).map(|w| w.range()),
        Err(CodeError::WindowExhausted { size: PAGE })
    );
    a.discard(small).unwrap();
    a.discard(table).unwrap();
    assert_sound_no_leak(&machine, &m);
}

/// Bug 9: in flip mode, a page that cannot be made executable again after a write is reported
/// (never `Ok`), is never W+X, and is restored by the next operation, so the published code
/// sharing it runs again.
#[test]
fn bug_09_a_failed_flip_back_is_reported_and_repaired() {
    let (machine, m) = rig(1024, config(ProtectionMode::Flip));
    assert_eq!(machine.online_cpus(), 1);
    let mut a = allocator_with_space(&m, 4 * PAGE);
    let mut w = a.allocate(64).unwrap();
    w.as_mut_slice().fill(0x90);
    let first = a.publish(w).unwrap();
    let mut w = a.allocate(64).unwrap();
    w.as_mut_slice().fill(0xC3);

    // The flip there (protect 0) works; the flip back (protect 1) fails.
    machine.fail_nth(CallKind::Protect, 1);
    let rejected = a.publish(w).unwrap_err();
    assert_eq!(rejected.error, CodeError::NotRestored(MmuError::Injected));
    assert_sound_without_audit(&machine);
    // Discarding it is the next operation: the page is R+X again, the first code runs.
    a.discard(rejected.code).unwrap();
    let mut seen = [0; 64];
    machine.exec_as(0, first.start(), &mut seen).unwrap();
    assert_eq!(seen, [0x90; 64]);
    assert_eq!(leaf_flags(&machine, first.start()), R_X);

    // The same for the INT3 fill of a free on the shared page: the handle comes back, and any
    // later operation repairs the page.
    let mut w = a.allocate(64).unwrap();
    w.as_mut_slice().fill(0xC3);
    let second = a.publish(w).unwrap();
    machine.fail_nth(CallKind::Protect, 1);
    let second = match free_published(&mut a, second) {
        Err(FreeError::NotFreed(CodeError::NotRestored(MmuError::Injected), code)) => code,
        other => panic!("{other:?}"),
    };
    assert_sound_without_audit(&machine);
    assert_eq!(m.audit().unwrap().mapped_pages, 1);
    assert_eq!(leaf_flags(&machine, first.start()), R_X);
    machine.exec_as(0, first.start(), &mut seen).unwrap();
    assert_eq!(seen, [0x90; 64]);
    free_published(&mut a, second).unwrap();
    free_published(&mut a, first).unwrap();
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

fn assert_sound_without_audit(machine: &SoftMmu) {
    assert!(
        machine.violations().is_empty(),
        "{:?}",
        machine.violations()
    );
    assert!(!machine.wx_ever_observed());
}

/// Bug 10: patching slots on several pages is all or nothing, and more pages than one alias
/// session maps are refused before anything is stored.
#[test]
fn bug_10_patching_is_all_or_nothing() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let mut a = CodeAllocator::new(&m, AllocatorConfig::default()).unwrap();
    let tables: Vec<_> = (0..=MAX_POKE_PAGES)
        .map(|_| {
            let mut t = a.allocate_table(PAGE, None).unwrap();
            t.as_mut_slice().fill(INT3);
            a.publish(t).unwrap()
        })
        .collect();
    let handles: Vec<_> = tables.iter().collect();
    let stores: Vec<(usize, u64)> = tables.iter().map(|t| (t.start(), 7)).collect();
    let before = machine.snapshot();
    assert_eq!(
        patch_tables(&a, &handles, &stores),
        Err(CodeError::Mmu(MmuError::TooManyPages {
            pages: MAX_POKE_PAGES + 1,
            max: MAX_POKE_PAGES
        }))
    );
    assert_eq!(machine.snapshot(), before);
    // Two pages, and mapping the alias fails: neither store lands.
    machine.fail_nth(CallKind::Poke, 0);
    assert_eq!(
        patch_tables(&a, &handles[..2], &stores[..2]),
        Err(CodeError::Mmu(MmuError::Injected))
    );
    assert_eq!(machine.snapshot(), before);
    patch_tables(&a, &handles[..2], &stores[..2]).unwrap();
    assert_eq!(read_u64(&m, tables[0].start()), 7);
    assert_eq!(read_u64(&m, tables[1].start()), 7);
    assert_sound(&machine, &m);
}

/// Bug 11: a function count whose tables or books cannot exist is a typed error, checked before
/// anything is allocated.
#[test]
fn bug_11_too_many_functions_is_a_typed_error() {
    let (machine, m) = rig(1024, ManagerConfig::default());
    let regs = registries();
    let too_many_for_a_space = (m.config().max_code_space_size / 16) as u32;
    for functions in [u32::MAX, u32::MAX / 2, too_many_for_a_space] {
        let config = ModuleConfig {
            functions,
            ..ModuleConfig::default()
        };
        assert_eq!(
            CodeModule::new(&m, regs, config).err(),
            Some(ModuleError::TooManyFunctions { functions })
        );
    }
    assert_eq!(m.stats().code_spaces, 0);
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

/// Bug 12: overlapping relocations are refused in every build (this test runs the same checks
/// with and without debug assertions).
#[test]
fn bug_12_overlapping_relocations_are_refused_in_every_build() {
    let (machine, m) = rig(1 << 12, ManagerConfig::default());
    let regs = registries();
    let module = module(&m, regs, functions(4));
    let call = |offset, slot| Relocation {
        offset,
        kind: RelocKind::CallSlot { slot },
    };
    let internal = |offset| Relocation {
        offset,
        kind: RelocKind::InternalReference { target_offset: 0 },
    };
    let bytes = [0xE8, 0, 0, 0, 0, 0xE8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xC3];
    let cases: [(&[Relocation], u32); 3] = [
        (&[call(1, 0), call(3, 1)], 3),
        (&[call(6, 0), internal(2)], 6),
        (&[internal(2), internal(8)], 8),
    ];
    let count = module.code_count().unwrap();
    for (relocs, offset) in cases {
        let mut code = NewCode::function(0, &bytes);
        code.relocations = relocs;
        assert_eq!(
            module.add_code(&code).map(|o| o.instruction_start()),
            Err(ModuleError::BadRelocation { offset }),
            "{relocs:?} (debug assertions: {})",
            cfg!(debug_assertions)
        );
    }
    assert_eq!(module.code_count().unwrap(), count);
    assert_eq!(module.function_code(0).unwrap(), None);
    assert_sound_no_leak(&machine, &m);
}
