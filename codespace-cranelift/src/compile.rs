//! A compiled function, as the module keeps it until it is finalized: machine code, its
//! relocations named as the module names things, and its trap records sorted by the exception
//! each raises.

use alloc::vec::Vec;

use cranelift_codegen::binemit::{Addend, Reloc};
use cranelift_codegen::ir::{self, ExternalName, TrapCode};
use cranelift_codegen::{CompiledCode, FinalizedRelocTarget};

use codespace::trap::TrapVector;

use crate::module::{FuncId, ModuleRelocTarget};

/// A relocation of a compiled function (`cranelift_module::ModuleReloc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleReloc {
    /// Offset of the field in the function's code.
    pub offset: u32,
    /// How to write it.
    pub kind: Reloc,
    /// What it refers to.
    pub name: ModuleRelocTarget,
    /// Added to the target's address.
    pub addend: Addend,
}

/// One trap record: which instruction, Cranelift's code, and the exception the CPU raises there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapRecord {
    /// Offset of the trapping instruction.
    pub offset: u32,
    /// Cranelift's trap code.
    pub code: TrapCode,
    /// The exception it raises: #UD for `ud2`, #DE for a division, #PF for a load or store.
    pub vector: TrapVector,
}

/// What Cranelift compiled, in codespace's terms: what `define_function` keeps until
/// `finalize_definitions`, and what a JIT of its own (lazy slots, tier-up from any CPU) builds
/// its `NewCode` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledFunction {
    /// The machine code, relocations not yet applied.
    pub bytes: Vec<u8>,
    /// Its relocations, named as the module names things (namespace 0: functions, 1: data).
    pub relocs: Vec<ModuleReloc>,
    /// Its trap records, sorted by offset, one per instruction.
    pub traps: Vec<TrapRecord>,
    /// `(pc_offset, source_location)` where the IR's source location changes, sorted.
    pub source_positions: Vec<(u32, u32)>,
}

impl CompiledFunction {
    /// Takes what `code` (compiled from `func`, function `id` of its module: relocations to
    /// offsets in its own code name it) holds.
    #[must_use]
    pub fn new(id: FuncId, func: &ir::Function, code: &CompiledCode) -> Self {
        let bytes = code.code_buffer().to_vec();
        let buffer = &code.buffer;
        let relocs = buffer
            .relocs()
            .iter()
            .map(|r| ModuleReloc {
                offset: r.offset,
                kind: r.kind,
                name: reloc_target(id, func, &r.target),
                addend: r.addend,
            })
            .collect();
        let mut traps: Vec<TrapRecord> = buffer
            .traps()
            .iter()
            .map(|t| TrapRecord {
                offset: t.offset,
                code: t.code,
                vector: vector_at(&bytes, t.offset as usize),
            })
            .collect();
        traps.sort_by_key(|t| t.offset);
        traps.dedup_by_key(|t| t.offset);
        let mut source_positions: Vec<(u32, u32)> = Vec::new();
        for s in buffer.get_srclocs_sorted() {
            let new = source_positions
                .last()
                .is_none_or(|&(_, l)| l != s.loc.bits());
            if !s.loc.is_default() && new {
                source_positions.push((s.start, s.loc.bits()));
            }
        }
        CompiledFunction {
            bytes,
            relocs,
            traps,
            source_positions,
        }
    }
}

/// What a finalized relocation target names, in the module's terms. `KnownSymbol` stands in
/// for targets with no module name (a test-case name), which finalizing refuses alike.
fn reloc_target(
    id: FuncId,
    func: &ir::Function,
    target: &FinalizedRelocTarget,
) -> ModuleRelocTarget {
    match target {
        FinalizedRelocTarget::ExternalName(ExternalName::User(r)) => {
            let name = &func.params.user_named_funcs()[*r];
            ModuleRelocTarget::user(name.namespace, name.index)
        }
        FinalizedRelocTarget::ExternalName(ExternalName::LibCall(l)) => {
            ModuleRelocTarget::LibCall(*l)
        }
        FinalizedRelocTarget::ExternalName(ExternalName::KnownSymbol(k)) => {
            ModuleRelocTarget::KnownSymbol(*k)
        }
        FinalizedRelocTarget::ExternalName(ExternalName::TestCase(_)) => {
            ModuleRelocTarget::KnownSymbol(ir::KnownSymbol::ElfGlobalOffsetTable)
        }
        FinalizedRelocTarget::Func(offset) => ModuleRelocTarget::FunctionOffset(id, *offset),
    }
}

/// The exception the instruction at `offset` of `bytes` raises when it traps: `ud2` (what
/// Cranelift emits for `trap`, `trapz`, overflow checks, ...) raises #UD, `div`/`idiv` #DE, and
/// every other instruction with a trap record is a load or store, which faults with #PF.
#[must_use]
pub fn vector_at(bytes: &[u8], offset: usize) -> TrapVector {
    let mut at = offset;
    // Legacy prefixes, then at most one REX prefix.
    while bytes.get(at).is_some_and(|b| {
        matches!(
            b,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3
        )
    }) {
        at += 1;
    }
    if bytes.get(at).is_some_and(|b| (0x40..=0x4F).contains(b)) {
        at += 1;
    }
    match (bytes.get(at), bytes.get(at + 1)) {
        (Some(0x0F), Some(0x0B)) => TrapVector::InvalidOpcode,
        // `F6 /6`, `F6 /7`, `F7 /6`, `F7 /7`: div and idiv; the ModRM reg field is the /digit.
        (Some(0xF6 | 0xF7), Some(modrm)) if (modrm >> 3) & 7 >= 6 => TrapVector::DivideError,
        _ => TrapVector::PageFault,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_vectors_follow_the_instruction() {
        assert_eq!(vector_at(&[0x0F, 0x0B], 0), TrapVector::InvalidOpcode);
        // div rcx (REX.W F7 /6), idiv r8d (REX.B F7 /7), div byte (F6 /6) after a NOP.
        assert_eq!(vector_at(&[0x48, 0xF7, 0xF1], 0), TrapVector::DivideError);
        assert_eq!(vector_at(&[0x41, 0xF7, 0xF8], 0), TrapVector::DivideError);
        assert_eq!(vector_at(&[0x90, 0xF6, 0xF1], 1), TrapVector::DivideError);
        // mov rax, [rdi] and neg rcx (F7 /3): loads fault with #PF, F7 /3 is no division.
        assert_eq!(vector_at(&[0x48, 0x8B, 0x07], 0), TrapVector::PageFault);
        assert_eq!(vector_at(&[0x48, 0xF7, 0xD9], 0), TrapVector::PageFault);
        // A 16-bit store with the operand-size prefix.
        assert_eq!(vector_at(&[0x66, 0x89, 0x07], 0), TrapVector::PageFault);
    }
}
