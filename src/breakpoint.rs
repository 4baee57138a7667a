//! The #BP hook of the INT3 patch protocol: where a CPU that hit a slot being patched resumes.
//!
//! Under [`PatchProtocol::Int3`](crate::manager::PatchProtocol::Int3) a live jump slot is
//! rewritten the way Linux's `text_poke_bp` rewrites kernel text, the cross-modifying sequence
//! the Intel SDM (vol. 3, 8.1.3) leaves defined: INT3 over the slot's first byte, every CPU
//! serializes, the other bytes, every CPU serializes, the new first byte, every CPU serializes.
//! Between the first and the last store a CPU that calls through the slot executes the INT3.
//! Its #BP handler asks [`BreakpointSites::resume_at`] and, on an answer, resumes there: the
//! slot's new target, which is what the `jmp` being written does (a `jmp` pushes nothing, so
//! only RIP changes).
//!
//! # The handler's contract
//!
//! Every kernel that configures the INT3 protocol installs this in its #BP handler, before its
//! own breakpoint handling (and uses the same `static` in the manager's configuration):
//!
//! ```
//! # use codespace::breakpoint::BreakpointSites;
//! # struct Frame { rip: u64 }
//! static BREAKPOINTS: BreakpointSites = BreakpointSites::new();
//! fn breakpoint_handler(frame: &mut Frame) -> bool {
//!     // `rip` is what the CPU pushed: the address after the INT3.
//!     match BREAKPOINTS.resume_at(frame.rip as usize) {
//!         Some(target) => {
//!             frame.rip = target as u64; // iretq resumes at the slot's new target
//!             true
//!         }
//!         None => false, // not a slot being patched: the kernel's own #BP handling
//!     }
//! }
//! # assert!(!breakpoint_handler(&mut Frame { rip: 0x1001 }));
//! ```
//!
//! - The handler runs with interrupts disabled from the exception until it has used the answer
//!   (an interrupt gate, as exception gates usually are), and the kernel's
//!   [`Smp::sync_cores`](crate::mmu::x86::Smp::sync_cores) completes only after every other CPU
//!   took its interrupt. Then the serialization round after a patch's last store cannot
//!   complete while a CPU is between its #BP and its use of the answer, and the patch
//!   unregisters its sites only after that round: no CPU that hit the INT3 finds them gone.
//! - The handler changes nothing but RIP: the slot is a `jmp`, so the stack and registers are
//!   already what the target expects.
//! - `resume_at` is lock-free and allocation-free, and may run on any CPU at any time, also
//!   while a patch registers or unregisters its sites (it then answers for the sites of patches
//!   whose INT3 the CPU can have executed).
//! - A slot whose new bytes are INT3 (an uncompiled slot without lazy compilation) registers no
//!   site: a CPU that hits it gets `None`, as it would after the patch.
//!
//! # Lifetime of a batch
//!
//! A patch registers its sites (sorted by address) as one heap batch in a free entry of the
//! table. Each entry counts its users (Linux's `bp_desc.refs`): the owning patch holds one, and
//! `resume_at` takes one around its look at the batch, so the patch frees the batch only once
//! no reader can still be reading it — also a reader that scans the entry while looking for
//! another patch's site.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crate::sync::atomic::{fence, AtomicPtr, AtomicUsize, Ordering};

/// Patches that may be in flight at once in one [`BreakpointSites`] (a manager has at most
/// one): one entry each.
#[cfg(not(loom))]
pub const MAX_PATCHES: usize = 32;
/// Patches in flight at once (small under loom to keep the models small).
#[cfg(loom)]
pub const MAX_PATCHES: usize = 2;

/// One slot being patched: the address of its INT3 and where a CPU that hit it resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Site {
    pub addr: usize,
    pub resume: usize,
}

/// The sites of one patch, sorted by address.
struct Batch {
    sites: Vec<Site>,
    /// Loom: written when the batch is freed, read by every lookup, so a lookup that the
    /// reference count does not order before the free is reported as a race.
    #[cfg(loom)]
    freed: loom::cell::UnsafeCell<bool>,
}

impl Batch {
    fn new(sites: Vec<Site>) -> Self {
        Batch {
            sites,
            #[cfg(loom)]
            freed: loom::cell::UnsafeCell::new(false),
        }
    }

    fn find(&self, int3: usize) -> Option<usize> {
        #[cfg(loom)]
        // SAFETY: a tracked read; loom reports it if it races with the poisoning write.
        self.freed
            .with(|f| assert!(!unsafe { *f }, "lookup in a freed batch"));
        let i = self.sites.binary_search_by_key(&int3, |s| s.addr).ok()?;
        Some(self.sites[i].resume)
    }
}

