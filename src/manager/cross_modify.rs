//! Rewriting live jump slots: the two cross-modifying-code protocols of [`PatchProtocol`].
//!
//! A patch is a list of [`SlotStore`]s into published tables. Data stores (far-slot targets,
//! pointers) are one aligned 8-byte store under either protocol: CPUs *load* them, and an
//! aligned qword load sees the old or the new value. Jump stores (near slots, whose bytes CPUs
//! *execute*) follow the manager's protocol:
//!
//! ```text
//! AtomicStore:  one alias session: every store        → sync
//! Int3:         register the sites (slot → new target) for the #BP hook
//!               session A: data stores; each changing slot := INT3 + old bytes 1..8 → sync 1
//!               session B: each slot whose tail changes := INT3 + new bytes 1..8   → sync 2
//!               session C: each slot := new bytes (unless its first byte is INT3)  → sync 3
//!               unregister the sites
//! ```
//!
//! Every step is one aligned 8-byte store per slot that changes one part only (the first byte,
//! or the other seven), so a CPU *loading* the slot also sees whole stages, never a torn one.
//!
//! Between sync 1 and the last store every CPU that executes a changing slot sees its INT3
//! (or, not having serialized yet, the whole old slot), so no CPU executes bytes that changed
//! since it last serialized, except that one byte to or from INT3 — the case the SDM (vol. 3,
//! 8.1.3) and Linux's `text_poke_bp` rely on. Slots whose bytes do not change are stored again
//! as data in session A (same bytes: nothing for an executing CPU to see; under QEMU's TCG the
//! store still drops stale translations, which `settle_slot`-style re-patching relies on).
//!
//! **Failure after the first INT3 landed** (a sync round or a later session failed): the sites
//! stay registered — every CPU runs the old slot or resumes at the new target through the hook,
//! which is the patch in effect — and the error is [`CodeError::SyncFailed`] ("stored, not
//! serialized everywhere"). The remaining steps are finished before the manager's next patch,
//! its next [`sync_cores`](super::CodeManager), and by its next operation that may wait; a patch
//! does not start while one is unfinished.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::config::PatchProtocol;
use super::error::CodeError;
use super::state::State;
use crate::breakpoint::{Registration, Site};
use crate::mmu::{Mmu, MmuError, Poke};
use crate::PAGE_SIZE;

const INT3: u8 = 0xCC;
const JMP_REL32: u8 = 0xE9;

/// `slot` with INT3 as its first byte.
const fn with_int3(slot: u64) -> u64 {
    (slot & !0xFF) | INT3 as u64
}

/// One aligned 8-byte store into a published, patchable table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotStore {
    /// A qword CPUs load as data (a far slot's target, a pointer): one atomic store under
    /// every [`PatchProtocol`].
    Data {
        /// 8-aligned address.
        addr: usize,
        /// The new qword.
        value: u64,
    },
    /// A near jump slot that CPUs may be executing: `jmp rel32` (`E9`) or eight INT3 (`CC`)
    /// as its first byte, written per the manager's [`PatchProtocol`].
    Jump {
        /// 8-aligned address.
        addr: usize,
        /// The slot's new 8 bytes, little-endian.
        value: u64,
    },
}

impl SlotStore {
    /// The address stored to.
    #[must_use]
    pub const fn addr(&self) -> usize {
        match *self {
            SlotStore::Data { addr, .. } | SlotStore::Jump { addr, .. } => addr,
        }
    }

    /// The value stored.
    #[must_use]
    pub const fn value(&self) -> u64 {
        match *self {
            SlotStore::Data { value, .. } | SlotStore::Jump { value, .. } => value,
        }
    }
}

/// Where a CPU that hits the INT3 of slot `addr` while it becomes `value` resumes: the target
/// of the new `jmp rel32`; `None` when the new slot is INT3 itself (it traps afterwards too).
fn resume_target(addr: usize, value: u64) -> Option<usize> {
    let b = value.to_le_bytes();
    (b[0] == JMP_REL32).then(|| {
        let rel = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        // Wrapping like the CPU; the slot's encoder checked reach.
        addr.wrapping_add(5).wrapping_add_signed(rel as isize)
    })
}

/// The next step of an INT3 patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    SyncInt3,
    WriteTails,
    SyncTails,
    WriteHeads,
    SyncHeads,
}

/// An INT3 patch whose INT3s landed: the slots still to finish, and its registered sites.
#[derive(Debug)]
pub(crate) struct Int3Patch {
    /// Every slot that changes: address, new value, whether its bytes 1..8 change.
    slots: Vec<(usize, u64, bool)>,
    step: Step,
    /// Unregisters on drop: dropped only once the last sync round succeeded.
    _sites: Option<Registration>,
}

