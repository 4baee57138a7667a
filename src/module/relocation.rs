//! Resolving a new code object's relocations in its staging bytes, and checking the result in
//! every build (V8's `Validate` runs in debug builds only; a kernel release build must refuse
//! bad input too).

use alloc::vec::Vec;

use super::config::ModuleError;
use super::state::ModuleState;
use crate::code_object::{RelocKind, Relocation};
use crate::jump_table;
use crate::mmu::Mmu;

impl<M: Mmu> ModuleState<M> {
    /// Resolves `relocations` of code that will live at `start`, in its staging `bytes`: a
    /// [`RelocKind::CallSlot`] becomes a rel32 to the slot of the code space's own table, an
    /// [`RelocKind::InternalReference`] the absolute address inside the object. Refuses
    /// relocations that overlap, leave the bytes, or do not patch a rel32 call or jump.
    pub fn relocate(
        &self,
        start: usize,
        bytes: &mut [u8],
        relocations: &[Relocation],
    ) -> Result<(), ModuleError> {
        let mut fields: Vec<(usize, usize, u32)> = relocations
            .iter()
            .map(|r| {
                let at = r.offset as usize;
                (at, at + r.kind.patch_size(), r.offset)
            })
            .collect();
        fields.sort_unstable();
        for w in fields.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(ModuleError::BadRelocation { offset: w[1].2 });
            }
        }
        let table = self.table_for(start);
        for r in relocations {
            let at = r.offset as usize;
            let bad = ModuleError::BadRelocation { offset: r.offset };
            match r.kind {
                RelocKind::CallSlot { slot } => {
                    let slot_addr = table
                        .and_then(|t| t.layout.near_slot_addr(slot))
                        .ok_or(bad)?;
                    // A rel32 call or jump: the opcode byte precedes the field.
                    let opcode = at.checked_sub(1).and_then(|o| bytes.get(o)).ok_or(bad)?;
                    if !matches!(opcode, 0xE8 | 0xE9) {
                        return Err(bad);
                    }
                    let field = bytes.get_mut(at..at + 4).ok_or(bad)?;
                    // The field lies in the code, so its end does too: no overflow.
                    let rel = jump_table::rel32(start + at + 4, slot_addr).ok_or(bad)?;
                    field.copy_from_slice(&rel.to_le_bytes());
                }
                RelocKind::InternalReference { target_offset } => {
                    // Checked: the offset is the caller's, and code near the top of the
                    // address space plus up to 4 GiB overflows (`validate` then refuses a
                    // target outside the object).
                    let target = start.checked_add(target_offset as usize).ok_or(bad)? as u64;
                    bytes
                        .get_mut(at..at + 8)
                        .ok_or(bad)?
                        .copy_from_slice(&target.to_le_bytes());
                }
            }
        }
        self.validate(start, bytes, relocations)
    }

    /// Every call lands on its slot of the code's own space's table, every internal reference
    /// inside the object.
    fn validate(
        &self,
        start: usize,
        bytes: &[u8],
        relocations: &[Relocation],
    ) -> Result<(), ModuleError> {
        let table = self.table_for(start);
        for r in relocations {
            let at = r.offset as usize;
            let bad = ModuleError::BadRelocation { offset: r.offset };
            match r.kind {
                RelocKind::CallSlot { slot } => {
                    let field: [u8; 4] = bytes
                        .get(at..at + 4)
                        .ok_or(bad)?
                        .try_into()
                        .map_err(|_| bad)?;
                    let rel = i32::from_le_bytes(field);
                    let target = (start + at + 4).wrapping_add_signed(rel as isize);
                    if table.and_then(|t| t.layout.slot_for_near_addr(target)) != Some(slot) {
                        return Err(bad);
                    }
                }
                RelocKind::InternalReference { .. } => {
                    let field: [u8; 8] = bytes
                        .get(at..at + 8)
                        .ok_or(bad)?
                        .try_into()
                        .map_err(|_| bad)?;
                    let target = u64::from_le_bytes(field) as usize;
                    if !(start..start + bytes.len()).contains(&target) {
                        return Err(bad);
                    }
                }
            }
        }
        Ok(())
    }
}
