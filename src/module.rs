//! A module's code: the allocator, code objects, trap registration, PC lookup and jump tables,
//! kept consistent with each other (V8's `NativeModule`).
//!
//! Publishing follows V8's order — register trap data, update the code table, patch the jump
//! tables — and freeing runs in the only safe order: release the trap entry, remove the code from
//! PC lookup, then return its memory, so a reused range is never still registered (wasmtime
//! #12511).
//!
//! Every code space gets jump tables (near, far and, with lazy compilation, lazy) unless it can
//! reach an existing table within ±2 GiB. Generated code calls other functions only through its
//! own space's table: a [`RelocKind::CallSlot`] relocation is resolved to that table's slot when
//! the code is copied in. Replacing a function is then one patched slot per table, done with
//! aligned 8-byte atomic stores through the writable alias.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::code_events::{CodeEvent, CodeEventListener};
use crate::code_map::{CodeMap, CodeMapError};
use crate::code_object::{
    CodeDesc, CodeKind, CodeObject, CodeObjectError, DecRef, RelocKind, Relocation,
};
use crate::code_pointer_table::{CodePointer, CodePointerError, CodePointerTable};
use crate::jump_table::{self, JumpTableLayout};
use crate::manager::{AllocatorConfig, CodeAllocator, CodeError, CodeManager, PublishedCode};
use crate::mmu::Mmu;
use crate::sync::grace::GraceDomain;
use crate::trap::{TrapError, TrapHandle, TrapTable};
use crate::AddressRange;

/// `jmp qword ptr [rip+0]` + 8-byte target: the far jump from a code space to the runtime's
/// lazy-compile entry, which lies out of rel32 reach (in the kernel image).
const TRAMPOLINE_SIZE: usize = 16;
/// Largest distance a rel32 call or jump covers.
const REACH: usize = i32::MAX as usize;

/// The lookups the fault handler and profilers need, shared by all modules of a manager; keep one
/// in a `static` so a page-fault handler reaches it without locks.
#[derive(Debug)]
pub struct Registries {
    /// Protected instructions of all published code.
    pub traps: TrapTable,
    /// PC → code object for all published code.
    pub code: CodeMap,
}

impl Registries {
    /// Empty registries whose replaced memory waits for grace periods of `grace` (the domain
    /// the kernel reports quiescent states to).
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new(grace: &'static GraceDomain) -> Self {
        Registries {
            traps: TrapTable::new(grace),
            code: CodeMap::new(grace),
        }
    }

    /// Empty registries (loom atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new(grace: &'static GraceDomain) -> Self {
        Registries {
            traps: TrapTable::new(grace),
            code: CodeMap::new(grace),
        }
    }

    /// The grace domain of both registries.
    #[must_use]
    pub fn grace(&self) -> &'static GraceDomain {
        self.traps.grace()
    }

    /// The code object holding `pc`: lock-free, O(log n).
    #[must_use]
    pub fn lookup_code(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.code.lookup(pc)
    }
}

/// Settings of a [`CodeModule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleConfig {
    /// Number of functions, i.e. jump-table slots.
    pub functions: u32,
    /// Address of the runtime's lazy-compile entry; enables lazy slots (`push index; jmp entry`).
    pub lazy_entry: Option<usize>,
    /// Whether more code spaces may be reserved.
    pub growable: bool,
    /// Size of the first code space (0: sized by need).
    pub initial_reservation: usize,
}

impl Default for ModuleConfig {
    fn default() -> Self {
        ModuleConfig {
            functions: 0,
            lazy_entry: None,
            growable: true,
            initial_reservation: 0,
        }
    }
}

/// Code to add to a module.
#[derive(Debug, Clone, Copy)]
pub struct NewCode<'a> {
    /// What it is.
    pub kind: CodeKind,
    /// Function index: installs the code in that jump-table slot.
    pub index: Option<u32>,
    /// Machine code, position-independent but for `relocations`.
    pub bytes: &'a [u8],
    /// Offsets of loads/stores that may hit a guard page.
    pub protected: &'a [u32],
    /// Offset of the landing pad where a protected fault resumes (r10 = faulting PC).
    pub landing_pad: Option<u32>,
    /// Fields to resolve once the address is known.
    pub relocations: &'a [Relocation],
    /// `(pc_offset, source_offset)` pairs, sorted.
    pub source_positions: &'a [(u32, u32)],
    /// Name for profilers and debuggers.
    pub name: Option<&'a str>,
}

