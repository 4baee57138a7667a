//! The kernel's lock for state an interrupt handler may also lock (page tables, frames): the
//! one codespace ships for kernels, `codespace::mmu::x86::IrqSpin`.

pub use codespace::mmu::x86::{IrqMutex, IrqMutexGuard, IrqSpin};
