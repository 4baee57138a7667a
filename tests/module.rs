//! Host integration tests of `CodeModule` over the software MMU.
//!
//! They check what a module promises on top of the code manager: jump tables per code space
//! (decoded with iced-x86 from bytes read back through the MMU), relocations resolved to the
//! code's own table, the far path across code spaces more than 2 GiB apart, slot patching only
//! through the writable alias, the safe free order (trap entry, PC lookup, then memory), liveness
//! reference counts, and failed operations that change nothing.

use std::sync::Arc;

use codespace::code_events::{CodeEvent, CodeEventListener};
use codespace::code_object::{
    CodeKind, CodeObject, CodeObjectError, DecRef, RelocKind, Relocation,
};
use codespace::jump_table::{
    JumpTableLayout, FAR_SLOT_SIZE, FAR_SLOT_TARGET_OFFSET, LAZY_SLOT_SIZE, NEAR_SLOT_SIZE,
};
use codespace::manager::CODE_ALIGNMENT;
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::{Mmu, PTE_ADDR_MASK, PTE_PRESENT};
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{
    AddressRange, AllocatorConfig, AuditReport, CodeAllocator, CodeError, CodeManager,
    ManagerConfig, PAGE_SIZE,
};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Start of a 512 GiB PML4 slot in the higher half (PML4 index 384).
const BASE: usize = 0xFFFF_C000_0000_0000;
const PAGE: usize = PAGE_SIZE;
const INT3: u8 = 0xCC;
/// A far lazy-compile entry (think kernel text): out of rel32 reach from the window.
const LAZY_ENTRY: usize = 0x20_0000;
const GIB: usize = 1 << 30;

/// Fresh registries for one test; `CodeModule` wants them `'static`.
fn registries() -> &'static Registries {
    let grace: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
    Box::leak(Box::new(Registries::new(grace)))
}

/// A manager over the whole PML4 slot with a software MMU.
fn manager_with(config: ManagerConfig) -> CodeManager<SoftMmu> {
    let window = AddressRange::new(BASE, BASE + (512 << 30));
    CodeManager::new(SoftMmu::new(1 << 16), window, config).expect("manager")
}

fn manager() -> CodeManager<SoftMmu> {
    manager_with(ManagerConfig::default())
}

fn module(
    m: &CodeManager<SoftMmu>,
    regs: &'static Registries,
    config: ModuleConfig,
) -> CodeModule<SoftMmu> {
    CodeModule::new(m, regs, config).expect("module")
}

fn functions(n: u32) -> ModuleConfig {
    ModuleConfig {
        functions: n,
        ..ModuleConfig::default()
    }
}

/// `len` bytes at `addr`, read back through the manager.
fn read(m: &CodeManager<SoftMmu>, addr: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    m.read(addr, &mut buf).expect("read");
    buf
}

fn read_u64(m: &CodeManager<SoftMmu>, addr: usize) -> u64 {
    u64::from_le_bytes(read(m, addr, 8).try_into().unwrap())
}

/// Decodes all of `bytes` as if at `ip`; every instruction must be valid.
fn decode(bytes: &[u8], ip: usize) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let i = decoder.decode();
        assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
        out.push(i);
    }
    out
}

/// Decodes near slot `i` of `layout`: `Some(target)` for `jmp rel32; int3 ×3`, `None` for an
/// all-INT3 slot. Anything else fails.
fn near_slot_target(m: &CodeManager<SoftMmu>, layout: &JumpTableLayout, i: u32) -> Option<usize> {
    let addr = layout.near_slot_addr(i).unwrap();
    let instrs = decode(&read(m, addr, NEAR_SLOT_SIZE), addr);
    if instrs.iter().all(|x| x.mnemonic() == Mnemonic::Int3) {
        assert_eq!(instrs.len(), NEAR_SLOT_SIZE);
        return None;
    }
    assert_eq!(instrs.len(), 4, "near slot {i}: {instrs:?}");
    assert_eq!(instrs[0].code(), Code::Jmp_rel32_64, "near slot {i}");
    assert!(instrs[1..].iter().all(|x| x.mnemonic() == Mnemonic::Int3));
    Some(instrs[0].near_branch_target() as usize)
}

/// Decodes `jmp qword ptr [rip+disp]` at `addr` and returns the address of its qword operand.
fn indirect_jmp_operand(instr: &Instruction) -> usize {
    assert_eq!(instr.code(), Code::Jmp_rm64, "{instr:?}");
    assert_eq!(instr.op0_kind(), OpKind::Memory);
    assert_eq!(instr.memory_base(), Register::RIP);
    assert!(instr.is_ip_rel_memory_operand());
    instr.ip_rel_memory_address() as usize
}

/// Decodes far slot `i` of `layout` (`jmp [rip+2]; nop`) and returns the qword it jumps through.
fn far_slot_target(m: &CodeManager<SoftMmu>, layout: &JumpTableLayout, i: u32) -> usize {
    let addr = layout.far_slot_addr(i).unwrap();
    let bytes = read(m, addr, FAR_SLOT_SIZE);
    let instrs = decode(&bytes[..FAR_SLOT_TARGET_OFFSET], addr);
    assert_eq!(instrs.len(), 2, "far slot {i}: {instrs:?}");
    assert_eq!(
        indirect_jmp_operand(&instrs[0]),
        addr + FAR_SLOT_TARGET_OFFSET
    );
    assert_eq!(instrs[1].code(), Code::Nopw);
    u64::from_le_bytes(bytes[FAR_SLOT_TARGET_OFFSET..].try_into().unwrap()) as usize
}

/// The (single) jump table whose region lies in `space`.
fn table_in(module: &CodeModule<SoftMmu>, space: AddressRange) -> JumpTableLayout {
    let tables: Vec<_> = module
        .jump_tables()
        .filter(|t| space.contains(t.base()))
        .copied()
        .collect();
    assert_eq!(tables.len(), 1, "one table in {space:?}");
    tables[0]
}

