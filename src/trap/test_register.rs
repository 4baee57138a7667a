//! Safe registration for the trap table's own tests, whose ranges are made-up addresses that no
//! CPU executes and no fault handler consults: the contract of the `unsafe` `register*`
//! functions holds trivially there.

use super::{TrapError, TrapHandle, TrapRegistration, TrapTable};
use crate::range::AddressRange;
use alloc::vec::Vec;

/// `register*` for tables no fault handler consults.
pub(super) trait TestRegister {
    fn test_register(
        &self,
        code: AddressRange,
        protected: &[u32],
        landing_pad: usize,
    ) -> Result<TrapHandle, TrapError>;
    fn test_register_with(&self, reg: &TrapRegistration<'_>) -> Result<TrapHandle, TrapError>;
    fn test_register_batch(
        &self,
        regs: &[TrapRegistration<'_>],
    ) -> Result<Vec<TrapHandle>, TrapError>;
}

impl TestRegister for TrapTable {
    fn test_register(
        &self,
        code: AddressRange,
        protected: &[u32],
        landing_pad: usize,
    ) -> Result<TrapHandle, TrapError> {
        // SAFETY: no fault handler consults the tests' tables (module docs).
        unsafe { self.register(code, protected, landing_pad) }
    }

    fn test_register_with(&self, reg: &TrapRegistration<'_>) -> Result<TrapHandle, TrapError> {
        // SAFETY: as above.
        unsafe { self.register_with(reg) }
    }

    fn test_register_batch(
        &self,
        regs: &[TrapRegistration<'_>],
    ) -> Result<Vec<TrapHandle>, TrapError> {
        // SAFETY: as above.
        unsafe { self.register_batch(regs) }
    }
}
