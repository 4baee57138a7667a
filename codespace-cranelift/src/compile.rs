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
pub(crate) struct TrapSite {
    pub offset: u32,
    pub code: TrapCode,
    pub vector: TrapVector,
}

/// A function compiled by `define_function`, waiting for `finalize_definitions`.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub bytes: Vec<u8>,
    pub relocs: Vec<ModuleReloc>,
    pub traps: Vec<TrapSite>,
    pub source_positions: Vec<(u32, u32)>,
}

impl Compiled {
    /// Takes what `code` (compiled from `func`) holds.
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
        let mut traps: Vec<TrapSite> = buffer
            .traps()
            .iter()
            .map(|t| TrapSite {
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
        Compiled {
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

/// The exception the instruction at `offset` raises when it traps: `ud2` (what Cranelift emits
/// for `trap`, `trapz`, overflow checks, ...) raises #UD, `div`/`idiv` #DE, and every other
/// instruction with a trap record is a load or store, which faults with #PF.
pub(crate) fn vector_at(bytes: &[u8], offset: usize) -> TrapVector {
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
