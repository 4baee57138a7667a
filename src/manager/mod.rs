//! The code manager: a virtual code window carved into code spaces, committed page by page on
//! the page tables, with committed bytes counted against a hard limit.
//!
//! [`CodeManager`] owns the window and the MMU backend (V8's `WasmCodeManager`);
//! [`CodeAllocator`] (one per module, V8's `WasmCodeAllocator`) allocates code inside its own
//! code spaces and hands out [`WritableCode`] that becomes [`PublishedCode`] on publish.

mod allocator;
mod audit;
mod code;
mod error;
mod state;

pub use allocator::{AllocatorConfig, AllocatorStats, CodeAllocator, CODE_ALIGNMENT};
pub use audit::AuditReport;
pub use code::{PublishedCode, WritableCode};
pub use error::{CodeError, Rejected};
pub use state::{CodeManager, ManagerConfig, ManagerStats, ProtectionMode};
