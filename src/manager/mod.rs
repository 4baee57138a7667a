//! The code manager: a virtual code window carved into code spaces, committed page by page on
//! the page tables, with committed bytes counted against a hard limit.
//!
//! [`CodeManager`] owns the window and the MMU backend (V8's `WasmCodeManager`);
//! [`CodeAllocator`] (one per module, V8's `WasmCodeAllocator`) allocates code inside its own
//! code spaces and hands out [`WritableCode`] that becomes [`PublishedCode`] on publish.
//!
//! ```
//! use codespace::mmu::soft::SoftMmu;
//! use codespace::{AddressRange, AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig};
//!
//! let window = AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_4000_0000);
//! let machine = SoftMmu::new(1024);
//! let manager = CodeManager::new(machine.clone(), window, ManagerConfig::default())?;
//! let mut module = CodeAllocator::new(&manager, AllocatorConfig::default())?;
//!
//! let mut code = module.allocate(4)?;             // commits one page, RW+NX
//! code.as_mut_slice().copy_from_slice(&[0x8D, 0x04, 0x37, 0xC3]); // lea eax,[rdi+rsi]; ret
//! let code = module.publish(code).map_err(|r| r.error)?; // now R+X; no way to write it
//! let mapping = manager.query(code.start())?.unwrap();
//! assert!(mapping.executable && !mapping.writable);
//! assert_eq!(manager.committed(), 4096);
//!
//! // SAFETY: no CPU ever ran this code, and nothing holds a way into it.
//! unsafe { module.free(code) }.map_err(|e| e.error())?; // the page is wholly free: decommitted
//! assert_eq!(manager.committed(), 0);
//! assert!(manager.audit()?.is_clean());
//! assert!(machine.violations().is_empty());       // the TLB model saw every flush in time
//! # Ok::<(), codespace::CodeError>(())
//! ```

mod abandoned;
mod allocator;
mod audit;
mod code;
mod commit;
mod config;
mod cross_modify;
mod error;
mod rox;
mod state;
mod write;

pub use allocator::{AllocatorConfig, AllocatorStats, CodeAllocator, CODE_ALIGNMENT};
pub(crate) use allocator::{ImagePages, ImageSource};
pub use audit::{wx_report, AuditFinding, AuditFindings, AuditReport, AuditViolation, LeafWalk};
pub use code::{PublishedCode, WritableCode};
pub use config::{ManagerConfig, PatchProtocol, ProtectionMode, MAX_CODE_SPACE_SIZE};
pub use cross_modify::SlotStore;
pub use error::{CodeError, FreeError, Rejected};
pub use state::{CodeManager, ManagerStats};
