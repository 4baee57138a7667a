//! `cranelift_module`'s vocabulary without `std`: identifiers, linkage, declarations, errors and
//! the [`Module`] trait, with the same names, fields and methods as `cranelift-module` 0.135, so
//! code written against it ports by changing its imports.
//!
//! Differences a kernel forces, each on the item it concerns: no `anyhow` or `std::io` in
//! [`ModuleError`] (a typed [`BackendError`](crate::BackendError) instead), names in a `BTreeMap`, no serde, and
//! [`Module::declare_data_in_func`] makes data references absolute (see there).

use alloc::borrow::ToOwned;
use alloc::string::String;
use core::fmt;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::entity::entity_impl;
use cranelift_codegen::ir;
use cranelift_codegen::isa::{self, TargetIsa};
use cranelift_codegen::Context;

use crate::data::DataDescription;
pub use crate::declarations::{DataDeclaration, FunctionDeclaration, ModuleDeclarations};
pub use crate::error::{ModuleError, ModuleResult};

/// `UserExternalName` namespace of functions (as `cranelift-module`).
pub const FUNCTION_NAMESPACE: u32 = 0;
/// `UserExternalName` namespace of data objects (as `cranelift-module`).
pub const DATA_NAMESPACE: u32 = 1;

/// A function identifier for use in the [`Module`] interface. With codespace it is also the
/// function's jump-table slot.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncId(u32);
entity_impl!(FuncId, "funcid");

/// A data object identifier for use in the [`Module`] interface.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataId(u32);
entity_impl!(DataId, "dataid");

/// Where an entity is defined and who can see it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Linkage {
    /// Defined outside of the module (resolved through the builder's symbols and lookups).
    Import,
    /// Defined inside the module, not visible outside it.
    Local,
    /// Defined inside the module, visible outside it, and may be preempted.
    Preemptible,
    /// Defined inside the module, visible inside the static linkage unit only.
    Hidden,
    /// Defined inside the module and visible outside it.
    Export,
}

impl Linkage {
    /// The linkage of an entity declared twice, with `a` and then `b` (the strongest
    /// visibility wins; an import takes the other declaration's).
    pub(crate) fn merge(a: Self, b: Self) -> Self {
        use Linkage::{Export, Hidden, Import, Local, Preemptible};
        match (a, b) {
            (Import, b) => b,
            (Export, _) | (_, Export) => Export,
            (Preemptible, _) | (_, Preemptible) => Preemptible,
            (Hidden, _) | (_, Hidden) => Hidden,
            (Local, Local | Import) => Local,
        }
    }

    /// Whether this linkage can have a definition.
    #[must_use]
    pub fn is_definable(self) -> bool {
        !matches!(self, Self::Import)
    }

    /// Whether this linkage must have a definition.
    #[must_use]
    pub fn requires_definition(self) -> bool {
        matches!(self, Self::Local | Self::Hidden | Self::Export)
    }

    /// Whether this linkage has a definition that cannot be preempted.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Local | Self::Hidden | Self::Export)
    }
}

/// A declared name may refer to either a function or data declaration.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum FuncOrDataId {
    /// A function.
    Func(FuncId),
    /// A data object.
    Data(DataId),
}
/// What a relocation refers to, translated from an `ExternalName`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleRelocTarget {
    /// A module function (namespace 0) or data object (namespace 1).
    User {
        /// [`FUNCTION_NAMESPACE`] or [`DATA_NAMESPACE`].
        namespace: u32,
        /// The [`FuncId`] or [`DataId`].
        index: u32,
    },
    /// A library function, resolved by the name the builder's `libcall_names` gives it.
    LibCall(ir::LibCall),
    /// A symbol known to the linker (refused: there is no linker).
    KnownSymbol(ir::KnownSymbol),
    /// An offset inside a function.
    FunctionOffset(FuncId, u32),
}

impl ModuleRelocTarget {
    /// A user-defined external name.
    #[must_use]
    pub fn user(namespace: u32, index: u32) -> Self {
        Self::User { namespace, index }
    }
}

impl fmt::Display for ModuleRelocTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User { namespace, index } => write!(f, "u{namespace}:{index}"),
            Self::LibCall(lc) => write!(f, "%{lc}"),
            Self::KnownSymbol(ks) => write!(f, "{ks}"),
            Self::FunctionOffset(func, offset) => write!(f, "{func}+{offset}"),
        }
    }
}
/// A module: declares and defines functions and data objects and links them together
/// (`cranelift_module::Module`, implemented by [`JITModule`](crate::JITModule)).
pub trait Module {
    /// The ISA compiled for.
    fn isa(&self) -> &dyn TargetIsa;

