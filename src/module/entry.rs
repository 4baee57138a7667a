//! Entering a module's functions from the kernel: the address to call, and a typed pointer.

use super::{CodeModule, ModuleError};
use crate::mmu::{EntryPoint, Mmu};

impl<M: Mmu + Send + 'static> CodeModule<M> {
    /// The address a caller outside the module enters function `index` at: its near slot in
    /// the module's first jump table. It stays the function's entry for the module's life:
    /// redefining the function patches the slot, it does not move it. Until the function has
    /// code, the slot leads to the lazy-compile entry or traps (INT3).
    ///
    /// # Errors
    /// [`ModuleError::BadIndex`] beyond the module's functions (or a module without functions
    /// and so without a jump table); [`ModuleError::Busy`].
    pub fn entry_address(&self, index: u32) -> Result<usize, ModuleError> {
        self.with(|s| {
            s.check_index(index)?;
            s.tables
                .first()
                .and_then(|t| t.layout.near_slot_addr(index))
                .ok_or(ModuleError::BadIndex { index })
        })
    }

    /// Function `index` as a typed function pointer `F` (an `extern "C"` or `extern "sysv64"`
    /// `fn`), entered through its slot ([`entry_address`](Self::entry_address)), e.g.
    /// `let add: extern "sysv64" fn(u64, u64) -> u64 = unsafe { module.entry(0)? };`.
    ///
    /// # Safety
    /// Every code the slot leads to while the pointer is called has `F`'s ABI and signature,
    /// and the module outlives every call (its drop resets the slots, frees the tables and,
    /// after a grace period, the code).
    ///
    /// # Errors
    /// As [`entry_address`](Self::entry_address).
    pub unsafe fn entry<F: EntryPoint>(&self, index: u32) -> Result<F, ModuleError> {
        let address = self.entry_address(index)?;
        // SAFETY: the caller's promise above is `from_address`'s.
        Ok(unsafe { F::from_address(address) })
    }
}