fn first_table(module: &CodeModule<SoftMmu>) -> JumpTableLayout {
    *module.jump_tables().next().expect("a jump table")
}

fn leaf(m: &CodeManager<SoftMmu>, addr: usize) -> Option<u64> {
    m.with_mmu(|mmu| mmu.raw_entries(addr)[3])
}

/// Whether the manager's window is clean and no page-table store ever made a page W+X.
fn assert_clean(m: &CodeManager<SoftMmu>) {
    let audit = m.audit();
    assert!(audit.is_clean(), "{audit:?}");
    assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
}

/// `len` bytes of code: NOPs then `ret`.
fn body(len: usize, nop: u8) -> Vec<u8> {
    let mut b = vec![nop; len];
    *b.last_mut().unwrap() = 0xC3;
    b
}

/// `call rel32` (to be relocated) then `ret`.
const CALL: [u8; 6] = [0xE8, 0, 0, 0, 0, 0xC3];

/// Everything a failed add must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct State {
    code_count: usize,
    committed: usize,
    allocated: usize,
    audit: AuditReport,
    code_map: usize,
    traps: usize,
    mapped: Vec<(usize, u64)>,
    tables: Vec<Vec<u8>>,
    functions: Vec<Option<usize>>,
}

fn state(m: &CodeManager<SoftMmu>, regs: &Registries, module: &CodeModule<SoftMmu>) -> State {
    let window = m.window();
    State {
        code_count: module.code_count(),
        committed: m.committed(),
        allocated: module.allocator().stats().allocated,
        audit: m.audit(),
        code_map: regs.code.len(),
        traps: regs.traps.len(),
        mapped: m.with_mmu(|mmu| {
            let mut pages = Vec::new();
            mmu.for_each_mapping(window, &mut |page, _| pages.push(page));
            pages
                .into_iter()
                .map(|p| (p, mmu.raw_entries(p)[3].unwrap()))
                .collect()
        }),
        tables: module
            .jump_tables()
            .map(|t| read(m, t.base(), t.total_size()))
            .collect(),
        functions: (0..64).map(|i| module.function_code(i)).collect(),
    }
}

/// Fills the free rest of the module's (single, contiguous) free space with a wrapper.
fn fill_free_space(module: &mut CodeModule<SoftMmu>) -> Arc<CodeObject> {
    let stats = module.allocator().stats();
    let rest = stats.reserved - stats.allocated;
    assert!(rest > 0 && rest.is_multiple_of(CODE_ALIGNMENT));
    let filler = vec![INT3; rest];
    let spaces = module.allocator().code_spaces().len();
    let o = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &filler))
        .expect("filler");
    assert_eq!(
        module.allocator().code_spaces().len(),
        spaces,
        "filler fits"
    );
    o
}