impl<'a> NewCode<'a> {
    /// Plain code of `kind` with nothing but its bytes.
    #[must_use]
    pub const fn new(kind: CodeKind, bytes: &'a [u8]) -> Self {
        NewCode {
            kind,
            index: None,
            bytes,
            protected: &[],
            landing_pad: None,
            relocations: &[],
            source_positions: &[],
            name: None,
        }
    }

    /// The function with `index`.
    #[must_use]
    pub const fn function(index: u32, bytes: &'a [u8]) -> Self {
        let mut c = NewCode::new(CodeKind::Function, bytes);
        c.index = Some(index);
        c
    }
}

/// Why a module operation failed; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModuleError {
    /// Allocation, commit or publish failed.
    Code(CodeError),
    /// The code's metadata is invalid.
    Metadata(CodeObjectError),
    /// Registering trap data failed.
    Trap(TrapError),
    /// Function index beyond the module's functions.
    BadIndex {
        /// The index given.
        index: u32,
    },
    /// Protected instructions without a landing pad, or a landing pad outside the code.
    BadLandingPad,
    /// A relocation does not fit its instruction (not a rel32 call/jump, or out of reach).
    BadRelocation {
        /// Offset of the relocation.
        offset: u32,
    },
    /// No code starts at that address in this module.
    UnknownCode {
        /// The address given.
        start: usize,
    },
    /// A jump table could not be emitted.
    JumpTable(jump_table::JumpTableError),
    /// The code overlaps code already registered for PC lookup (registries shared with a
    /// manager over another window).
    CodeMap(CodeMapError),
    /// The code pointer table refused (full).
    CodePointer(CodePointerError),
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::Code(e) => write!(f, "{e}"),
            ModuleError::Metadata(e) => write!(f, "code metadata: {e:?}"),
            ModuleError::Trap(e) => write!(f, "trap data: {e}"),
            ModuleError::BadIndex { index } => write!(f, "no function {index}"),
            ModuleError::BadLandingPad => {
                f.write_str("protected code needs a landing pad inside it")
            }
            ModuleError::BadRelocation { offset } => write!(f, "bad relocation at {offset:#x}"),
            ModuleError::UnknownCode { start } => write!(f, "no code at {start:#x}"),
            ModuleError::JumpTable(e) => write!(f, "jump table: {e:?}"),
            ModuleError::CodeMap(e) => write!(f, "PC lookup: {e}"),
            ModuleError::CodePointer(e) => write!(f, "code pointer table: {e:?}"),
        }
    }
}

impl core::error::Error for ModuleError {}

impl From<CodeError> for ModuleError {
    fn from(e: CodeError) -> Self {
        ModuleError::Code(e)
    }
}

/// The jump tables of one code space and the spaces they serve.
#[derive(Debug)]
struct Tables {
    layout: JumpTableLayout,
}

/// Published code the module owns.
struct Live {
    object: Arc<CodeObject>,
    code: PublishedCode,
    trap: Option<TrapHandle>,
    /// The code pointer of anonymous code (functions use their index's shared pointer).
    pointer: Option<CodePointer>,
    /// Whether the module still holds its reference (dropped on replacement or `free_code`).
    module_ref: bool,
}

/// One module's code (V8's `NativeModule`). Dropping it frees all its code, in the safe order.
pub struct CodeModule<M: Mmu> {
    allocator: CodeAllocator<M>,
    registries: &'static Registries,
    listener: Option<&'static dyn CodeEventListener>,
    config: ModuleConfig,
    tables: Vec<Tables>,
    live: BTreeMap<usize, Live>,
    functions: Vec<Option<usize>>,
    pointers: Option<&'static CodePointerTable>,
    function_pointers: Vec<Option<CodePointer>>,
}

/// Bytes of a code space's table object: the tables, then (with lazy compilation) the trampoline
/// at the next 16-aligned offset (table objects start `CODE_ALIGNMENT`-aligned).
fn tables_size(functions: u32, lazy: bool) -> usize {
    let tables = JumpTableLayout::new(0, functions, lazy).map_or(0, |l| l.total_size());
    if lazy {
        tables.next_multiple_of(16) + TRAMPOLINE_SIZE
    } else {
        tables
    }
}

