//! The lookups shared by every module of a kernel, and the grace domain that frees their memory.

use alloc::sync::Arc;

use crate::code_map::CodeMap;
use crate::code_object::CodeObject;
use crate::sync::grace::GraceDomain;
use crate::trap::TrapTable;

/// The lookups the fault handler and profilers need, shared by all modules; keep one in a
/// `static` so a page-fault handler reaches it without locks:
///
/// ```
/// use codespace::module::Registries;
/// use codespace::sync::grace::GraceDomain;
///
/// static GRACE: GraceDomain = GraceDomain::new();
/// static CODE: Registries = Registries::new(&GRACE);
///
/// assert!(CODE.lookup_code(0x1000).is_none());
/// assert_eq!(CODE.traps.len(), 0);
/// ```
#[derive(Debug)]
pub struct Registries {
    /// Protected instructions of all published code.
    pub traps: TrapTable,
    /// PC → code object for all published code.
    pub code: CodeMap,
}

impl Registries {
    /// Empty registries whose freed code and replaced memory wait for grace periods of `grace`
    /// (the domain the kernel reports quiescent states to).
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new(grace: &'static GraceDomain) -> Self {
        Registries {
            traps: TrapTable::new(grace),
            code: CodeMap::new(grace),
        }
    }

    /// Empty registries (loom atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new(grace: &'static GraceDomain) -> Self {
        Registries {
            traps: TrapTable::new(grace),
            code: CodeMap::new(grace),
        }
    }

    /// The grace domain: the kernel reports quiescent states to it.
    #[must_use]
    pub fn grace(&self) -> &'static GraceDomain {
        self.traps.grace()
    }

    /// The code object holding `pc`: lock-free, O(log n).
    #[must_use]
    pub fn lookup_code(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.code.lookup(pc)
    }
}
