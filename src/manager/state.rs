//! [`CodeManager`]: the window, its free virtual ranges, the code spaces, the MMU and the
//! committed-bytes accounting, behind one lock shared by every allocator.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use spin::{Mutex, MutexGuard};

use super::audit::{self, AuditReport};
use super::error::CodeError;
use crate::mmu::{Mmu, MmuError, Protection, TlbFlush};
use crate::pool::DisjointAllocationPool;
use crate::{AddressRange, PAGE_SIZE};

/// How code lands on a page that already holds published (R+X) code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtectionMode {
    /// Make the page RW+NX (NX first), write, make it R+X again (W off first). Other code on the
    /// page cannot execute meanwhile. This is V8's write-scope model.
    Flip,
    /// Write through a temporary RW+NX alias of the page's frame; the executable mapping is never
    /// writable. This is Linux's `text_poke`.
    Alias,
}

/// Settings of a [`CodeManager`].
#[derive(Debug, Clone, Copy)]
pub struct ManagerConfig {
    /// Hard limit on committed code bytes (V8: 4095 MiB on x64).
    pub max_committed: usize,
    /// Largest code space one reservation may take (V8: 1024 MiB on x64).
    pub max_code_space_size: usize,
    /// Unmapped guard pages on each side of every code space (at least 1).
    pub guard_pages: usize,
    /// How published pages are written.
    pub protection: ProtectionMode,
    /// Called (with the manager lock held: record, don't re-enter) when committed bytes cross the
    /// critical threshold, which then moves halfway to the limit (V8's memory-pressure signal).
    pub on_critical: Option<fn(committed: usize)>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            max_committed: 4095 << 20,
            max_code_space_size: 1024 << 20,
            guard_pages: 1,
            protection: ProtectionMode::Alias,
            on_critical: None,
        }
    }
}

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
}

/// Number of alias pages kept at the bottom of the window for writes through a writable alias.
pub(crate) const ALIAS_PAGES: usize = 2;

pub(crate) struct State<M> {
    pub(crate) mmu: M,
    pub(crate) config: ManagerConfig,
    pub(crate) window: AddressRange,
    /// The alias pages (unmapped at rest).
    pub(crate) alias: AddressRange,
    free_va: DisjointAllocationPool,
    /// Code spaces by usable start: (usable range, reservation with guards).
    pub(crate) spaces: BTreeMap<usize, (AddressRange, AddressRange)>,
    pub(crate) committed: usize,
    /// Reused page list for commits (keeps the allocation path allocation-free when warm).
    pub(crate) scratch_pages: alloc::vec::Vec<usize>,
    critical: usize,
    critical_crossings: u64,
}

/// The code manager: cheap to clone (a shared handle), `Send + Sync` when the backend is `Send`.
pub struct CodeManager<M> {
    pub(crate) inner: Arc<Mutex<State<M>>>,
}

