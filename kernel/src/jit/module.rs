//! A JIT module: Cranelift output installed in a codespace `CodeModule`.
//!
//! This file holds every call into `CodeModule` the glue makes (`new`, `add_code`, the slot
//! address, the installed code, reclaiming replaced code), so moving to another codespace API
//! touches this file only.
//!
//! Replaced code is retired by the module and freed once every CPU passed a quiescent state:
//! this glue reports one for the calling CPU whenever it knows the CPU holds nothing — task
//! context (never an interrupt handler, which cannot know what the task it interrupted holds)
//! and no generated frame on its stack (no [`enter`] active on it) — and idle CPUs report from
//! their idle loop.
//!
//! # Concurrency
//!
//! A [`JitModule`] is shared between CPUs (in a `static`, an `Arc`, or borrowed by work on other
//! CPUs): every method takes `&self`. Code, slots and retirement are `CodeModule`'s, behind its
//! IRQ-safe lock (interrupt context gets `Busy` instead of spinning on it). The only state of
//! the glue itself is each function's parameter count, one atomic word per function: written
//! after the code is installed (a caller that reads the word first gets `NotCompiled`, as before
//! the install), read before a call. Calls take no lock at all: they read the slot address (fixed
//! for the module's life) and jump, so generated code never runs with a module lock held.
//!
//! Every `CodeModule` call (its drop included) runs inside [`module_call`]: the module's lock is
//! held with interrupts as the caller had them, so only that per-CPU count tells the stop NMI
//! of timed-out work not to abandon a job holding it.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::sync::atomic::{AtomicUsize, Ordering};

use codespace::code_object::CodeObject;
use codespace::jump_table::JumpTableLayout;
use codespace::mmu::Mmu;
use codespace::module::{CodeModule, Installed, ModuleConfig, ModuleError, NewCode, Registries};

use crate::code;
use crate::smp::work::module_call;
use codespace::{CodeError, CodeManager};

use super::compile::{CompiledFunction, HostFunction, Linkage};
use super::enter::{self, enter};
use super::linear_memory::LinearMemory;
use super::JitError;

/// Settings of a [`JitModule`].
#[derive(Debug, Clone, Copy)]
pub struct JitConfig {
    /// Number of functions (jump-table slots), indices `0..functions`.
    pub functions: u32,
    /// Kernel functions generated code may call (namespace `HOST`).
    pub host: &'static [HostFunction],
    /// The lazy-compile entry: functions start as lazy slots that call it (see `lazy`).
    pub lazy_entry: Option<usize>,
}

/// Compiled functions in a codespace module, callable through their jump-table slots.
pub struct JitModule<M: Mmu + Send + 'static> {
    /// Dropped in `drop`, inside [`module_call`] (the drop takes the module's lock).
    module: ManuallyDrop<CodeModule<M>>,
    config: JitConfig,
    /// The first jump table, where callers enter (fixed for the module's life: created with the
    /// module, never moved), so a call needs no module lock.
    table: Option<JumpTableLayout>,
    /// Parameter count of each function once known (compiled, or declared for lazy slots),
    /// [`UNKNOWN`] before.
    params: Vec<AtomicUsize>,
}

/// `params` entry of a function with no code and no declaration.
const UNKNOWN: usize = usize::MAX;

impl<M: Mmu + Send + 'static> core::fmt::Debug for JitModule<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JitModule")
            .field("functions", &self.config.functions)
            .field("module", &self.module)
            .finish()
    }
}