struct Entry {
    /// 0: free. Else 1 for the owning patch plus one per reader looking at `batch`.
    refs: AtomicUsize,
    /// The owner's batch (null before it is published and after it is withdrawn).
    batch: AtomicPtr<Batch>,
}

/// The slots being patched under the INT3 protocol, for the #BP handler: see the module docs.
/// Usable as a `static` ([`new`](Self::new) is `const`); give the same one to every
/// [`ManagerConfig`](crate::ManagerConfig) that selects
/// [`PatchProtocol::Int3`](crate::manager::PatchProtocol::Int3).
pub struct BreakpointSites {
    entries: [Entry; MAX_PATCHES],
}

impl fmt::Debug for BreakpointSites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let busy = self
            .entries
            .iter()
            .filter(|e| e.refs.load(Ordering::Relaxed) != 0)
            .count();
        f.debug_struct("BreakpointSites")
            .field("patches_in_flight", &busy)
            .finish()
    }
}

impl Default for BreakpointSites {
    fn default() -> Self {
        Self::new()
    }
}

impl BreakpointSites {
    /// An empty table.
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new() -> Self {
        BreakpointSites {
            entries: [const {
                Entry {
                    refs: AtomicUsize::new(0),
                    batch: AtomicPtr::new(core::ptr::null_mut()),
                }
            }; MAX_PATCHES],
        }
    }

    /// An empty table (loom's atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new() -> Self {
        BreakpointSites {
            entries: core::array::from_fn(|_| Entry {
                refs: AtomicUsize::new(0),
                batch: AtomicPtr::new(core::ptr::null_mut()),
            }),
        }
    }

    /// Where a CPU that executed an INT3 resumes: `rip` is the RIP the #BP pushed (the address
    /// after the INT3). `Some(target)`: the INT3 is the first byte of a jump slot being patched
    /// to `target`; set RIP to it and return from the exception. `None`: no patch placed it.
    /// Lock-free and allocation-free; see the module docs for the handler's contract.
    #[must_use]
    pub fn resume_at(&self, rip: usize) -> Option<usize> {
        let int3 = rip.checked_sub(1)?;
        self.entries.iter().find_map(|e| e.find(int3))
    }

    /// Registers `sites` (any order) for `resume_at`, in a free entry.
    ///
    /// `None` when every entry is taken ([`MAX_PATCHES`] patches in flight).
    pub(crate) fn register(&'static self, mut sites: Vec<Site>) -> Option<Registration> {
        sites.sort_unstable_by_key(|s| s.addr);
        let (index, entry) = self.entries.iter().enumerate().find(|(_, e)| {
            // 0 -> 1: free (no owner, and readers never raise a count from 0) to owned.
            e.refs
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        })?;
        let batch = Box::into_raw(Box::new(Batch::new(sites)));
        entry.batch.store(batch, Ordering::SeqCst);
        // The sites are visible before any INT3 of the patch can be: the caller stores INT3s
        // only after this returns, x86 makes stores visible in program order, and a CPU that
        // executed one of them loads after its #BP (exception delivery serializes it).
        fence(Ordering::SeqCst);
        Some(Registration { table: self, index })
    }
}

impl Entry {
    /// The resume address of `int3` in this entry's batch, holding a reference meanwhile.
    fn find(&self, int3: usize) -> Option<usize> {
        if self.batch.load(Ordering::Acquire).is_null() {
            return None;
        }
        // Linux's `try_get_desc`: no reference on a free entry (its batch may be gone).
        let mut refs = self.refs.load(Ordering::Relaxed);
        loop {
            if refs == 0 {
                return None;
            }
            match self.refs.compare_exchange_weak(
                refs,
                refs + 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => refs = now,
            }
        }
        // SeqCst with `Registration::drop`'s swap and count check: either the owner sees this
        // reference and waits for it, or this load sees the batch withdrawn.
        let batch = self.batch.load(Ordering::SeqCst);
        // SAFETY: non-null batches are live `Box`es; the owner frees one only after withdrawing
        // it and seeing no reader reference, and this reader holds one until it is done.
        let hit = (!batch.is_null())
            .then(|| unsafe { &*batch }.find(int3))
            .flatten();
        self.refs.fetch_sub(1, Ordering::Release);
        hit
    }
}

