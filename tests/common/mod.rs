//! Helpers shared by the host test binaries: the simulated machine (a `SoftMmu` with per-CPU
//! TLBs, 4 CPUs and a direct map), grace domains and registries per test, the soundness check
//! every test ends with, jump-table decoding, and a small deterministic RNG.
//!
//! Each binary uses a subset, hence the `allow(dead_code)`.
#![allow(dead_code)]

use std::sync::Arc;

use codespace::code_object::{CodeKind, CodeObject};
use codespace::jump_table::{JumpTableLayout, FAR_SLOT_SIZE, FAR_SLOT_TARGET_OFFSET};
use codespace::jump_table::{LAZY_SLOT_SIZE, NEAR_SLOT_SIZE};
use codespace::mmu::soft::{SoftMmu, Violation};
use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig,
    ProtectionMode, PublishedCode, PAGE_SIZE,
};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// Start of a 512 GiB PML4 slot in the higher half (PML4 index 384), the code window.
pub const BASE: usize = 0xFFFF_C000_0000_0000;
/// The simulated kernel's direct map of all physical frames (PML4 index 256).
pub const DIRECT_MAP: usize = 0xFFFF_8000_0000_0000;
pub const PAGE: usize = PAGE_SIZE;
pub const GIB: usize = 1 << 30;
pub const INT3: u8 = 0xCC;
/// A far lazy-compile entry (think kernel text): out of rel32 reach from the window.
pub const LAZY_ENTRY: usize = 0x20_0000;

/// x86 leaf bits, as the software MMU stores them.
pub const PTE_PRESENT: u64 = 1;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_NO_EXECUTE: u64 = 1 << 63;
pub const PTE_ADDR: u64 = 0x000F_FFFF_FFFF_F000;
pub const RW_NX: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE;
pub const R_X: u64 = PTE_PRESENT;

/// The whole PML4 slot.
pub fn slot() -> AddressRange {
    AddressRange::new(BASE, BASE + (512 << 30))
}

/// A window of `pages` pages at the start of the slot.
pub fn window(pages: usize) -> AddressRange {
    AddressRange::new(BASE, BASE + pages * PAGE)
}

/// A 4-CPU machine of `frames` frames with a direct map.
pub fn machine(frames: usize) -> SoftMmu {
    SoftMmu::new(frames).with_direct_map(DIRECT_MAP)
}

/// A machine for `mode`: flip mode writes live pages by making them non-executable, which is
/// refused with more than one CPU online, so it gets one CPU.
pub fn machine_for(frames: usize, mode: ProtectionMode) -> SoftMmu {
    let cpus = match mode {
        ProtectionMode::Flip => 1,
        ProtectionMode::Alias => 4,
    };
    SoftMmu::with_cpus(frames, cpus).with_direct_map(DIRECT_MAP)
}

/// How a suite's manager places and writes code: the protection mode, and whether code lives
/// on 2 MiB ROX pages (issue 20). Suites loop over [`MODES`] instead of copying tests per mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub protection: ProtectionMode,
    pub rox: bool,
}

impl Mode {
    pub const ALIAS: Mode = Mode {
        protection: ProtectionMode::Alias,
        rox: false,
    };
    pub const FLIP: Mode = Mode {
        protection: ProtectionMode::Flip,
        rox: false,
    };
    /// Code on 2 MiB pages mapped R+X once, written through the alias only.
    pub const ROX: Mode = Mode {
        protection: ProtectionMode::Alias,
        rox: true,
    };

    /// `config` with this mode.
    pub fn manager(self, config: ManagerConfig) -> ManagerConfig {
        ManagerConfig {
            protection: self.protection,
            rox_code: self.rox,
            ..config
        }
    }

    /// `config` asking for ROX code spaces in the ROX mode.
    pub fn module(self, config: ModuleConfig) -> ModuleConfig {
        ModuleConfig {
            rox: self.rox,
            ..config
        }
    }

    /// `config` asking for ROX code spaces in the ROX mode.
    pub fn allocator(self, config: AllocatorConfig) -> AllocatorConfig {
        AllocatorConfig {
            rox: self.rox,
            ..config
        }
    }

