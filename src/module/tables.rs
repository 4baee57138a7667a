//! Jump tables: one set per code space that cannot reach another within ±2 GiB, emitted with the
//! current slot targets, and patched live — all slots of one change at once, per the manager's
//! patch protocol (one alias session and one cross-CPU serialization round, or the INT3
//! protocol's three).

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::config::ModuleError;
use super::state::{Live, ModuleState, Table};
use crate::code_object::{CodeDesc, CodeKind, CodeObject};
use crate::jump_table::{self, JumpTableError, JumpTableLayout};
use crate::manager::SlotStore;
use crate::mmu::Mmu;
use crate::AddressRange;

/// `jmp qword ptr [rip+0]` + 8-byte target: the far jump from a code space to the runtime's
/// lazy-compile entry, which lies out of rel32 reach (in the kernel image).
pub(super) const TRAMPOLINE_SIZE: usize = 16;
/// Largest distance a rel32 call or jump covers.
const REACH: usize = i32::MAX as usize;
/// Eight INT3s: an uncompiled slot without lazy compilation traps.
const INT3_SLOT: u64 = u64::from_le_bytes([0xCC; 8]);

/// Bytes of a code space's table object: the tables, then (with lazy compilation) the trampoline
/// at the next 16-aligned offset. `None` when they cannot be laid out.
pub(super) fn tables_size(functions: u32, lazy: bool) -> Option<usize> {
    let tables = JumpTableLayout::new(0, functions, lazy)?.total_size();
    Some(if lazy {
        tables.next_multiple_of(16) + TRAMPOLINE_SIZE
    } else {
        tables
    })
}

/// Whether every address of `span` reaches every address of `table` with a rel32 displacement.
fn reaches(table: AddressRange, span: AddressRange) -> bool {
    let lo = table.start().min(span.start());
    let hi = table.end().max(span.end());
    hi - lo <= REACH
}

impl<M: Mmu> ModuleState<M> {
    /// The table reachable by rel32 from every address of the code space holding `addr`.
    pub fn table_for(&self, addr: usize) -> Option<&Table> {
        let span = self
            .allocator
            .space_of(addr)
            .unwrap_or(AddressRange::new(addr, addr.saturating_add(1)));
        self.tables.iter().find(|t| reaches(t.layout.range(), span))
    }

    /// The value slot `i` of `layout` holds for `target` (`None`: uncompiled).
    fn slot_value(&self, layout: &JumpTableLayout, i: u32, target: Option<usize>) -> Option<u64> {
        match target {
            Some(t) => layout.near_slot_value(i, t),
            None => match layout.lazy_slot_addr(i) {
                Some(lazy) => jump_table::near_slot(layout.near_slot_addr(i)?, lazy),
                None => Some(INT3_SLOT),
            },
        }
    }

    /// Makes sure the code space holding `addr` reaches a jump table, creating one inside it.
    pub fn ensure_tables_for(&mut self, addr: usize) -> Result<(), ModuleError> {
        if self.config.functions == 0 || self.table_for(addr).is_some() {
            return Ok(());
        }
        let space = self
            .allocator
            .space_of(addr)
            .ok_or(ModuleError::UnknownCode { start: addr })?;
        self.create_tables(Some(space))
    }

    /// Emits and publishes jump tables (inside `region`, or in a new code space), filled with
    /// the current slot targets, and registers them for PC lookup.
    pub fn create_tables(&mut self, region: Option<AddressRange>) -> Result<(), ModuleError> {
        let lazy = self.config.lazy_entry;
        let functions = self.config.functions;
        let size = tables_size(functions, lazy.is_some())
            .ok_or(ModuleError::TooManyFunctions { functions })?;
        let mut w = self.allocator.allocate_table(size, region)?;
        let start = w.start();
        let result = (|| {
            let layout = JumpTableLayout::new(start, functions, lazy.is_some())
                .ok_or(ModuleError::JumpTable(JumpTableError::AllocationFailed))?;
            let trampoline = layout.range().end().next_multiple_of(16);
            let targets: Vec<usize> = (0..functions)
                .map(|i| match self.slots[i as usize] {
                    Some(t) => t,
                    None => layout.lazy_slot_addr(i).unwrap_or(0),
                })
                .collect();
            let mut image = jump_table::emit_tables(&layout, &targets, lazy.map(|_| trampoline))
                .map_err(ModuleError::JumpTable)?;
            for i in 0..functions {
                if self.slots[i as usize].is_none() && lazy.is_none() {
                    let at = layout.near_slot_addr(i).unwrap_or(start) - start;
                    image[at..at + jump_table::NEAR_SLOT_SIZE].fill(0xCC);
                }
            }
            if let Some(entry) = lazy {
                image.resize(trampoline - start, 0xCC);
                image.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
                image.extend_from_slice(&(entry as u64).to_le_bytes());
            }
            image.resize(w.as_slice().len(), 0xCC);
            Ok((layout, image))
        })();
        let (layout, image) = match result {
            Ok(r) => r,
            Err(e) => {
                self.discard_or_retry(w);
                return Err(e);
            }
        };
        w.as_mut_slice().copy_from_slice(&image);
        let code = match self.allocator.publish(w) {
            Ok(c) => c,
            Err(r) => {
                self.discard_or_retry(r.code);
                return Err(r.error.into());
            }
        };
        let object = match CodeObject::new(&CodeDesc::new(CodeKind::JumpTable, code.range())) {
            Ok(o) => Arc::new(o),
            Err(e) => {
                self.free_or_retry(code);
                return Err(ModuleError::Metadata(e));
            }
        };
        if let Err(e) = self.registries.code.insert(Arc::clone(&object)) {
            self.free_or_retry(code);
            return Err(ModuleError::CodeMap(e));
        }
        self.live.insert(
            start,
            Live {
                object,
                code,
                trap: None,
                pointer: None,
                module_ref: true,
            },
        );
        self.tables.push(Table { layout, start });
        Ok(())
    }

