//! A JIT module: Cranelift output installed in a codespace `CodeModule`.
//!
//! This file holds every call into `CodeModule` the glue makes (`new`, `add_code`, the slot
//! address, the installed code, freeing retired code), so moving to another codespace API
//! touches this file only.

use alloc::sync::Arc;
use alloc::vec::Vec;

use codespace::code_object::{CodeObject, DecRef};
use codespace::mmu::Mmu;
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode, Registries};
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
pub struct JitModule<M: Mmu> {
    module: CodeModule<M>,
    config: JitConfig,
    /// Parameter count of each function, once known (compiled, or declared for lazy slots).
    params: Vec<Option<usize>>,
    /// Replaced code still referenced here until no call can be inside it (see `tier`).
    pub(super) retired: Vec<Arc<CodeObject>>,
}

impl<M: Mmu> core::fmt::Debug for JitModule<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JitModule")
            .field("functions", &self.config.functions)
            .field("retired", &self.retired.len())
            .field("module", &self.module)
            .finish()
    }
}

impl<M: Mmu> JitModule<M> {
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
        let module = CodeModule::new(
            manager,
            registries,
            ModuleConfig {
                functions: config.functions,
                lazy_entry: config.lazy_entry,
                ..ModuleConfig::default()
            },
        )
        .map_err(install_error)?;
        Ok(JitModule {
            module,
            config,
            params: alloc::vec![None; config.functions as usize],
            retired: Vec::new(),
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
    /// replaces is retired, not freed: it is freed by [`reclaim`](Self::reclaim) once no call
    /// can be inside it.
    ///
    /// # Errors
    /// [`JitError::BadIndex`], [`JitError::CodeTooLarge`], [`JitError::Install`]; nothing is
    /// installed then and the slot keeps its old target.
    pub fn install(
        &mut self,
        index: u32,
        code: &CompiledFunction,
        name: Option<&str>,
    ) -> Result<Arc<CodeObject>, JitError> {
        if index >= self.config.functions {
            return Err(JitError::BadIndex { index });
        }
        self.reclaim();
        // Keep the old version alive past `add_code`, which drops the module's reference.
        let old = self.hold(index);
        let new = NewCode {
            protected: code.protected(),
            landing_pad: code.landing_pad(),
            relocations: code.relocations(),
            source_positions: code.source_positions(),
            name,
            ..NewCode::function(index, code.bytes())
        };
        match self.module.add_code(&new) {
            Ok(object) => {
                self.params[index as usize] = Some(code.params());
                self.retired.extend(old);
                Ok(object)
            }
            Err(e) => {
                if let Some(old) = old {
                    // Still installed: the module holds its own reference, this never frees.
                    let _ = old.dec_ref();
                }
                Err(install_error(e))
            }
        }
    }

    /// A reference to the code installed for `index`, counted in its reference count.
    fn hold(&self, index: u32) -> Option<Arc<CodeObject>> {
        let start = self.module.function_code(index)?;
        let object = self.module.lookup_code(start)?;
        object.inc_ref().then_some(object)
    }

    /// Frees retired code when no call can be inside it: no [`enter`] is active on this CPU (the
    /// only CPU running generated code), so no generated frame exists anywhere. Returns how many
    /// objects were freed; 0 while a call is active (from an interrupt handler, or a host
    /// function called by generated code).
    pub fn reclaim(&mut self) -> usize {
        if enter::active() || self.retired.is_empty() {
            return 0;
        }
        let dead = self
            .retired
            .drain(..)
            .filter(|o| o.dec_ref() == DecRef::Dead)
            .count();
        if dead > 0 {
            self.module.free_dead_code();
        }
        dead
    }

    /// Declares function `index`'s parameter count before it is compiled (lazy functions).
    pub(super) fn declare_params(&mut self, index: u32, params: usize) {
        if let Some(p) = self.params.get_mut(index as usize) {
            *p = Some(params);
        }
    }

    /// Address callers use for function `index`: its near slot in the module's first jump table
    /// (direct jump to the code, or the lazy stub).
    #[must_use]
    pub fn entry(&self, index: u32) -> Option<usize> {
        self.module.jump_tables().next()?.near_slot_addr(index)
    }

    /// Start of the code installed for `index`, if compiled.
    #[must_use]
    pub fn code(&self, index: u32) -> Option<usize> {
        self.module.function_code(index)
    }

    /// The code object holding `pc` (names, source positions, protected instructions).
    #[must_use]
    pub fn lookup(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.module.lookup_code(pc)
    }

    /// Live code objects, jump tables included.
    #[must_use]
    pub fn code_count(&self) -> usize {
        self.module.code_count()
    }

    /// The manager the code lives in (statistics, reading code bytes for disassembly).
    #[must_use]
    pub fn manager(&self) -> &CodeManager<M> {
        self.module.manager()
    }

    /// Checks `index` is callable with `args` and returns its slot.
    pub(super) fn callable(&self, index: u32, args: &[u64]) -> Result<usize, JitError> {
        let declared = *self
            .params
            .get(index as usize)
            .ok_or(JitError::BadIndex { index })?;
        let expected = declared.ok_or(JitError::NotCompiled { index })?;
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

/// codespace's refusal as a glue error, naming "larger than a code space" on its own.
fn install_error(e: ModuleError) -> JitError {
    match e {
        ModuleError::Code(CodeError::CodeSpaceTooLarge { size, max }) => {
            JitError::CodeTooLarge { size, max }
        }
        other => JitError::Install(other),
    }
}