impl<M: Mmu> CodeModule<M> {
    /// A module with `config.functions` jump-table slots over `manager`; the first code space and
    /// its tables are created now when there are functions.
    ///
    /// # Errors
    /// Reservation, commit or publish failures of the first code space.
    pub fn new(
        manager: &CodeManager<M>,
        registries: &'static Registries,
        config: ModuleConfig,
    ) -> Result<Self, ModuleError> {
        // Tables take whole pages, plus up to a page of slack to start on a page boundary.
        let tables = tables_size(config.functions, config.lazy_entry.is_some());
        let overhead = if tables == 0 {
            0
        } else {
            crate::range::page_round_up(tables).unwrap_or(tables) + crate::PAGE_SIZE
        };
        let allocator = CodeAllocator::new(
            manager,
            AllocatorConfig {
                overhead,
                growable: config.growable,
                initial_reservation: config.initial_reservation,
            },
        )?;
        let mut module = CodeModule {
            allocator,
            registries,
            listener: None,
            config,
            tables: Vec::new(),
            live: BTreeMap::new(),
            functions: alloc::vec![None; config.functions as usize],
            pointers: None,
            function_pointers: alloc::vec![None; config.functions as usize],
        };
        if config.functions > 0 {
            let region = match module.allocator.code_spaces().first() {
                Some(&space) => space,
                None => AddressRange::new(0, usize::MAX),
            };
            module.create_tables(region)?;
        }
        Ok(module)
    }

    /// Reports published and freed code to `listener` from now on.
    pub fn set_listener(&mut self, listener: Option<&'static dyn CodeEventListener>) {
        self.listener = listener;
    }

    /// Gives code entry points handles in `table` for indirect calls (V8's
    /// `WasmCodePointerTable`): each function index gets one handle, shared by every version of
    /// the function and updated (one atomic store) when the function is replaced; anonymous code
    /// (wrappers) gets a handle of its own, freed with the code. Set it before adding code.
    pub fn set_code_pointer_table(&mut self, table: Option<&'static CodePointerTable>) {
        self.pointers = table;
    }

    /// The code pointer of function `index`, once it has code.
    #[must_use]
    pub fn function_pointer(&self, index: u32) -> Option<CodePointer> {
        self.function_pointers
            .get(index as usize)
            .copied()
            .flatten()
    }

    /// The code pointer of the anonymous code starting at `start`.
    #[must_use]
    pub fn code_pointer(&self, start: usize) -> Option<CodePointer> {
        self.live.get(&start).and_then(|l| l.pointer)
    }

    /// The manager.
    #[must_use]
    pub fn manager(&self) -> &CodeManager<M> {
        self.allocator.manager()
    }

    /// The allocator (statistics, code spaces).
    #[must_use]
    pub fn allocator(&self) -> &CodeAllocator<M> {
        &self.allocator
    }

    /// The code object holding `pc`, in any module sharing these registries.
    #[must_use]
    pub fn lookup_code(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.registries.lookup_code(pc)
    }

    /// Start of the code installed for function `index`.
    #[must_use]
    pub fn function_code(&self, index: u32) -> Option<usize> {
        self.functions.get(index as usize).copied().flatten()
    }

    /// Layouts of the jump tables, one per code space that has its own.
    pub fn jump_tables(&self) -> impl Iterator<Item = &JumpTableLayout> {
        self.tables.iter().map(|t| &t.layout)
    }

    /// Address of function `index`'s near slot in the table serving `pc`'s code space (what
    /// generated code at `pc` calls).
    #[must_use]
    pub fn slot_address_for(&self, index: u32, pc: usize) -> Option<usize> {
        self.table_for(pc)?.layout.near_slot_addr(index)
    }

    /// The table reachable by rel32 from every address of the code space holding `addr`.
    fn table_for(&self, addr: usize) -> Option<&Tables> {
        let space = self
            .allocator
            .code_spaces()
            .iter()
            .find(|s| s.contains(addr))
            .copied();
        let span = space.unwrap_or(AddressRange::new(addr, addr.saturating_add(1)));
        self.tables.iter().find(|t| reaches(t.layout.range(), span))
    }