/// Three other allocators on `m` reserving 1 GiB each, so that the window's next free range is
/// more than 2 GiB above everything reserved so far. They commit nothing.
fn far_fillers(m: &CodeManager<SoftMmu>) -> Vec<CodeAllocator<SoftMmu>> {
    (0..3)
        .map(|_| {
            let config = AllocatorConfig {
                initial_reservation: GIB,
                ..AllocatorConfig::default()
            };
            CodeAllocator::new(m, config).expect("filler reservation")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Tables per code space
// ---------------------------------------------------------------------------------------------

#[test]
fn tables_in_the_first_space_trap_without_lazy_compilation() {
    let m = manager();
    let regs = registries();
    for n in [1u32, 4, 5, 8, 64] {
        let module = module(&m, regs, functions(n));
        assert_eq!(module.jump_tables().count(), 1);
        let t = first_table(&module);
        assert_eq!(t.slots(), n);
        assert!(t.lazy().is_none());
        let space = module.allocator().code_spaces()[0];
        assert!(space.contains(t.base()) && t.range().end() <= space.end());
        assert_eq!(module.code_count(), 1, "the table is the only code");

        // Published R+X: the leaf of every table page is present, not writable, executable.
        for page in t.range().pages() {
            let entry = leaf(&m, page).expect("table page mapped");
            assert_eq!(entry & !PTE_ADDR_MASK, PTE_PRESENT, "n={n} page {page:#x}");
        }
        // Registered for PC lookup as a jump table, over the whole table region.
        for pc in [t.base(), t.far().start(), t.range().end() - 1] {
            let o = regs.lookup_code(pc).expect("table in the code map");
            assert_eq!(o.kind(), CodeKind::JumpTable);
            assert_eq!(o.instruction_start(), t.base());
            assert_eq!(format!("{}", o.debug_name()), "jump-table");
        }
        assert!(regs.lookup_code(t.base() - 1).is_none());

        // Every uncompiled slot is INT3 (eight of them), end to end.
        let near = read(&m, t.base(), t.near().size());
        let instrs = decode(&near, t.base());
        assert_eq!(instrs.len(), 8 * n as usize);
        assert!(instrs.iter().all(|i| i.mnemonic() == Mnemonic::Int3));
        for i in 0..n {
            assert_eq!(near_slot_target(&m, &t, i), None);
        }
        assert_clean(&m);
    }
    assert_eq!(m.committed(), 0);
    assert!(regs.code.is_empty());
}

/// Checks the lazy path of every slot of `t`: near slot → lazy slot i → trampoline → `entry`.
/// With `fresh` (a table as emitted) the far slots must hold the lazy slots too; after a direct
/// near patch only the near slot is pinned (the far slot is used on the far path only).
fn check_lazy_table(m: &CodeManager<SoftMmu>, t: &JumpTableLayout, entry: usize, fresh: bool) {
    let lazy = t.lazy().expect("lazy table");
    let mut trampoline = None;
    for i in 0..t.slots() {
        let slot = t.lazy_slot_addr(i).unwrap();
        assert_eq!(near_slot_target(m, t, i), Some(slot), "near slot {i}");
        if fresh {
            assert_eq!(far_slot_target(m, t, i), slot, "far slot {i}");
        }
        let instrs = decode(&read(m, slot, LAZY_SLOT_SIZE), slot);
        assert_eq!(instrs.len(), 2, "lazy slot {i}: {instrs:?}");
        assert_eq!(instrs[0].code(), Code::Pushq_imm32);
        assert_eq!(instrs[0].immediate32(), i);
        assert_eq!(instrs[1].code(), Code::Jmp_rel32_64);
        let to = instrs[1].near_branch_target() as usize;
        assert_eq!(*trampoline.get_or_insert(to), to, "one trampoline");
    }
    // The trampoline follows the tables, inside the table object, and jumps to the entry.
    let trampoline = trampoline.unwrap();
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
    let m = manager();
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
        check_lazy_table(&m, &t, LAZY_ENTRY, true);
        // The whole table region, trampoline included, is the jump-table object.
        let trampoline = t.range().end().next_multiple_of(16);
        let o = regs
            .lookup_code(trampoline + 13)
            .expect("trampoline is mapped code");
        assert_eq!(o.kind(), CodeKind::JumpTable);
        assert_clean(&m);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. add_code and replacement
// ---------------------------------------------------------------------------------------------

#[test]
fn add_code_installs_the_function_in_its_slot_and_lookup_finds_it() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(8));
    let t = first_table(&module);

    let bytes = body(100, 0x90);
    let mut code = NewCode::function(3, &bytes);
    code.protected = &[10, 20];
    code.landing_pad = Some(90);
    let o = module.add_code(&code).expect("add");
    let start = o.instruction_start();
    assert_eq!(o.instructions(), AddressRange::new(start, start + 100));
    assert_eq!(o.kind(), CodeKind::Function);
    assert_eq!(o.index(), Some(3));
    assert_eq!(start % CODE_ALIGNMENT, 0);
    assert_eq!(module.function_code(3), Some(start));
    assert_eq!(module.code_count(), 2);
    assert_eq!(read(&m, start, 100), bytes);
    assert_eq!(read(&m, start + 100, 28), vec![INT3; 28], "padding");

    // Slot 3 jumps to the code, directly and through its far slot; the others still trap.
    assert_eq!(near_slot_target(&m, &t, 3), Some(start));
    for i in (0..8).filter(|&i| i != 3) {
        assert_eq!(near_slot_target(&m, &t, i), None, "slot {i}");
    }
    assert_eq!(module.slot_address_for(3, start), t.near_slot_addr(3));

    // PC lookup: first, middle and last byte; not the end.
    for pc in [start, start + 50, start + 99] {
        let found = module.lookup_code(pc).expect("found");
        assert!(Arc::ptr_eq(&found, &o), "pc {pc:#x}");
    }
    assert!(module.lookup_code(start + 100).is_none());
    assert!(regs.lookup_code(start + 100).is_none());

    // Trap data.
    let hit = regs.traps.lookup(start + 20).expect("protected");
    assert_eq!(hit.landing_pad(), start + 90);
    assert_eq!(hit.code(), o.instructions());
    assert!(regs.traps.lookup(start + 21).is_none());
    assert_clean(&m);
}

#[test]
fn replacing_a_function_frees_the_old_code_and_its_range_is_reused() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(8));
    let t = first_table(&module);

    let v1 = body(100, 0x90);
    let mut code = NewCode::function(5, &v1);
    code.protected = &[7];
    code.landing_pad = Some(50);
    let old = module.add_code(&code).expect("v1");
    let old_start = old.instruction_start();
    assert_eq!(regs.traps.len(), 1);

    let v2 = body(100, 0x66);
    let new = module.add_code(&NewCode::function(5, &v2)).expect("v2");
    let new_start = new.instruction_start();
    assert_ne!(new_start, old_start);
    assert_eq!(near_slot_target(&m, &t, 5), Some(new_start));
    assert_eq!(module.function_code(5), Some(new_start));
    assert_eq!(module.code_count(), 2, "table and v2");

    // The old object is freed: out of PC lookup and the trap table, dying, bytes INT3.
    assert!(old.is_dying());
    for pc in [old_start, old_start + 7, old_start + 99] {
        assert!(regs.lookup_code(pc).is_none(), "pc {pc:#x}");
        assert!(regs.traps.lookup(pc).is_none(), "pc {pc:#x}");
    }
    assert_eq!(regs.traps.len(), 0);
    assert_eq!(read(&m, old_start, 128), vec![INT3; 128]);

    // First fit hands the freed range out again, to code that is found there.
    let bytes = body(64, 0x90);
    let mut wrapper = NewCode::new(CodeKind::Wrapper, &bytes);
    wrapper.protected = &[7];
    wrapper.landing_pad = Some(8);
    let reuse = module.add_code(&wrapper).expect("reuse");
    assert_eq!(reuse.instruction_start(), old_start);
    let found = regs.lookup_code(old_start + 7).unwrap();
    assert!(Arc::ptr_eq(&found, &reuse));
    assert_eq!(
        regs.traps.lookup(old_start + 7).unwrap().landing_pad(),
        old_start + 8
    );
    // A wrapper is not installed anywhere.
    assert_eq!(near_slot_target(&m, &t, 5), Some(new_start));
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// 3. Relocations
// ---------------------------------------------------------------------------------------------

#[test]
fn call_slot_relocations_resolve_to_the_own_table() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(8));
    let t = first_table(&module);

    // Two calls (slots 2 and 7) and a jmp (slot 0): e8 rel32; e8 rel32; e9 rel32.
    let mut bytes = vec![0xE8, 0, 0, 0, 0, 0xE8, 0, 0, 0, 0, 0xE9, 0, 0, 0, 0];
    bytes.push(0xC3);
    let relocs = [
        Relocation {
            offset: 1,
            kind: RelocKind::CallSlot { slot: 2 },
        },
        Relocation {
            offset: 6,
            kind: RelocKind::CallSlot { slot: 7 },
        },
        Relocation {
            offset: 11,
            kind: RelocKind::CallSlot { slot: 0 },
        },
    ];
    let mut code = NewCode::function(1, &bytes);
    code.relocations = &relocs;
    let o = module.add_code(&code).expect("add");
    let start = o.instruction_start();
    let instrs = decode(&read(&m, start, bytes.len()), start);
    assert_eq!(instrs.len(), 4);
    assert_eq!(instrs[0].code(), Code::Call_rel32_64);
    assert_eq!(
        instrs[0].near_branch_target() as usize,
        t.near_slot_addr(2).unwrap()
    );
    assert_eq!(instrs[1].code(), Code::Call_rel32_64);
    assert_eq!(
        instrs[1].near_branch_target() as usize,
        t.near_slot_addr(7).unwrap()
    );
    assert_eq!(instrs[2].code(), Code::Jmp_rel32_64);
    assert_eq!(
        instrs[2].near_branch_target() as usize,
        t.near_slot_addr(0).unwrap()
    );
    assert_eq!(instrs[3].code(), Code::Retnq);
    // The object keeps its relocations.
    assert_eq!(o.relocations().collect::<Vec<_>>(), relocs);
    assert_clean(&m);
}