    /// Every declaration of this module.
    fn declarations(&self) -> &ModuleDeclarations;

    /// The identifier declared for `name`.
    fn get_name(&self, name: &str) -> Option<FuncOrDataId> {
        self.declarations().get_name(name)
    }

    /// What frontends need to know of the target to produce IR for it.
    fn target_config(&self) -> isa::TargetFrontendConfig {
        self.isa().frontend_config()
    }

    /// A new `Context` with the ISA's default calling convention.
    fn make_context(&self) -> Context {
        let mut ctx = Context::new();
        ctx.func.signature.call_conv = self.isa().default_call_conv();
        ctx
    }

    /// Clears `ctx` for a new function, keeping the ISA's default calling convention.
    fn clear_context(&self, ctx: &mut Context) {
        ctx.clear();
        ctx.func.signature.call_conv = self.isa().default_call_conv();
    }

    /// An empty signature with the ISA's default calling convention.
    fn make_signature(&self) -> ir::Signature {
        ir::Signature::new(self.isa().default_call_conv())
    }

    /// Clears `sig`, keeping the ISA's default calling convention.
    fn clear_signature(&self, sig: &mut ir::Signature) {
        sig.clear(self.isa().default_call_conv());
    }

    /// Declares a function.
    ///
    /// # Errors
    /// As [`ModuleDeclarations::declare_function`], and the implementation's own.
    fn declare_function(
        &mut self,
        name: &str,
        linkage: Linkage,
        signature: &ir::Signature,
    ) -> ModuleResult<FuncId>;

    /// Declares an anonymous function.
    ///
    /// # Errors
    /// The implementation's.
    fn declare_anonymous_function(&mut self, signature: &ir::Signature) -> ModuleResult<FuncId>;

    /// Declares a data object.
    ///
    /// # Errors
    /// As [`ModuleDeclarations::declare_data`], and the implementation's own.
    fn declare_data(
        &mut self,
        name: &str,
        linkage: Linkage,
        writable: bool,
        tls: bool,
    ) -> ModuleResult<DataId>;

    /// Declares an anonymous data object.
    ///
    /// # Errors
    /// The implementation's.
    fn declare_anonymous_data(&mut self, writable: bool, tls: bool) -> ModuleResult<DataId>;

    /// References function `func_id` from `func` (being built). Functions with a final linkage
    /// are colocated: called with a rel32 `call`, which codespace aims at the function's
    /// jump-table slot; imports are called through their absolute address.
    ///
    /// An identifier this module never declared gets a reference that
    /// [`define_function`](Self::define_function) refuses as [`ModuleError::Undeclared`]
    /// (`cranelift-module` panics here).
    fn declare_func_in_func(&mut self, func_id: FuncId, func: &mut ir::Function) -> ir::FuncRef {
        let (signature, colocated) = match self.declarations().get_function_decl(func_id) {
            Some(decl) => (decl.signature.clone(), decl.linkage.is_final()),
            None => (self.make_signature(), false),
        };
        let signature = func.import_signature(signature);
        let user_name_ref = func.declare_imported_user_function(ir::UserExternalName {
            namespace: FUNCTION_NAMESPACE,
            index: func_id.as_u32(),
        });
        func.import_function(ir::ExtFuncData {
            name: ir::ExternalName::user(user_name_ref),
            signature,
            colocated,
            patchable: false,
        })
    }

    /// References data object `data` from `func` (being built).
    ///
    /// Unlike `cranelift-module`, the reference is never colocated: data lives in the kernel
    /// heap or in read-only pages that need not lie within ±2 GiB of the code, so its address is
    /// loaded as an absolute 64-bit immediate.
    fn declare_data_in_func(&self, data: DataId, func: &mut ir::Function) -> ir::GlobalValue {
        let tls = self
            .declarations()
            .get_data_decl(data)
            .is_some_and(|d| d.tls);
        let user_name_ref = func.declare_imported_user_function(ir::UserExternalName {
            namespace: DATA_NAMESPACE,
            index: data.as_u32(),
        });
        func.create_global_value(ir::GlobalValueData::Symbol {
            name: ir::ExternalName::user(user_name_ref),
            offset: ir::immediates::Imm64::new(0),
            colocated: false,
            tls,
        })
    }

