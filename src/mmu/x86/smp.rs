//! What the x86 backend needs from the kernel about its CPUs: who runs, and how to reach the
//! others (IPIs).

use crate::mmu::MmuError;
use crate::sync::atomic::{fence, Ordering};

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
    ///
    /// A CPU must be counted here before it can cache translations of the code window or of a
    /// linear map: it sets its online bit (or count) with a `SeqCst` read-modify-write (on x86
    /// a `lock`ed instruction, a full barrier), and only then flushes its TLB and runs anything
    /// that touches those addresses. That store pairs with the `SeqCst` fence
    /// [`X86Mmu`](super::X86Mmu) executes between its staging stores and this call (see
    /// `others_online`): either the flushing CPU sees the new CPU and shoots it down, or the
    /// new CPU's page walks see the staged entries.
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

/// Whether CPUs other than the caller are online, so a flush or a serialization round must
/// reach them (issue 18, item 7).
///
/// The caller has just staged page-table entries (or written code) with plain stores. Without
/// a fence, x86 may satisfy the load of the online count before those stores leave the store
/// buffer (store → load reordering): a CPU coming online at that moment could count itself
/// (`lock or`), flush its TLB and walk the old, present entry — caching a translation the
/// flush then skips, before the final entry is stored and the frame freed. The `SeqCst` fence
/// (`mfence`) makes the staging stores globally visible before the count is read; it pairs with
/// the `SeqCst` read-modify-write by which a CPU comes online ([`Smp::online_cpus`]'s
/// contract; the test kernel's `ONLINE.fetch_or` in `smp/boot.rs`), which precedes its TLB flush
/// and first walk. Store-buffering both ways is thereby excluded: the flusher sees the new CPU,
/// or the new CPU sees the staged entries. (`loom_` models below.)
pub(super) fn others_online(online: impl FnOnce() -> usize) -> bool {
    fence(Ordering::SeqCst);
    online() > 1
}

#[cfg(all(test, loom))]
mod loom_models {
    use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
    use loom::sync::Arc;
    use loom::thread;

    const PRESENT: u64 = 1;
    const STAGED: u64 = 2;

    /// A flushing CPU stages an entry and decides whether to shoot down while a second CPU comes
    /// online and walks the entry. Fails when the flush skips the shootdown although the new CPU
    /// cached the old, present entry.
    fn model(fenced: bool) {
        loom::model(move || {
            let pte = Arc::new(AtomicU64::new(PRESENT));
            let online = Arc::new(AtomicUsize::new(1));
            let ap = {
                let (pte, online) = (Arc::clone(&pte), Arc::clone(&online));
                thread::spawn(move || {
                    // Coming online: a locked RMW (a full barrier on x86), then the TLB flush
                    // and the first walks.
                    online.fetch_add(1, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    pte.load(Ordering::Relaxed)
                })
            };
            // The staging store (a volatile store on hardware).
            pte.store(STAGED, Ordering::Relaxed);
            let shoot = if fenced {
                super::others_online(|| online.load(Ordering::SeqCst))
            } else {
                online.load(Ordering::SeqCst) > 1
            };
            let cached = ap.join().unwrap();
            assert!(
                shoot || cached != PRESENT,
                "a CPU came online, cached the old entry and was not shot down"
            );
        });
    }

    #[test]
    fn item_07_loom_flush_reaches_a_cpu_coming_online() {
        model(true);
    }

    /// The model catches the missed CPU when the fence is left out.
    #[test]
    #[should_panic(expected = "was not shot down")]
    fn item_07_loom_flush_without_the_fence_misses_a_cpu_coming_online() {
        model(false);
    }
}