#[test]
fn internal_references_resolve_to_the_code_start_plus_offset() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(2));
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
    assert_clean(&m);
}

#[test]
fn bad_relocations_are_refused_and_change_nothing() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(4));
    module
        .add_code(&NewCode::function(0, &body(32, 0x90)))
        .unwrap();
    let before = state(&m, regs, &module);

    let nop_call = [0x90, 0, 0, 0, 0, 0xC3];
    let cases: [(&[u8], Relocation); 4] = [
        // Not a call or jmp opcode before the field.
        (
            &nop_call,
            Relocation {
                offset: 1,
                kind: RelocKind::CallSlot { slot: 1 },
            },
        ),
        // No opcode byte at all.
        (
            &[0, 0, 0, 0, 0xC3],
            Relocation {
                offset: 0,
                kind: RelocKind::CallSlot { slot: 1 },
            },
        ),
        // A slot the table does not have.
        (
            &CALL,
            Relocation {
                offset: 1,
                kind: RelocKind::CallSlot { slot: 4 },
            },
        ),
        // A rel8 jmp (eb) is not a rel32 branch.
        (
            &[0xEB, 0, 0, 0, 0, 0xC3],
            Relocation {
                offset: 1,
                kind: RelocKind::CallSlot { slot: 0 },
            },
        ),
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
            assert_eq!(state(&m, regs, &module), before, "{reloc:?}");
        }
    }
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// 4. The far path: a second code space more than 2 GiB away
// ---------------------------------------------------------------------------------------------

#[test]
fn a_far_code_space_gets_its_own_tables_and_slots_use_the_far_path() {
    let m = manager_with(ManagerConfig {
        max_code_space_size: GIB,
        ..ManagerConfig::default()
    });
    let regs = registries();
    let n = 8;
    let mut module = module(
        &m,
        regs,
        ModuleConfig {
            functions: n,
            growable: true,
            initial_reservation: 16 * PAGE,
            lazy_entry: None,
        },
    );
    let first_space = module.allocator().code_spaces()[0];
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
    fill_free_space(&mut module);

    // Function 5 no longer fits: a new code space, > 2 GiB away, with its own tables.
    let mut far_fn = NewCode::function(5, &CALL);
    far_fn.relocations = &relocs;
    let f5 = module.add_code(&far_fn).expect("f5");
    let spaces = module.allocator().code_spaces().to_vec();
    assert_eq!(spaces.len(), 2);
    let far_space = spaces[1];
    assert!(far_space.contains(f5.instruction_start()));
    assert!(far_space.start() - first_space.end() > 2 * GIB);
    assert_eq!(module.jump_tables().count(), 2);
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
        module.slot_address_for(1, f5.instruction_start()),
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

    // Patching slot 2 to a target in the far space: far path in t1, direct in t2.
    let target = f5_start + 0x40;
    module.patch_slot(2, target).expect("patch");
    assert_eq!(near_slot_target(&m, &t1, 2), t1.far_slot_addr(2));
    assert_eq!(far_slot_target(&m, &t1, 2), target);
    assert_eq!(read_u64(&m, t1.far_target_addr(2).unwrap()), target as u64);
    assert_eq!(near_slot_target(&m, &t2, 2), Some(target));
    // And back to a target in the first space.
    module.patch_slot(2, f0_start).expect("patch back");
    assert_eq!(near_slot_target(&m, &t1, 2), Some(f0_start));
    assert_eq!(near_slot_target(&m, &t2, 2), t2.far_slot_addr(2));
    assert_eq!(far_slot_target(&m, &t2, 2), f0_start);

    // More code in the far space reuses its table.
    let f6 = module.add_code(&NewCode::function(6, &CALL)).unwrap();
    assert!(far_space.contains(f6.instruction_start()));
    assert_eq!(module.jump_tables().count(), 2);
    assert_clean(&m);

    drop(module);
    assert_eq!(m.committed(), 0);
    assert!(regs.code.is_empty());
    drop(fillers);
    assert_eq!(m.stats().code_spaces, 0);
    assert_clean(&m);
}

#[test]
fn a_far_lazy_table_gets_its_own_trampoline() {
    let m = manager_with(ManagerConfig {
        max_code_space_size: GIB,
        ..ManagerConfig::default()
    });
    let regs = registries();
    let mut module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 5,
            growable: true,
            initial_reservation: 4 * PAGE,
            lazy_entry: Some(LAZY_ENTRY),
        },
    );
    let _fillers = far_fillers(&m);
    fill_free_space(&mut module);
    let f = module.add_code(&NewCode::function(4, &CALL)).unwrap();
    let far_space = module.allocator().code_spaces()[1];
    assert!(far_space.contains(f.instruction_start()));
    let t1 = table_in(&module, module.allocator().code_spaces()[0]);
    let t2 = table_in(&module, far_space);
    assert_eq!(near_slot_target(&m, &t1, 4), t1.far_slot_addr(4));
    assert_eq!(near_slot_target(&m, &t2, 4), Some(f.instruction_start()));
    // Put slot 4 back to lazy in both tables, then check every slot's lazy path.
    module.patch_slot(4, t1.lazy_slot_addr(4).unwrap()).unwrap();
    check_lazy_table(&m, &t1, LAZY_ENTRY, false);
    // (t2's slot 4 now goes to t1's lazy slot through its far slot; reset it to its own.)
    assert_eq!(near_slot_target(&m, &t2, 4), t2.far_slot_addr(4));
    module.patch_slot(4, t2.lazy_slot_addr(4).unwrap()).unwrap();
    check_lazy_table(&m, &t2, LAZY_ENTRY, false);
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// 5. patch_slot writes only through the alias
// ---------------------------------------------------------------------------------------------

