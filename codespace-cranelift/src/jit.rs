//! [`JITModule`]: cranelift-jit's module over a codespace `CodeModule`.
//!
//! # Concurrency
//! Declaring, defining and finalizing take `&mut self`, as in cranelift-jit: one writer. What
//! CPUs share is `&self`: [`call`](JITModule::call), [`get_finalized_function`](JITModule::get_finalized_function),
//! [`reclaim`](JITModule::reclaim). A call reads the function's slot address (fixed for the
//! module's life: the first jump table is created with the module and never moves) and jumps;
//! it takes no lock, so generated code never runs with a module lock held. A redefinition
//! finalized while other CPUs call the function is a slot patch: a call that read the slot
//! before runs the old code, which codespace frees only after every CPU passed a quiescent
//! state.

use alloc::alloc::{dealloc, Layout};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;

use codespace::jump_table::JumpTableLayout;
use codespace::mmu::Mmu;
use codespace::module::{CodeImage, CodeModule, ModuleConfig};
use codespace::AddressRange;
use cranelift_codegen::entity::EntityRef;
use cranelift_codegen::isa::OwnedTargetIsa;

use crate::builder::{Codespace, JITBuilder, LibcallNames, SymbolLookup};
use crate::call::CallShape;
use crate::compile::{CompiledFunction, TrapRecord};
use crate::data::DataDescription;
use crate::error::BackendError;
use crate::kernel::Kernel;
use crate::module::{DataId, FuncId, ModuleDeclarations, ModuleError, ModuleResult};

/// Data alignment unless the description gives one (cranelift-jit's).
pub(crate) const DEFAULT_DATA_ALIGN: u64 = 16;
/// The largest data alignment: read-only data starts on a page.
pub(crate) const MAX_DATA_ALIGN: u64 = 4096;

/// A function's state beyond its declaration.
#[derive(Debug, Default)]
pub(crate) struct FunctionState {
    /// Start of its installed code, once finalized.
    pub finalized: Option<usize>,
    /// Compiled, waiting for `finalize_definitions`.
    pub pending: Option<CompiledFunction>,
    /// `prepare_for_function_redefine` allowed a new definition.
    pub redefinable: bool,
    /// How [`JITModule::call`] calls it (`None`: not in integer registers), from the signature.
    pub shape: Option<CallShape>,
}

/// Where a data object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Writable: a zeroed kernel-heap block, allocated when defined.
    Heap(usize),
    /// Read-only: placed in the next finalize's image.
    ReadOnly,
}

/// A defined data object.
#[derive(Debug)]
pub(crate) struct DataState {
    pub description: DataDescription,
    pub size: usize,
    pub align: u64,
    pub place: Place,
    /// Its address once finalized.
    pub finalized: Option<usize>,
}

/// A kernel-heap block owned by the module, freed when it is dropped.
#[derive(Debug)]
pub(crate) struct HeapBlock {
    pub addr: usize,
    pub layout: Layout,
}

/// cranelift-jit's `JITModule` on codespace: functions called through jump-table slots, W^X
/// code, traps landing through the kernel, hot-swap as a slot patch with a grace period.
pub struct JITModule<M: Mmu + Send + 'static> {
    pub(crate) isa: OwnedTargetIsa,
    pub(crate) declarations: ModuleDeclarations,
    pub(crate) libcall_names: LibcallNames,
    pub(crate) symbols: BTreeMap<String, usize>,
    pub(crate) lookups: Vec<SymbolLookup>,
    pub(crate) hotswap: bool,
    pub(crate) max_functions: u32,
    pub(crate) fault_ranges: Vec<AddressRange>,
    pub(crate) kernel: &'static dyn Kernel,
    /// Dropped in `drop`, inside the kernel's `module_call`.
    pub(crate) module: ManuallyDrop<CodeModule<M>>,
    /// The first jump table, where callers enter (fixed for the module's life).
    pub(crate) table: JumpTableLayout,
    pub(crate) functions: Vec<FunctionState>,
    pub(crate) data: Vec<Option<DataState>>,
    /// Trap sites of installed code, by the code's start (a trap's PC names its code).
    pub(crate) trap_sites: BTreeMap<usize, Vec<TrapRecord>>,
    /// Read-only data images; freed with the module.
    pub(crate) images: Vec<CodeImage>,
    pub(crate) heap: Vec<HeapBlock>,
}

