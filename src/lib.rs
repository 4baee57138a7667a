//! codespace: memory for runtime-generated machine code in x86-64 kernels.
//!
//! A JIT or a wasm runtime running in ring 0 needs what `mmap` and `mprotect` give a user-space
//! JIT, and more: code memory on the kernel's own page tables that is never writable and
//! executable at once (W^X, on every CPU and in every TLB, stale entries included), jump tables
//! whose slots can be patched while other CPUs execute through them, a trap table that a
//! page-fault (or #UD, #DE) handler asks where a faulting instruction of generated code resumes,
//! and grace periods so that replaced or freed code is reclaimed only once no CPU can still be
//! in it. codespace provides these as a `no_std` library over a small page-table backend: the
//! kernel's own (`x86_64` crate `Mapper`, feature `x86_64`) or a software MMU that models
//! per-CPU TLBs for host tests.
//!
//! # The trust boundary
//!
//! Everything that can break memory safety sits in one `unsafe` layer, [`mmu`]; above it the
//! crate is safe Rust. The kernel makes a handful of promises, each on an `unsafe` item:
//!
//! | you promise | where |
//! | --- | --- |
//! | the page table, frame allocator and physical mapping you hand over are the ones every CPU runs on; the code window and the poke slot are yours to give | `unsafe fn X86Mmu::new` |
//! | your linear maps of physical memory (direct map, identity map) are what you say | `unsafe fn X86Mmu::with_linear_maps` |
//! | the 2 MiB frames you hand over (ROX code) are yours alone, 2 MiB aligned, mapped writable only by the physical mapping and otherwise only in your listed linear maps | `unsafe fn X86Mmu::with_huge_frames` |
//! | shootdowns and core serialization reach every other online CPU before they return | `unsafe trait Smp` |
//! | a CPU you report quiescent runs no generated code and holds no lookup reference, reported from task context; a task switched out inside generated code has a [`GraceHold`](sync::grace::GraceHold) | `unsafe fn` [`GraceDomain::quiescent`](sync::grace::GraceDomain::quiescent) (and `set_possible_cpus`, `cpu_online`, `cpu_offline`) |
//! | calling generated code is sound (its ABI, and you do not free it from inside itself) | your `unsafe` call |
//! | a raw code pointer entry is code you own, kept until you replace or free it | `unsafe fn CodePointerTable::{allocate, update, free, with_capacity_and_trap}` (safe path: a module with the table set) |
//! | a raw trap registration covers code you own, with a landing pad of it, until you release it | `unsafe fn TrapTable::{register, register_with, register_batch}` (safe path: [`CodeModule::add_code`](module::CodeModule::add_code)) |
//! | a manual `dec_ref` gives back a reference you hold | `unsafe fn CodeObject::dec_ref` (safe path: the guard of `CodeObject::hold`) |
//! | code you free at the allocator level runs nowhere any more | `unsafe fn CodeAllocator::{free, release_all}` (the module layer waits for a grace period instead) |
//! | values stored into jump-table slots are valid slot encodings toward live code | `unsafe fn CodeAllocator::{patch, patch_slots}` |
//!
//! The backend itself is an `unsafe trait` [`Mmu`](mmu::Mmu); no safe path reaches its
//! dangerous operations. The one bounded exception to W^X is the patching alias inside
//! `Mmu::poke` (private to the patching CPU, interrupts off, as Linux's `text_poke`).
//!
//! **Two page modes.** By default code lives on 4 KiB pages made R+X at publish (one shootdown
//! round per publish). With [`ManagerConfig::rox_code`] and a module's `rox`, code spaces are
//! 2 MiB pages mapped R+X once and never writable, written only through the alias: a publish
//! changes no page-table entry and costs no shootdown (Linux's execmem ROX cache); it takes 2
//! MiB of contiguous frames per page and falls back to 4 KiB pages without them. README,
//! "Code on 2 MiB pages that are never writable", says when to choose it.
//!
//! # A first example
//!
//! On the software MMU (4 simulated CPUs): a manager over a code window, a module with two
//! function slots, a function with one protected instruction and a landing pad, the trap lookup
//! a page-fault handler makes, and a slot patched to new code.
//!
//! ```
//! use codespace::code_object::CodeKind;
//! use codespace::mmu::soft::SoftMmu;
//! use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
//! use codespace::sync::grace::GraceDomain;
//! use codespace::{AddressRange, CodeManager, ManagerConfig};
//!
//! // The kernel reports quiescent states to one grace domain; registries hold the trap table
//! // and the PC -> code map that exception handlers read lock-free.
//! static GRACE: GraceDomain = GraceDomain::new();
//! static REGISTRIES: Registries = Registries::new(&GRACE);
//! # fn main() -> Result<(), codespace::module::ModuleError> {
//! # // SAFETY: one CPU (this thread) reads what the domain protects.
//! # unsafe { GRACE.set_possible_cpus(1) };
//!
//! // A machine with 64 MiB of frames and a direct map, and a window for code in the higher half.
//! let mmu = SoftMmu::new(1 << 14).with_direct_map(0xFFFF_8000_0000_0000);
//! let window = AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_4000_0000);
//! let manager = CodeManager::new(mmu, window, ManagerConfig::default())?;
//! let config = ModuleConfig { functions: 2, ..ModuleConfig::default() };
//! let module = CodeModule::new(&manager, &REGISTRIES, config)?;
//!
//! // Function 0: the load at offset 4 may fault (a guard-page bounds check); it resumes at 16.
//! let body = [0x90u8; 32];
//! let mut f = NewCode::function(0, &body);
//! f.protected = &[4];
//! f.landing_pad = Some(16);
//! let code = module.add_code(&f)?;
//! let start = code.instruction_start();
//!
//! // What the #PF handler asks with the faulting RIP and CR2.
//! let hit = REGISTRIES.traps.lookup_fault(start + 4, 0x1000).expect("protected");
//! assert_eq!(hit.landing_pad(), start + 16);
//! assert!(REGISTRIES.traps.lookup_fault(start + 5, 0x1000).is_none());
//!
//! // Calls go through jump-table slots: point function 1's slot at new code.
//! let stub = module.add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))?;
//! module.patch_slot(1, stub.instruction_start())?;
//! assert_eq!(module.slot_target(1)?, Some(stub.instruction_start()));
//! # Ok(())
//! # }
//! ```
//!
//! # Where things live
//!
//! - [`CodeManager`], [`ManagerConfig`], [`ProtectionMode`], [`PatchProtocol`]: the code
//!   window, W^X publishing, patching; [`CodeAllocator`] for a lower-level free pool.
//! - Modules, in [`module`]: [`CodeModule`](module::CodeModule),
//!   [`Registries`](module::Registries), [`NewCode`](module::NewCode),
//!   [`ModuleConfig`](module::ModuleConfig) and images ([`CodeImage`](module::CodeImage)):
//!   what a JIT or a wasm runtime uses.
//! - Traps, in [`trap`]: [`TrapTable`](trap::TrapTable) (`lookup_fault`, `lookup_trap`),
//!   [`TrapVector`](trap::TrapVector); [`code_map`]: PC -> code object.
//! - Grace periods, in [`sync::grace`]: [`GraceDomain`](sync::grace::GraceDomain),
//!   [`GraceHold`](sync::grace::GraceHold); [`sync::irq_lock`].
//! - Backends, in [`mmu`]: the [`Mmu`](mmu::Mmu) trait;
//!   `mmu::x86::{X86Mmu, PhysOffset, LinearMap, UniProcessor, Smp, X86_INTERRUPTS}` for
//!   kernels (feature `x86_64`); [`mmu::soft::SoftMmu`] for host tests.
//! - Building blocks: [`jump_table`], [`code_pointer_table`], [`breakpoint`],
//!   [`code_object`], [`pool`].
//!
//! The integration guide — what a kernel provides, in the order it wires codespace in, with
//! every snippet compiled — is the [`guide`] module.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod breakpoint;
#[doc = include_str!("../docs/guide.md")]
pub mod guide {}
pub mod code_events;
pub mod code_map;
pub mod code_object;
pub mod code_pointer_table;
pub mod index;
pub mod jump_table;
pub mod manager;
pub mod mmu;
pub mod module;
pub mod pool;
pub mod range;
pub mod sync;
pub mod trap;

pub use manager::{
    AllocatorConfig, AuditReport, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig,
    PatchProtocol, ProtectionMode, PublishedCode, SlotStore, WritableCode,
};
pub use range::{AddressRange, PAGE_SIZE};

// The README's Rust snippets compile as doctests too.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