#[test]
fn patch_slot_writes_only_through_the_alias() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(64));
    let t = first_table(&module);
    let a = module
        .add_code(&NewCode::function(10, &body(64, 0x90)))
        .unwrap();
    let b = module
        .add_code(&NewCode::function(11, &body(64, 0x90)))
        .unwrap();
    let alias = m.window().start();

    let table_pages: Vec<usize> = t.range().pages().collect();
    let raw = |m: &CodeManager<SoftMmu>| {
        m.with_mmu(|mmu| {
            table_pages
                .iter()
                .map(|&p| mmu.raw_entries(p))
                .collect::<Vec<_>>()
        })
    };
    // with_mmu locks the manager: take the window first.
    let window = m.window();
    let mapped_pages = |m: &CodeManager<SoftMmu>| {
        m.with_mmu(|mmu| {
            let mut pages = Vec::new();
            mmu.for_each_mapping(window, &mut |p, mapping| pages.push((p, mapping)));
            pages
        })
    };
    let raw_before = raw(&m);
    let pages_before = mapped_pages(&m);
    let flushes_before = m.with_mmu(|mmu| mmu.flush_stats());
    let stores_before = m.with_mmu(|mmu| mmu.leaf_stores());
    let frames_before = m.with_mmu(|mmu| mmu.free_frames());

    for (k, target) in [
        (3u32, a.instruction_start()),
        (3, b.instruction_start()),
        (63, b.instruction_start()),
    ] {
        module.patch_slot(k, target).expect("patch");
        assert_eq!(near_slot_target(&m, &t, k), Some(target));
    }

    // The table's leaves never changed (no flip to RW), nothing else got mapped or unmapped.
    assert_eq!(raw(&m), raw_before);
    for entries in &raw_before {
        assert_eq!(entries[3].unwrap() & !PTE_ADDR_MASK, PTE_PRESENT, "R+X");
    }
    assert_eq!(mapped_pages(&m), pages_before);
    assert_eq!(m.with_mmu(|mmu| mmu.free_frames()), frames_before);
    // The alias is unmapped again, its page tables kept.
    assert_eq!(leaf(&m, alias), Some(0));
    assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
    // Three patches of at most two stores each. Every alias use is one map and one unmap of the
    // alias leaf (two leaf stores) and one single-page invalidation (the alias page); no other
    // leaf changed (above), so the invalidations are all the alias page's. No full flush.
    let flushes = m.with_mmu(|mmu| mmu.flush_stats());
    let invalidations = flushes.single_pages - flushes_before.single_pages;
    assert!((3..=6).contains(&invalidations), "{invalidations}");
    assert_eq!(flushes.full, flushes_before.full);
    assert_eq!(
        m.with_mmu(|mmu| mmu.leaf_stores()) - stores_before,
        2 * invalidations
    );
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// 6. Free order, events and reference counts
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    published: bool,
    name: String,
    kind: CodeKind,
    range: AddressRange,
    /// At the time of the event: whether PC lookup found the code at its start.
    in_code_map: bool,
    /// At the time of the event: whether any byte of the range was a protected instruction.
    in_trap_table: bool,
}

/// Records events, and probes the registries when each event arrives.
struct Recorder {
    registries: &'static Registries,
    events: spin::Mutex<Vec<Event>>,
}

impl Recorder {
    fn leak(registries: &'static Registries) -> &'static Recorder {
        Box::leak(Box::new(Recorder {
            registries,
            events: spin::Mutex::new(Vec::new()),
        }))
    }

    fn record(&self, published: bool, e: &CodeEvent<'_>) {
        let in_code_map = self.registries.lookup_code(e.range.start()).is_some();
        let in_trap_table =
            (e.range.start()..e.range.end()).any(|pc| self.registries.traps.is_protected(pc));
        self.events.lock().push(Event {
            published,
            name: e.name.to_string(),
            kind: e.kind,
            range: e.range,
            in_code_map,
            in_trap_table,
        });
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock())
    }
}

impl CodeEventListener for Recorder {
    fn code_published(&self, e: &CodeEvent<'_>) {
        self.record(true, e);
    }

    fn code_freed(&self, e: &CodeEvent<'_>) {
        self.record(false, e);
    }
}