impl<M: Mmu> State<M> {
    /// Stores `stores` into published tables (all checked and all pages committed before the
    /// first byte moves), per the configured [`PatchProtocol`]; when this returns `Ok`, every
    /// CPU executes the new slots.
    ///
    /// # Errors
    /// [`CodeError::NotPatchable`] for a misaligned store or (INT3 protocol) a jump value that
    /// is neither `jmp rel32` nor INT3; [`CodeError::Busy`] when the [`BreakpointSites`]
    /// table is full; backend failures before the first store (nothing stored);
    /// [`CodeError::SyncFailed`] (stored, the patch finishes later: see the module docs).
    ///
    /// [`BreakpointSites`]: crate::breakpoint::BreakpointSites
    pub(crate) fn patch_slots(&mut self, stores: &[SlotStore]) -> Result<(), CodeError> {
        self.finish_before_patch()?;
        if let Some(s) = stores.iter().find(|s| !s.addr().is_multiple_of(8)) {
            return Err(CodeError::NotPatchable { addr: s.addr() });
        }
        let PatchProtocol::Int3(table) = self.config.patch_protocol else {
            let plain: Vec<(usize, u64)> = stores.iter().map(|s| (s.addr(), s.value())).collect();
            return self.store_and_sync(&plain);
        };
        // Data stores in order, then each jump slot's last value.
        let mut data: Vec<(usize, u64)> = Vec::new();
        let mut jumps: BTreeMap<usize, u64> = BTreeMap::new();
        for s in stores {
            match *s {
                SlotStore::Data { addr, value } => data.push((addr, value)),
                SlotStore::Jump { addr, value } => {
                    if !matches!(value.to_le_bytes()[0], JMP_REL32 | INT3) {
                        return Err(CodeError::NotPatchable { addr });
                    }
                    jumps.insert(addr, value); // a later store to the slot wins
                }
            }
        }
        // Every page committed before anything is stored.
        let addrs = data.iter().map(|&(a, _)| a).chain(jumps.keys().copied());
        super::write::session(&self.pages, addrs.map(|a| a & !(PAGE_SIZE - 1)))?;
        let mut changing = Vec::new();
        for (&addr, &value) in &jumps {
            if self.read_u64(addr)? == value {
                data.push((addr, value)); // same bytes: nothing for executing CPUs to see
            } else {
                changing.push((addr, value));
            }
        }
        if changing.is_empty() {
            return self.store_and_sync(&data);
        }
        let mut slots = Vec::new();
        let mut sites = Vec::new();
        for &(addr, value) in &changing {
            let old = self.read_u64(addr)?;
            if old & 0xFF != u64::from(INT3) {
                data.push((addr, with_int3(old))); // only the first byte changes
            }
            slots.push((addr, value, old >> 8 != value >> 8));
            if let Some(resume) = resume_target(addr, value) {
                sites.push(Site { addr, resume });
            }
        }
        let registration = if sites.is_empty() {
            None
        } else {
            Some(table.register(sites).ok_or(CodeError::Busy)?)
        };
        // Session A. `poke_stores` stores all or nothing (see there), so on failure nothing
        // was stored and no CPU could hit a new INT3: the sites go (a CPU that hit an INT3 that
        // was there before resumed at a new target; the slot was uncompiled, so that call had
        // no old target to keep).
        self.poke_stores(&data)?;
        self.int3 = Some(Int3Patch {
            slots,
            step: Step::SyncInt3,
            _sites: registration,
        });
        self.finish_int3()
    }

    /// Runs the remaining steps of an unfinished INT3 patch, if any (see the module docs).
    ///
    /// # Errors
    /// [`CodeError::SyncFailed`]: a step failed again; the patch stays pending.
    pub(crate) fn finish_int3(&mut self) -> Result<(), CodeError> {
        let Some(mut patch) = self.int3.take() else {
            return Ok(());
        };
        // No page of a pending patch is freed or decommitted (`settle_int3_in`), so every
        // error here, `NotMapped` included, is a backend failure to retry, never "gone".
        let result = self.run_int3(&mut patch);
        match result {
            Ok(()) => Ok(()), // `patch` drops here: its sites go after the last round
            Err(e) => {
                self.int3 = Some(patch);
                Err(match e {
                    CodeError::Mmu(e) => CodeError::SyncFailed(e),
                    e => e,
                })
            }
        }
    }

    /// [`finish_int3`](Self::finish_int3) before an operation that stores or frees: a
    /// failure is [`CodeError::PatchPending`] — nothing of the operation happened — never
    /// [`CodeError::SyncFailed`], which callers read as "this call's stores landed".
    pub(crate) fn finish_before_patch(&mut self) -> Result<(), CodeError> {
        self.finish_int3().map_err(|e| match e {
            CodeError::SyncFailed(e) | CodeError::Mmu(e) => CodeError::PatchPending(e),
            e => e,
        })
    }

    /// Before `range` is freed or its code space released: a pending INT3 patch with a slot in
    /// it is finished first, so no site stays registered with a resume target there, and no
    /// later step stores old bytes into pages a new owner got. A failure refuses the free
    /// ([`CodeError::PatchPending`], nothing freed): the range stays allocated (the module
    /// retries the free, a dropped allocator's space stays orphaned) until the patch finished.
    pub(crate) fn settle_int3_in(&mut self, range: crate::AddressRange) -> Result<(), CodeError> {
        let touches = self
            .int3
            .as_ref()
            .is_some_and(|p| p.slots.iter().any(|&(addr, ..)| range.contains(addr)));
        if touches {
            self.finish_before_patch()?;
        }
        Ok(())
    }