    /// Points each listed slot at its new target (`None`: back to uncompiled) in every table:
    /// per the manager's [`PatchProtocol`](crate::manager::PatchProtocol) (one alias session and
    /// one serialization of every CPU, or the INT3 protocol's three), so when this returns every
    /// CPU executes the new targets. Far targets are stored (as data) before the near slots
    /// that jump to them; a slot whose new target is in rel32 reach gets a direct near jump and
    /// its far slot is left as it was. Targets must be live code of this module or external
    /// entries.
    pub fn set_slots(&mut self, changes: &[(u32, Option<usize>)]) -> Result<(), ModuleError> {
        if changes.is_empty() {
            // Nothing to store, and nothing for other CPUs to see: no alias, no serialization.
            return Ok(());
        }
        let mut stores = Vec::new();
        for &(index, target) in changes {
            self.check_index(index)?;
            if let Some(t) = target {
                if !self.is_target(t) {
                    return Err(ModuleError::UnknownTarget { target: t });
                }
            }
            for table in &self.tables {
                let layout = &table.layout;
                match target.and_then(|t| layout.patch(index, t)) {
                    Some(p) if p.direct => stores.push(SlotStore::Jump {
                        addr: p.near_addr,
                        value: p.near_value,
                    }),
                    Some(p) => {
                        stores.push(SlotStore::Data {
                            addr: p.far_target_addr,
                            value: p.target as u64,
                        });
                        stores.push(SlotStore::Jump {
                            addr: p.near_addr,
                            value: p.near_value,
                        });
                    }
                    None => {
                        let near = layout
                            .near_slot_addr(index)
                            .ok_or(ModuleError::BadIndex { index })?;
                        let value = self
                            .slot_value(layout, index, target)
                            .ok_or(ModuleError::BadRelocation { offset: 0 })?;
                        stores.push(SlotStore::Jump { addr: near, value });
                    }
                }
            }
        }
        let handles = self.table_handles();
        // SAFETY: every value is this module's layout's encoding for the slot it is stored in
        // (a near jump, or a far target followed by its near slot) toward a target checked
        // above to be live code of this module or a registered external entry; code stays live
        // while a slot targets it and is freed only a grace period (and a serialization round)
        // after the last slot stopped targeting it (`retarget`, `reclaim`). Far target qwords
        // are data, near slots jumps (written per the manager's patch protocol).
        let patched = unsafe { self.allocator.patch_slots(&handles, &stores) };
        match patched {
            // Stored (and maybe not yet seen everywhere): the books follow the slots. Until a
            // serialization round succeeds, a CPU may still jump to an old target: `reclaim`
            // frees nothing retired before one has. (`SyncFailed` means this call's stores
            // landed; an earlier INT3 patch that could not be finished first is
            // `PatchPending`, nothing stored, and lands in the arm below.)
            Ok(()) | Err(crate::manager::CodeError::SyncFailed(_)) => {
                self.needs_sync = patched.is_err();
                let mut untargeted = Vec::new();
                for &(index, target) in changes {
                    let old = core::mem::replace(&mut self.slots[index as usize], target);
                    untargeted.extend(self.retarget(old, target));
                    if let (Some(table), Some(p)) =
                        (self.pointers, self.function_pointers[index as usize])
                    {
                        // SAFETY: the module owns its functions' handles, and the entry is
                        // the slot's new target, checked above (`is_target`: live code of this
                        // module or a registered external entry) and retired only after it is
                        // unreachable from slots and pointers and a grace period passed; or
                        // the trap address.
                        let _ = unsafe { table.update(p, target.unwrap_or(table.trap_address())) };
                    }
                }
                // Code whose last slot just moved away goes once nothing else reaches it, however
                // the changes were split into calls (the books are final here: a later change of
                // this batch may have targeted it again, and code still installed or held stays).
                // The code pointers were updated above, so none leads there either.
                for old in untargeted {
                    self.retire_if_unreachable(old);
                }
                patched.map_err(ModuleError::from)
            }
            Err(e) => Err(e.into()),
        }
    }
}