#[test]
fn events_report_names_and_frees_happen_after_unregistering() {
    let m = manager();
    let regs = registries();
    let rec = Recorder::leak(regs);
    let mut module = module(&m, regs, functions(8));
    module.set_listener(Some(rec));
    let t = first_table(&module);

    let bytes = body(40, 0x90);
    let mut code = NewCode::function(3, &bytes);
    code.protected = &[4];
    code.landing_pad = Some(30);
    let v1 = module.add_code(&code).unwrap();
    let mut named = NewCode::function(4, &bytes);
    named.name = Some("fib");
    let fib = module.add_code(&named).unwrap();
    let wrapper = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &bytes))
        .unwrap();
    let range = |o: &CodeObject| o.instructions();
    let published = |name: &str, kind, r| Event {
        published: true,
        name: name.into(),
        kind,
        range: r,
        // Published code is reported once it is registered.
        in_code_map: true,
        in_trap_table: false,
    };
    let mut expected_v1 = published("func[3]", CodeKind::Function, range(&v1));
    expected_v1.in_trap_table = true;
    assert_eq!(
        rec.take(),
        [
            expected_v1,
            published("fib", CodeKind::Function, range(&fib)),
            published("wrapper", CodeKind::Wrapper, range(&wrapper)),
        ]
    );

    // Replacing function 3 frees v1: by the time it is reported freed, it is out of PC lookup
    // and the trap table (its memory is returned right after).
    let v2 = module.add_code(&NewCode::function(3, &bytes)).unwrap();
    let freed = |name: &str, kind, r| Event {
        published: false,
        name: name.into(),
        kind,
        range: r,
        in_code_map: false,
        in_trap_table: false,
    };
    assert_eq!(
        rec.take(),
        [
            published("func[3]", CodeKind::Function, range(&v2)),
            freed("func[3]", CodeKind::Function, range(&v1)),
        ]
    );
    assert!(regs.traps.lookup(v1.instruction_start() + 4).is_none());
    assert!(regs.lookup_code(v1.instruction_start()).is_none());

    // free_code frees a wrapper, but not installed code.
    assert_eq!(
        module.free_code(v2.instruction_start()),
        Err(ModuleError::UnknownCode {
            start: v2.instruction_start()
        })
    );
    assert_eq!(
        module.free_code(wrapper.instruction_start() + 1),
        Err(ModuleError::UnknownCode {
            start: wrapper.instruction_start() + 1
        })
    );
    module.free_code(wrapper.instruction_start()).unwrap();
    assert_eq!(
        rec.take(),
        [freed("wrapper", CodeKind::Wrapper, range(&wrapper))]
    );
    assert!(regs.lookup_code(wrapper.instruction_start()).is_none());

    // Dropping the module frees the rest, each one unregistered before it is reported.
    drop(module);
    let mut events = rec.take();
    events.sort_by_key(|e| e.range.start());
    let mut expected = vec![
        freed("func[3]", CodeKind::Function, range(&v2)),
        freed("fib", CodeKind::Function, range(&fib)),
    ];
    let table = events
        .iter()
        .find(|e| e.kind == CodeKind::JumpTable)
        .cloned()
        .expect("table freed");
    assert_eq!(table.range.start(), t.base());
    expected.push(freed("jump-table", CodeKind::JumpTable, table.range));
    expected.sort_by_key(|e| e.range.start());
    assert_eq!(events, expected);
    assert!(regs.code.is_empty());
    assert!(regs.traps.is_empty());
    assert_eq!(m.committed(), 0);
    assert_clean(&m);
}