    /// While code is live in a run that claims the mode: it is on ROX pages, none fell back.
    pub fn assert_in_use(self, m: &CodeManager<SoftMmu>) {
        if self.rox {
            let s = m.stats();
            assert!(
                s.rox_spaces > 0 && s.huge_pages > 0,
                "no ROX space in use: {s:?}"
            );
            assert_eq!(s.rox_fallbacks, 0, "ROX spaces fell back: {s:?}");
        }
    }

    /// After a run that claimed the mode: no ROX space fell back.
    pub fn assert_claimed(self, m: &CodeManager<SoftMmu>) {
        if self.rox {
            let s = m.stats();
            assert_eq!(s.rox_fallbacks, 0, "ROX spaces fell back: {s:?}");
        }
    }
}

/// Every mode the parameterized suites run in.
pub const MODES: [Mode; 3] = [Mode::ALIAS, Mode::FLIP, Mode::ROX];

pub fn config(protection: ProtectionMode) -> ManagerConfig {
    ManagerConfig {
        protection,
        ..ManagerConfig::default()
    }
}

/// A manager over `window` on (a handle of) `machine`.
pub fn manager_on(
    machine: &SoftMmu,
    window: AddressRange,
    config: ManagerConfig,
) -> CodeManager<SoftMmu> {
    CodeManager::new(machine.clone(), window, config).expect("manager")
}

/// A 4-CPU machine with a direct map and a manager over the whole slot.
pub fn rig(frames: usize, config: ManagerConfig) -> (SoftMmu, CodeManager<SoftMmu>) {
    let m = match config.protection {
        ProtectionMode::Flip => machine_for(frames, ProtectionMode::Flip),
        ProtectionMode::Alias => machine(frames),
    };
    let manager = manager_on(&m, slot(), config);
    (m, manager)
}

/// A grace domain of its own for one test (tests run in parallel and must not end each other's
/// grace periods), with one CPU that the test reports quiescent states for.
pub fn grace() -> &'static GraceDomain {
    let g: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
    // SAFETY: CPU 0 is the test thread; no other CPU index reads what the domain protects.
    unsafe { g.set_possible_cpus(1) };
    g
}

/// Registries on a grace domain of their own; `CodeModule` wants them `'static`.
pub fn registries() -> &'static Registries {
    Box::leak(Box::new(Registries::new(grace())))
}

/// Passes a whole grace period: CPU 0 reports a quiescent state and the epoch advances, twice.
pub fn pass_grace(regs: &Registries) {
    let g = regs.grace();
    for _ in 0..2 {
        // SAFETY: the test thread (CPU 0) holds nothing from a lookup and runs no generated code.
        unsafe { g.quiescent(0) };
        g.try_advance();
    }
}

/// Passes a grace period and drops what dropped modules left to it; returns how many.
pub fn settle(regs: &Registries) -> usize {
    pass_grace(regs);
    regs.grace().reclaim()
}

pub fn module(
    m: &CodeManager<SoftMmu>,
    regs: &'static Registries,
    config: ModuleConfig,
) -> CodeModule<SoftMmu> {
    CodeModule::new(m, regs, config).expect("module")
}

pub fn functions(n: u32) -> ModuleConfig {
    ModuleConfig {
        functions: n,
        ..ModuleConfig::default()
    }
}

/// No broken promise recorded by the machine, never a W+X leaf, and a clean audit.
pub fn assert_sound(machine: &SoftMmu, m: &CodeManager<SoftMmu>) {
    let v: Vec<Violation> = machine.violations();
    assert!(v.is_empty(), "TLB model violations: {v:#?}");
    assert!(!machine.wx_ever_observed(), "a leaf was W+X");
    let audit = m.audit().expect("audit");
    assert!(audit.is_clean(), "{audit:?}");
}

/// [`assert_sound`], and no frame leaked: the data frames in use are exactly the committed
/// pages of `m` (for machines with one manager).
pub fn assert_sound_no_leak(machine: &SoftMmu, m: &CodeManager<SoftMmu>) {
    assert_sound(machine, m);
    assert_eq!(
        machine.snapshot().data_frames.len() * PAGE,
        m.committed(),
        "data frames in use vs committed bytes"
    );
}

/// `len` bytes at `addr`, read back through the manager.
pub fn read(m: &CodeManager<SoftMmu>, addr: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    m.read(addr, &mut buf).expect("read");
    buf
}

