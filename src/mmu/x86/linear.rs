//! Keeping the kernel's linear maps of physical memory (a direct map, an identity map) free of
//! writable aliases of code frames, as Linux's CPA does for `set_memory_rox`.

use x86_64::structures::paging::mapper::PageTableFrameMapping;

use super::stage;
use super::tables::{Tables, W};
use crate::mmu::{MmuError, TlbFlush};

/// A linear map of physical memory: `[phys, phys + size)` mapped at `virt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearMap {
    /// Virtual address of `phys`.
    pub virt: usize,
    /// First physical address mapped.
    pub phys: u64,
    /// Bytes mapped.
    pub size: u64,
}

impl LinearMap {
    /// Whether `va` lies in this map.
    pub(super) fn covers(&self, va: u64) -> bool {
        va.checked_sub(self.virt as u64)
            .is_some_and(|off| off < self.size)
    }

    /// The address of `frame` in this map, if it covers it.
    fn alias_of(&self, frame: u64) -> Option<u64> {
        let off = frame.checked_sub(self.phys).filter(|&o| o < self.size)?;
        (self.virt as u64).checked_add(off)
    }

    /// Stages the alias of `frame` read-only (`writable == false`) or writable again. A huge
    /// leaf in the way is split first, with a table frame from `table_frame` (called only
    /// then); splitting keeps every translation, so it needs no invalidation of its own beyond
    /// the staged page's. Nothing is staged when the alias already has the asked permission or
    /// the map does not cover the frame.
    ///
    /// # Errors
    /// No frame for a split table (nothing staged then).
    pub(super) fn set_writable<F: PageTableFrameMapping>(
        &self,
        view: &Tables<'_, F>,
        frame: u64,
        writable: bool,
        tlb: &mut TlbFlush,
        mut table_frame: impl FnMut() -> Result<u64, MmuError>,
    ) -> Result<(), MmuError> {
        let Some(va) = self.alias_of(frame) else {
            return Ok(());
        };
        loop {
            let Some(slot) = view.leaf(va) else {
                return Ok(());
            };
            let e = slot.get();
            // Staged already: by a batch whose flush failed and is still pending (item 5 of
            // issue 18: its queued value may be the opposite of what is asked now), or by this
            // call for another linear map sharing the leaf (aliased page tables, as when an
            // identity and a direct map share their PDs). Queue this change too: the batches
            // are merged oldest first and the last staging of a leaf is the one stored.
            let staged = e & super::P == 0 && e & super::STAGED != 0;
            if e & super::P == 0 && !staged {
                return Ok(());
            }
            if !staged && (e & W != 0) == writable {
                return Ok(());
            }
            if slot.level == 3 {
                let e = (e | super::P) & !super::STAGED;
                let target = if writable { e | W } else { e & !W };
                stage(slot, va as usize, target, tlb);
                return Ok(());
            }
            // A 1 GiB or 2 MiB leaf: split one level and walk again.
            view.split(slot, table_frame()?);
        }
    }
}