#[test]
fn a_held_reference_keeps_replaced_code_until_free_dead_code() {
    let m = manager();
    let regs = registries();
    let rec = Recorder::leak(regs);
    let mut module = module(&m, regs, functions(4));
    module.set_listener(Some(rec));

    // Old code spanning three pages, the middle one its own, so "still committed" is visible.
    let bytes = body(3 * PAGE, 0x90);
    let mut code = NewCode::function(2, &bytes);
    code.protected = &[100];
    code.landing_pad = Some(200);
    let old = module.add_code(&code).unwrap();
    let start = old.instruction_start();
    assert_eq!(old.ref_count(), 1);
    assert!(
        old.inc_ref(),
        "the test holds a reference (e.g. code on a stack)"
    );

    let new = module
        .add_code(&NewCode::function(2, &body(64, 0x90)))
        .unwrap();
    let t = first_table(&module);
    assert_eq!(near_slot_target(&m, &t, 2), Some(new.instruction_start()));
    // Still alive: found, protected, committed, bytes intact; nothing freed; 2 code + table.
    assert_eq!(old.ref_count(), 1);
    assert!(!old.is_dying());
    assert!(Arc::ptr_eq(&regs.lookup_code(start + 10).unwrap(), &old));
    assert_eq!(
        regs.traps.lookup(start + 100).unwrap().landing_pad(),
        start + 200
    );
    assert_eq!(read(&m, start, 3 * PAGE), bytes);
    assert_eq!(module.code_count(), 3);
    assert_eq!(module.free_dead_code(), 0, "nothing is dying yet");
    assert!(rec.take().iter().all(|e| e.published));

    // The test drops its reference: the object is dying, and the next scan frees it.
    assert_eq!(old.dec_ref(), DecRef::Dead);
    assert!(old.is_dying());
    assert!(
        regs.lookup_code(start).is_some(),
        "freed by free_dead_code, not by dec_ref"
    );
    let committed = m.committed();
    assert_eq!(module.free_dead_code(), 1);
    assert!(regs.lookup_code(start).is_none());
    assert!(regs.lookup_code(start + 3 * PAGE - 1).is_none());
    // Every page wholly inside the old code is decommitted (pages shared with live code stay).
    let own = AddressRange::new(
        start.next_multiple_of(PAGE),
        (start + 3 * PAGE) & !(PAGE - 1),
    );
    assert!(own.pages().count() >= 2);
    for page in own.pages() {
        assert_eq!(leaf(&m, page).unwrap_or(0), 0, "page {page:#x} decommitted");
    }
    assert!(regs.traps.lookup(start + 100).is_none());
    assert_eq!(module.code_count(), 2);
    assert!(m.committed() <= committed - own.pages().count() * PAGE);
    let events = rec.take();
    assert_eq!(events.len(), 1);
    assert!(!events[0].published && !events[0].in_code_map && !events[0].in_trap_table);
    assert_eq!(events[0].range, old.instructions());
    assert_eq!(events[0].name, "func[2]");
    assert_eq!(module.free_dead_code(), 0);
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// 7. Dropping a module
// ---------------------------------------------------------------------------------------------

#[test]
fn dropping_a_module_frees_everything_it_owns() {
    let m = manager();
    let regs = registries();
    let mut b = module(&m, regs, functions(3));
    let ob = b.add_code(&NewCode::function(1, &body(64, 0x90))).unwrap();
    let mut pb = NewCode::new(CodeKind::Wrapper, &CALL);
    pb.protected = &[0];
    pb.landing_pad = Some(5);
    b.add_code(&pb).unwrap();
    let committed_b = m.committed();
    let traps_b = regs.traps.len();
    let code_b = regs.code.len();
    assert_eq!(code_b, 3);

    let mut a = module(
        &m,
        regs,
        ModuleConfig {
            functions: 6,
            lazy_entry: Some(LAZY_ENTRY),
            ..ModuleConfig::default()
        },
    );

    let mut ranges = Vec::new();
    for i in 0..6 {
        let bytes = body(100 + 300 * i as usize, 0x90);
        let mut code = NewCode::function(i, &bytes);
        code.protected = &[1, 2];
        code.landing_pad = Some(3);
        ranges.push(a.add_code(&code).unwrap().instructions());
    }
    // A replaced one and a wrapper too.
    ranges.push(
        a.add_code(&NewCode::function(0, &body(50, 0x90)))
            .unwrap()
            .instructions(),
    );
    ranges.push(
        a.add_code(&NewCode::new(CodeKind::Wrapper, &body(10, 0x90)))
            .unwrap()
            .instructions(),
    );
    ranges.push(first_table(&a).range());
    assert_eq!(
        regs.traps.len(),
        traps_b + 5,
        "the replaced function 0 released its entry"
    );
    assert_eq!(a.code_count(), 8, "table, functions 0-5, wrapper");
    assert!(m.committed() > committed_b);
    let spaces_a = a.allocator().code_spaces().to_vec();

    drop(a);
    for r in &ranges {
        for pc in [r.start(), r.end() - 1] {
            assert!(regs.lookup_code(pc).is_none(), "pc {pc:#x}");
            assert!(regs.traps.lookup(pc).is_none());
        }
    }
    assert_eq!(regs.traps.len(), traps_b);
    assert_eq!(regs.code.len(), code_b);
    assert_eq!(m.committed(), committed_b);
    for s in spaces_a {
        assert!(!m.code_spaces().contains(&s));
    }
    // b is untouched.
    assert!(Arc::ptr_eq(
        &regs.lookup_code(ob.instruction_start()).unwrap(),
        &ob
    ));
    assert_eq!(b.code_count(), 3);
    assert_clean(&m);

    drop(b);
    assert!(regs.code.is_empty());
    assert!(regs.traps.is_empty());
    assert_eq!(m.committed(), 0);
    assert_eq!(m.stats().code_spaces, 0);
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// 8. Errors change nothing
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_code_is_refused_and_changes_nothing() {
    let m = manager();
    let regs = registries();
    let mut module = module(&m, regs, functions(4));
    module
        .add_code(&NewCode::function(1, &body(100, 0x90)))
        .unwrap();
    let before = state(&m, regs, &module);
    let bytes = body(64, 0x90);

    // Index out of range.
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
        assert_eq!(state(&m, regs, &module), before);
    }

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
        assert_eq!(state(&m, regs, &module), before);
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
        assert_eq!(state(&m, regs, &module), before, "{error:?}");
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
    assert_eq!(state(&m, regs, &module), before);
    assert_clean(&m);
}

#[test]
fn a_full_fixed_module_refuses_code_and_changes_nothing() {
    let m = manager();
    let regs = registries();
    let mut module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 4,
            growable: false,
            initial_reservation: 2 * PAGE,
            lazy_entry: None,
        },
    );
    fill_free_space(&mut module);
    let before = state(&m, regs, &module);
    assert_eq!(
        module
            .add_code(&NewCode::function(0, &CALL))
            .map(|o| o.instruction_start()),
        Err(ModuleError::Code(CodeError::NotGrowable))
    );
    assert_eq!(state(&m, regs, &module), before);
    assert_clean(&m);
}

/// A code space whose jump tables could not be created (commit limit) must still get them when
/// code later lands in it: every code space reaches a table, so `CallSlot` relocations resolve.
#[test]
fn a_space_whose_tables_failed_gets_them_with_its_next_code() {
    let m = manager_with(ManagerConfig {
        max_code_space_size: GIB,
        max_committed: 4 * PAGE,
        ..ManagerConfig::default()
    });
    let regs = registries();
    let mut module = module(
        &m,
        regs,
        ModuleConfig {
            functions: 4,
            growable: true,
            initial_reservation: 2 * PAGE,
            lazy_entry: None,
        },
    );
    let _fillers = far_fillers(&m);
    fill_free_space(&mut module);
    assert_eq!(m.committed(), 2 * PAGE, "a page of tables, a page of code");

    // Two pages of code in a new, far space: the code commits the last pages allowed, the
    // tables (a page of their own) need one more.
    let page = body(2 * PAGE, 0x90);
    let r = module.add_code(&NewCode::function(1, &page));
    assert!(
        matches!(r, Err(ModuleError::Code(CodeError::CommitLimit { .. }))),
        "{:?}",
        r.map(|o| o.instruction_start())
    );
    assert_eq!(m.committed(), 2 * PAGE);
    assert_eq!(module.jump_tables().count(), 1);

    // Small code with a call: one page for it, one for the far space's tables.
    let relocs = [Relocation {
        offset: 1,
        kind: RelocKind::CallSlot { slot: 3 },
    }];
    let mut code = NewCode::function(2, &CALL);
    code.relocations = &relocs;
    let o = module
        .add_code(&code)
        .expect("code in the far space with a call");
    let far_space = module.allocator().code_spaces()[1];
    assert!(far_space.contains(o.instruction_start()));
    assert_eq!(module.jump_tables().count(), 2);
    let t2 = table_in(&module, far_space);
    let instrs = decode(
        &read(&m, o.instruction_start(), CALL.len()),
        o.instruction_start(),
    );
    assert_eq!(
        instrs[0].near_branch_target() as usize,
        t2.near_slot_addr(3).unwrap()
    );
    assert_eq!(near_slot_target(&m, &t2, 2), Some(o.instruction_start()));
    assert_clean(&m);
}

