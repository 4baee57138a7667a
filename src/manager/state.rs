//! [`CodeManager`]: the window, its free virtual ranges, the code spaces, the committed pages,
//! the backend and the accounting, behind one IRQ-safe lock shared by every allocator.
//!
//! Lock order: a module's lock, then this one, then the backend's page-table and frame locks.
//! Counters readers poll often live in atomics, updated under the lock, so reading them needs no
//! lock (and works from interrupt context).

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::abandoned::{Abandoned, AbandonedNode};
use super::audit::{self, AuditReport};
use super::config::{ManagerConfig, ProtectionMode};
use super::error::CodeError;
use crate::mmu::{CommittedPage, FlushStats, InterruptControl, Mmu, PageMapping, TlbFlush};
use crate::pool::DisjointAllocationPool;
use crate::sync::irq_lock::{IrqGuard, IrqLock};
use crate::{AddressRange, PAGE_SIZE};

/// Counters of a manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ManagerStats {
    /// Bytes of virtual address space in live code spaces (guard pages excluded).
    pub reserved: usize,
    /// Bytes currently committed (mapped) in code spaces.
    pub committed: usize,
    /// The hard limit.
    pub max_committed: usize,
    /// The current critical threshold.
    pub critical_threshold: usize,
    /// How often the critical threshold was crossed.
    pub critical_crossings: u64,
    /// Live code spaces.
    pub code_spaces: usize,
    /// Free virtual bytes left in the window.
    pub window_free: usize,
    /// Live code spaces on 2 MiB ROX pages ([`ManagerConfig::rox_code`]).
    pub rox_spaces: usize,
    /// Code spaces that asked for ROX pages and fell back to 4 KiB pages (no 2 MiB frame, or
    /// no room for a 2 MiB aligned space), ever.
    pub rox_fallbacks: u64,
    /// 2 MiB pages mapped now (each one page-table leaf for 2 MiB of code).
    pub huge_pages: usize,
}

/// One code space: the usable range and the reservation around it (guard pages included).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Space {
    pub usable: AddressRange,
    pub reservation: AddressRange,
    /// Backed by 2 MiB ROX pages (2 MiB aligned, whole 2 MiB pages); false once it fell back.
    pub rox: bool,
}

/// Counters mirrored out of the lock.
#[derive(Default)]
struct Counters {
    reserved: AtomicUsize,
    committed: AtomicUsize,
    critical: AtomicUsize,
    crossings: AtomicU64,
    spaces: AtomicUsize,
    window_free: AtomicUsize,
    rox_spaces: AtomicUsize,
    rox_fallbacks: AtomicU64,
    huge_pages: AtomicUsize,
}

pub(crate) struct State<M> {
    pub(crate) mmu: M,
    pub(crate) config: ManagerConfig,
    pub(crate) window: AddressRange,
    pub(super) free_va: DisjointAllocationPool,
    /// Code spaces by usable start.
    pub(crate) spaces: BTreeMap<usize, Space>,
    /// Usable bytes of all `spaces`, kept with them (the counters publish it on every unlock).
    pub(super) reserved: usize,
    /// Every committed page of every space, owning its frame (the 512 pages of each 2 MiB
    /// page included).
    pub(crate) pages: BTreeMap<usize, CommittedPage>,
    /// Starts of the mapped 2 MiB pages (of ROX spaces).
    pub(crate) huge: alloc::collections::BTreeSet<usize>,
    /// ROX spaces that fell back to 4 KiB pages, ever.
    pub(crate) rox_fallbacks: u64,
    pub(crate) committed: usize,
    critical: usize,
    critical_crossings: u64,
    /// CPUs whose NXE/WP were checked (bit per CPU index).
    checked_cpus: [u64; 4],
    /// A batch whose flush failed: merged into (and retried by) the next flush.
    unflushed: Option<TlbFlush>,
    /// Pages holding published code that a failed flip back left RW+NX (flip mode): made R+X
    /// again by the next operation.
    pub(crate) unrestored: Vec<usize>,
    /// Code spaces of dropped allocators whose release failed: released by the next operation.
    pub(crate) orphaned: Vec<AddressRange>,
    /// Reused list for commits, so a warm allocation path does not allocate.
    pub(crate) scratch: Vec<usize>,
    /// An INT3 patch whose last steps failed: finished before anything else patches or syncs.
    pub(crate) int3: Option<super::cross_modify::Int3Patch>,
}

