//! Declaring and defining: [`Module`] for [`JITModule`]. Functions are compiled when defined (on
//! the kernel's compile stack), writable data gets its heap block; everything waits for
//! `finalize_definitions` (`link`) to be published.

use alloc::alloc::{alloc_zeroed, Layout};
use alloc::format;
use alloc::string::String;

use codespace::mmu::Mmu;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::entity::EntityRef;
use cranelift_codegen::ir;
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::Context;

use crate::call::CallShape;
use crate::compile::CompiledFunction;
use crate::data::DataDescription;
use crate::error::BackendError;
use crate::jit::{
    DataState, FunctionState, HeapBlock, JITModule, Place, DEFAULT_DATA_ALIGN, MAX_DATA_ALIGN,
};
use crate::module::{DataId, FuncId, Module, ModuleDeclarations, ModuleError, ModuleResult};

impl<M: Mmu + Send + 'static> Module for JITModule<M> {
    fn isa(&self) -> &dyn TargetIsa {
        &*self.isa
    }

    fn declarations(&self) -> &ModuleDeclarations {
        &self.declarations
    }

    /// Declares a function; it gets jump-table slot `id.as_u32()`.
    ///
    /// # Errors
    /// As [`ModuleDeclarations::declare_function`]; [`BackendError::TooManyFunctions`].
    fn declare_function(
        &mut self,
        name: &str,
        linkage: crate::Linkage,
        signature: &ir::Signature,
    ) -> ModuleResult<FuncId> {
        if self.declarations.get_name(name).is_none() {
            self.check_room()?;
        }
        let (id, _) = self
            .declarations
            .declare_function(name, linkage, signature)?;
        self.grow_functions(id);
        Ok(id)
    }

    fn declare_anonymous_function(&mut self, signature: &ir::Signature) -> ModuleResult<FuncId> {
        self.check_room()?;
        let id = self.declarations.declare_anonymous_function(signature);
        self.grow_functions(id);
        Ok(id)
    }

    /// Declares a data object.
    ///
    /// # Errors
    /// As [`ModuleDeclarations::declare_data`]; [`BackendError::Tls`] (cranelift-jit panics).
    fn declare_data(
        &mut self,
        name: &str,
        linkage: crate::Linkage,
        writable: bool,
        tls: bool,
    ) -> ModuleResult<DataId> {
        if tls {
            return Err(BackendError::Tls(name.into()).into());
        }
        let (id, _) = self
            .declarations
            .declare_data(name, linkage, writable, tls)?;
        if self.data.len() <= id.index() {
            self.data.resize_with(id.index() + 1, || None);
        }
        Ok(id)
    }

    fn declare_anonymous_data(&mut self, writable: bool, tls: bool) -> ModuleResult<DataId> {
        if tls {
            return Err(BackendError::Tls("anonymous data".into()).into());
        }
        let id = self.declarations.declare_anonymous_data(writable, tls);
        if self.data.len() <= id.index() {
            self.data.resize_with(id.index() + 1, || None);
        }
        Ok(id)
    }

    /// Compiles `ctx` on the kernel's compile stack and keeps the result until
    /// [`finalize_definitions`](JITModule::finalize_definitions).
    ///
    /// # Errors
    /// As [`Module::define_function_with_control_plane`]; [`BackendError::CompileStack`].
    fn define_function_with_control_plane(
        &mut self,
        id: FuncId,
        ctx: &mut Context,
        ctrl_plane: &mut ControlPlane,
    ) -> ModuleResult<()> {
        self.function_decl_checked(id)?;
        let isa = &*self.isa;
        let mut result = None;
        self.kernel
            .on_compile_stack(&mut || {
                result = Some(
                    ctx.compile(isa, ctrl_plane)
                        .map(|_| ())
                        .map_err(|e| e.inner),
                );
            })
            .map_err(BackendError::CompileStack)?;
        match result {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(ModuleError::Compilation(e)),
            None => return Err(BackendError::CompileStack("the compiler did not run").into()),
        }
        let Some(code) = ctx.compiled_code() else {
            return Err(BackendError::CompileStack("no code after compiling").into());
        };
        let compiled = CompiledFunction::new(id, &ctx.func, code);
        self.functions[id.index()].pending = Some(compiled);
        Ok(())
    }

    /// Keeps `bytes` (codespace starts all code on
    /// [`CODE_ALIGNMENT`](codespace::manager::CODE_ALIGNMENT), so any `alignment` up to it holds) with
    /// `relocs` until [`finalize_definitions`](JITModule::finalize_definitions).
    ///
    /// # Errors
    /// As [`Module::define_function_bytes`]; [`BackendError::BadAlignment`] for an alignment
    /// that is not a power of two or above codespace's code alignment.
    fn define_function_bytes(
        &mut self,
        id: FuncId,
        alignment: u64,
        bytes: &[u8],
        relocs: &[crate::ModuleReloc],
    ) -> ModuleResult<()> {
        self.function_decl_checked(id)?;
        if !alignment.is_power_of_two() || alignment > codespace::manager::CODE_ALIGNMENT as u64 {
            return Err(BackendError::BadAlignment(alignment).into());
        }
        self.functions[id.index()].pending = Some(CompiledFunction {
            bytes: bytes.to_vec(),
            relocs: relocs.to_vec(),
            traps: alloc::vec::Vec::new(),
            source_positions: alloc::vec::Vec::new(),
        });
        Ok(())
    }

    /// Defines data object `id`: writable data gets zeroed kernel-heap memory now (its address
    /// is fixed from here), read-only data a place in the read-only pages the next
    /// [`finalize_definitions`](JITModule::finalize_definitions) maps. Contents and addresses
    /// are written when finalizing.
    ///
    /// # Errors
    /// As [`Module::define_data`]; [`BackendError::Uninitialized`] and
    /// [`BackendError::BadAlignment`] (cranelift-jit panics); [`ModuleError::Allocation`].
    fn define_data(&mut self, id: DataId, data: &DataDescription) -> ModuleResult<()> {
        let decl = self
            .declarations
            .get_data_decl(id)
            .ok_or_else(|| ModuleError::Undeclared(format!("{id}")))?;
        let name = decl.linkage_name(id).into_owned();
        if !decl.linkage.is_definable() {
            return Err(ModuleError::InvalidImportDefinition(name));
        }
        if self.data.get(id.index()).is_some_and(Option::is_some) {
            return Err(ModuleError::DuplicateDefinition(name));
        }
        let size = data
            .init
            .size()
            .ok_or_else(|| BackendError::Uninitialized(name.clone()))?;
        let align = data.align.unwrap_or(DEFAULT_DATA_ALIGN);
        if !align.is_power_of_two() || align > MAX_DATA_ALIGN {
            return Err(BackendError::BadAlignment(align).into());
        }
        let place = if decl.writable {
            // At least one byte, as cranelift-jit: an empty object still has its own address.
            let layout = Layout::from_size_align(size.max(1), align as usize).map_err(|_| {
                ModuleError::Allocation {
                    message: "data object too large",
                }
            })?;
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { alloc_zeroed(layout) };
            if ptr.is_null() {
                return Err(ModuleError::Allocation {
                    message: "kernel heap exhausted",
                });
            }
            self.heap.push(HeapBlock {
                addr: ptr as usize,
                layout,
            });
            Place::Heap(ptr as usize)
        } else {
            Place::ReadOnly
        };
        self.data[id.index()] = Some(DataState {
            description: data.clone(),
            size,
            align,
            place,
            finalized: None,
        });
        Ok(())
    }
}