// ---------------------------------------------------------------------------------------------
// Code pointer table: functions share their index's handle, wrappers get their own.
// ---------------------------------------------------------------------------------------------

#[test]
fn code_pointers_follow_functions_and_wrappers() {
    use codespace::code_pointer_table::CodePointerTable;
    let table: &'static CodePointerTable = Box::leak(Box::new(CodePointerTable::with_capacity(16)));
    let m = manager();
    let mut module = module(&m, registries(), functions(2));
    module.set_code_pointer_table(Some(table));
    let v1 = module
        .add_code(&NewCode::function(1, &[0xB8, 1, 0, 0, 0, 0xC3]))
        .unwrap()
        .instruction_start();
    let handle = module
        .function_pointer(1)
        .expect("function 1 has a code pointer");
    assert_eq!(table.get(handle), v1);
    // A new version of the function keeps the handle; the entry moves with one store.
    let v2 = module
        .add_code(&NewCode::function(1, &[0xB8, 2, 0, 0, 0, 0xC3]))
        .unwrap()
        .instruction_start();
    assert_eq!(module.function_pointer(1), Some(handle));
    assert_eq!(table.get(handle), v2);
    // Anonymous code gets a handle of its own, freed (reset to the trap address) with the code.
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap()
        .instruction_start();
    let wh = module
        .code_pointer(w)
        .expect("wrapper has its own code pointer");
    assert_ne!(wh, handle);
    assert_eq!(table.get(wh), w);
    assert_eq!(table.len(), 2);
    module.free_code(w).unwrap();
    assert_eq!(table.get(wh), table.trap_address());
    assert_eq!(table.len(), 1);
    drop(module);
    assert_eq!(
        table.len(),
        0,
        "dropping the module frees its functions' handles"
    );
}

// ---------------------------------------------------------------------------------------------
// Lifetimes: references, jump tables and code pointers survive failed or misdirected frees.
// ---------------------------------------------------------------------------------------------

#[test]
fn free_code_refuses_replaced_code_someone_still_holds() {
    let m = manager();
    let mut module = module(&m, registries(), functions(1));
    let v1 = module
        .add_code(&NewCode::function(0, &[0x90, 0xC3]))
        .unwrap();
    assert!(v1.inc_ref(), "a stack frame holds v1");
    module.add_code(&NewCode::function(0, &[0xC3])).unwrap();
    // The module already gave up its reference on replacement: nothing left for it to drop.
    assert!(matches!(
        module.free_code(v1.instruction_start()),
        Err(ModuleError::UnknownCode { .. })
    ));
    assert!(
        module.lookup_code(v1.instruction_start()).is_some(),
        "v1 still mapped"
    );
    assert_eq!(v1.dec_ref(), DecRef::Dead);
    assert_eq!(module.free_dead_code(), 1);
    assert!(module.lookup_code(v1.instruction_start()).is_none());
}

#[test]
fn jump_tables_are_never_freed_before_the_module() {
    let m = manager();
    let mut module = module(&m, registries(), functions(2));
    let base = module.jump_tables().next().unwrap().base();
    assert!(matches!(
        module.free_code(base),
        Err(ModuleError::UnknownCode { .. })
    ));
    let table = module.lookup_code(base).expect("table is registered");
    assert_eq!(table.kind(), CodeKind::JumpTable);
    assert_eq!(
        table.dec_ref(),
        DecRef::Dead,
        "an unbalanced dec_ref by some holder"
    );
    assert_eq!(
        module.free_dead_code(),
        0,
        "tables stay until the module is dropped"
    );
    assert!(module.lookup_code(base).is_some());
    let code = module.add_code(&NewCode::function(1, &[0xC3])).unwrap();
    assert_ne!(code.instruction_start(), base);
    assert_clean(&m);
}

#[test]
fn a_failed_add_leaves_no_code_pointer_behind() {
    use codespace::code_pointer_table::CodePointerTable;
    let table: &'static CodePointerTable = Box::leak(Box::new(CodePointerTable::with_capacity(4)));
    let regs = registries();
    // Two managers over windows one page apart share the registries: b's tables miss a's code,
    // b's first function lands on it.
    let m1 = manager();
    let shifted = AddressRange::new(BASE - PAGE, BASE - PAGE + GIB);
    let m2 = CodeManager::new(SoftMmu::new(1 << 12), shifted, ManagerConfig::default()).unwrap();
    let mut a = module(&m1, regs, functions(0));
    a.add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3; 64]))
        .unwrap();
    let mut b = module(&m2, regs, functions(1));
    b.set_code_pointer_table(Some(table));
    let r = b.add_code(&NewCode::function(0, &[0xC3; 64]));
    assert!(
        matches!(r, Err(ModuleError::CodeMap(_))),
        "{:?}",
        r.map(|o| o.instruction_start())
    );
    assert_eq!(b.function_pointer(0), None);
    assert_eq!(table.len(), 0);
    assert_eq!(b.function_code(0), None);
}

#[test]
fn flip_mode_never_touches_jump_table_pages() {
    let m = manager_with(ManagerConfig {
        protection: codespace::ProtectionMode::Flip,
        ..ManagerConfig::default()
    });
    let mut module = module(&m, registries(), functions(4));
    let table = module.jump_tables().next().unwrap().range().page_expand();
    let entries = |m: &CodeManager<SoftMmu>| -> Vec<[Option<u64>; 4]> {
        m.with_mmu(|mmu| table.pages().map(|p| mmu.raw_entries(p)).collect())
    };
    let before = entries(&m);
    let stores = m.with_mmu(|mmu| mmu.leaf_stores());
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
    assert!(
        m.with_mmu(|mmu| mmu.leaf_stores()) > stores,
        "code pages were flipped"
    );
    assert_eq!(entries(&m), before, "table pages' entries never changed");
    assert!(!table.contains(f.instruction_start()) && !table.contains(g.instruction_start()));
    assert!(!m.with_mmu(|mmu| mmu.wx_ever_observed()));
    assert_clean(&m);
}