    /// Emits and publishes jump tables inside `region`, filled with the current targets.
    fn create_tables(&mut self, region: AddressRange) -> Result<(), ModuleError> {
        let lazy = self.config.lazy_entry.is_some();
        let size = tables_size(self.config.functions, lazy);
        // Tables get pages of their own: code published or freed next to them (a flip in Flip
        // mode, INT3 fills) must never touch a page that calls are executing through.
        let mut w = if region.size() == usize::MAX {
            // No code space yet: the new one starts on a page boundary with the tables.
            self.allocator
                .allocate(crate::range::page_round_up(size).unwrap_or(size))?
        } else {
            self.allocator.allocate_pages_in_region(size, region)?
        };
        let start = w.start();
        let Some(layout) = JumpTableLayout::new(start, self.config.functions, lazy) else {
            let _ = self.allocator.discard(w);
            return Err(ModuleError::JumpTable(
                jump_table::JumpTableError::AllocationFailed,
            ));
        };
        let trampoline = layout.range().end().next_multiple_of(16);
        let targets: Vec<usize> = (0..self.config.functions)
            .map(|i| match self.function_code(i) {
                Some(code) => code,
                None => layout.lazy_slot_addr(i).unwrap_or(0),
            })
            .collect();
        let image = jump_table::emit_tables(&layout, &targets, lazy.then_some(trampoline));
        let mut image = match image {
            Ok(image) => image,
            Err(e) => {
                let _ = self.allocator.discard(w);
                return Err(ModuleError::JumpTable(e));
            }
        };
        if !lazy {
            // Uncompiled slots without lazy compilation trap (INT3) instead of jumping anywhere.
            for i in 0..self.config.functions {
                if self.function_code(i).is_none() {
                    let at = layout.near_slot_addr(i).unwrap_or(start) - start;
                    image[at..at + jump_table::NEAR_SLOT_SIZE].fill(0xCC);
                }
            }
        }
        if let Some(entry) = self.config.lazy_entry {
            image.resize(trampoline - start, 0xCC);
            image.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
            image.extend_from_slice(&(entry as u64).to_le_bytes());
        }
        image.resize(w.as_slice().len(), 0xCC);
        w.as_mut_slice().copy_from_slice(&image);
        let code = self.allocator.publish(w).map_err(|r| {
            let _ = self.allocator.discard(r.code);
            ModuleError::Code(r.error)
        })?;
        let desc = CodeDesc::new(CodeKind::JumpTable, code.range());
        let object = match CodeObject::new(&desc) {
            Ok(o) => Arc::new(o),
            Err(e) => {
                let _ = self.allocator.free(code);
                return Err(ModuleError::Metadata(e));
            }
        };
        self.install(object, code, None, None)?;
        self.tables.push(Tables { layout });
        Ok(())
    }

    /// Makes sure the code space holding `addr` reaches a jump table, creating one inside it.
    fn ensure_tables_for(&mut self, addr: usize) -> Result<(), ModuleError> {
        if self.config.functions == 0 || self.table_for(addr).is_some() {
            return Ok(());
        }
        let space = self
            .allocator
            .code_spaces()
            .iter()
            .find(|s| s.contains(addr))
            .copied()
            .ok_or(ModuleError::UnknownCode { start: addr })?;
        self.create_tables(space)
    }

