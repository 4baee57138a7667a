//! `finalize_definitions`: resolving every reference, then publishing in three steps — the
//! read-only data in one image (one TLB round), the writable data in place, every function in
//! one batch (one publish round and one slot patch).
//!
//! # Relocations
//!
//! | Cranelift | refers to | codespace |
//! | --- | --- | --- |
//! | `X86CallPCRel4` on a rel32 `call`/`jmp` | a module function (colocated: final linkage) | `RelocKind::CallSlot`: the calling code space's jump-table slot |
//! | `Abs8` | a module function | the address of its slot in the first table |
//! | `Abs8` | a data object | its address |
//! | `Abs8` | an import or a libcall | the builder's symbols and lookups |
//! | anything else | | [`BackendError::UnsupportedRelocation`] |
//!
//! Everything that can fail on the module's side (names, kinds, definitions) is checked before
//! anything is written; what codespace may still refuse (memory, commit limits) after the data
//! image was loaded retires that image again, so a failed finalize leaves every definition
//! pending and nothing reachable.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use codespace::code_object::{RelocKind, Relocation};
use codespace::module::NewCode;
use codespace::trap::TrapVector;
use cranelift_codegen::binemit::Reloc;
use cranelift_codegen::entity::EntityRef;

use crate::compile::{CompiledFunction, ModuleReloc};
use crate::data::Init;
use crate::error::BackendError;
use crate::jit::{JITModule, Place};
use crate::module::{
    DataId, FuncId, Linkage, ModuleError, ModuleRelocTarget, ModuleResult, DATA_NAMESPACE,
    FUNCTION_NAMESPACE,
};

use codespace::mmu::Mmu;

/// An address known before the data image is loaded, or an offset into that image.
#[derive(Debug, Clone, Copy)]
enum Address {
    Absolute(usize),
    InImage(usize),
}

impl Address {
    fn at(self, image: usize) -> usize {
        match self {
            Address::Absolute(a) => a,
            Address::InImage(offset) => image + offset,
        }
    }
}

/// A field to write: 8 bytes at `offset`, the target's address plus `addend`.
#[derive(Debug, Clone, Copy)]
struct Write {
    offset: usize,
    target: Address,
    addend: i64,
}

/// `jmp qword ptr [rip+0]` and the landing pad's address: every register preserved.
const LANDING_STUB_LEN: usize = 14;