impl<M: Mmu + Send + 'static> JitModule<M> {
    /// A module over `manager`, its code registered in `registries` (the ones the #PF path
    /// consults).
    ///
    /// # Errors
    /// [`JitError::Install`] when the first code space or its jump tables cannot be created.
    pub fn new(
        manager: &CodeManager<M>,
        registries: &'static Registries,
        config: JitConfig,
    ) -> Result<Self, JitError> {
        let module = module_call(|| {
            CodeModule::new(
                manager,
                registries,
                code::module_config(
                    manager,
                    ModuleConfig {
                        functions: config.functions,
                        lazy_entry: config.lazy_entry,
                        ..ModuleConfig::default()
                    },
                ),
            )
        })
        .map_err(install_error)?;
        let table = module_call(|| module.jump_tables())
            .map_err(install_error)?
            .first()
            .copied();
        Ok(JitModule {
            module: ManuallyDrop::new(module),
            config,
            table,
            params: (0..config.functions)
                .map(|_| AtomicUsize::new(UNKNOWN))
                .collect(),
        })
    }

    /// What compiled functions of this module may call.
    #[must_use]
    pub fn linkage(&self) -> Linkage<'static> {
        Linkage {
            functions: self.config.functions,
            host: self.config.host,
        }
    }

    /// Installs `code` as function `index`: publishes it, registers its protected instructions
    /// with its landing pad, and points every jump-table slot of the function at it. Code it
    /// replaces is retired by the module: still registered (a call inside it finishes, a
    /// protected fault in it lands) until a grace period has passed, then freed by
    /// [`reclaim`](Self::reclaim). Any CPU may install while others call the function: a call
    /// that reads the slot before the patch runs the old code, after it the new code.
    ///
    /// # Errors
    /// [`JitError::BadIndex`], [`JitError::CodeTooLarge`], [`JitError::Install`]; nothing is
    /// installed then and the slot keeps its old target.
    pub fn install(
        &self,
        index: u32,
        code: &CompiledFunction,
        name: Option<&str>,
    ) -> Result<Arc<CodeObject>, JitError> {
        self.check_install(index)?;
        let new = self.new_code(index, code, name);
        let object = module_call(|| self.module.add_code(&new)).map_err(install_error)?;
        self.params[index as usize].store(code.params(), Ordering::SeqCst);
        // Under QEMU's TCG a CPU may go on running a translation of the old slot (see
        // `code::settle_slot`); nothing to do on hardware.
        module_call(|| crate::code::settle_slot(&self.module, index));
        Ok(object)
    }

    /// Installs `code` as function `index` unless the function has code already (lazy
    /// compilation: several CPUs may compile the same function at once). The first to get here
    /// installs; the others get [`Installed::Existing`] with the winner's code, and their
    /// compiled bytes are simply dropped — they were never copied into the code window, so
    /// nothing needs freeing.
    ///
    /// # Errors
    /// As [`install`](Self::install).
    pub fn install_if_absent(
        &self,
        index: u32,
        code: &CompiledFunction,
        name: Option<&str>,
    ) -> Result<Installed, JitError> {
        self.check_install(index)?;
        let new = self.new_code(index, code, name);
        let installed =
            module_call(|| self.module.install_if_absent(&new)).map_err(install_error)?;
        if let Installed::New(_) = installed {
            self.params[index as usize].store(code.params(), Ordering::SeqCst);
        }
        Ok(installed)
    }

    /// Checks `index` and frees what can be freed before adding code.
    fn check_install(&self, index: u32) -> Result<(), JitError> {
        if index >= self.config.functions {
            return Err(JitError::BadIndex { index });
        }
        self.reclaim();
        Ok(())
    }

    /// `code` as codespace's `NewCode` for function `index`.
    fn new_code<'a>(
        &self,
        index: u32,
        code: &'a CompiledFunction,
        name: Option<&'a str>,
    ) -> NewCode<'a> {
        NewCode {
            protected: code.protected(),
            landing_pad: code.landing_pad(),
            fault_ranges: &[],
            relocations: code.relocations(),
            source_positions: code.source_positions(),
            name,
            ..NewCode::function(index, code.bytes())
        }
    }

    /// Frees replaced code whose grace period is over. Reports this CPU quiescent first, but
    /// only where the CPU holds nothing: task context (no interrupt or exception handler active
    /// on this CPU: a handler cannot know that the task it interrupted holds nothing — it may
    /// hold a [`lookup`](Self::lookup) result or a [`code`](Self::code) address, or be inside
    /// generated code) and no [`enter`] active (no generated frame on its stack). Elsewhere it
    /// only frees what other reports allow. The caller itself must not hold a `code` address it
    /// will still call (calling one is `unsafe`, under that contract). Returns how many
    /// objects were freed. Other CPUs' calls are unaffected: code they may be running is freed
    /// only once they, too, reported a quiescent state.
    pub fn reclaim(&self) -> usize {
        if reclaim_may_report() {
            // SAFETY: task context with no call into generated code active on this CPU (its
            // entry record is empty; no context migrates between CPUs here), and the glue holds
            // no reference from a lookup here. A task the scheduler switched away from inside
            // generated code has a hold (see `sched`).
            unsafe { crate::code::quiescent() };
        }
        module_call(|| self.module.reclaim()).unwrap_or(0)
    }

    /// Replaced objects waiting for their grace period.
    #[must_use]
    pub fn retired(&self) -> usize {
        module_call(|| self.module.code_count()).map_or(0, |(_, retired)| retired)
    }

    /// Declares function `index`'s parameter count before it is compiled (lazy functions).
    pub(super) fn declare_params(&self, index: u32, params: usize) {
        if let Some(p) = self.params.get(index as usize) {
            p.store(params, Ordering::SeqCst);
        }
    }

    /// Address callers use for function `index`: its near slot in the module's first jump table
    /// (direct jump to the code, or the lazy stub). Lock-free.
    #[must_use]
    pub fn entry(&self, index: u32) -> Option<usize> {
        self.table?.near_slot_addr(index)
    }

    /// Start of the code installed for `index`, if compiled.
    #[must_use]
    pub fn code(&self, index: u32) -> Option<usize> {
        module_call(|| self.module.function_code(index))
            .ok()
            .flatten()
    }

    /// The code object holding `pc` (names, source positions, protected instructions).
    #[must_use]
    pub fn lookup(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.module.lookup_code(pc)
    }

    /// Live code objects, jump tables included.
    #[must_use]
    pub fn code_count(&self) -> usize {
        module_call(|| self.module.code_count()).map_or(0, |(live, _)| live)
    }

    /// The manager the code lives in (statistics, reading code bytes for disassembly).
    #[must_use]
    pub fn manager(&self) -> &CodeManager<M> {
        self.module.manager()
    }

    /// Checks `index` is callable with `args` and returns its slot.
    pub(super) fn callable(&self, index: u32, args: &[u64]) -> Result<usize, JitError> {
        let expected = self
            .params
            .get(index as usize)
            .ok_or(JitError::BadIndex { index })?
            .load(Ordering::SeqCst);
        if expected == UNKNOWN {
            return Err(JitError::NotCompiled { index });
        }
        if args.len() != expected || expected > 6 {
            return Err(JitError::ArgumentCount {
                expected,
                given: args.len(),
            });
        }
        self.entry(index).ok_or(JitError::BadIndex { index })
    }

    /// Calls function `index` through its slot with integer `args`.
    ///
    /// # Errors
    /// [`JitError::Trapped`] when the call trapped (the landing pad unwound it); argument-count
    /// and index errors before calling.
    pub fn call(&self, index: u32, args: &[u64]) -> Result<u64, JitError> {
        let slot = self.callable(index, args)?;
        // SAFETY: the slot leads to code installed from a `CompiledFunction` (System V, integer
        // arguments, `params` of them as checked, landing pads to the trap stub) or to the lazy
        // stub that compiles such code; every slot a function calls belongs to this module,
        // whose slots all satisfy the same.
        unsafe { enter(slot, args) }.map_err(JitError::Trapped)
    }

    /// Calls function `index` with `memory`'s base as its first argument, then `args`.
    ///
    /// # Errors
    /// As [`call`](Self::call).
    pub fn call_with_memory(
        &self,
        index: u32,
        memory: &mut LinearMemory,
        args: &[u64],
    ) -> Result<u64, JitError> {
        if args.len() > 5 {
            return Err(JitError::ArgumentCount {
                expected: 6,
                given: args.len() + 1,
            });
        }
        let n = args.len();
        let mut all = [0u64; 6];
        all[0] = memory.base();
        all[1..=n].copy_from_slice(args);
        self.call(index, &all[..=n])
    }
}

/// Whether [`JitModule::reclaim`] may report this CPU quiescent: task context (no interrupt
/// handler: issue 18's item 2 — a timer tick that reclaimed used to report for the task it
/// interrupted) and no [`enter`] active.
impl<M: Mmu + Send + 'static> Drop for JitModule<M> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; `self.module` is not used afterwards.
        module_call(|| unsafe { ManuallyDrop::drop(&mut self.module) });
    }
}

fn reclaim_may_report() -> bool {
    !crate::cpu::interrupts::in_interrupt() && !enter::active()
}

/// codespace's refusal as a glue error, naming "larger than a code space" on its own.
fn install_error(e: ModuleError) -> JitError {
    match e {
        ModuleError::Code(CodeError::CodeSpaceTooLarge { size, max }) => {
            JitError::CodeTooLarge { size, max }
        }
        other => JitError::Install(other),
    }
}
