//! Adding code: allocate, relocate, publish, register, install — in V8's order (trap data, code
//! table, jump tables), all or nothing, for one object or a whole batch.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::config::{ModuleError, NewCode};
use super::state::{Live, ModuleState};
use crate::code_events::CodeEvent;
use crate::code_object::{CodeDesc, CodeObject};
use crate::code_pointer_table::CodePointer;
use crate::manager::{PublishedCode, WritableCode};
use crate::mmu::Mmu;
use crate::trap::{TrapHandle, TrapRegistration};
use crate::AddressRange;

/// One new object on its way in.
struct Staged {
    object: Arc<CodeObject>,
    code: PublishedCode,
    trap: Option<TrapHandle>,
    pointer: Option<CodePointer>,
}

impl<M: Mmu> ModuleState<M> {
    /// Checks what can be checked before anything is allocated.
    fn check_new(&self, batch: &[NewCode<'_>]) -> Result<(), ModuleError> {
        // Ordered, so a batch of a whole module is O(k log k), not O(k²).
        let mut seen = alloc::collections::BTreeSet::new();
        for new in batch {
            if let Some(index) = new.index {
                self.check_index(index)?;
                if !seen.insert(index) {
                    return Err(ModuleError::BadIndex { index });
                }
            }
            match (new.protected.is_empty(), new.landing_pad) {
                (true, _) => {}
                (false, Some(pad)) if (pad as usize) < new.bytes.len() => {}
                (false, _) => return Err(ModuleError::BadLandingPad),
            }
        }
        Ok(())
    }

    /// Adds `batch`, all or nothing; see [`CodeModule::add_code_batch`](super::CodeModule).
    pub fn add_batch(
        &mut self,
        batch: &[NewCode<'_>],
    ) -> Result<Vec<Arc<CodeObject>>, ModuleError> {
        self.check_new(batch)?;
        let before = (self.allocator.code_spaces().len(), self.tables.len());
        let written = self.allocate_and_write(batch);
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                self.undo_new_spaces(before);
                return Err(e);
            }
        };
        let (objects, writable): (Vec<_>, Vec<_>) = written.into_iter().unzip();
        let published = match self.allocator.publish_batch(writable) {
            Ok(p) => p,
            Err(r) => {
                for w in r.code {
                    self.discard_or_retry(w);
                }
                self.undo_new_spaces(before);
                // Rolled back, so nothing changed even if the bytes landed and only a CPU's
                // serialization failed: `SyncFailed` from an add means its functions were
                // installed, which these were not.
                let error = match r.error {
                    crate::CodeError::SyncFailed(e) => crate::CodeError::Mmu(e),
                    e => e,
                };
                return Err(error.into());
            }
        };
        let mut staged: Vec<Staged> = objects
            .into_iter()
            .zip(published)
            .map(|(object, code)| Staged {
                object,
                code,
                trap: None,
                pointer: None,
            })
            .collect();
        if let Err(e) = self.register(batch, &mut staged) {
            self.abandon(staged);
            self.undo_new_spaces(before);
            return Err(e);
        }
        // Installed from here on: the objects are in `live` and PC lookup.
        let objects: Vec<Arc<CodeObject>> = staged.iter().map(|s| Arc::clone(&s.object)).collect();
        for s in staged {
            if let Some(listener) = self.listener {
                listener.code_published(&CodeEvent::new(&s.object));
            }
            self.live.insert(
                s.code.start(),
                Live {
                    object: s.object,
                    code: s.code,
                    trap: s.trap,
                    pointer: s.pointer,
                    module_ref: true,
                },
            );
        }
        let changes: Vec<(u32, Option<usize>)> = batch
            .iter()
            .zip(&objects)
            .filter_map(|(n, o)| Some((n.index?, Some(o.instruction_start()))))
            .collect();
        if let Err(e) = self.set_slots(&changes) {
            if !matches!(e, ModuleError::Code(crate::CodeError::SyncFailed(_))) {
                // No slot changed: the new code was never reachable; free it right away.
                for o in &objects {
                    self.unpublish_now(o.instruction_start());
                }
                self.undo_new_spaces(before);
                return Err(e);
            }
            // Stored but not serialized everywhere: the functions are installed (the slots do
            // point at them, and `reclaim` frees what they replaced only after a serialization
            // round succeeded). Anonymous code of the batch is reachable from nowhere — no
            // slot, and the error hands back no object or pointer — so it goes now.
            self.install_functions(&changes);
            for o in objects.iter().filter(|o| o.index().is_none()) {
                self.unpublish_now(o.instruction_start());
            }
            return Err(e);
        }
        self.install_functions(&changes);
        Ok(objects)
    }