    /// References function `func_id` from data object `data` (for
    /// [`DataDescription::write_function_addr`]).
    fn declare_func_in_data(&self, func_id: FuncId, data: &mut DataDescription) -> ir::FuncRef {
        data.import_function(ModuleRelocTarget::user(
            FUNCTION_NAMESPACE,
            func_id.as_u32(),
        ))
    }

    /// References data object `data_id` from data object `data` (for
    /// [`DataDescription::write_data_addr`]).
    fn declare_data_in_data(&self, data_id: DataId, data: &mut DataDescription) -> ir::GlobalValue {
        data.import_global_value(ModuleRelocTarget::user(DATA_NAMESPACE, data_id.as_u32()))
    }

    /// Defines function `func` by compiling `ctx` (which holds the compiled function
    /// afterwards), with a default control plane.
    ///
    /// # Errors
    /// As [`define_function_with_control_plane`](Self::define_function_with_control_plane).
    fn define_function(&mut self, func: FuncId, ctx: &mut Context) -> ModuleResult<()> {
        self.define_function_with_control_plane(func, ctx, &mut ControlPlane::default())
    }

    /// Defines function `func` by compiling `ctx` with `ctrl_plane`.
    ///
    /// # Errors
    /// [`ModuleError::Undeclared`], [`ModuleError::InvalidImportDefinition`],
    /// [`ModuleError::DuplicateDefinition`], [`ModuleError::Compilation`], and the
    /// implementation's own.
    fn define_function_with_control_plane(
        &mut self,
        func: FuncId,
        ctx: &mut Context,
        ctrl_plane: &mut ControlPlane,
    ) -> ModuleResult<()>;

    /// Defines function `func_id` as these machine-code `bytes` with `relocs` (instead of
    /// compiling IR). Raw bytes carry no trap records: a trap in them is the kernel's fault, not
    /// a landing.
    ///
    /// # Errors
    /// As [`define_function`](Self::define_function), but for compilation.
    fn define_function_bytes(
        &mut self,
        func_id: FuncId,
        alignment: u64,
        bytes: &[u8],
        relocs: &[crate::ModuleReloc],
    ) -> ModuleResult<()>;

    /// Defines data object `data_id` as `data` says.
    ///
    /// # Errors
    /// [`ModuleError::Undeclared`], [`ModuleError::InvalidImportDefinition`],
    /// [`ModuleError::DuplicateDefinition`], and the implementation's own.
    fn define_data(&mut self, data_id: DataId, data: &DataDescription) -> ModuleResult<()>;
}

/// The names `cranelift-module` gives library calls (`memcpy`, `memset`, `fmaf`, ...): what
/// [`JITBuilder::with_isa`](crate::JITBuilder::with_isa) resolves them by.
#[must_use]
pub fn default_libcall_names() -> alloc::boxed::Box<dyn Fn(ir::LibCall) -> String + Send + Sync> {
    alloc::boxed::Box::new(|libcall| match libcall {
        ir::LibCall::Probestack => "__cranelift_probestack".to_owned(),
        ir::LibCall::CeilF32 => "ceilf".to_owned(),
        ir::LibCall::CeilF64 => "ceil".to_owned(),
        ir::LibCall::FloorF32 => "floorf".to_owned(),
        ir::LibCall::FloorF64 => "floor".to_owned(),
        ir::LibCall::TruncF32 => "truncf".to_owned(),
        ir::LibCall::TruncF64 => "trunc".to_owned(),
        ir::LibCall::NearestF32 => "nearbyintf".to_owned(),
        ir::LibCall::NearestF64 => "nearbyint".to_owned(),
        ir::LibCall::FmaF32 => "fmaf".to_owned(),
        ir::LibCall::FmaF64 => "fma".to_owned(),
        ir::LibCall::Memcpy => "memcpy".to_owned(),
        ir::LibCall::Memset => "memset".to_owned(),
        ir::LibCall::Memmove => "memmove".to_owned(),
        ir::LibCall::Memcmp => "memcmp".to_owned(),
        ir::LibCall::ElfTlsGetAddr => "__tls_get_addr".to_owned(),
        ir::LibCall::ElfTlsGetOffset => "__tls_get_offset".to_owned(),
        ir::LibCall::X86Pshufb => "__cranelift_x86_pshufb".to_owned(),
    })
}
