//! The manager's books under its lock: the CPU check, reserving and releasing code spaces,
//! the commit limit and counters, finishing staged work and flushing.

use super::*;

impl<M: Mmu> State<M> {
    /// Checks the calling CPU's NXE and WP the first time it uses this manager.
    pub(super) fn check_cpu(&mut self) -> Result<(), CodeError> {
        let cpu = self.mmu.current_cpu();
        let (word, bit) = (cpu / 64, 1u64 << (cpu % 64));
        match self.checked_cpus.get(word) {
            Some(w) if w & bit != 0 => return Ok(()),
            _ => {}
        }
        self.mmu.check_cpu().map_err(CodeError::CpuUnsupported)?;
        if let Some(w) = self.checked_cpus.get_mut(word) {
            *w |= bit;
        }
        Ok(())
    }

    /// The code space holding `addr`.
    pub(crate) fn space_of(&self, addr: usize) -> Option<&Space> {
        self.spaces
            .range(..=addr)
            .next_back()
            .map(|(_, s)| s)
            .filter(|s| s.usable.contains(addr))
    }

    /// Reserves a code space of `size` usable bytes (page rounded) with guard pages around it.
    pub(crate) fn reserve(&mut self, size: usize) -> Result<AddressRange, CodeError> {
        let size = crate::range::page_round_up(size)
            .filter(|&s| s > 0)
            .ok_or(CodeError::InvalidSize { size })?;
        let guard = self.config.guard_bytes();
        let total = size
            .checked_add(2 * guard)
            .ok_or(CodeError::InvalidSize { size })?;
        let reservation = self
            .free_va
            .allocate(total)
            .ok_or(CodeError::WindowExhausted { size: total })?;
        Ok(self.book_space(reservation, guard, false))
    }

    /// Books a new code space: `reservation` less `guard` bytes at each end is usable. Returns
    /// the usable range.
    pub(crate) fn book_space(
        &mut self,
        reservation: AddressRange,
        guard: usize,
        rox: bool,
    ) -> AddressRange {
        let usable = AddressRange::new(reservation.start() + guard, reservation.end() - guard);
        self.spaces.insert(
            usable.start(),
            Space {
                usable,
                reservation,
                rox,
            },
        );
        self.reserved += usable.size();
        usable
    }

    /// Returns a code space's virtual range, decommitting whatever is still committed in it.
    ///
    /// # Errors
    /// [`CodeError::PartialDecommit`] or [`CodeError::FlushFailed`]: the space is kept (with
    /// what stayed committed) so a later release can finish. [`CodeError::PatchPending`]: a
    /// pending INT3 patch has a slot in the space and could not be finished; nothing changed.
    pub(crate) fn release(&mut self, usable: AddressRange) -> Result<(), CodeError> {
        let Some(space) = self.spaces.get(&usable.start()).copied() else {
            return Ok(());
        };
        self.settle_int3_in(usable)?;
        self.decommit(usable)?;
        self.spaces.remove(&usable.start());
        self.reserved -= space.usable.size();
        // The reservation came out of this pool, so it cannot overlap free space.
        let _ = self.free_va.merge(space.reservation);
        Ok(())
    }

    /// Checks that `bytes` more may be committed, changing nothing.
    pub(crate) fn check_commit(&self, bytes: usize) -> Result<(), CodeError> {
        let remaining = self.config.max_committed.saturating_sub(self.committed);
        if bytes > remaining {
            return Err(CodeError::CommitLimit {
                requested: bytes,
                remaining,
            });
        }
        Ok(())
    }

    /// Accounts `bytes` that were just committed and applies V8's moving critical threshold.
    pub(crate) fn account_commit(&mut self, bytes: usize) {
        self.committed += bytes;
        if self.committed >= self.critical {
            let max = self.config.max_committed;
            self.critical = self.committed + (max.saturating_sub(self.committed)) / 2;
            self.critical_crossings += 1;
            if let Some(hook) = self.config.on_critical {
                hook(self.committed);
            }
        }
    }

    /// Retries what failed operations left pending, as their errors promise "the next operation"
    /// does: the flush of [`CodeError::FlushFailed`], the release of a dropped allocator's code
    /// space, the flip back of [`CodeError::NotRestored`], and the last steps of an INT3 patch
    /// that answered [`CodeError::SyncFailed`]. What fails again stays pending (and safe) for
    /// the next try.
    pub(crate) fn finish_pending(&mut self) {
        let _ = self.finish_int3();
        if self.unflushed.is_some() {
            let _ = self.flush(TlbFlush::new());
        }
        for space in core::mem::take(&mut self.orphaned) {
            if self.release(space).is_err() {
                self.orphaned.push(space);
            }
        }
        if self.unrestored.is_empty() {
            return;
        }
        let mut tlb = TlbFlush::new();
        let mut left = Vec::new();
        for page in core::mem::take(&mut self.unrestored) {
            let Some(committed) = self.pages.get(&page) else {
                continue; // decommitted since
            };
            match self.mmu.query(page) {
                Some(m) if m.writable => {}
                Some(_) => continue, // R+X again
                None => {
                    // Staged by a flush that failed again: wait for it.
                    left.push(page);
                    continue;
                }
            }
            // SAFETY: the page held published code before the failed flip back and nothing
            // executes it while it is RW+NX; it holds only bytes written as code (flip mode
            // writes code and INT3 fill only).
            if unsafe {
                self.mmu
                    .protect(committed, crate::mmu::Protection::ReadExecute, &mut tlb)
            }
            .is_err()
            {
                left.push(page);
            }
        }
        self.unrestored = left;
        // A failed flush leaves the pages staged R+X, to be finished by the next retry.
        let _ = self.flush(tlb);
    }

    /// Flushes `tlb` (with any batch a failed flush left behind).
    ///
    /// # Errors
    /// [`CodeError::FlushFailed`]: the batch is kept for the next flush.
    pub(crate) fn flush(&mut self, mut tlb: TlbFlush) -> Result<(), CodeError> {
        if let Some(mut left) = self.unflushed.take() {
            // The older work first: what `tlb` staged since replaces it.
            left.merge(tlb);
            tlb = left;
        }
        if tlb.is_empty() {
            return Ok(());
        }
        self.mmu.flush(tlb).map_err(|u| {
            self.unflushed = Some(*u.tlb);
            CodeError::FlushFailed(u.error)
        })
    }

    /// Copies committed bytes at `addr` (within the window) into `buf`.
    pub(crate) fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), CodeError> {
        let mut done = 0;
        while done < buf.len() {
            let at = addr
                .checked_add(done)
                .ok_or(crate::mmu::MmuError::OutOfRange { addr })?;
            let page = at & !(PAGE_SIZE - 1);
            // Not `page + PAGE_SIZE - at`: that overflows in the last page of the address space.
            let n = (PAGE_SIZE - (at - page)).min(buf.len() - done);
            let committed = self
                .pages
                .get(&page)
                .filter(|_| self.window.contains(at))
                .ok_or(crate::mmu::MmuError::NotMapped { page })?;
            self.mmu
                .read(committed, at - page, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}