struct Inner<M> {
    irq: InterruptControl,
    window: AddressRange,
    config: ManagerConfig,
    counters: Counters,
    /// Spaces of allocators dropped where they could not release them (see `abandoned.rs`).
    abandoned: Abandoned,
    state: IrqLock<State<M>>,
}

/// The code manager: cheap to clone (a shared handle), `Send + Sync` when the backend is `Send`.
///
/// Dropping the last handle releases nothing by itself: code spaces that dropped allocators
/// only queued (dropped with interrupts off, or while the lock was busy) stay reserved and
/// mapped — a leak, never a use-after-free — until someone calls
/// [`release_pending`](Self::release_pending). Task context that runs with interrupts off
/// (where the manager cannot tell it from an interrupt handler) calls it before dropping the
/// manager.
pub struct CodeManager<M> {
    inner: Arc<Inner<M>>,
}

impl<M> Clone for CodeManager<M> {
    fn clone(&self) -> Self {
        CodeManager {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// The locked state, with the counters refreshed when it is released.
pub(crate) struct Locked<'a, M> {
    guard: IrqGuard<'a, State<M>>,
    counters: &'a Counters,
}

impl<M> core::ops::Deref for Locked<'_, M> {
    type Target = State<M>;
    fn deref(&self) -> &State<M> {
        &self.guard
    }
}

impl<M> core::ops::DerefMut for Locked<'_, M> {
    fn deref_mut(&mut self) -> &mut State<M> {
        &mut self.guard
    }
}

impl<M> Drop for Locked<'_, M> {
    fn drop(&mut self) {
        let s = &*self.guard;
        let c = self.counters;
        c.reserved.store(s.reserved, Ordering::Relaxed);
        c.committed.store(s.committed, Ordering::Relaxed);
        c.critical.store(s.critical, Ordering::Relaxed);
        c.crossings.store(s.critical_crossings, Ordering::Relaxed);
        c.spaces.store(s.spaces.len(), Ordering::Relaxed);
        c.window_free
            .store(s.free_va.total_size(), Ordering::Relaxed);
        let rox = s.spaces.values().filter(|sp| sp.rox).count();
        c.rox_spaces.store(rox, Ordering::Relaxed);
        c.rox_fallbacks.store(s.rox_fallbacks, Ordering::Relaxed);
        c.huge_pages.store(s.huge.len(), Ordering::Relaxed);
    }
}

impl<M: Mmu> CodeManager<M> {
    /// A manager over the virtual `window` (page aligned, wholly unmapped, e.g. one PML4 slot).
    ///
    /// # Errors
    /// [`CodeError::InvalidConfig`] for a bad window or setting;
    /// [`CodeError::CpuUnsupported`] when the calling CPU does not enforce NX or CR0.WP;
    /// [`CodeError::FlipNeedsOneCpu`] for [`ProtectionMode::Flip`] while several CPUs are online
    /// (writes that would flip refuse the same way if more CPUs come online later).
    pub fn new(mmu: M, window: AddressRange, config: ManagerConfig) -> Result<Self, CodeError> {
        config.validate(window)?;
        mmu.check_cpu().map_err(CodeError::CpuUnsupported)?;
        if config.protection == ProtectionMode::Flip && mmu.online_cpus() > 1 {
            return Err(CodeError::FlipNeedsOneCpu);
        }
        let mut checked_cpus = [0; 4];
        if let Some(w) = checked_cpus.get_mut(mmu.current_cpu() / 64) {
            *w |= 1 << (mmu.current_cpu() % 64);
        }
        let irq = mmu.interrupt_control();
        let manager = CodeManager {
            inner: Arc::new(Inner {
                irq,
                window,
                config,
                counters: Counters::default(),
                abandoned: Abandoned::new(),
                state: IrqLock::new(State {
                    mmu,
                    config,
                    window,
                    free_va: DisjointAllocationPool::from_range(window),
                    spaces: BTreeMap::new(),
                    reserved: 0,
                    pages: BTreeMap::new(),
                    huge: alloc::collections::BTreeSet::new(),
                    rox_fallbacks: 0,
                    committed: 0,
                    critical: config.max_committed / 2,
                    critical_crossings: 0,
                    checked_cpus,
                    unflushed: None,
                    unrestored: Vec::new(),
                    orphaned: Vec::new(),
                    scratch: Vec::new(),
                    int3: None,
                }),
            }),
        };
        drop(manager.lock()?);
        Ok(manager)
    }

