//! A module's code: the allocator, code objects, trap registration, PC lookup and jump tables,
//! kept consistent with each other (V8's `NativeModule`), usable from many CPUs at once.
//!
//! Every code space gets jump tables (near, far and, with lazy compilation, lazy) unless it can
//! reach an existing table within ±2 GiB. Generated code calls other functions only through its
//! own space's table: a [`RelocKind::CallSlot`](crate::code_object::RelocKind) relocation is
//! resolved to that table's slot when the code is copied in. Replacing a function is one aligned
//! 8-byte store per table, through the private alias, and one serialization of every CPU — or,
//! under [`PatchProtocol::Int3`](crate::manager::PatchProtocol::Int3), three stores per slot
//! in three alias sessions, each followed by a serialization round.
//!
//! # Concurrency
//! All methods take `&self`. The module's books live behind an [`IrqLock`], held with interrupts
//! as the caller had them (so the manager's lock, taken under it, still knows whether the caller
//! can wait). Called with interrupts off (an interrupt handler) while the lock is held — by
//! another CPU, or by the code the handler interrupted — a method answers
//! [`ModuleError::Busy`] instead of spinning. Lock order: this module's lock, then the trap
//! table's and code map's writer locks, then the manager's lock, then the backend's. Nothing
//! takes a module lock while holding one of those. An interrupt handler may add code when the
//! registries were built [`with_interrupt_control`](Registries::with_interrupt_control) (their
//! writer locks are then held with interrupts off, so the handler never finds one held by the
//! code it interrupted); without it, add code only with interrupts on.
//!
//! Freed and replaced code lives on until a grace period has passed (see the private `lifetime` module); call
//! [`CodeModule::reclaim`] (or any other writing method, which reclaims first) after CPUs
//! reported quiescent states to the registries' grace domain.

use alloc::sync::Arc;
use alloc::vec::Vec;

mod config;
mod entry;
mod image;
mod install;
mod lifetime;
#[cfg(all(test, loom))]
mod loom_models;
mod registries;
mod relocation;
mod state;
mod tables;

pub use config::{ModuleConfig, ModuleError, NewCode};
pub use image::{CodeImage, ImageTraps, LandingPad};
pub use registries::Registries;

use crate::code_events::CodeEventListener;
use crate::code_object::CodeObject;
use crate::code_pointer_table::{CodePointer, CodePointerTable};
use crate::jump_table::JumpTableLayout;
use crate::manager::{AllocatorConfig, AllocatorStats, CodeAllocator, CodeManager};
use crate::mmu::{InterruptControl, Mmu};
use crate::range::page_round_up;
use crate::sync::irq_lock::{IrqGuard, IrqLock};
use state::{nones, ModuleState};

/// The result of [`CodeModule::install_if_absent`].
#[derive(Debug, Clone)]
pub enum Installed {
    /// This call installed the code.
    New(Arc<CodeObject>),
    /// Another caller installed code for the index first; this call changed nothing. The start
    /// of that code.
    Existing(usize),
}

impl Installed {
    /// Start of the function's code, whoever installed it.
    #[must_use]
    pub fn start(&self) -> usize {
        match self {
            Installed::New(o) => o.instruction_start(),
            Installed::Existing(s) => *s,
        }
    }
}

/// One module's code (V8's `NativeModule`). Dropping it resets its code pointers to the trap
/// address at once and hands its code to the registries' grace domain, which frees it once every
/// CPU passed a quiescent state
/// ([`GraceDomain::reclaim`](crate::sync::grace::GraceDomain::reclaim)).
pub struct CodeModule<M: Mmu + Send + 'static> {
    manager: CodeManager<M>,
    registries: &'static Registries,
    irq: InterruptControl,
    state: IrqLock<Option<ModuleState<M>>>,
}