    /// Adds code: allocates, resolves relocations, publishes, registers trap data and PC lookup,
    /// and for a function installs it in every jump table (replacing what was there).
    ///
    /// # Errors
    /// Invalid metadata, index, landing pad or relocation; allocation or commit failures.
    /// Nothing changes on error.
    pub fn add_code(&mut self, new: &NewCode<'_>) -> Result<Arc<CodeObject>, ModuleError> {
        if let Some(index) = new.index {
            if index >= self.config.functions {
                return Err(ModuleError::BadIndex { index });
            }
        }
        let landing = match (new.protected.is_empty(), new.landing_pad) {
            (true, _) => None,
            (false, Some(pad)) if (pad as usize) < new.bytes.len() => Some(pad as usize),
            (false, _) => return Err(ModuleError::BadLandingPad),
        };
        let mut w = self.allocator.allocate(new.bytes.len())?;
        // Not only for a new code space: an earlier add may have reserved this space and then
        // failed to create its tables.
        if let Err(e) = self.ensure_tables_for(w.start()) {
            let _ = self.allocator.discard(w);
            return Err(e);
        }
        let start = w.start();
        let instructions = AddressRange::new(start, start + new.bytes.len().max(1));
        let desc = CodeDesc {
            kind: new.kind,
            index: new.index,
            instructions,
            protected_instructions: new.protected,
            relocations: new.relocations,
            source_positions: new.source_positions,
            name: new.name,
        };
        let object = match CodeObject::new(&desc) {
            Ok(o) => Arc::new(o),
            Err(e) => {
                let _ = self.allocator.discard(w);
                return Err(ModuleError::Metadata(e));
            }
        };
        w.as_mut_slice().copy_from_slice(new.bytes);
        if let Err(e) = self.relocate(start, w.as_mut_slice(), new.relocations) {
            let _ = self.allocator.discard(w);
            return Err(e);
        }
        let code = self.allocator.publish(w).map_err(|r| {
            let _ = self.allocator.discard(r.code);
            ModuleError::Code(r.error)
        })?;
        let trap = match landing {
            None => None,
            Some(pad) => {
                match self
                    .registries
                    .traps
                    .register(instructions, new.protected, start + pad)
                {
                    Ok(h) => Some(h),
                    Err(e) => {
                        let _ = self.allocator.free(code);
                        return Err(ModuleError::Trap(e));
                    }
                }
            }
        };
        // Code pointers are reserved now (a full table fails cleanly) but aimed at the code only
        // once it is registered and installed: no indirect call reaches unregistered code.
        let (pointer, new_function_pointer) = match self.reserve_pointer(new.index) {
            Ok(p) => p,
            Err(e) => {
                if let Some(h) = trap {
                    let _ = self.registries.traps.release(h);
                }
                let _ = self.allocator.free(code);
                return Err(e);
            }
        };
        if let Err(e) = self.install(Arc::clone(&object), code, trap, pointer) {
            self.drop_pointer(new_function_pointer);
            return Err(e);
        }
        if let Some(index) = new.index {
            let old = self.functions[index as usize];
            if let Err(e) = self.patch_slot(index, start) {
                // Aim every table back at what it held, then free the new code in the safe order.
                self.restore_slot(index, old);
                self.drop_pointer(new_function_pointer);
                self.free_live(start);
                return Err(e);
            }
            self.functions[index as usize] = Some(start);
            if let (Some(table), Some(p)) = (self.pointers, self.function_pointer(index)) {
                let _ = table.update(p, start);
            }
            if let Some(old) = old {
                self.release_ref(old);
            }
        } else if let (Some(table), Some(p)) = (self.pointers, pointer) {
            let _ = table.update(p, start);
        }
        Ok(object)
    }

    /// Reserves a code pointer for new code, aimed at the table's trap address for now: a fresh
    /// one for anonymous code, and for a function its index's shared one (allocated on first
    /// use). Returns (the anonymous code's pointer, the function pointer allocated by this call).
    fn reserve_pointer(
        &mut self,
        index: Option<u32>,
    ) -> Result<(Option<CodePointer>, Option<u32>), ModuleError> {
        let Some(table) = self.pointers else {
            return Ok((None, None));
        };
        match index {
            None => table
                .allocate(table.trap_address())
                .map(|p| (Some(p), None))
                .map_err(ModuleError::CodePointer),
            Some(i) if self.function_pointers[i as usize].is_none() => {
                let p = table
                    .allocate(table.trap_address())
                    .map_err(ModuleError::CodePointer)?;
                self.function_pointers[i as usize] = Some(p);
                Ok((None, Some(i)))
            }
            Some(_) => Ok((None, None)),
        }
    }

    /// Frees the function pointer `reserve_pointer` allocated for index `index`, if any.
    fn drop_pointer(&mut self, index: Option<u32>) {
        let Some(i) = index else { return };
        if let (Some(table), Some(p)) = (self.pointers, self.function_pointers[i as usize].take()) {
            let _ = table.free(p);
        }
    }

