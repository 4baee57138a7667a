//! Giving code back: patching published tables, freeing code (INT3 over it, then the pool),
//! releasing empty spaces, trimming committed pages.

use super::*;

impl<M: Mmu> CodeAllocator<M> {
    /// Stores `(addr, value)` pairs into the 8-byte slots of published `tables` (each `addr`
    /// inside one of them, 8-aligned) with one aligned store each, all or none, then makes every
    /// CPU serialize: when this returns, every CPU executes through the new slots.
    ///
    /// The addresses are checked (they lie in slots of this allocator's own patchable tables);
    /// the values cannot be: they are what other CPUs jump to or through next.
    ///
    /// Every value is one atomic store, whatever the manager's
    /// [`PatchProtocol`](crate::PatchProtocol): [`patch_slots`](Self::patch_slots) says which
    /// stores are jump slots, to be written per the protocol.
    ///
    /// # Safety
    /// Each `value` must be exactly what the slot's users expect at that address: for a jump
    /// slot, the 8 bytes of a valid slot encoding whose targets are code that stays executable
    /// and unfreed for as long as the slot may lead there (until the slot is patched again and
    /// a grace period passed), with the calling convention of the slot's function; for a data
    /// slot (a far-slot target, a pointer), an address meeting the same conditions. Every CPU
    /// may run through the new slot as soon as the store lands, before this returns.
    ///
    /// # Errors
    /// [`CodeError::ForeignCode`], [`CodeError::NotPatchable`] for a table that is not patchable
    /// or an address outside the tables (any address, `usize::MAX` included: nothing is
    /// stored); backend failures and [`CodeError::PatchPending`] (nothing stored);
    /// [`CodeError::SyncFailed`] (stored, not serialized everywhere).
    pub unsafe fn patch(
        &self,
        tables: &[&PublishedCode],
        stores: &[(usize, u64)],
    ) -> Result<(), CodeError> {
        self.check_slots(tables, stores.iter().map(|&(addr, _)| addr))?;
        self.manager.lock()?.patch(stores)
    }

    /// Stores `stores` into the slots of published `tables` as [`patch`](Self::patch) does, but
    /// knowing which are instructions: [`SlotStore::Jump`] slots are rewritten per the manager's
    /// [`PatchProtocol`](crate::PatchProtocol) (with [`Int3`](crate::PatchProtocol::Int3): in
    /// three serialization rounds, through the #BP hook), [`SlotStore::Data`] ones with one
    /// aligned store each. When this returns `Ok`, every CPU executes through the new slots.
    ///
    /// # Safety
    /// As [`patch`](Self::patch): each value is what the slot's users expect (a jump slot's
    /// target is code that stays executable as long as the slot may lead there); the addresses
    /// are checked.
    ///
    /// # Errors
    /// As [`patch`](Self::patch); [`CodeError::NotPatchable`] also for a jump value that is
    /// neither `jmp rel32` nor INT3 under the INT3 protocol, [`CodeError::Busy`] when its
    /// [`BreakpointSites`](crate::breakpoint::BreakpointSites) has no free entry; after
    /// [`CodeError::SyncFailed`] the patch is in effect and finishes later (see
    /// [`PatchProtocol::Int3`](crate::PatchProtocol::Int3)).
    pub unsafe fn patch_slots(
        &self,
        tables: &[&PublishedCode],
        stores: &[SlotStore],
    ) -> Result<(), CodeError> {
        self.check_slots(tables, stores.iter().map(SlotStore::addr))?;
        self.manager.lock()?.patch_slots(stores)
    }

    /// Checks that `tables` are this allocator's and that every address is a whole, aligned
    /// 8-byte slot inside a patchable one (`addr + 8` checked: an address in the last 8 bytes of
    /// the address space is refused, not an overflow).
    pub(super) fn check_slots(
        &self,
        tables: &[&PublishedCode],
        addrs: impl Iterator<Item = usize>,
    ) -> Result<(), CodeError> {
        if tables.iter().any(|t| t.owner != self.id) {
            return Err(CodeError::ForeignCode);
        }
        for addr in addrs {
            let inside = tables.iter().any(|t| {
                t.patchable
                    && addr.is_multiple_of(8)
                    && addr >= t.range.start()
                    && addr.checked_add(8).is_some_and(|end| end <= t.range.end())
            });
            if !inside {
                return Err(CodeError::NotPatchable { addr });
            }
        }
        Ok(())
    }