impl<M: Mmu + Send + 'static> CodeModule<M> {
    /// A module with `config.functions` jump-table slots over `manager`; the first code space and
    /// its tables are created now when there are functions.
    ///
    /// # Errors
    /// [`ModuleError::TooManyFunctions`] when the tables would not fit a code space (checked
    /// before anything is allocated); reservation, commit or publish failures.
    pub fn new(
        manager: &CodeManager<M>,
        registries: &'static Registries,
        config: ModuleConfig,
    ) -> Result<Self, ModuleError> {
        let functions = config.functions;
        let too_many = ModuleError::TooManyFunctions { functions };
        let tables = tables::tables_size(functions, config.lazy_entry.is_some()).ok_or(too_many)?;
        // Tables take whole pages, plus up to a page of slack to start on a page boundary.
        let overhead = match tables {
            0 => 0,
            t => page_round_up(t)
                .and_then(|p| p.checked_add(crate::PAGE_SIZE))
                .ok_or(too_many)?,
        };
        if overhead > manager.config().max_code_space_size {
            return Err(too_many);
        }
        // The first tables go into the initial reservation (page aligned, so whole pages fit
        // without slack): refuse before reserving it when they cannot.
        let initial = config.initial_reservation;
        let fits = |tables| page_round_up(initial).zip(page_round_up(tables));
        if tables > 0 && initial > 0 && fits(tables).is_some_and(|(room, need)| room < need) {
            return Err(too_many);
        }
        let mut state = ModuleState {
            allocator: CodeAllocator::new(
                manager,
                AllocatorConfig {
                    overhead,
                    growable: config.growable,
                    initial_reservation: config.initial_reservation,
                    rox: config.rox,
                },
            )?,
            registries,
            config,
            listener: None,
            pointers: None,
            tables: Vec::new(),
            live: alloc::collections::BTreeMap::new(),
            functions: nones(functions)?,
            slots: nones(functions)?,
            targeted: alloc::collections::BTreeMap::new(),
            function_pointers: nones(functions)?,
            externals: alloc::collections::BTreeSet::new(),
            retired: Vec::new(),
            unfreed: Vec::new(),
            needs_sync: false,
            images: alloc::collections::BTreeMap::new(),
            retired_images: Vec::new(),
        };
        if functions > 0 {
            let first = state.allocator.code_spaces().first().copied();
            // On error `state` is dropped here, not handed to the grace domain: no CPU can have
            // run code of a module that never existed (`create_tables` took back its table, and
            // nothing else was added), so its allocator releases the code space it reserved at
            // once and the manager is as before.
            state.create_tables(first)?;
        }
        let irq = manager.lock_control();
        Ok(CodeModule {
            manager: manager.clone(),
            registries,
            irq,
            state: IrqLock::new(Some(state)),
        })
    }

    /// Runs `f` on the books under the module lock.
    fn with<R>(
        &self,
        f: impl FnOnce(&mut ModuleState<M>) -> Result<R, ModuleError>,
    ) -> Result<R, ModuleError> {
        let mut guard: IrqGuard<'_, _> = self
            .state
            .lock_interruptible(self.irq)
            .map_err(|_| ModuleError::Busy)?;
        let state = guard.as_mut().ok_or(ModuleError::Busy)?;
        f(state)
    }

    /// Like `with`, after reclaiming retired code whose grace period is over — unless the caller
    /// had interrupts off: reclaiming may free many objects (an INT3 fill and perhaps a decommit
    /// each), too long for an interrupt handler; the next call with interrupts on does it.
    fn writing<R>(
        &self,
        f: impl FnOnce(&mut ModuleState<M>) -> Result<R, ModuleError>,
    ) -> Result<R, ModuleError> {
        let mut guard = self
            .state
            .lock_interruptible(self.irq)
            .map_err(|_| ModuleError::Busy)?;
        let reclaim_ok = guard.interrupts_were_enabled();
        let state = guard.as_mut().ok_or(ModuleError::Busy)?;
        if reclaim_ok {
            state.reclaim();
        }
        f(state)
    }

    /// Reports published and freed code to `listener` from now on.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn set_listener(
        &self,
        listener: Option<&'static dyn CodeEventListener>,
    ) -> Result<(), ModuleError> {
        self.with(|s| {
            s.listener = listener;
            Ok(())
        })
    }

    /// Gives code entry points handles in `table` for indirect calls (V8's
    /// `WasmCodePointerTable`): each function index gets one handle, shared by its versions and
    /// aimed at whatever its slot targets; anonymous code (wrappers) gets a handle of its own,
    /// reset to the trap address when the code is retired. Set it before adding code: once the
    /// module holds pointers the table cannot change (they would be freed in the wrong table).
    ///
    /// # Errors
    /// [`ModuleError::CodePointersExist`] for a different table (or `None`) once the module
    /// holds pointers; [`ModuleError::Busy`];
    /// [`ModuleError::CodePointer`]`(`[`CodePointerError::OtherGraceDomain`](crate::code_pointer_table::CodePointerError::OtherGraceDomain)`)`
    /// when the table reuses freed handles after grace periods of another domain than the
    /// registries' (a handle freed with its code could then be reused while a CPU that read it
    /// is still about to call through it).
    pub fn set_code_pointer_table(
        &self,
        table: Option<&'static CodePointerTable>,
    ) -> Result<(), ModuleError> {
        self.with(|s| {
            if let Some(t) = table {
                if !core::ptr::eq(t.grace(), s.registries.grace()) {
                    return Err(ModuleError::CodePointer(
                        crate::code_pointer_table::CodePointerError::OtherGraceDomain,
                    ));
                }
            }
            let same = match (s.pointers, table) {
                (Some(a), Some(b)) => core::ptr::eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            };
            if !same && s.holds_pointers() {
                return Err(ModuleError::CodePointersExist);
            }
            s.pointers = table;
            Ok(())
        })
    }

    /// Lets slots target `entry`, code outside the module: a runtime stub, a kernel function,
    /// another module's code. A slot jumps wherever it points, and the module cannot know when
    /// code it does not own goes away; hence the contract.
    ///
    /// What can be checked is: `entry` must lie outside every code space of this module (code
    /// there is freed and its range reused on the module's own schedule, while the slot would
    /// still jump there), and, inside the manager's code window, in some code space (anywhere
    /// else in the window is unmapped, or a code space reserved later).
    ///
    /// # Safety
    /// `entry` is the first instruction of code that stays mapped, executable and callable the
    /// way the module's generated code calls through its slots (its calling convention and
    /// signature) for as long as any slot of this module may jump to it: until every slot
    /// patched to it was patched elsewhere and a grace period of the registries' domain passed
    /// since, or until this module was dropped and its grace period passed. For another module's
    /// code this means that module (and the code, not freed or replaced) outlives those uses.
    ///
    /// # Errors
    /// [`ModuleError::BadExternal`] (nothing recorded); [`ModuleError::Busy`].
    pub unsafe fn register_external(&self, entry: usize) -> Result<(), ModuleError> {
        self.with(|s| {
            let bad = ModuleError::BadExternal { entry };
            if s.allocator.space_of(entry).is_some() {
                return Err(bad);
            }
            // Lock order: the module's lock (held), then the manager's.
            if self.manager.window().contains(entry) && self.manager.space_of(entry)?.is_none() {
                return Err(bad);
            }
            s.externals.insert(entry);
            Ok(())
        })
    }

    /// Adds code: allocates, resolves relocations, publishes, registers trap data and PC lookup,
    /// and for a function installs it in every jump table (replacing what was there; the old
    /// code is retired once nothing else reaches it).
    ///
    /// # Errors
    /// Invalid metadata, index, landing pad or relocation; allocation or commit failures. Nothing
    /// changes on error, except as [`CodeError::SyncFailed`](crate::CodeError::SyncFailed) says.
    pub fn add_code(&self, new: &NewCode<'_>) -> Result<Arc<CodeObject>, ModuleError> {
        let mut objects = self.add_code_batch(core::slice::from_ref(new))?;
        Ok(objects.remove(0))
    }

    /// Adds many objects at once, all or nothing: one publish (one shootdown round), one trap
    /// and PC-lookup registration step, one slot patch (one serialization round, or the INT3
    /// protocol's three: see [`patch_slots`](Self::patch_slots)).
    ///
    /// # Errors
    /// As [`add_code`](Self::add_code); an index given twice is [`ModuleError::BadIndex`].
    pub fn add_code_batch(
        &self,
        batch: &[NewCode<'_>],
    ) -> Result<Vec<Arc<CodeObject>>, ModuleError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.writing(|s| s.add_batch(batch))
    }

    /// Installs `new` (a function) unless its index already has code: two CPUs that compiled
    /// the same lazy function install it once; the loser's bytes are never allocated.
    ///
    /// # Errors
    /// As [`add_code`](Self::add_code); [`ModuleError::BadIndex`] for code without an index.
    pub fn install_if_absent(&self, new: &NewCode<'_>) -> Result<Installed, ModuleError> {
        let index = new.index.ok_or(ModuleError::BadIndex { index: u32::MAX })?;
        self.writing(|s| {
            let i = s.check_index(index)?;
            if let Some(start) = s.functions[i] {
                return Ok(Installed::Existing(start));
            }
            let mut objects = s.add_batch(core::slice::from_ref(new))?;
            Ok(Installed::New(objects.remove(0)))
        })
    }

    /// Points function `index`'s slot in every table at `target`, which must be code of this
    /// module or a registered external entry. When this returns, every CPU executes the new
    /// target. The function's code pointer follows the slot.
    ///
    /// # Errors
    /// [`ModuleError::BadIndex`], [`ModuleError::UnknownTarget`]; backend failures (nothing
    /// changed) or [`CodeError::SyncFailed`](crate::CodeError::SyncFailed) (the slot changed).
    pub fn patch_slot(&self, index: u32, target: usize) -> Result<(), ModuleError> {
        self.patch_slots(&[(index, target)])
    }

    /// Several [`patch_slot`](Self::patch_slot)s at once, per the manager's
    /// [`PatchProtocol`](crate::manager::PatchProtocol): one alias session and one
    /// serialization round, or under [`Int3`](crate::manager::PatchProtocol::Int3) three of
    /// each (and a pending INT3 patch's remaining rounds first).
    ///
    /// Callable from interrupt context: it answers [`ModuleError::Busy`] if the module lock
    /// is held elsewhere instead of spinning. It does allocate (the list of stores), and each
    /// serialization round is an IPI to every other CPU waited for with interrupts off, so
    /// under `Int3` a handler waits through three rounds. It is not refused for that: the
    /// wait is of the same kind as `AtomicStore`'s one round (other CPUs acknowledge from
    /// their IPI handler, which does not need this CPU's interrupts), and `Busy` means a held
    /// lock, retried later — not a cost. A handler that cannot afford the rounds should defer
    /// the patch to a context with interrupts on.
    ///
    /// # Errors
    /// As `patch_slot`; all or nothing. [`CodeError::PatchPending`](crate::CodeError::PatchPending):
    /// an earlier INT3 patch's rounds failed again, nothing changed.
    pub fn patch_slots(&self, patches: &[(u32, usize)]) -> Result<(), ModuleError> {
        let changes: Vec<(u32, Option<usize>)> =
            patches.iter().map(|&(i, t)| (i, Some(t))).collect();
        self.with(|s| s.set_slots(&changes))
    }

    /// Drops the module's reference to the code at `start` (anonymous code, or a function no
    /// longer installed): it is retired now when nobody else holds a reference, else once the
    /// last holder's `dec_ref` returns `Dead` and [`free_dead_code`](Self::free_dead_code) runs.
    ///
    /// # Errors
    /// [`ModuleError::UnknownCode`] (no such code, a jump table, or the reference already
    /// dropped), [`ModuleError::StillInstalled`], [`ModuleError::StillTargeted`].
    pub fn free_code(&self, start: usize) -> Result<(), ModuleError> {
        self.writing(|s| s.free_code(start))
    }

    /// Retires code whose reference count reached zero elsewhere (V8's `FreeDeadCode`), unless a
    /// slot or pointer still reaches it; returns how many objects were retired.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn free_dead_code(&self) -> Result<usize, ModuleError> {
        self.writing(|s| Ok(s.free_dead_code()))
    }

    /// Frees retired code whose grace period is over; returns how many objects.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn reclaim(&self) -> Result<usize, ModuleError> {
        self.with(|s| Ok(s.reclaim()))
    }

    /// The manager.
    #[must_use]
    pub fn manager(&self) -> &CodeManager<M> {
        &self.manager
    }

    /// The code object holding `pc`, in any module sharing these registries. Lock-free.
    #[must_use]
    pub fn lookup_code(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.registries.lookup_code(pc)
    }

    /// Start of the code installed for function `index`.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn function_code(&self, index: u32) -> Result<Option<usize>, ModuleError> {
        self.with(|s| Ok(s.functions.get(index as usize).copied().flatten()))
    }

    /// What function `index`'s slots jump to (`None`: the lazy slot or INT3).
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn slot_target(&self, index: u32) -> Result<Option<usize>, ModuleError> {
        self.with(|s| Ok(s.slots.get(index as usize).copied().flatten()))
    }

    /// The code pointer of function `index`, once it has code.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn function_pointer(&self, index: u32) -> Result<Option<CodePointer>, ModuleError> {
        self.with(|s| Ok(s.function_pointers.get(index as usize).copied().flatten()))
    }

    /// The code pointer of the anonymous code starting at `start`.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn code_pointer(&self, start: usize) -> Result<Option<CodePointer>, ModuleError> {
        self.with(|s| Ok(s.live.get(&start).and_then(|l| l.pointer)))
    }

    /// Layouts of the jump tables, one per code space that has its own.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn jump_tables(&self) -> Result<Vec<JumpTableLayout>, ModuleError> {
        self.with(|s| Ok(s.tables.iter().map(|t| t.layout).collect()))
    }

    /// Address of function `index`'s near slot in the table serving `pc`'s code space (what
    /// generated code at `pc` calls).
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn slot_address_for(&self, index: u32, pc: usize) -> Result<Option<usize>, ModuleError> {
        self.with(|s| Ok(s.table_for(pc).and_then(|t| t.layout.near_slot_addr(index))))
    }

    /// Counters of the module's allocator.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn stats(&self) -> Result<AllocatorStats, ModuleError> {
        self.with(|s| Ok(s.allocator.stats()))
    }

    /// The module's code spaces (usable ranges), in creation order.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn code_spaces(&self) -> Result<Vec<crate::AddressRange>, ModuleError> {
        self.with(|s| Ok(s.allocator.code_spaces().to_vec()))
    }

    /// Live code objects (jump tables included) and retired ones still waiting for their grace
    /// period.
    ///
    /// # Errors
    /// [`ModuleError::Busy`].
    pub fn code_count(&self) -> Result<(usize, usize), ModuleError> {
        self.with(|s| Ok((s.live.len(), s.retired.len())))
    }
}

impl<M: Mmu + Send + 'static> core::fmt::Debug for CodeModule<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CodeModule").finish_non_exhaustive()
    }
}
