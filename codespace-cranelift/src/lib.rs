//! cranelift-jit's [`JITModule`] for x86-64 kernels, on [codespace](codespace).
//!
//! A Rust JIT written against `cranelift_module::Module` and `cranelift_jit::JITModule` ports to
//! ring 0 by changing imports and the module type: the same `declare_function`,
//! `define_function`, `declare_data`, `define_data`, `finalize_definitions`,
//! `get_finalized_function`, `get_finalized_data`, `declare_func_in_func`, `make_context` and
//! `clear_context`, the same [`ModuleError`]s (`DuplicateDefinition`, `IncompatibleSignature`,
//! `Undeclared`, ...). `cranelift-module` 0.135 itself does not build without `std` (it needs
//! `anyhow` with `std` and names `std::io::Error`), so this crate carries its vocabulary
//! ([`module`], [`data`]) with the same names.
//!
//! What the kernel gets for the type change:
//! - **W^X code**: functions are copied into codespace's code window through a writable,
//!   non-executable alias and published read-execute; no page is ever writable and executable.
//! - **Calls through jump-table slots**: a function [`FuncId`] *is* its slot. Calls between
//!   module functions are `call rel32` to the calling code space's slot, and
//!   [`JITModule::get_finalized_function`] returns the slot, so redefining a function
//!   ([`JITBuilder::hotswap`], [`JITModule::prepare_for_function_redefine`]) is one slot patch
//!   seen by every CPU, and the old code is freed only after a grace period.
//! - **Traps that come back**: Cranelift's trap records (bounds-checked loads and stores, `trap`,
//!   division by zero) are registered in codespace's trap table with a landing pad, so a trap
//!   in generated code unwinds to [`JITModule::call`] as [`CallError::Trap`] naming its
//!   [`TrapCode`](cranelift_codegen::ir::TrapCode), instead of a kernel panic.
//! - **Data**: read-only objects in read-only, non-executable pages (one mapping per finalize),
//!   writable ones in the kernel heap.
//! - **Few TLB rounds**: a finalize publishes all its data in one image and all its functions
//!   in one batch (one publish round, one slot patch).
//!
//! # What the kernel provides
//! 1. A codespace [`CodeManager`](codespace::CodeManager) and
//!    [`Registries`](codespace::module::Registries) whose trap table its #PF, #UD and #DE
//!    handlers consult (codespace's integration guide).
//! 2. A [`Kernel`]: how to enter generated code and unwind from a trap (one entry record per
//!    CPU), a stack for Cranelift to compile on, and when a CPU may report a quiescent state.
//! 3. An ISA: [`native::builder`] replaces `cranelift_native::builder` (which is `std`-only).
//!
//! # Porting from cranelift-jit
//! ```ignore
//! // was: use cranelift_jit::{JITBuilder, JITModule}; use cranelift_module::*;
//! use codespace_cranelift::{JITBuilder, JITModule, Codespace, Module, Linkage, default_libcall_names};
//!
//! let mut flags = settings::builder();
//! flags.set("is_pic", "false")?;
//! let isa = codespace_cranelift::native::builder()?.finish(settings::Flags::new(flags))?;
//! let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
//! builder.symbol("malloc", kernel_malloc as *const u8);
//! let codespace = Codespace { manager: &MANAGER, registries: &REGISTRIES, kernel: &MY_KERNEL };
//! let mut module = JITModule::new(builder, &codespace)?; // was: JITModule::new(builder)
//! // ... declare_function, define_function, finalize_definitions: unchanged ...
//! let result = unsafe { module.call(func_b, &[]) }?;     // or get_finalized_function + transmute
//! ```
//! The kernel test suite (`kernel/tests/cranelift_jit.rs` in the repository) runs cranelift-jit's
//! own tests ported this way, calling every finalized function from every CPU.
//!
//! # Differences a kernel forces
//! - [`JITModule::new`] takes the [`Codespace`] pieces and returns a `Result`;
//!   [`JITBuilder::symbol_lookup_fn`] wants `Send + Sync` (CPUs share the module); there is no
//!   `dlsym` fallback.
//! - A module has a fixed number of slots ([`JITBuilder::max_functions`]).
//! - Data references are absolute (`movabs`), not colocated (data need not lie within ±2 GiB of
//!   the code); taking a module function's address PC-relatively is refused, absolutely it
//!   gives the slot.
//! - Where cranelift-jit panics (an undeclared id, TLS, uninitialized data, an unresolvable
//!   symbol, `get_finalized_*` before finalizing) this crate returns an error or a null pointer.
//! - No `define_function_bytes` (bytes carry no trap records) and no perf map.
#![no_std]
#![deny(missing_docs)]
// `ModuleError` is `cranelift_module`'s, whose `IncompatibleSignature` carries two signatures:
// kept by value so ported code matches on it unchanged.
#![allow(clippy::result_large_err)]

extern crate alloc;

mod builder;
mod call;
mod compile;
pub mod data;
mod error;
mod jit;
mod kernel;
mod link;
pub mod module;
pub mod native;

pub use builder::{Codespace, JITBuilder, LibcallNames, SymbolLookup, DEFAULT_MAX_FUNCTIONS};
pub use compile::ModuleReloc;
pub use data::{DataDescription, Init};
pub use error::{BackendError, CallError, Trap};
pub use jit::JITModule;
pub use kernel::{Exit, Kernel};
pub use module::{
    default_libcall_names, DataDeclaration, DataId, FuncId, FuncOrDataId, FunctionDeclaration,
    Linkage, Module, ModuleDeclarations, ModuleError, ModuleRelocTarget, ModuleResult,
};