impl<M: Mmu + Send + 'static> JITModule<M> {
    fn function_decl_checked(&self, id: FuncId) -> ModuleResult<String> {
        let decl = self
            .declarations
            .get_function_decl(id)
            .ok_or_else(|| ModuleError::Undeclared(format!("{id}")))?;
        let name = decl.linkage_name(id).into_owned();
        if !decl.linkage.is_definable() {
            return Err(ModuleError::InvalidImportDefinition(name));
        }
        let state = self.functions.get(id.index());
        let defined =
            state.is_some_and(|s| s.pending.is_some() || (s.finalized.is_some() && !s.redefinable));
        if defined {
            return Err(ModuleError::DuplicateDefinition(name));
        }
        Ok(name)
    }

    fn check_room(&self) -> ModuleResult<()> {
        if self.declarations.get_functions().count() >= self.max_functions as usize {
            return Err(BackendError::TooManyFunctions {
                max: self.max_functions,
            }
            .into());
        }
        Ok(())
    }

    /// Makes room for `id`'s state and records how it is called (its signature never changes:
    /// a second declaration must repeat it).
    fn grow_functions(&mut self, id: FuncId) {
        if self.functions.len() <= id.index() {
            self.functions
                .resize_with(id.index() + 1, FunctionState::default);
        }
        let shape = self
            .declarations
            .get_function_decl(id)
            .and_then(|d| CallShape::of(&d.signature));
        self.functions[id.index()].shape = shape;
    }
}