pub fn read_u64(m: &CodeManager<SoftMmu>, addr: usize) -> u64 {
    u64::from_le_bytes(read(m, addr, 8).try_into().unwrap())
}

/// The raw leaf (PT) entry of `addr`'s page, `None` when a table on the walk is missing.
pub fn leaf(machine: &SoftMmu, addr: usize) -> Option<u64> {
    machine.raw_entries(addr)[3]
}

/// The flag bits of `addr`'s leaf entry (0 when not mapped).
pub fn leaf_flags(machine: &SoftMmu, addr: usize) -> u64 {
    leaf(machine, addr).unwrap_or(0) & !PTE_ADDR
}

pub fn is_mapped(m: &CodeManager<SoftMmu>, addr: usize) -> bool {
    m.query(addr).expect("query").is_some()
}

/// `len` bytes of code: `nop`s then `ret`.
pub fn body(len: usize, nop: u8) -> Vec<u8> {
    let mut b = vec![nop; len];
    *b.last_mut().unwrap() = 0xC3;
    b
}

/// `call rel32` (to be relocated) then `ret`.
pub const CALL: [u8; 6] = [0xE8, 0, 0, 0, 0, 0xC3];

/// Decodes all of `bytes` as if at `ip`; every instruction must be valid.
pub fn decode(bytes: &[u8], ip: usize) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let i = decoder.decode();
        assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
        out.push(i);
    }
    out
}

/// Decodes an 8-byte near slot at `addr`: `Some(target)` for `jmp rel32; int3 ×3`, `None` for
/// eight INT3s. Anything else fails.
pub fn decode_near_slot(bytes: &[u8], addr: usize) -> Option<usize> {
    let instrs = decode(bytes, addr);
    if instrs.iter().all(|x| x.mnemonic() == Mnemonic::Int3) {
        assert_eq!(instrs.len(), NEAR_SLOT_SIZE);
        return None;
    }
    assert_eq!(instrs.len(), 4, "near slot at {addr:#x}: {instrs:?}");
    assert_eq!(
        instrs[0].code(),
        Code::Jmp_rel32_64,
        "near slot at {addr:#x}"
    );
    assert!(instrs[1..].iter().all(|x| x.mnemonic() == Mnemonic::Int3));
    Some(instrs[0].near_branch_target() as usize)
}

/// Near slot `i` of `layout` as the manager reads it (see [`decode_near_slot`]).
pub fn near_slot_target(
    m: &CodeManager<SoftMmu>,
    layout: &JumpTableLayout,
    i: u32,
) -> Option<usize> {
    let addr = layout.near_slot_addr(i).unwrap();
    decode_near_slot(&read(m, addr, NEAR_SLOT_SIZE), addr)
}

/// Near slot `i` of `layout` as CPU `cpu` would execute it (its TLB and instruction view).
pub fn executed_slot_target(
    machine: &SoftMmu,
    cpu: usize,
    layout: &JumpTableLayout,
    i: u32,
) -> Option<usize> {
    let addr = layout.near_slot_addr(i).unwrap();
    let mut bytes = [0; NEAR_SLOT_SIZE];
    machine
        .exec_as(cpu, addr, &mut bytes)
        .expect("slot executable");
    decode_near_slot(&bytes, addr)
}

/// Where slot `i` of `layout` finally jumps as CPU `cpu` executes it: through the far slot when
/// the near slot jumps there.
pub fn executed_destination(
    machine: &SoftMmu,
    cpu: usize,
    layout: &JumpTableLayout,
    i: u32,
) -> Option<usize> {
    let near = executed_slot_target(machine, cpu, layout, i)?;
    if Some(near) != layout.far_slot_addr(i) {
        return Some(near);
    }
    let mut target = [0; 8];
    machine
        .exec_as(cpu, near + FAR_SLOT_TARGET_OFFSET, &mut target)
        .expect("far slot executable");
    Some(u64::from_le_bytes(target) as usize)
}

