//! cranelift-jit's [`JITModule`] for x86-64 kernels, on [`codespace`].
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
//! cranelift-jit's `jit-minimal` example, ported: the imports, `native::builder`, and
//! [`JITModule::new`] taking the [`Codespace`] pieces change; the rest is upstream's. This
//! doctest runs on codespace's software MMU (whose code window is not host memory, so it stops
//! short of the call; in a kernel, [`JITModule::call`] or the transmuted pointer runs it).
//! ```
//! use codespace_cranelift::{default_libcall_names, native, Codespace, JITBuilder, JITModule, Linkage, Module};
//! use cranelift_codegen::ir::{types, AbiParam, InstBuilder, UserFuncName};
//! use cranelift_codegen::settings::{self, Configurable};
//! use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
//! # use codespace::mmu::soft::SoftMmu;
//! # use codespace::module::Registries;
//! # use codespace::sync::grace::GraceDomain;
//! # use codespace::{AddressRange, CodeManager, ManagerConfig};
//! # use codespace_cranelift::{Exit, Kernel};
//! # static GRACE: GraceDomain = GraceDomain::new();
//! # static REGISTRIES: Registries = Registries::new(&GRACE);
//! # struct Host;
//! # // SAFETY: nothing is entered on the host, so no landing pad is reached; no quiescent report.
//! # unsafe impl Kernel for Host {
//! #     fn landing_pad(&self) -> usize { 0x1000 }
//! #     fn on_compile_stack(&self, f: &mut dyn FnMut()) -> Result<(), &'static str> { f(); Ok(()) }
//! #     unsafe fn enter(&self, _: usize, _: &[u64]) -> Exit { Exit::Other(0) }
//! #     fn quiescent(&self) {}
//! # }
//! # static KERNEL: Host = Host;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mmu = SoftMmu::new(1 << 14).with_direct_map(0xFFFF_8000_0000_0000);
//! # let window = AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_4000_0000);
//! # let manager = CodeManager::new(mmu, window, ManagerConfig::default())?;
//!
//! let mut flag_builder = settings::builder();
//! flag_builder.set("use_colocated_libcalls", "false")?;
//! flag_builder.set("is_pic", "false")?;
//! let isa = native::builder()?.finish(settings::Flags::new(flag_builder))?;
//! let codespace = Codespace { manager: &manager, registries: &REGISTRIES, kernel: &KERNEL };
//! let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()), &codespace)?;
//!
//! let mut ctx = module.make_context();
//! let mut func_ctx = FunctionBuilderContext::new();
//! let mut sig_a = module.make_signature();
//! sig_a.params.push(AbiParam::new(types::I32));
//! sig_a.returns.push(AbiParam::new(types::I32));
//! let mut sig_b = module.make_signature();
//! sig_b.returns.push(AbiParam::new(types::I32));
//! let func_a = module.declare_function("a", Linkage::Local, &sig_a)?;
//! let func_b = module.declare_function("b", Linkage::Local, &sig_b)?;
//!
//! ctx.func.signature = sig_a;
//! ctx.func.name = UserFuncName::user(0, func_a.as_u32());
//! {
//!     let mut bcx = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
//!     let block = bcx.create_block();
//!     bcx.switch_to_block(block);
//!     bcx.append_block_params_for_function_params(block);
//!     let param = bcx.block_params(block)[0];
//!     let cst = bcx.ins().iconst(types::I32, 37);
//!     let add = bcx.ins().iadd(cst, param);
//!     bcx.ins().return_(&[add]);
//!     bcx.seal_all_blocks();
//!     bcx.finalize(module.target_config());
//! }
//! module.define_function(func_a, &mut ctx)?;
//! module.clear_context(&mut ctx);
//!
//! ctx.func.signature = sig_b;
//! ctx.func.name = UserFuncName::user(0, func_b.as_u32());
//! {
//!     let mut bcx = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
//!     let block = bcx.create_block();
//!     bcx.switch_to_block(block);
//!     let local_func = module.declare_func_in_func(func_a, bcx.func);
//!     let arg = bcx.ins().iconst(types::I32, 5);
//!     let call = bcx.ins().call(local_func, &[arg]);
//!     let value = bcx.inst_results(call)[0];
//!     bcx.ins().return_(&[value]);
//!     bcx.seal_all_blocks();
//!     bcx.finalize(module.target_config());
//! }
//! module.define_function(func_b, &mut ctx)?;
//! module.clear_context(&mut ctx);
//!
//! // Perform linking: one publish of both functions, `b` calling `a` through `a`'s slot.
//! module.finalize_definitions()?;
//!
//! // The entry is `b`'s jump-table slot. In a kernel: `unsafe { module.call(func_b, &[]) }`
//! // returns `Ok(42)`, or transmute the pointer to `extern "C" fn() -> u32` as upstream.
//! let code_b = module.get_finalized_function(func_b);
//! assert_eq!(code_b as usize, module.slot_address(func_b).unwrap());
//! # Ok(())
//! # }
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
//! - `define_function_bytes` takes bytes without trap records (a trap in them is the kernel's
//!   fault, not a landing); there is no perf map.
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
mod declarations;
mod define;
mod error;
mod jit;
mod kernel;
mod link;
pub mod module;
pub mod native;

pub use builder::{Codespace, JITBuilder, LibcallNames, SymbolLookup, DEFAULT_MAX_FUNCTIONS};
pub use compile::{vector_at, CompiledFunction, ModuleReloc, TrapRecord};
pub use data::{DataDescription, Init};
pub use error::{BackendError, CallError, Trap};
pub use jit::JITModule;
pub use kernel::{Exit, Kernel};
pub use module::{
    default_libcall_names, DataDeclaration, DataId, FuncId, FuncOrDataId, FunctionDeclaration,
    Linkage, Module, ModuleDeclarations, ModuleError, ModuleRelocTarget, ModuleResult,
};
