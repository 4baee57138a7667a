//! codespace: memory for runtime-generated machine code in x86-64 kernels.
//!
//! W^X code memory on the kernel's own page tables, a coalescing free pool, jump tables patched
//! through a writable alias, and a lock-free trap table for guard-page bounds checks.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod breakpoint;
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