impl<M: Mmu + Send + 'static> JITModule<M> {
    /// Resolves, publishes and installs every function and data object defined since the last
    /// finalize: afterwards [`get_finalized_function`](Self::get_finalized_function),
    /// [`get_finalized_data`](Self::get_finalized_data) and [`call`](Self::call) reach them, on
    /// every CPU. Redefined functions (hot-swap) switch over with their slot patch.
    ///
    /// # Errors
    /// [`ModuleError::Undeclared`]; [`BackendError::UnresolvedSymbol`] (an import no lookup
    /// resolves, or a module function or data object referenced but never defined);
    /// [`BackendError::UnsupportedRelocation`]; codespace's refusals. Nothing is installed then
    /// and every definition stays pending.
    pub fn finalize_definitions(&mut self) -> ModuleResult<()> {
        // Read-only data: offsets in one image.
        let mut image_len = 0usize;
        let mut ro_offsets: Vec<(usize, usize)> = Vec::new(); // (data index, offset)
        for (i, d) in self.data.iter().enumerate() {
            if let Some(d) = d {
                if d.finalized.is_none() && d.place == Place::ReadOnly {
                    let offset = image_len.next_multiple_of(d.align as usize);
                    ro_offsets.push((i, offset));
                    image_len = offset + d.size.max(1);
                }
            }
        }
        // Every field of every pending data object, resolved.
        let mut data_writes: Vec<(usize, Vec<Write>)> = Vec::new();
        for (i, d) in self.data.iter().enumerate() {
            let Some(d) = d.as_ref().filter(|d| d.finalized.is_none()) else {
                continue;
            };
            let mut writes = Vec::new();
            for (offset, target, addend) in d.description.all_relocs() {
                let name = target
                    .ok_or_else(|| ModuleError::Undeclared(format!("reference at {offset}")))?;
                let offset = offset as usize;
                if offset.checked_add(8).is_none_or(|end| end > d.size) {
                    return Err(BackendError::UnsupportedRelocation {
                        kind: Reloc::Abs8,
                        offset: offset as u32,
                        target: format!("{name}"),
                    }
                    .into());
                }
                let target = self.address_of(name, &ro_offsets)?;
                writes.push(Write {
                    offset,
                    target,
                    addend,
                });
            }
            data_writes.push((i, writes));
        }
        // Every function's fields and slot calls.
        let pending: Vec<FuncId> = (0..self.functions.len())
            .filter(|&i| self.functions[i].pending.is_some())
            .map(FuncId::new)
            .collect();
        let mut function_links: Vec<(Vec<Write>, Vec<Relocation>)> = Vec::new();
        for &id in &pending {
            let Some(code) = self.functions[id.index()].pending.as_ref() else {
                continue;
            };
            function_links.push(self.link_function(code, &ro_offsets)?);
        }

        // Nothing can fail on this side any more. 1: the read-only data, one image, one flush.
        let mut image = None;
        if image_len > 0 {
            let fill = |base: usize, bytes: &mut [u8]| {
                for &(i, offset) in &ro_offsets {
                    let Some(d) = self.data[i].as_ref() else {
                        continue;
                    };
                    let object = &mut bytes[offset..offset + d.size];
                    write_contents(object, &d.description.init);
                    if let Some((_, writes)) = data_writes.iter().find(|(j, _)| *j == i) {
                        apply(object, writes, base);
                    }
                }
            };
            let mut loaded = None;
            let module = &self.module;
            let mut fill = Some(fill);
            self.kernel.module_call(&mut || {
                if let Some(fill) = fill.take() {
                    loaded = Some(module.load_image_with(image_len, fill));
                }
            });
            image = Some(match loaded {
                Some(r) => r?,
                None => return Err(codespace::module::ModuleError::Busy.into()),
            });
        }
        let image_base = image.as_ref().map_or(0, |i| i.range().start());

        // 2: writable data, in place (not yet reachable from any code).
        for (i, writes) in &data_writes {
            let Some(d) = self.data[*i].as_ref() else {
                continue;
            };
            if let Place::Heap(addr) = d.place {
                // SAFETY: the module's own heap block of at least `size` bytes (`define_data`),
                // not finalized yet: no installed code refers to it (a finalize installs code
                // only once everything it refers to is defined, and this object was not when
                // the last one succeeded), and its address was handed out nowhere else
                // (`get_finalized_data` answers null until this finalize succeeds).
                let object = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, d.size) };
                write_contents(object, &d.description.init);
                apply(object, writes, image_base);
            }
        }

        // 3: the functions, one batch.
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        let mut protected: Vec<Vec<u32>> = Vec::new();
        let mut sites: Vec<Vec<(u32, TrapVector)>> = Vec::new();
        let landing = self.kernel.landing_pad();
        for (&id, (writes, _)) in pending.iter().zip(&function_links) {
            let Some(code) = self.functions[id.index()].pending.as_ref() else {
                continue;
            };
            let mut bytes = code.bytes.clone();
            apply(&mut bytes, writes, image_base);
            if !code.traps.is_empty() {
                bytes.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
                bytes.extend_from_slice(&(landing as u64).to_le_bytes());
            }
            protected.push(
                code.traps
                    .iter()
                    .filter(|t| t.vector == TrapVector::PageFault)
                    .map(|t| t.offset)
                    .collect(),
            );
            sites.push(
                code.traps
                    .iter()
                    .filter(|t| t.vector != TrapVector::PageFault)
                    .map(|t| (t.offset, t.vector))
                    .collect(),
            );
            bodies.push(bytes);
        }
        let names: Vec<String> = pending
            .iter()
            .map(|&id| {
                self.declarations
                    .get_function_decl(id)
                    .map(|d| d.linkage_name(id).into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let mut batch: Vec<NewCode<'_>> = Vec::new();
        for (k, &id) in pending.iter().enumerate() {
            let Some(code) = self.functions[id.index()].pending.as_ref() else {
                continue;
            };
            let has_traps = !code.traps.is_empty();
            batch.push(NewCode {
                protected: &protected[k],
                sites: &sites[k],
                landing_pad: has_traps.then(|| (bodies[k].len() - LANDING_STUB_LEN) as u32),
                fault_ranges: &self.fault_ranges,
                relocations: &function_links[k].1,
                source_positions: &code.source_positions,
                name: Some(&names[k]),
                ..NewCode::function(id.as_u32(), &bodies[k])
            });
        }
        let mut added = None;
        let module = &self.module;
        self.kernel
            .module_call(&mut || added = Some(module.add_code_batch(&batch)));
        let objects = match added {
            Some(Ok(objects)) => objects,
            failed => {
                if let Some(image) = image {
                    let mut image = Some(image);
                    // Retired after a grace period; nothing refers to it (no code was added).
                    self.kernel.module_call(&mut || {
                        if let Some(i) = image.take() {
                            let _ = module.unpublish_image(i);
                        }
                    });
                }
                return Err(match failed {
                    Some(Err(e)) => e.into(),
                    _ => codespace::module::ModuleError::Busy.into(),
                });
            }
        };
        drop(batch);
        if self.kernel.patch_slots_twice() && !objects.is_empty() {
            let again: Vec<(u32, usize)> = pending
                .iter()
                .zip(&objects)
                .map(|(id, o)| (id.as_u32(), o.instruction_start()))
                .collect();
            // The first patch stands if this one is refused (see `Kernel::patch_slots_twice`).
            self.kernel.module_call(&mut || {
                let _ = module.patch_slots(&again);
            });
        }

        // Books: everything is finalized.
        let registries_live = |start: usize| {
            module
                .lookup_code(start)
                .is_some_and(|o| o.instruction_start() == start)
        };
        self.trap_sites.retain(|&start, _| registries_live(start));
        for (&id, object) in pending.iter().zip(&objects) {
            let state = &mut self.functions[id.index()];
            let traps = state.pending.take().map(|c| c.traps).unwrap_or_default();
            let start = object.instruction_start();
            state.finalized = Some(start);
            state.redefinable = false;
            if !traps.is_empty() {
                self.trap_sites.insert(start, traps);
            }
        }
        for &(i, offset) in &ro_offsets {
            if let Some(d) = self.data[i].as_mut() {
                d.finalized = Some(image_base + offset);
            }
        }
        for (i, _) in &data_writes {
            if let Some(d) = self.data[*i].as_mut() {
                if let Place::Heap(addr) = d.place {
                    d.finalized = Some(addr);
                }
            }
        }
        self.images.extend(image);
        Ok(())
    }

    /// The fields and slot calls of `code`.
    fn link_function(
        &self,
        code: &CompiledFunction,
        ro_offsets: &[(usize, usize)],
    ) -> ModuleResult<(Vec<Write>, Vec<Relocation>)> {
        let mut writes = Vec::new();
        let mut slots = Vec::new();
        for r in &code.relocs {
            let ModuleReloc {
                offset,
                kind,
                ref name,
                addend,
            } = *r;
            let unsupported = || {
                ModuleError::from(BackendError::UnsupportedRelocation {
                    kind,
                    offset,
                    target: format!("{name}"),
                })
            };
            match kind {
                Reloc::X86CallPCRel4 => {
                    let ModuleRelocTarget::User {
                        namespace: FUNCTION_NAMESPACE,
                        index,
                    } = *name
                    else {
                        return Err(unsupported());
                    };
                    // Only a rel32 `call` or `jmp` (tail call) can go through a slot; the same
                    // relocation on `lea` takes the function's address, which a slot is not.
                    let opcode = (offset as usize)
                        .checked_sub(1)
                        .and_then(|o| code.bytes.get(o).copied());
                    if addend != -4 || !matches!(opcode, Some(0xE8 | 0xE9)) {
                        return Err(unsupported());
                    }
                    let id = FuncId::from_u32(index);
                    if !self.is_module_function(id)? {
                        return Err(unsupported());
                    }
                    slots.push(Relocation {
                        offset,
                        kind: RelocKind::CallSlot { slot: index },
                    });
                }
                Reloc::Abs8 => {
                    if (offset as usize)
                        .checked_add(8)
                        .is_none_or(|end| end > code.bytes.len())
                    {
                        return Err(unsupported());
                    }
                    writes.push(Write {
                        offset: offset as usize,
                        target: self.address_of(name, ro_offsets)?,
                        addend,
                    });
                }
                _ => return Err(unsupported()),
            }
        }
        Ok((writes, slots))
    }

    /// Whether `id` is a function this module defines (defined now or pending); an import or
    /// an undefined preemptible function is not.
    ///
    /// # Errors
    /// [`ModuleError::Undeclared`]; [`BackendError::UnresolvedSymbol`] for a function with a
    /// final linkage never defined.
    fn is_module_function(&self, id: FuncId) -> ModuleResult<bool> {
        let decl = self
            .declarations
            .get_function_decl(id)
            .ok_or_else(|| ModuleError::Undeclared(format!("{id}")))?;
        let state = &self.functions[id.index()];
        let defined = state.finalized.is_some() || state.pending.is_some();
        match decl.linkage {
            Linkage::Import => Ok(false),
            Linkage::Preemptible => Ok(defined),
            _ if defined => Ok(true),
            _ => Err(BackendError::UnresolvedSymbol(decl.linkage_name(id).into_owned()).into()),
        }
    }

    /// Where `name` is.
    fn address_of(
        &self,
        name: &ModuleRelocTarget,
        ro_offsets: &[(usize, usize)],
    ) -> ModuleResult<Address> {
        let unresolved = |n: String| ModuleError::from(BackendError::UnresolvedSymbol(n));
        match *name {
            ModuleRelocTarget::User {
                namespace: FUNCTION_NAMESPACE,
                index,
            } => {
                let id = FuncId::from_u32(index);
                if self.is_module_function(id)? {
                    return self
                        .slot_address(id)
                        .map(Address::Absolute)
                        .ok_or_else(|| ModuleError::Undeclared(format!("{id}")));
                }
                let n = self
                    .declarations
                    .get_function_decl(id)
                    .map(|d| d.linkage_name(id).into_owned())
                    .unwrap_or_default();
                self.lookup_symbol(&n)
                    .map(Address::Absolute)
                    .ok_or_else(|| unresolved(n))
            }
            ModuleRelocTarget::User {
                namespace: DATA_NAMESPACE,
                index,
            } => {
                let id = DataId::from_u32(index);
                let decl = self
                    .declarations
                    .get_data_decl(id)
                    .ok_or_else(|| ModuleError::Undeclared(format!("{id}")))?;
                let n = decl.linkage_name(id).into_owned();
                match self.data.get(id.index()).and_then(Option::as_ref) {
                    Some(d) => match (d.finalized, d.place) {
                        (Some(a), _) | (None, Place::Heap(a)) => Ok(Address::Absolute(a)),
                        (None, Place::ReadOnly) => ro_offsets
                            .iter()
                            .find(|(i, _)| *i == id.index())
                            .map(|&(_, o)| Address::InImage(o))
                            .ok_or_else(|| unresolved(n)),
                    },
                    None if !decl.linkage.is_final() => self
                        .lookup_symbol(&n)
                        .map(Address::Absolute)
                        .ok_or_else(|| unresolved(n)),
                    None => Err(unresolved(n)),
                }
            }
            ModuleRelocTarget::LibCall(libcall) => {
                let n = (self.libcall_names)(libcall);
                self.lookup_symbol(&n)
                    .map(Address::Absolute)
                    .ok_or_else(|| unresolved(n))
            }
            _ => Err(ModuleError::Undeclared(format!("{name}"))),
        }
    }
}

/// The object's initial contents (the rest stays zero).
fn write_contents(object: &mut [u8], init: &Init) {
    if let Init::Bytes { contents } = init {
        object[..contents.len()].copy_from_slice(contents);
    }
}

/// Writes every field (checked in bounds when resolved).
fn apply(bytes: &mut [u8], writes: &[Write], image: usize) {
    for w in writes {
        let value = (w.target.at(image) as u64).wrapping_add(w.addend as u64);
        bytes[w.offset..w.offset + 8].copy_from_slice(&value.to_le_bytes());
    }
}