    /// Allocates, builds the objects and relocates into staging bytes; on error nothing stays
    /// allocated.
    fn allocate_and_write(
        &mut self,
        batch: &[NewCode<'_>],
    ) -> Result<Vec<(Arc<CodeObject>, WritableCode)>, ModuleError> {
        let mut out: Vec<(Arc<CodeObject>, WritableCode)> = Vec::with_capacity(batch.len());
        for new in batch {
            match self.allocate_one(new) {
                Ok(pair) => out.push(pair),
                Err(e) => {
                    for (_, w) in out {
                        self.discard_or_retry(w);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn allocate_one(
        &mut self,
        new: &NewCode<'_>,
    ) -> Result<(Arc<CodeObject>, WritableCode), ModuleError> {
        let mut w = self.allocator.allocate(new.bytes.len())?;
        // Not only for a new code space: an earlier add may have reserved this space and then
        // failed to create its tables.
        let result = self.ensure_tables_for(w.start()).and_then(|()| {
            let start = w.start();
            let desc = CodeDesc {
                kind: new.kind,
                index: new.index,
                instructions: AddressRange::new(start, start + new.bytes.len().max(1)),
                protected_instructions: new.protected,
                relocations: new.relocations,
                source_positions: new.source_positions,
                name: new.name,
            };
            let object = CodeObject::new(&desc).map_err(ModuleError::Metadata)?;
            w.as_mut_slice().copy_from_slice(new.bytes);
            self.relocate(start, w.as_mut_slice(), new.relocations)?;
            Ok(Arc::new(object))
        });
        match result {
            Ok(object) => Ok((object, w)),
            Err(e) => {
                self.discard_or_retry(w);
                Err(e)
            }
        }
    }

    /// Undoes what a failed add created besides its code, given the counts of code spaces and
    /// tables before it: the jump tables it created (only its own code, freed already, could
    /// reach them: every space gets its tables before its first code is written), then the code
    /// spaces it reserved, now empty.
    pub(super) fn undo_new_spaces(&mut self, (spaces, tables): (usize, usize)) {
        for table in self.tables.split_off(tables) {
            if let Some(live) = self.live.remove(&table.start) {
                if self
                    .registries
                    .code
                    .lookup(table.start)
                    .is_some_and(|o| Arc::ptr_eq(&o, &live.object))
                {
                    let _ = self.registries.code.remove(table.start);
                }
                self.free_or_retry(live.code);
            }
        }
        let created: Vec<AddressRange> = self.allocator.code_spaces()[spaces..].to_vec();
        for space in created {
            self.allocator.release_if_empty(space);
        }
    }

    /// Trap data, code pointers, PC lookup for the staged objects; undone by `abandon`.
    fn register(
        &mut self,
        batch: &[NewCode<'_>],
        staged: &mut [Staged],
    ) -> Result<(), ModuleError> {
        // Trap data for the whole batch: one update of the trap table, all or nothing.
        let protected: Vec<(usize, TrapRegistration<'_>)> = batch
            .iter()
            .zip(staged.iter())
            .enumerate()
            .filter_map(|(i, (new, s))| {
                let pad = new.landing_pad.filter(|_| !new.protected.is_empty())?;
                Some((
                    i,
                    TrapRegistration {
                        code: s.object.instructions(),
                        protected: new.protected,
                        sites: &[],
                        landing_pad: s.code.start() + pad as usize,
                        fault_ranges: new.fault_ranges,
                    },
                ))
            })
            .collect();
        if !protected.is_empty() {
            let regs: Vec<TrapRegistration<'_>> = protected.iter().map(|(_, r)| *r).collect();
            // SAFETY: each range is a staged object of this batch, code the module allocated
            // and owns; the trap table checks that every protected offset and the landing pad
            // lie inside it. The module releases the handles before the code is freed
            // (`unregister`, `abandon`).
            let handles = unsafe { self.registries.traps.register_batch(&regs) }
                .map_err(ModuleError::Trap)?;
            for ((i, _), h) in protected.iter().zip(handles) {
                staged[*i].trap = Some(h);
            }
        }
        for (new, s) in batch.iter().zip(staged.iter_mut()) {
            if let Some(table) = self.pointers {
                match new.index {
                    // Anonymous code gets a pointer of its own, aimed at it once registered.
                    None => {
                        // SAFETY: the entry is this staged code's start: published code
                        // the module owns, retired only after its pointer is freed and a
                        // grace period passed (or never reachable: `abandon`).
                        let p = unsafe { table.allocate(s.code.start()) }
                            .map_err(ModuleError::CodePointer)?;
                        s.pointer = Some(p);
                    }
                    // A function's pointer is shared by its versions: made on first use, aimed
                    // at the slot's target by `set_slots`.
                    Some(i) if self.function_pointers[i as usize].is_none() => {
                        let p = table.allocate_trap().map_err(ModuleError::CodePointer)?;
                        self.function_pointers[i as usize] = Some(p);
                    }
                    Some(_) => {}
                }
            }
        }
        self.registries
            .code
            .insert_batch(staged.iter().map(|s| Arc::clone(&s.object)))
            .map_err(ModuleError::CodeMap)
    }

    /// Undoes `register` and frees code that was never reachable (no slot, no pointer aimed at
    /// code still registering): it never ran, so it needs no grace period.
    fn abandon(&mut self, staged: Vec<Staged>) {
        for s in staged {
            if let Some(h) = s.trap {
                let _ = self.registries.traps.release(h);
            }
            if let (Some(table), Some(p)) = (self.pointers, s.pointer) {
                // SAFETY: the module allocated `p` for this code and frees it once.
                let _ = unsafe { table.free(p) };
            }
            if let Some(map) = self.registries.code.lookup(s.code.start()) {
                if Arc::ptr_eq(&map, &s.object) {
                    let _ = self.registries.code.remove(s.code.start());
                }
            }
            self.free_or_retry(s.code);
        }
        self.drop_unused_function_pointers();
    }

    /// Removes code that was installed a moment ago but never reached by a slot.
    fn unpublish_now(&mut self, start: usize) {
        if let Some(live) = self.live.remove(&start) {
            if let Some(listener) = self.listener {
                listener.code_freed(&CodeEvent::new(&live.object));
            }
            self.abandon(alloc::vec![Staged {
                object: live.object,
                code: live.code,
                trap: live.trap,
                pointer: live.pointer,
            }]);
        }
    }

    /// Frees function pointers made for functions that still have no code.
    fn drop_unused_function_pointers(&mut self) {
        let Some(table) = self.pointers else { return };
        for i in 0..self.function_pointers.len() {
            // A slot may have a target without the function having code (`patch_slot` to a
            // wrapper or stub): what counts is whether code was ever installed.
            if self.functions[i].is_none() {
                if let Some(p) = self.function_pointers[i].take() {
                    // SAFETY: the module allocated `p` for function `i`, which has no code:
                    // nothing but the module's books knew it.
                    let _ = unsafe { table.free(p) };
                }
            }
        }
    }

    /// Records the functions whose slots now point at new code, releasing what they replace.
    fn install_functions(&mut self, changes: &[(u32, Option<usize>)]) {
        for &(index, start) in changes {
            let old = core::mem::replace(&mut self.functions[index as usize], start);
            if let Some(old) = old.filter(|&o| Some(o) != start) {
                self.release_ref(old);
            }
        }
    }
}