/// Sites registered by one patch; dropping it unregisters them, waiting for readers that are
/// looking at them (a bounded wait: a reader only searches a sorted list).
///
/// Drop it only after the serialization round that followed the patch's last store (see the
/// module docs), or before its first INT3 was stored.
pub(crate) struct Registration {
    table: &'static BreakpointSites,
    index: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let entry = &self.table.entries[self.index];
        let batch = entry.batch.swap(core::ptr::null_mut(), Ordering::SeqCst);
        // Readers that took a reference before the swap may hold `batch`: wait until only the
        // owner's is left, then free the entry (1 -> 0; a reader arriving meanwhile sees null).
        while entry
            .refs
            .compare_exchange_weak(1, 0, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            #[cfg(not(loom))]
            core::hint::spin_loop();
            #[cfg(loom)]
            loom::thread::yield_now();
        }
        if !batch.is_null() {
            // SAFETY: created by `register` with `Box::into_raw`; withdrawn above, and no reader
            // holds a reference any more (a later one loads null).
            let batch = unsafe { Box::from_raw(batch) };
            #[cfg(loom)]
            {
                // Poison instead of freeing, so a racing reader is reported, not undefined.
                // SAFETY: a tracked write (see `Batch::freed`).
                batch.freed.with_mut(|f| unsafe { *f = true });
                core::mem::forget(batch);
            }
            #[cfg(not(loom))]
            drop(batch);
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("entry", &self.index)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::vec;

    fn leak() -> &'static BreakpointSites {
        Box::leak(Box::new(BreakpointSites::new()))
    }

    #[test]
    fn registered_sites_answer_until_dropped() {
        let t = leak();
        assert_eq!(t.resume_at(0x1001), None);
        assert_eq!(t.resume_at(0), None, "no underflow");
        let r = t
            .register(vec![
                Site {
                    addr: 0x2000,
                    resume: 0x9000,
                },
                Site {
                    addr: 0x1000,
                    resume: 0x8000,
                },
            ])
            .unwrap();
        assert_eq!(t.resume_at(0x1001), Some(0x8000));
        assert_eq!(t.resume_at(0x2001), Some(0x9000));
        assert_eq!(t.resume_at(0x1000), None, "RIP is after the INT3");
        assert_eq!(t.resume_at(0x1009), None);
        drop(r);
        assert_eq!(t.resume_at(0x1001), None);
        assert_eq!(t.resume_at(0x2001), None);
    }

    #[test]
    fn every_entry_can_be_taken_and_freed() {
        let t = leak();
        let regs: Vec<_> = (0..MAX_PATCHES)
            .map(|i| {
                t.register(vec![Site {
                    addr: 0x1000 * (i + 1),
                    resume: i,
                }])
                .unwrap()
            })
            .collect();
        assert!(t.register(Vec::new()).is_none(), "all entries taken");
        assert_eq!(t.resume_at(0x1000 * MAX_PATCHES + 1), Some(MAX_PATCHES - 1));
        drop(regs);
        assert!(t.entries.iter().all(|e| e.refs.load(Ordering::SeqCst) == 0));
        assert!(t.register(Vec::new()).is_some());
    }

    #[test]
    fn readers_on_other_threads_see_a_registered_site() {
        let t = leak();
        let r = t
            .register(vec![Site {
                addr: 0x5000,
                resume: 0x6000,
            }])
            .unwrap();
        let readers: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(move || (0..10_000).all(|_| t.resume_at(0x5001) == Some(0x6000)))
            })
            .collect();
        for h in readers {
            assert!(h.join().unwrap());
        }
        drop(r);
        assert_eq!(t.resume_at(0x5001), None);
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use alloc::vec;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use std::boxed::Box;

    /// A patch registers a site, "stores the INT3" (a flag), waits for the other CPU's
    /// "serialization" (an acknowledgement it gives after its #BP lookup, as a CPU in its #BP
    /// handler with interrupts off cannot acknowledge the sync IPI earlier), then unregisters and
    /// frees the batch while that CPU scans the table again (for another patch's site): a CPU
    /// that saw the INT3 finds its site, and no lookup reads the batch once freed.
    #[test]
    fn loom_breakpoint_sites_lookup_and_unregister() {
        loom::model(|| {
            let t: &'static BreakpointSites = Box::leak(Box::new(BreakpointSites::new()));
            let int3 = Arc::new(AtomicBool::new(false));
            let ack = Arc::new(AtomicBool::new(false));
            let (i, a) = (Arc::clone(&int3), Arc::clone(&ack));
            let reader = loom::thread::spawn(move || {
                let saw_int3 = i.load(Ordering::SeqCst);
                let hit = t.resume_at(0x1001);
                a.store(true, Ordering::SeqCst);
                if saw_int3 {
                    assert_eq!(hit, Some(0x2000), "the INT3 was there: so is its site");
                }
                assert_eq!(t.resume_at(0x7001), None);
            });
            let reg = t
                .register(vec![Site {
                    addr: 0x1000,
                    resume: 0x2000,
                }])
                .unwrap();
            int3.store(true, Ordering::SeqCst);
            while !ack.load(Ordering::SeqCst) {
                loom::thread::yield_now();
            }
            drop(reg);
            reader.join().unwrap();
            assert_eq!(t.resume_at(0x1001), None);
        });
    }
}
