//! The private address space through which live code is written (Linux's `text_poke`
//! temporary mm).
//!
//! A PML4 of its own mirrors the PML4 the CPU runs on, entry for entry, except one slot that
//! leads to a private PDPT → PD → PT holding the alias pages. A session, with interrupts off on
//! the calling CPU:
//! 1. copies the current PML4's entries (so everything the CPU runs on stays mapped) and
//!    points the alias PTEs at the frames to write, RW+NX;
//! 2. loads the private PML4 into CR3 (bit 63 clear: the PCID's old entries are flushed);
//! 3. writes through the alias;
//! 4. clears the alias PTEs, `invlpg`s them, and reloads the original CR3 (flushing again).
//!
//! No other CPU ever loads this PML4, so no other CPU can hold the alias translation, not even
//! speculatively: writing live code needs no shootdown, and the code's own mapping is never
//! writable. Interrupts stay off for the whole session, so the task cannot migrate and no
//! interrupt handler runs on the private address space with a half-written alias.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::structures::paging::mapper::PageTableFrameMapping;

use super::cpu;
use super::tables::{Tables, ADDR, NX, P, W};
use crate::mmu::{MmuError, Poke, MAX_POKE_PAGES};
use crate::PAGE_SIZE;

/// The private tables: frames of the PML4, PDPT, PD and PT, and the PML4 slot they claim.
#[derive(Debug)]
pub(super) struct PokeSpace {
    pml4: u64,
    pdpt: u64,
    pd: u64,
    pt: u64,
    slot: usize,
}

impl PokeSpace {
    /// Links four zeroed frames into the private tables claiming PML4 `slot`.
    pub fn new(
        frames: [u64; 4],
        slot: usize,
        tables: &Tables<'_, impl PageTableFrameMapping>,
    ) -> Self {
        let [pml4, pdpt, pd, pt] = frames;
        for f in frames {
            // SAFETY: each frame is fresh (the caller allocated it for this) and reachable
            // through the kernel's physical mapping.
            unsafe { core::ptr::write_bytes(tables.table(f), 0, 512) };
        }
        // SAFETY: `pdpt` and `pd` are the fresh tables just zeroed; index 0 is in bounds.
        unsafe {
            tables.table(pdpt).write_volatile(pd | P | W);
            tables.table(pd).write_volatile(pt | P | W);
        }
        PokeSpace {
            pml4,
            pdpt,
            pd,
            pt,
            slot,
        }
    }

    /// The frames it holds.
    pub fn frames(&self) -> [u64; 4] {
        [self.pml4, self.pdpt, self.pd, self.pt]
    }

    /// The first alias address.
    pub fn base(&self) -> u64 {
        let va = (self.slot as u64) << 39;
        (((va << 16) as i64) >> 16) as u64
    }

    /// Runs `f` with `frames` mapped writable at the alias, on this CPU only (see the module
    /// docs). The caller holds the page-table lock.
    ///
    /// # Safety
    /// The caller owns `frames` (committed code pages) and writes through the alias only what
    /// [`Mmu::poke`](crate::mmu::Mmu::poke) allows.
    pub unsafe fn session(
        &self,
        tables: &Tables<'_, impl PageTableFrameMapping>,
        frames: &[u64],
        f: &mut dyn FnMut(&mut dyn Poke) -> Result<(), MmuError>,
    ) -> Result<(), MmuError> {
        if frames.len() > MAX_POKE_PAGES {
            return Err(MmuError::TooManyPages {
                pages: frames.len(),
                max: MAX_POKE_PAGES,
            });
        }
        let enabled = (cpu::INTERRUPTS.disable)();
        let current = cpu::read_cr3();
        let (own, theirs, pt) = (
            tables.table(self.pml4),
            tables.table(current & ADDR),
            tables.table(self.pt),
        );
        for i in 0..512 {
            let e = if i == self.slot {
                self.pdpt | P | W
            } else {
                // SAFETY: `theirs` is the PML4 in CR3, reachable through the physical mapping;
                // the page-table lock keeps software from editing it meanwhile.
                unsafe { theirs.add(i).read_volatile() }
            };
            // SAFETY: `own` is the private PML4; `i < 512`.
            unsafe { own.add(i).write_volatile(e) };
        }
        for (i, &frame) in frames.iter().enumerate() {
            // SAFETY: the private PT; `i < MAX_POKE_PAGES <= 512`.
            unsafe { pt.add(i).write_volatile((frame & ADDR) | P | W | NX) };
        }
        // SAFETY: the private PML4 maps everything the current one does (copied above) plus the
        // alias; interrupts are off until the original CR3 is back.
        unsafe { cpu::write_cr3(self.pml4 | (current & 0xFFF)) };
        let mut alias = Alias {
            base: self.base(),
            pages: frames.len(),
        };
        let result = f(&mut alias);
        for i in 0..frames.len() {
            // SAFETY: as above.
            unsafe { pt.add(i).write_volatile(0) };
            cpu::invlpg(self.base() + (i * PAGE_SIZE) as u64);
        }
        // SAFETY: back to the address space the CPU ran on.
        unsafe { cpu::write_cr3(current) };
        (cpu::INTERRUPTS.restore)(enabled);
        result
    }
}

/// The alias pages of one session.
struct Alias {
    base: u64,
    pages: usize,
}

impl Alias {
    fn at(&self, i: usize, offset: usize, len: usize) -> Result<*mut u8, MmuError> {
        if i >= self.pages {
            return Err(MmuError::OutOfRange { addr: i });
        }
        if offset.checked_add(len).is_none_or(|end| end > PAGE_SIZE) {
            return Err(MmuError::OutOfRange { addr: offset });
        }
        Ok((self.base as usize + i * PAGE_SIZE + offset) as *mut u8)
    }
}

impl Poke for Alias {
    fn write(&mut self, i: usize, offset: usize, data: &[u8]) -> Result<(), MmuError> {
        let dst = self.at(i, offset, data.len())?;
        // SAFETY: `dst..dst + len` lies in alias page `i`, mapped RW+NX for this session, and
        // no Rust reference points into it; the data source is ordinary memory.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn store_u64(&mut self, i: usize, offset: usize, value: u64) -> Result<(), MmuError> {
        if !offset.is_multiple_of(8) {
            return Err(MmuError::Unaligned { addr: offset });
        }
        let dst = self.at(i, offset, 8)?;
        // SAFETY: aligned, inside alias page `i` (checked); an atomic store is one `mov` qword,
        // which x86 performs as one access for an aligned quadword (SDM vol. 3 8.1.1).
        unsafe { AtomicU64::from_ptr(dst.cast::<u64>()).store(value, Ordering::Release) };
        Ok(())
    }
}