impl<M: Mmu + Send + 'static> core::fmt::Debug for JITModule<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JITModule")
            .field("declarations", &self.declarations)
            .field("module", &*self.module)
            .finish_non_exhaustive()
    }
}

impl<M: Mmu + Send + 'static> JITModule<M> {
    /// A module as `builder` says, its code in a new codespace module over
    /// `codespace.manager` (`cranelift_jit::JITModule::new`, which cannot fail: this one
    /// reserves a code space and writes the jump tables).
    ///
    /// # Errors
    /// [`ModuleError::Backend`] when codespace cannot create the module (too many functions for
    /// a code space, reservation or commit failures).
    pub fn new(builder: JITBuilder, codespace: &Codespace<'_, M>) -> ModuleResult<Self> {
        let kernel = codespace.kernel;
        let functions = builder.max_functions.max(1);
        let mut created = None;
        kernel.module_call(&mut || {
            created = Some(CodeModule::new(
                codespace.manager,
                codespace.registries,
                ModuleConfig {
                    functions,
                    rox: builder.rox,
                    ..ModuleConfig::default()
                },
            ));
        });
        let module = unwrap_call(created)?;
        let mut tables = None;
        kernel.module_call(&mut || tables = Some(module.jump_tables()));
        let table = match unwrap_call(tables).map(|t| t.first().copied()) {
            Ok(Some(t)) => t,
            other => {
                drop_module(kernel, module);
                return Err(match other {
                    Err(e) => e,
                    Ok(_) => {
                        ModuleError::Backend(BackendError::TooManyFunctions { max: functions })
                    }
                });
            }
        };
        Ok(JITModule {
            isa: builder.isa,
            declarations: ModuleDeclarations::default(),
            libcall_names: builder.libcall_names,
            symbols: builder.symbols,
            lookups: builder.lookups,
            hotswap: builder.hotswap,
            max_functions: functions,
            fault_ranges: builder.fault_ranges,
            kernel,
            module: ManuallyDrop::new(module),
            table,
            functions: Vec::new(),
            data: Vec::new(),
            trap_sites: BTreeMap::new(),
            images: Vec::new(),
            heap: Vec::new(),
        })
    }

    /// The address of kernel symbol `name`: the builder's symbols, then its lookups in reverse
    /// order of addition.
    pub(crate) fn lookup_symbol(&self, name: &str) -> Option<usize> {
        if let Some(&addr) = self.symbols.get(name) {
            return Some(addr);
        }
        self.lookups
            .iter()
            .rev()
            .find_map(|lookup| lookup(name))
            .map(|p| p as usize)
    }

    /// The address callers enter function `id` at: its near slot in the module's first jump
    /// table. Lock-free.
    #[must_use]
    pub fn slot_address(&self, id: FuncId) -> Option<usize> {
        self.table.near_slot_addr(id.as_u32())
    }

    /// The entry of a finalized function: its jump-table slot, so a call always reaches the
    /// function's current definition (cranelift-jit returns the code itself, or with hot-swap
    /// its GOT entry). Null when `id` is not a finalized function of this module
    /// (cranelift-jit panics).
    ///
    /// Calling the pointer is `unsafe` (transmuted to the function's type): prefer
    /// [`call`](Self::call). It stays valid while the module lives.
    #[must_use]
    pub fn get_finalized_function(&self, id: FuncId) -> *const u8 {
        match self.functions.get(id.index()) {
            Some(FunctionState {
                finalized: Some(_), ..
            }) => self
                .slot_address(id)
                .map_or(core::ptr::null(), |a| a as *const u8),
            _ => core::ptr::null(),
        }
    }

    /// The address and size of a finalized data object; `(null, 0)` when `id` is not one
    /// (cranelift-jit panics). Read-only objects are mapped read-only and non-executable;
    /// writable ones live in the kernel heap. Valid while the module lives.
    #[must_use]
    pub fn get_finalized_data(&self, id: DataId) -> (*const u8, usize) {
        match self.data.get(id.index()) {
            Some(Some(DataState {
                finalized: Some(addr),
                size,
                ..
            })) => (*addr as *const u8, *size),
            _ => (core::ptr::null(), 0),
        }
    }

    /// Allows defining finalized function `id` again (hot-swap; only with
    /// [`JITBuilder::hotswap`]). The old code keeps running until the new definition is
    /// finalized, which patches the function's slot; calls already inside the old code finish
    /// there, and it is freed after a grace period ([`reclaim`](Self::reclaim)). A definition
    /// not yet finalized is simply dropped.
    ///
    /// # Errors
    /// [`BackendError::HotswapDisabled`], [`ModuleError::Undeclared`],
    /// [`ModuleError::InvalidImportDefinition`], [`BackendError::UnresolvedSymbol`] for a
    /// function never defined.
    pub fn prepare_for_function_redefine(&mut self, id: FuncId) -> ModuleResult<()> {
        if !self.hotswap {
            return Err(BackendError::HotswapDisabled.into());
        }
        let decl = self
            .declarations
            .get_function_decl(id)
            .ok_or_else(|| ModuleError::Undeclared(format!("{id}")))?;
        if !decl.linkage.is_definable() {
            return Err(ModuleError::InvalidImportDefinition(
                decl.linkage_name(id).into_owned(),
            ));
        }
        let name = decl.linkage_name(id).into_owned();
        let state = &mut self.functions[id.index()];
        if state.pending.take().is_none() && state.finalized.is_none() {
            return Err(BackendError::UnresolvedSymbol(name).into());
        }
        state.redefinable = true;
        Ok(())
    }

    /// Frees replaced code whose grace period is over, after letting the kernel report this
    /// CPU quiescent where it knows it may ([`Kernel::quiescent`]). Returns how many objects
    /// were freed.
    pub fn reclaim(&self) -> usize {
        self.kernel.quiescent();
        let mut freed = None;
        self.kernel
            .module_call(&mut || freed = Some(self.module.reclaim()));
        freed.and_then(Result::ok).unwrap_or(0)
    }

    /// Replaced code objects still waiting for their grace period.
    #[must_use]
    pub fn retired(&self) -> usize {
        let mut counts = None;
        self.kernel
            .module_call(&mut || counts = Some(self.module.code_count()));
        counts
            .and_then(Result::ok)
            .map_or(0, |(_, retired)| retired)
    }

    /// The codespace module holding the code (statistics, PC lookup).
    #[must_use]
    pub fn code_module(&self) -> &CodeModule<M> {
        &self.module
    }
}

/// The result a `module_call` closure left.
fn unwrap_call<T>(r: Option<Result<T, codespace::module::ModuleError>>) -> ModuleResult<T> {
    match r {
        Some(r) => r.map_err(ModuleError::from),
        None => Err(ModuleError::Backend(BackendError::Codespace(
            codespace::module::ModuleError::Busy,
        ))),
    }
}

fn drop_module<M: Mmu + Send + 'static>(kernel: &dyn Kernel, module: CodeModule<M>) {
    let mut module = Some(module);
    kernel.module_call(&mut || drop(module.take()));
}

impl<M: Mmu + Send + 'static> Drop for JITModule<M> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; `self.module` is not used afterwards.
        let module = unsafe { ManuallyDrop::take(&mut self.module) };
        drop_module(self.kernel, module);
        for block in self.heap.drain(..) {
            // SAFETY: allocated by `define_data` with this layout, freed once. No call into
            // the module's code can still run: `call` borrows the module, and pointers from
            // `get_finalized_*` are valid only while it lives.
            unsafe { dealloc(block.addr as *mut u8, block.layout) };
        }
    }
}