    /// Frees published code: its range becomes reusable and INT3, and the pages that became
    /// wholly free are decommitted.
    ///
    /// # Safety
    /// No CPU executes the code's range now or ever will again through anything made before
    /// this call:
    /// - no CPU is running in it, and no task, CPU or interrupted frame holds a return address
    ///   into it (a preempted task counts, wherever it is switched out);
    /// - nothing any CPU may still follow leads into it: no jump-table slot or code pointer
    ///   targets it, no other live code calls or jumps into it, and every CPU that could have
    ///   read such a way in before it was removed has since passed a point where it holds none
    ///   (a grace period after unpublishing it, as the module layer waits for, and a
    ///   serialization round after the last slot patch that led there);
    /// - nobody keeps its start address to run it later.
    ///
    /// Freeing code from inside itself breaks the first rule. Code never published
    /// ([`discard`](Self::discard)) needs none of this.
    ///
    /// # Errors
    /// [`FreeError::Foreign`] and [`FreeError::NotFreed`] hand the code back, nothing freed;
    /// [`FreeError::Decommit`] (freed, some pages stay committed for now).
    pub unsafe fn free(&mut self, code: PublishedCode) -> Result<(), FreeError<PublishedCode>> {
        if code.owner != self.id {
            return Err(FreeError::Foreign(code));
        }
        match self.free_range(code.range, true) {
            Ok(()) => {
                self.count_live(code.range, false);
                Ok(())
            }
            Err(Freeing::NotFreed(e)) => Err(FreeError::NotFreed(e, code)),
            Err(Freeing::Decommit(e)) => {
                self.count_live(code.range, false);
                Err(FreeError::Decommit(e))
            }
        }
    }

    /// Frees every allocation of this allocator and hands all its code spaces back to the
    /// manager (released now, or by the manager's next operation when it is busy or interrupts
    /// are off), published code included. Handles of this allocator still held become foreign:
    /// freeing them later answers [`FreeError::Foreign`] and touches nothing. The allocator
    /// stays usable and starts over empty.
    ///
    /// Dropping does this for spaces without published code; this is how code spaces that
    /// still hold published code are given back (the module layer calls it once a dropped
    /// module's grace period is over).
    ///
    /// # Safety
    /// As [`free`](Self::free), for every published allocation of this allocator not freed yet.
    pub unsafe fn release_all(&mut self) {
        // Outstanding handles name ranges that may be reused by others from now on.
        self.id = NEXT_OWNER.fetch_add(1, Ordering::Relaxed);
        self.live.iter_mut().for_each(|l| *l = 0);
        self.free = DisjointAllocationPool::new();
        self.allocated = 0;
        self.trim_pending = false;
        self.stale_images.clear();
        self.hand_over_releasable();
    }

    /// Hands every space holding no published code to the manager and forgets all spaces:
    /// those with published code stay reserved and mapped for good. Only for `drop` and
    /// [`release_all`](Self::release_all) (where none is live).
    pub(super) fn hand_over_releasable(&mut self) {
        let mut spaces = core::mem::take(&mut self.spaces);
        let live = core::mem::take(&mut self.live);
        self.image_spaces.clear();
        let mut i = 0;
        // In place (`retain` never allocates): dropping may run in interrupt context.
        spaces.retain(|_| {
            let empty = live[i] == 0;
            i += 1;
            empty
        });
        if spaces.is_empty() {
            return;
        }
        // A space was added, so the node exists (allocated by `add_space`).
        let Some(mut node) = self.node.take() else {
            return;
        };
        node.spaces = spaces;
        self.manager.abandon(node);
    }

    /// Frees code that was never published. Unless a failed publish wrote its bytes, they never
    /// reached memory and nothing is written: the range still holds INT3 (what fresh pages and
    /// freed ranges hold); else the range is filled with INT3 again.
    ///
    /// # Errors
    /// As [`free`](Self::free).
    pub fn discard(&mut self, code: WritableCode) -> Result<(), FreeError<WritableCode>> {
        if code.owner != self.id {
            return Err(FreeError::Foreign(code));
        }
        match self.free_range(code.range, code.written) {
            Ok(()) => Ok(()),
            Err(Freeing::NotFreed(e)) => Err(FreeError::NotFreed(e, code)),
            Err(Freeing::Decommit(e)) => Err(FreeError::Decommit(e)),
        }
    }

    /// Hands `code` back as [`CodeError::ForeignCode`] unless this allocator created it.
    pub(super) fn own<T>(&self, owner: u64, code: T) -> Result<T, Rejected<T>> {
        if owner == self.id {
            Ok(code)
        } else {
            Err(Rejected {
                error: CodeError::ForeignCode,
                code,
            })
        }
    }