/// The qword operand address of `jmp qword ptr [rip+disp]`.
pub fn indirect_jmp_operand(instr: &Instruction) -> usize {
    assert_eq!(instr.code(), Code::Jmp_rm64, "{instr:?}");
    assert_eq!(instr.op0_kind(), OpKind::Memory);
    assert_eq!(instr.memory_base(), Register::RIP);
    assert!(instr.is_ip_rel_memory_operand());
    instr.ip_rel_memory_address() as usize
}

/// Decodes far slot `i` of `layout` (`jmp [rip+2]; nop`) and returns the qword it jumps through.
pub fn far_slot_target(m: &CodeManager<SoftMmu>, layout: &JumpTableLayout, i: u32) -> usize {
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

/// Checks lazy slot `i` of `layout`: `push i; jmp trampoline`; returns the trampoline.
pub fn lazy_slot_trampoline(m: &CodeManager<SoftMmu>, layout: &JumpTableLayout, i: u32) -> usize {
    let slot = layout.lazy_slot_addr(i).unwrap();
    let instrs = decode(&read(m, slot, LAZY_SLOT_SIZE), slot);
    assert_eq!(instrs.len(), 2, "lazy slot {i}: {instrs:?}");
    assert_eq!(instrs[0].code(), Code::Pushq_imm32);
    assert_eq!(instrs[0].immediate32(), i);
    assert_eq!(instrs[1].code(), Code::Jmp_rel32_64);
    instrs[1].near_branch_target() as usize
}

/// The single jump table of `module` whose region lies in `space`.
pub fn table_in(module: &CodeModule<SoftMmu>, space: AddressRange) -> JumpTableLayout {
    let tables: Vec<_> = module
        .jump_tables()
        .unwrap()
        .into_iter()
        .filter(|t| space.contains(t.base()))
        .collect();
    assert_eq!(tables.len(), 1, "one table in {space:?}");
    tables[0]
}

pub fn first_table(module: &CodeModule<SoftMmu>) -> JumpTableLayout {
    module.jump_tables().unwrap()[0]
}

/// Whether PC lookup finds exactly `object` at `pc`.
pub fn finds(regs: &Registries, pc: usize, object: &CodeObject) -> bool {
    regs.lookup_code(pc)
        .is_some_and(|o| core::ptr::eq(&*o, object))
}

/// Fills the free rest of the module's (single, contiguous) free space with a wrapper.
pub fn fill_free_space(module: &CodeModule<SoftMmu>) -> Arc<CodeObject> {
    let stats = module.stats().unwrap();
    let rest = stats.reserved - stats.allocated;
    assert!(rest > 0);
    let filler = vec![INT3; rest];
    let spaces = module.code_spaces().unwrap().len();
    let o = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &filler))
        .expect("filler");
    assert_eq!(module.code_spaces().unwrap().len(), spaces, "filler fits");
    o
}

/// Three other allocators on `m` reserving 1 GiB each, so that the window's next free range is
/// more than 2 GiB above everything reserved so far. They commit nothing.
pub fn far_fillers(m: &CodeManager<SoftMmu>) -> Vec<CodeAllocator<SoftMmu>> {
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

/// xorshift64*: deterministic, no crates.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    /// A code size in `1..=3 pages`, skewed small.
    pub fn code_size(&mut self) -> usize {
        let max = match self.below(8) {
            0..=3 => 128,
            4 | 5 => 1024,
            6 => PAGE,
            _ => 3 * PAGE,
        };
        1 + self.below(max)
    }
}

/// [`CodeAllocator::free`] on the software machine.
pub fn free_published(
    a: &mut CodeAllocator<SoftMmu>,
    code: PublishedCode,
) -> Result<(), FreeError<PublishedCode>> {
    // SAFETY: no real CPU ever executes the software machine's code pages, so nothing can be
    // running what a host test frees; what the machine models (TLBs, fetched bytes) it checks
    // itself and records as violations, which every test asserts are none.
    unsafe { a.free(code) }
}

/// [`CodeAllocator::patch`] on the software machine.
pub fn patch_tables(
    a: &CodeAllocator<SoftMmu>,
    tables: &[&PublishedCode],
    stores: &[(usize, u64)],
) -> Result<(), CodeError> {
    // SAFETY: no real CPU ever executes the software machine's code pages or jumps through its
    // slots: any value is as good as another to the host tests.
    unsafe { a.patch(tables, stores) }
}