    fn run_int3(&mut self, patch: &mut Int3Patch) -> Result<(), CodeError> {
        loop {
            patch.step = match patch.step {
                Step::SyncInt3 => {
                    self.mmu.sync_cores().map_err(CodeError::SyncFailed)?;
                    Step::WriteTails
                }
                Step::WriteTails if !patch.slots.iter().any(|s| s.2) => Step::WriteHeads,
                Step::WriteTails => {
                    // INT3 stays the first byte: one store per slot changes only bytes 1..8.
                    let tails: Vec<(usize, u64)> = patch
                        .slots
                        .iter()
                        .filter(|s| s.2)
                        .map(|&(a, v, _)| (a, with_int3(v)))
                        .collect();
                    self.poke_stores(&tails)?;
                    Step::SyncTails
                }
                Step::SyncTails => {
                    self.mmu.sync_cores().map_err(CodeError::SyncFailed)?;
                    Step::WriteHeads
                }
                Step::WriteHeads => {
                    // The whole new slot: after the tails' round only its first byte differs.
                    let heads: Vec<(usize, u64)> = patch
                        .slots
                        .iter()
                        .filter(|s| s.1 & 0xFF != u64::from(INT3))
                        .map(|&(a, v, _)| (a, v))
                        .collect();
                    if heads.is_empty() {
                        return Ok(()); // every slot stays INT3: the tails' round was the last
                    }
                    self.poke_stores(&heads)?;
                    Step::SyncHeads
                }
                Step::SyncHeads => {
                    self.mmu.sync_cores().map_err(CodeError::SyncFailed)?;
                    return Ok(());
                }
            };
        }
    }

    /// The [`AtomicStore`](PatchProtocol::AtomicStore) protocol: one alias session with every
    /// store ([`poke_stores`](Self::poke_stores)), then one serialization round. Stores are
    /// 8-aligned (checked by the caller) and no INT3 patch is pending.
    pub(super) fn store_and_sync(&mut self, stores: &[(usize, u64)]) -> Result<(), CodeError> {
        self.poke_stores(stores)?;
        self.mmu.sync_cores().map_err(CodeError::SyncFailed)
    }

    /// One private-alias session: each `(addr, value)` is one aligned 8-byte store, in order.
    ///
    /// All of them land or none does: every store is checked (its page committed and in the
    /// session, the address 8-aligned) before the session, so no `store_u64` in it fails, and
    /// [`Mmu::poke`] fails only before it runs `f` or with `f`'s own error (its contract).
    /// The INT3 protocol relies on this: a failed session A leaves no new INT3 to clean up.
    fn poke_stores(&mut self, stores: &[(usize, u64)]) -> Result<(), CodeError> {
        if let Some(&(addr, _)) = stores.iter().find(|(a, _)| !a.is_multiple_of(8)) {
            return Err(CodeError::NotPatchable { addr });
        }
        let (pages, committed) = super::write::session(
            &self.pages,
            stores.iter().map(|&(a, _)| a & !(PAGE_SIZE - 1)),
        )?;
        // (alias page index, offset, value): every page is in `pages`, which `session` built
        // from these very addresses.
        let mut planned = Vec::with_capacity(stores.len());
        for &(addr, value) in stores {
            let page = addr & !(PAGE_SIZE - 1);
            let i = pages
                .iter()
                .position(|&p| p == page)
                .ok_or(MmuError::NotMapped { page })?;
            planned.push((i, addr - page, value));
        }
        let mut f = |poke: &mut dyn Poke| {
            for &(i, offset, value) in &planned {
                poke.store_u64(i, offset, value)?;
            }
            Ok(())
        };
        // SAFETY: whole aligned slots of published tables or pointer slots the caller owns
        // (checked by the allocator): data slots, a near slot's step of the INT3 protocol — a
        // CPU executing one sees the old slot, the INT3 (resumed by the #BP hook) or the new
        // slot — or, under `AtomicStore`, a whole jump slot (the old or the new slot).
        unsafe { self.mmu.poke(&committed, &mut f) }?;
        Ok(())
    }

    fn read_u64(&self, addr: usize) -> Result<u64, CodeError> {
        let page = addr & !(PAGE_SIZE - 1);
        let committed = self.pages.get(&page).ok_or(MmuError::NotMapped { page })?;
        let mut b = [0; 8];
        self.mmu.read(committed, addr - page, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_target_decodes_the_new_jump() {
        let slot = 0xFFFF_C000_0000_1000usize;
        let to = |t: usize| crate::jump_table::near_slot(slot, t).unwrap();
        for t in [slot + 5, slot + 0x1234, slot - 0x7000_0000, slot] {
            assert_eq!(resume_target(slot, to(t)), Some(t));
        }
        assert_eq!(resume_target(slot, u64::from_le_bytes([INT3; 8])), None);
        let s = SlotStore::Jump {
            addr: slot,
            value: 7,
        };
        assert_eq!((s.addr(), s.value()), (slot, 7));
    }
}