    /// Points slot `index` of every table back at `old` code, or at its uncompiled state (the
    /// lazy slot, or INT3) — best effort, after a failed patch.
    fn restore_slot(&mut self, index: u32, old: Option<usize>) {
        if let Some(old) = old {
            let _ = self.patch_slot(index, old);
            return;
        }
        let manager = self.allocator.manager().clone();
        for t in &self.tables {
            let Some(near) = t.layout.near_slot_addr(index) else {
                continue;
            };
            let value = t
                .layout
                .lazy_slot_addr(index)
                .and_then(|lazy| jump_table::near_slot(near, lazy))
                .unwrap_or(u64::from_le_bytes([0xCC; 8]));
            let _ = manager.patch_u64(near, value);
        }
    }

    /// Registers published code in PC lookup, reports it, and keeps it.
    fn install(
        &mut self,
        object: Arc<CodeObject>,
        code: PublishedCode,
        trap: Option<TrapHandle>,
        pointer: Option<CodePointer>,
    ) -> Result<(), ModuleError> {
        if let Err(e) = self.registries.code.insert(Arc::clone(&object)) {
            if let Some(h) = trap {
                let _ = self.registries.traps.release(h);
            }
            if let (Some(table), Some(p)) = (self.pointers, pointer) {
                let _ = table.free(p);
            }
            let _ = self.allocator.free(code);
            return Err(ModuleError::CodeMap(e));
        }
        if let Some(listener) = self.listener {
            listener.code_published(&CodeEvent::new(&object));
        }
        self.live.insert(
            code.start(),
            Live {
                object,
                code,
                trap,
                pointer,
                module_ref: true,
            },
        );
        Ok(())
    }

    /// Resolves `relocations` of code that will live at `start`, in its staging bytes.
    fn relocate(
        &self,
        start: usize,
        bytes: &mut [u8],
        relocations: &[Relocation],
    ) -> Result<(), ModuleError> {
        for r in relocations {
            let at = r.offset as usize;
            let bad = ModuleError::BadRelocation { offset: r.offset };
            match r.kind {
                RelocKind::CallSlot { slot } => {
                    let slot_addr = self.slot_address_for(slot, start).ok_or(bad)?;
                    // A rel32 call or jump: the opcode byte precedes the field.
                    let opcode = at.checked_sub(1).and_then(|o| bytes.get(o)).ok_or(bad)?;
                    if !matches!(opcode, 0xE8 | 0xE9) {
                        return Err(bad);
                    }
                    let rel = jump_table::rel32(start + at + 4, slot_addr).ok_or(bad)?;
                    bytes
                        .get_mut(at..at + 4)
                        .ok_or(bad)?
                        .copy_from_slice(&rel.to_le_bytes());
                }
                RelocKind::InternalReference { target_offset } => {
                    let target = (start + target_offset as usize) as u64;
                    bytes
                        .get_mut(at..at + 8)
                        .ok_or(bad)?
                        .copy_from_slice(&target.to_le_bytes());
                }
            }
        }
        if cfg!(debug_assertions) {
            self.validate(start, bytes, relocations)?;
        }
        Ok(())
    }