impl<M> Clone for CodeManager<M> {
    fn clone(&self) -> Self {
        CodeManager {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<M: Mmu> CodeManager<M> {
    /// A manager over the virtual `window` (page aligned, wholly unmapped, e.g. one PML4 slot).
    ///
    /// # Errors
    /// [`CodeError::Mmu`] when the CPU does not enforce NX or CR0.WP, or the alias pages' tables
    /// cannot be created; [`CodeError::InvalidConfig`] for an unaligned or too small window.
    pub fn new(mut mmu: M, window: AddressRange, config: ManagerConfig) -> Result<Self, CodeError> {
        mmu.check_protection_support()?;
        let alias_size = ALIAS_PAGES * PAGE_SIZE;
        if !window.is_page_aligned()
            || config.guard_pages == 0
            || window.size() < alias_size + (2 * config.guard_pages + 1) * PAGE_SIZE
        {
            return Err(CodeError::InvalidConfig);
        }
        let alias = AddressRange::from_start_size(window.start(), alias_size)
            .ok_or(CodeError::InvalidConfig)?;
        // Build the alias pages' page tables now, so a later alias write never allocates a
        // page-table frame (and cannot fail for lack of one).
        let mut tlb = TlbFlush::new();
        let probe_frame = {
            mmu.map_fresh(alias.start(), &mut tlb)?;
            mmu.query(alias.start()).map(|m| m.frame)
        };
        mmu.unmap(alias.start(), &mut tlb)?;
        mmu.flush(tlb);
        if probe_frame.is_none() {
            return Err(CodeError::Mmu(MmuError::NotMapped {
                page: alias.start(),
            }));
        }
        let free_va =
            DisjointAllocationPool::from_range(AddressRange::new(alias.end(), window.end()));
        Ok(CodeManager {
            inner: Arc::new(Mutex::new(State {
                mmu,
                config,
                window,
                alias,
                free_va,
                spaces: BTreeMap::new(),
                committed: 0,
                scratch_pages: alloc::vec::Vec::new(),
                critical: config.max_committed / 2,
                critical_crossings: 0,
            })),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State<M>> {
        self.inner.lock()
    }

    /// Runs `f` with the backend (for inspection: queries, flush counters).
    pub fn with_mmu<R>(&self, f: impl FnOnce(&mut M) -> R) -> R {
        f(&mut self.lock().mmu)
    }

    /// Copies committed code bytes at `addr` into `buf`.
    ///
    /// # Errors
    /// A page of the range is not mapped.
    pub fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), CodeError> {
        self.lock().read(addr, buf)
    }

    /// Committed bytes still allowed under the hard limit.
    #[must_use]
    pub fn remaining_uncommitted(&self) -> usize {
        let s = self.lock();
        s.config.max_committed - s.committed
    }

    /// Bytes committed now.
    #[must_use]
    pub fn committed(&self) -> usize {
        self.lock().committed
    }

    /// The code window.
    #[must_use]
    pub fn window(&self) -> AddressRange {
        self.lock().window
    }

    /// The protection mode chosen at creation.
    #[must_use]
    pub fn protection_mode(&self) -> ProtectionMode {
        self.lock().config.protection
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> ManagerStats {
        let s = self.lock();
        ManagerStats {
            reserved: s.spaces.values().map(|(usable, _)| usable.size()).sum(),
            committed: s.committed,
            max_committed: s.config.max_committed,
            critical_threshold: s.critical,
            critical_crossings: s.critical_crossings,
            code_spaces: s.spaces.len(),
            window_free: s.free_va.total_size(),
        }
    }

    /// The live code spaces (usable ranges, guard pages excluded), in address order.
    #[must_use]
    pub fn code_spaces(&self) -> alloc::vec::Vec<AddressRange> {
        self.lock()
            .spaces
            .values()
            .map(|(usable, _)| *usable)
            .collect()
    }

    /// Stores `value` at the 8-byte aligned `addr` of committed code with one atomic 64-bit
    /// store, then serializes this CPU. Published (R+X) pages are written through the writable
    /// alias whatever the protection mode — live code (jump tables) is never made writable, not
    /// even briefly. Patchers serialize on the manager lock; executing code never waits.
    ///
    /// # Errors
    /// Unaligned or uncommitted address, or a backend failure; nothing is written then.
    pub fn patch_u64(&self, addr: usize, value: u64) -> Result<(), CodeError> {
        self.patch_u64s(&[(addr, value)])
    }

    /// Several [`patch_u64`](Self::patch_u64) stores in order, under one lock: stores to the same
    /// page share one alias mapping (one map, one unmap, one `invlpg`), and the CPU serializes
    /// once at the end.
    ///
    /// # Errors
    /// As `patch_u64`; all addresses are checked before the first store.
    pub fn patch_u64s(&self, stores: &[(usize, u64)]) -> Result<(), CodeError> {
        let mut s = self.lock();
        s.patch_u64s(stores)
    }

    /// Walks the window's page tables: W+X pages, committed pages against the counter, and
    /// mappings outside any code space.
    #[must_use]
    pub fn audit(&self) -> AuditReport {
        audit::audit(&self.lock())
    }
}

impl<M: Mmu> State<M> {
    /// Reserves a code space of `size` usable bytes (page rounded) with guard pages around it.
    pub(crate) fn reserve(&mut self, size: usize) -> Result<AddressRange, CodeError> {
        let size = crate::range::page_round_up(size)
            .filter(|&s| s > 0)
            .ok_or(CodeError::InvalidSize { size })?;
        let guard = self.config.guard_pages * PAGE_SIZE;
        let total = size
            .checked_add(2 * guard)
            .ok_or(CodeError::InvalidSize { size })?;
        let reservation = self
            .free_va
            .allocate(total)
            .ok_or(CodeError::WindowExhausted { size: total })?;
        let usable = AddressRange::new(reservation.start() + guard, reservation.end() - guard);
        self.spaces.insert(usable.start(), (usable, reservation));
        Ok(usable)
    }

    /// Returns a code space's virtual range, unmapping whatever is still committed in it.
    pub(crate) fn release(&mut self, usable: AddressRange) {
        let Some((_, reservation)) = self.spaces.remove(&usable.start()) else {
            return;
        };
        let mut pages = alloc::vec::Vec::new();
        self.mmu
            .for_each_mapping(usable, &mut |page, _| pages.push(page));
        let mut tlb = TlbFlush::new();
        for page in pages {
            if self.mmu.unmap(page, &mut tlb).is_ok() {
                self.committed -= PAGE_SIZE;
            }
        }
        self.mmu.flush(tlb);
        // The reservation came out of this pool, so it cannot overlap free space.
        let _ = self.free_va.merge(reservation);
    }

    /// Checks that `bytes` more may be committed, changing nothing.
    pub(crate) fn check_commit(&self, bytes: usize) -> Result<(), CodeError> {
        let remaining = self.config.max_committed - self.committed;
        if bytes > remaining {
            return Err(CodeError::CommitLimit {
                requested: bytes,
                remaining,
            });
        }
        Ok(())
    }

    /// Accounts `bytes` that were just committed (after [`check_commit`](Self::check_commit)
    /// and the mapping both succeeded) and applies V8's moving critical threshold.
    pub(crate) fn account_commit(&mut self, bytes: usize) {
        self.committed += bytes;
        if self.committed >= self.critical {
            let max = self.config.max_committed;
            self.critical = self.committed + (max - self.committed) / 2;
            self.critical_crossings += 1;
            if let Some(hook) = self.config.on_critical {
                hook(self.committed);
            }
        }
    }

    /// Writes `data` at `addr` in committed code pages, whatever their protection, without ever
    /// making a page W+X. Pages come back as they were (R+X pages stay R+X).
    pub(crate) fn write_code(&mut self, addr: usize, data: &[u8]) -> Result<(), CodeError> {
        let mut done = 0;
        while done < data.len() {
            let at = addr + done;
            let page = at & !(PAGE_SIZE - 1);
            let n = (page + PAGE_SIZE - at).min(data.len() - done);
            let chunk = &data[done..done + n];
            let mapping = self.mmu.query(page).ok_or(MmuError::NotMapped { page })?;
            if mapping.writable {
                self.mmu.write(at, chunk)?;
            } else {
                match self.config.protection {
                    ProtectionMode::Flip => {
                        let mut tlb = TlbFlush::new();
                        self.mmu.protect(page, Protection::ReadWrite, &mut tlb)?;
                        self.mmu.flush(tlb);
                        let written = self.mmu.write(at, chunk);
                        let mut tlb = TlbFlush::new();
                        let restored = self.mmu.protect(page, Protection::ReadExecute, &mut tlb);
                        self.mmu.flush(tlb);
                        written?;
                        restored?;
                    }
                    ProtectionMode::Alias => {
                        let alias = self.alias.start() + (at - page);
                        self.with_alias(mapping.frame, |mmu| mmu.write(alias, chunk))?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    pub(crate) fn patch_u64s(&mut self, stores: &[(usize, u64)]) -> Result<(), CodeError> {
        for &(addr, _) in stores {
            if !addr.is_multiple_of(8) {
                return Err(MmuError::Unaligned { addr }.into());
            }
            let page = addr & !(PAGE_SIZE - 1);
            let in_space = self
                .spaces
                .range(..=page)
                .next_back()
                .is_some_and(|(_, (usable, _))| usable.contains(addr));
            if !in_space || self.mmu.query(page).is_none() {
                return Err(MmuError::NotMapped { page }.into());
            }
        }
        let mut i = 0;
        while i < stores.len() {
            let page = stores[i].0 & !(PAGE_SIZE - 1);
            // The run of consecutive stores to this page.
            let run = stores[i..]
                .iter()
                .take_while(|(a, _)| a & !(PAGE_SIZE - 1) == page)
                .count();
            let batch = &stores[i..i + run];
            let mapping = self.mmu.query(page).ok_or(MmuError::NotMapped { page })?;
            if mapping.writable {
                for &(addr, value) in batch {
                    self.mmu.write_u64_atomic(addr, value)?;
                }
            } else {
                let alias = self.alias.start();
                self.with_alias(mapping.frame, |mmu| {
                    for &(addr, value) in batch {
                        mmu.write_u64_atomic(alias + (addr - page), value)?;
                    }
                    Ok(())
                })?;
            }
            i += run;
        }
        self.mmu.serialize();
        Ok(())
    }

    /// Reads committed code bytes (for inspection and tests).
    pub(crate) fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), CodeError> {
        Ok(self.mmu.read(addr, buf)?)
    }

    /// Maps the first alias page onto `frame`, runs `f`, unmaps and invalidates the alias.
    pub(crate) fn with_alias<R>(
        &mut self,
        frame: u64,
        f: impl FnOnce(&mut M) -> Result<R, MmuError>,
    ) -> Result<R, CodeError> {
        let alias = self.alias.start();
        let mut tlb = TlbFlush::new();
        self.mmu.map_alias(alias, frame, &mut tlb)?;
        self.mmu.flush(tlb);
        let result = f(&mut self.mmu);
        let mut tlb = TlbFlush::new();
        let unmapped = self.mmu.unmap_alias(alias, &mut tlb);
        self.mmu.flush(tlb);
        unmapped?;
        Ok(result?)
    }
}
