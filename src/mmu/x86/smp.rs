//! What the x86 backend needs from the kernel about its CPUs: who runs, and how to reach the
//! others (IPIs).

use crate::mmu::MmuError;

/// The kernel's CPUs, for [`X86Mmu`](super::X86Mmu). The kernel implements it over its IPI
/// layer; [`UniProcessor`] is the implementation for a kernel that runs one CPU.
///
/// # Safety
/// codespace's W^X and free-after-flush guarantees rest on these promises:
/// - [`current_cpu`](Self::current_cpu) is a dense index, distinct per CPU and stable while
///   interrupts are disabled; [`online_cpus`](Self::online_cpus) counts every CPU that may run
///   codespace operations, generated code or lookups.
/// - [`shootdown`](Self::shootdown) returns `Ok` only after every *other* online CPU
///   invalidated `pages` (or everything, when `full`) in every address space and PCID in which
///   it may cache them: `invlpg` per page, or a full flush that includes global entries.
/// - [`sync_cores`](Self::sync_cores) returns `Ok` only after every other online CPU executed a
///   serializing instruction after the call began.
/// - Both may be called with interrupts disabled and must not deadlock when two CPUs call them
///   at once (a waiting CPU keeps serving requests addressed to it).
pub unsafe trait Smp: Sync {
    /// Index of the calling CPU.
    fn current_cpu(&self) -> usize;

    /// CPUs online now.
    fn online_cpus(&self) -> usize;

    /// Invalidates `pages` (or everything) on every other online CPU and waits for all of them.
    ///
    /// # Errors
    /// [`MmuError::ShootdownTimeout`] when a CPU did not acknowledge.
    fn shootdown(&self, pages: &[usize], full: bool) -> Result<(), MmuError>;

    /// Makes every other online CPU serialize and waits for all of them.
    ///
    /// # Errors
    /// [`MmuError::ShootdownTimeout`] when a CPU did not acknowledge.
    fn sync_cores(&self) -> Result<(), MmuError>;
}

/// A kernel that runs on one CPU: nothing to reach.
#[derive(Debug, Clone, Copy, Default)]
pub struct UniProcessor;

// SAFETY: with one CPU there is no other CPU to invalidate or serialize, and index 0 is the
// only index.
unsafe impl Smp for UniProcessor {
    fn current_cpu(&self) -> usize {
        0
    }

    fn online_cpus(&self) -> usize {
        1
    }

    fn shootdown(&self, _pages: &[usize], _full: bool) -> Result<(), MmuError> {
        Ok(())
    }

    fn sync_cores(&self) -> Result<(), MmuError> {
        Ok(())
    }
}
