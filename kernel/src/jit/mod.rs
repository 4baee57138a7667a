//! A Cranelift JIT on codespace: the glue a kernel copies to compile functions in the kernel and
//! run them from codespace's code window.
//!
//! | file | concept |
//! | --- | --- |
//! | `isa` | the target: `x86_64-unknown-none` (`codespace_cranelift::native`), System V, settings and why |
//! | `ir` | building IR for it: signatures, callees, linear-memory addresses, loops |
//! | `compile` | Cranelift output (read by `codespace_cranelift::CompiledFunction`) → codespace parts: relocations mapped, traps, landing pad |
//! | `module` | [`JitModule`]: installing in a `CodeModule`, calling through slots (every `CodeModule` call site); `&self`, shared by CPUs |
//! | `enter` | entering generated code and unwinding from a landing pad ([`Trap`]); one entry record per CPU |
//! | `linear_memory` | [`LinearMemory`]: a guarded 8 GiB reservation, bounds checks by page fault |
//! | `stack` | the stacks Cranelift runs on: 1 MiB per CPU with a guard below |
//! | `lazy` | lazy slots compiled on first call, on any CPU, installed once (`install_if_absent`) |
//! | `tier` | tier-up: recompiling and switching a running function, from any CPU |
//! | `programs` | real programs as IR, with Rust references (the tests', demo's and bench's) |
//! | `error` | [`JitError`] |
//! | `cranelift` | this kernel as `codespace_cranelift` sees it: cranelift-jit's `JITModule` API on codespace |
//!
//! The flow: build a `Function` (IR), [`Compiler::compile`] it for an [`OptLevel`] against the
//! module's [`Linkage`], [`JitModule::install`] the result as function `index`, and
//! [`JitModule::call`] it (or [`JitModule::call_with_memory`]) through its jump-table slot.
//!
//! Every CPU may do all of it at once: compile (each on its own compile stack, with its own
//! [`Compiler`]), install into a shared [`JitModule`], call, trap (unwinding to that CPU's own
//! [`enter`]). No lock is held while Cranelift or generated code runs. Calls that may compile
//! or install (lazy slots, tier-up) run with interrupts on: with interrupts off, a contended
//! codespace lock answers `Busy` instead of waiting.

mod compile;
pub mod cranelift;
mod enter;
mod error;
pub mod ir;
mod isa;
pub mod lazy;
mod linear_memory;
mod module;
pub mod programs;
pub mod stack;
mod tier;

pub use compile::{CompiledFunction, Compiler, HostFunction, Linkage, HOST, MODULE};
pub(crate) use enter::swap_record;
pub use enter::{active, active_on, enter, trap_landing_address, Trap};
pub use error::JitError;
pub use isa::{frontend_config, isa, OptLevel};
pub use linear_memory::{LinearMemory, MAX_LEN, RESERVATION};
pub use module::{JitConfig, JitModule};
pub use tier::TierUp;