    /// V8's `Validate` in debug builds: every call lands on a slot of the code's own space's
    /// table, every internal reference inside the object.
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
                    let field = bytes.get(at..at + 4).ok_or(bad)?;
                    let rel = i32::from_le_bytes([field[0], field[1], field[2], field[3]]);
                    let target = (start + at + 4).wrapping_add_signed(rel as isize);
                    let lands = table.and_then(|t| t.layout.slot_for_near_addr(target));
                    if lands != Some(slot) {
                        return Err(bad);
                    }
                }
                RelocKind::InternalReference { .. } => {
                    let field = bytes.get(at..at + 8).ok_or(bad)?;
                    let mut q = [0u8; 8];
                    q.copy_from_slice(field);
                    let target = u64::from_le_bytes(q) as usize;
                    if !(start..start + bytes.len()).contains(&target) {
                        return Err(bad);
                    }
                }
            }
        }
        Ok(())
    }

    /// Points function `index`'s slot in every table at `target`: a direct near jump when in
    /// rel32 reach (one store), else the far slot's target then the near slot pointing at it
    /// (two stores through one alias mapping when they share a page). Each update is
    /// one aligned 8-byte atomic store through the writable alias; code executing through the
    /// slot sees the old or the new jump, never a mix.
    ///
    /// # Errors
    /// Bad index; backend failures.
    pub fn patch_slot(&mut self, index: u32, target: usize) -> Result<(), ModuleError> {
        if index >= self.config.functions {
            return Err(ModuleError::BadIndex { index });
        }
        let manager = self.allocator.manager().clone();
        for t in &self.tables {
            let p = t
                .layout
                .patch(index, target)
                .ok_or(ModuleError::BadIndex { index })?;
            if p.direct {
                // In reach: the near slot alone decides; the far slot is not on the path.
                manager.patch_u64(p.near_addr, p.near_value)?;
            } else {
                // Far target first, then the near slot pointing at the far slot: a caller sees
                // the old jump or the complete new path, never a half-set far slot. Both stores
                // share one alias mapping when they share a page.
                manager.patch_u64s(&[
                    (p.far_target_addr, p.target as u64),
                    (p.near_addr, p.near_value),
                ])?;
            }
        }
        Ok(())
    }

    /// Drops the module's reference to the code at `start`; frees it when that was the last.
    fn release_ref(&mut self, start: usize) {
        let Some(live) = self.live.get_mut(&start) else {
            return;
        };
        if !core::mem::replace(&mut live.module_ref, false) {
            return;
        }
        if live.object.dec_ref() == DecRef::Dead {
            self.free_live(start);
        }
    }

    /// Frees code whose reference count reached zero elsewhere (dying code found by a liveness
    /// scan, V8's `FreeDeadCode`); returns how many objects were freed.
    pub fn free_dead_code(&mut self) -> usize {
        let dead: Vec<usize> = self
            .live
            .iter()
            // Jump tables are the module's own until it is dropped, whatever a holder did.
            .filter(|(_, l)| l.object.is_dying() && l.object.kind() != CodeKind::JumpTable)
            .map(|(&s, _)| s)
            .collect();
        for &start in &dead {
            self.free_live(start);
        }
        dead.len()
    }

    /// Drops the module's reference to the code at `start` (a wrapper, or a function no longer
    /// installed): it is freed now when nobody else holds a reference, else once the last holder's
    /// `dec_ref` returns `Dead` and [`free_dead_code`](Self::free_dead_code) runs.
    ///
    /// # Errors
    /// [`ModuleError::UnknownCode`] when no code of this module starts there, it is a jump table
    /// or still installed in a jump-table slot, or the module's reference was already dropped.
    pub fn free_code(&mut self, start: usize) -> Result<(), ModuleError> {
        let installed = self.functions.contains(&Some(start));
        let releasable = self
            .live
            .get(&start)
            .is_some_and(|l| l.module_ref && l.object.kind() != CodeKind::JumpTable);
        if installed || !releasable {
            return Err(ModuleError::UnknownCode { start });
        }
        self.release_ref(start);
        Ok(())
    }

    /// Trap entry first, then PC lookup, then memory.
    fn free_live(&mut self, start: usize) {
        let Some(live) = self.live.remove(&start) else {
            return;
        };
        if let Some(h) = live.trap {
            let _ = self.registries.traps.release(h);
        }
        if let (Some(table), Some(p)) = (self.pointers, live.pointer) {
            // Reset to the table's trap address: a stale indirect call traps, never runs freed code.
            let _ = table.free(p);
        }
        let _ = self.registries.code.remove(start);
        if let Some(listener) = self.listener {
            listener.code_freed(&CodeEvent::new(&live.object));
        }
        let _ = self.allocator.free(live.code);
    }

    /// Number of live code objects (jump tables included).
    #[must_use]
    pub fn code_count(&self) -> usize {
        self.live.len()
    }
}

/// Whether every address of `span` reaches every address of `table` with a rel32 displacement.
fn reaches(table: AddressRange, span: AddressRange) -> bool {
    let lo = table.start().min(span.start());
    let hi = table.end().max(span.end());
    hi - lo <= REACH
}

impl<M: Mmu> Drop for CodeModule<M> {
    fn drop(&mut self) {
        if let Some(table) = self.pointers {
            for p in self.function_pointers.iter().flatten() {
                let _ = table.free(*p);
            }
        }
        let starts: Vec<usize> = self.live.keys().copied().collect();
        for start in starts {
            self.free_live(start);
        }
    }
}

impl<M: Mmu> fmt::Debug for CodeModule<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeModule")
            .field("functions", &self.config.functions)
            .field("code", &self.live.len())
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}