    /// How this manager's (and its modules') locks disable interrupts.
    pub(crate) fn lock_control(&self) -> InterruptControl {
        self.inner.irq
    }

    /// Locks the state with interrupts off, after checking the calling CPU once, and (unless
    /// called with interrupts already off) finishes what a failed operation left pending (see
    /// [`State::finish_pending`]).
    pub(crate) fn lock(&self) -> Result<Locked<'_, M>, CodeError> {
        let guard = self.inner.state.lock(self.inner.irq)?;
        let mut locked = Locked {
            guard,
            counters: &self.inner.counters,
        };
        locked.check_cpu()?;
        // Not from interrupt context (a slot patch from a handler): finishing may unmap and
        // free frames, which takes the kernel's allocator locks.
        if locked.guard.interrupts_were_enabled() {
            if !self.inner.abandoned.is_empty() {
                let orphaned = &mut locked.guard.orphaned;
                self.inner.abandoned.take_all(orphaned);
            }
            locked.finish_pending();
        }
        Ok(locked)
    }

    /// Hands a dropped allocator's spaces to the manager without waiting or releasing where it
    /// may not: always queued lock-free first (no allocation: the node exists). They are
    /// released now only when the lock is taken from a context with interrupts on — releasing
    /// unmaps, flushes, frees frames and may grow `orphaned`, which takes the kernel's allocator
    /// locks, the work [`lock`](Self::lock) refuses in interrupt context. Else (interrupts off
    /// here, or [`CodeError::Busy`]: the lock is held elsewhere) the manager's next operation
    /// with interrupts on takes the queue and releases them.
    pub(crate) fn abandon(&self, node: alloc::boxed::Box<AbandonedNode>) {
        self.inner.abandoned.push(node);
        // With interrupts on, `lock` itself takes the queue and releases every orphaned space
        // (`finish_pending`); with them off it does neither. Busy: left to the holder's
        // successor, as above.
        drop(self.lock());
    }

    /// Releases the code spaces that allocators dropped with interrupts off (or while the lock
    /// was busy) left queued, and finishes what a failed operation left pending. Every
    /// operation called with interrupts on does this first; this is for task context that runs
    /// with interrupts off (a kernel's boot path or scheduler), where the manager cannot tell
    /// it from an interrupt handler. Never call it from an interrupt handler: it unmaps,
    /// flushes and frees frames, which takes the kernel's allocator locks.
    ///
    /// # Errors
    /// [`CodeError::Busy`] (nothing done; the next operation with interrupts on does it).
    pub fn release_pending(&self) -> Result<(), CodeError> {
        let mut locked = self.lock()?;
        if !self.inner.abandoned.is_empty() {
            self.inner.abandoned.take_all(&mut locked.guard.orphaned);
        }
        locked.finish_pending();
        Ok(())
    }

    /// Copies committed code bytes at `addr` into `buf`.
    ///
    /// # Errors
    /// A byte outside the window's committed pages; [`CodeError::Busy`].
    pub fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), CodeError> {
        self.lock()?.read(addr, buf)
    }

    /// The mapping of the window page holding `addr` (`None` outside the window or when not
    /// committed).
    ///
    /// # Errors
    /// [`CodeError::Busy`].
    pub fn query(&self, addr: usize) -> Result<Option<PageMapping>, CodeError> {
        let s = self.lock()?;
        Ok(s.window.contains(addr).then(|| s.mmu.query(addr)).flatten())
    }

    /// Bytes committed now. Lock-free.
    #[must_use]
    pub fn committed(&self) -> usize {
        self.inner.counters.committed.load(Ordering::Relaxed)
    }

    /// Committed bytes still allowed under the hard limit. Lock-free.
    #[must_use]
    pub fn remaining_uncommitted(&self) -> usize {
        self.inner
            .config
            .max_committed
            .saturating_sub(self.committed())
    }

    /// The code window.
    #[must_use]
    pub fn window(&self) -> AddressRange {
        self.inner.window
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> ManagerConfig {
        self.inner.config
    }

    /// The protection mode chosen at creation.
    #[must_use]
    pub fn protection_mode(&self) -> ProtectionMode {
        self.inner.config.protection
    }

    /// Counters, as of the last operation. Lock-free.
    #[must_use]
    pub fn stats(&self) -> ManagerStats {
        let c = &self.inner.counters;
        ManagerStats {
            reserved: c.reserved.load(Ordering::Relaxed),
            committed: c.committed.load(Ordering::Relaxed),
            max_committed: self.inner.config.max_committed,
            critical_threshold: match c.critical.load(Ordering::Relaxed) {
                0 => self.inner.config.max_committed / 2,
                t => t,
            },
            critical_crossings: c.crossings.load(Ordering::Relaxed),
            code_spaces: c.spaces.load(Ordering::Relaxed),
            window_free: match c.window_free.load(Ordering::Relaxed) {
                0 if c.spaces.load(Ordering::Relaxed) == 0 => self.inner.window.size(),
                free => free,
            },
            rox_spaces: c.rox_spaces.load(Ordering::Relaxed),
            rox_fallbacks: c.rox_fallbacks.load(Ordering::Relaxed),
            huge_pages: c.huge_pages.load(Ordering::Relaxed),
        }
    }

    /// Makes every online CPU serialize, so each executes code as it is now (after a
    /// [`CodeError::SyncFailed`], before freeing what old bytes may still jump to).
    ///
    /// # Errors
    /// [`CodeError::SyncFailed`], [`CodeError::Busy`].
    pub(crate) fn sync_cores(&self) -> Result<(), CodeError> {
        let mut state = self.lock()?;
        // An unfinished INT3 patch first (a failure after its first INT3 is a `SyncFailed`).
        state.finish_int3()?;
        state.mmu.sync_cores().map_err(CodeError::SyncFailed)
    }

    /// The backend's TLB and cross-CPU counters.
    ///
    /// # Errors
    /// [`CodeError::Busy`].
    pub fn flush_stats(&self) -> Result<FlushStats, CodeError> {
        Ok(self.lock()?.mmu.flush_stats())
    }

    /// The live code spaces (usable ranges, guard pages excluded), in address order.
    ///
    /// # Errors
    /// [`CodeError::Busy`].
    pub fn code_spaces(&self) -> Result<Vec<AddressRange>, CodeError> {
        Ok(self.lock()?.spaces.values().map(|s| s.usable).collect())
    }

    /// The code space (usable range) holding `addr`.
    ///
    /// # Errors
    /// [`CodeError::Busy`].
    pub fn space_of(&self, addr: usize) -> Result<Option<AddressRange>, CodeError> {
        Ok(self.lock()?.space_of(addr).map(|s| s.usable))
    }

    /// Walks the page tables: the window against the manager's books, and the whole table for
    /// W+X leaves and writable aliases of executable frames.
    ///
    /// # Errors
    /// [`CodeError::Busy`].
    pub fn audit(&self) -> Result<AuditReport, CodeError> {
        let state = self.lock()?;
        Ok(audit::audit(&state))
    }
}

#[path = "state_books.rs"]
mod books;