    pub(super) fn free_range(&mut self, range: AddressRange, fill: bool) -> Result<(), Freeing> {
        let manager = self.manager.clone();
        let mut state = manager.lock().map_err(Freeing::NotFreed)?;
        // Handles are unique and owned, so their range is allocated: a failure here would be a
        // bookkeeping bug, and changes nothing.
        let merged = self
            .free
            .merged_extent(range)
            .map_err(|_| Freeing::NotFreed(CodeError::InvalidSize { size: range.size() }))?;
        // A pending INT3 patch's slots in the range are finished first (nothing freed if not).
        state.settle_int3_in(range).map_err(Freeing::NotFreed)?;
        // V8's rule: decommit the whole pages that are now free and touch the freed range (in
        // a ROX space, whole 2 MiB pages: the rest stays mapped and becomes INT3).
        let g = state.granule(range.start());
        let start = merged
            .start()
            .checked_next_multiple_of(g)
            .unwrap_or(usize::MAX)
            .max(range.start() / g * g);
        let end = (merged.end() / g * g).min(
            range
                .end()
                .checked_next_multiple_of(g)
                .unwrap_or(usize::MAX),
        );
        let dead = AddressRange::new(start, end.max(start));
        // What stays committed of published code becomes INT3 first: if that fails, the range
        // stays allocated (the caller gets its handle back) and nothing but its own bytes
        // changed. (Code never published never reached memory: nothing to overwrite.)
        let parts = [
            AddressRange::new(
                range.start(),
                dead.start().clamp(range.start(), range.end()),
            ),
            AddressRange::new(dead.end().clamp(range.start(), range.end()), range.end()),
        ];
        if fill {
            // Both parts in one batch: one alias session for up to 2 MiB of pages (a ROX
            // page's freed code), so a failure leaves nothing written.
            fill_int3(&mut state, &parts).map_err(Freeing::NotFreed)?;
        }
        let _ = self.free.merge(range);
        self.allocated -= range.size();
        self.freed += range.size();
        let decommitted = state.decommit(dead);
        if matches!(decommitted, Err(CodeError::PartialDecommit(_))) {
            self.trim_pending = true;
        } else if decommitted.is_ok() && self.trim_pending {
            // Pages an earlier failed decommit left behind go now.
            self.trim_pending = self.trim_locked(&mut state).is_err();
        }
        decommitted.map_err(Freeing::Decommit)
    }

    /// Decommits every committed page of this allocator's spaces that holds no allocation (left
    /// behind by a failed decommit).
    ///
    /// # Errors
    /// As the decommit of [`free`](Self::free).
    pub fn trim(&mut self) -> Result<(), CodeError> {
        let manager = self.manager.clone();
        let mut state = manager.lock()?;
        self.trim_locked(&mut state)?;
        self.trim_pending = false;
        Ok(())
    }

    pub(super) fn trim_locked(&self, state: &mut State<M>) -> Result<(), CodeError> {
        let free: Vec<AddressRange> = self.free.ranges().collect();
        for r in free {
            let whole = r.page_shrink();
            if !whole.is_empty() {
                state.decommit(whole)?;
            }
        }
        Ok(())
    }
}

/// How freeing a range failed.
pub(super) enum Freeing {
    /// Nothing was freed.
    NotFreed(CodeError),
    /// Freed; the decommit failed.
    Decommit(CodeError),
}

/// Writes INT3 over `ranges` of committed code, whatever the pages' protection, in one batch
/// (every page checked before a byte moves; live pages in as few alias sessions as
/// [`MAX_POKE_PAGES`](crate::mmu::MAX_POKE_PAGES) allows).
pub(super) fn fill_int3<M: Mmu>(
    state: &mut State<M>,
    ranges: &[AddressRange],
) -> Result<(), CodeError> {
    static INT3_PAGE: [u8; PAGE_SIZE] = [INT3; PAGE_SIZE];
    let mut writes: Vec<(usize, &[u8])> = Vec::new();
    for range in ranges {
        let mut at = range.start();
        while at < range.end() {
            let n = (range.end() - at).min(PAGE_SIZE - at % PAGE_SIZE);
            writes.push((at, &INT3_PAGE[..n]));
            at += n;
        }
    }
    if writes.is_empty() {
        return Ok(());
    }
    state.write_code_batch(&writes)?;
    Ok(())
}
