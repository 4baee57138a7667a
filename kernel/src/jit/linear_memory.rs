//! A wasm-style linear memory: an 8 GiB virtual reservation in which only the accessible bytes
//! are mapped, so generated code indexes it with `base + zero-extended 32-bit index + offset`
//! and no bounds check; anything past the accessible bytes hits an unmapped guard page, and the
//! #PF path resumes at the faulting function's landing pad.
//!
//! Layout of one reservation (wasmtime's "static memory" on 64-bit hosts):
//!
//! ```text
//! slot start          base                  base + len          base + 6 GiB = slot end
//! | 2 GiB guard       | accessible (mapped) | guard (unmapped) ...                        |
//! ```
//!
//! A 32-bit index reaches `base + 4 GiB − 1`, and a Cranelift access adds a signed 32-bit
//! offset (±2 GiB), so every address generated code can form from its base lies inside its own
//! reservation: it hits this memory's bytes or this memory's guard, never another mapping.
//!
//! Reservations live in the kernel's scratch PML4 slot (`memory::SCRATCH_BASE`, 512 GiB), from
//! 64 GiB on (tests and the demo use the first GiBs): 32 slots of 8 GiB.

use core::sync::atomic::{AtomicU32, Ordering};

use alloc::vec::Vec;

use x86_64::structures::paging::{
    FrameDeallocator, Mapper, Page, PageTableFlags as F, PhysFrame, Size4KiB,
};
use x86_64::VirtAddr;

use super::JitError;
use crate::memory::{self, SCRATCH_BASE};
use crate::smp::ipi::MAX_FLUSH_PAGES;

/// Bytes of one reservation.
pub const RESERVATION: u64 = 8 << 30;
/// Guard below the base (negative static offsets).
const LOW_GUARD: u64 = 2 << 30;
/// Most accessible bytes: what a 32-bit index reaches.
pub const MAX_LEN: u64 = 4 << 30;
const FIRST_SLOT: u64 = SCRATCH_BASE + (64 << 30);
const SLOTS: u32 = 32;
const PAGE: u64 = 4096;

/// Which reservations are taken (bit i = slot i).
static SLOTS_TAKEN: AtomicU32 = AtomicU32::new(0);

/// One linear memory; dropping it unmaps its pages and frees its reservation.
#[derive(Debug)]
pub struct LinearMemory {
    slot: u32,
    base: u64,
    len: u64,
}

impl LinearMemory {
    /// A memory whose first `len` bytes (rounded up to pages) are mapped, zeroed, RW+NX.
    ///
    /// # Errors
    /// [`JitError::LinearMemory`] for a zero or larger-than-4-GiB size, when all reservations are
    /// taken, or when frames run out (nothing stays mapped then).
    pub fn new(len: u64) -> Result<Self, JitError> {
        if len == 0 || len > MAX_LEN {
            return Err(JitError::LinearMemory("size must be 1 byte..4 GiB"));
        }
        let len = len.div_ceil(PAGE) * PAGE;
        let slot = take_slot().ok_or(JitError::LinearMemory("all reservations are taken"))?;
        let base = FIRST_SLOT + u64::from(slot) * RESERVATION + LOW_GUARD;
        let mut mem = LinearMemory { slot, base, len: 0 };
        while mem.len < len {
            memory::map_fresh_page(mem.base + mem.len, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)
                .map_err(JitError::LinearMemory)?; // `mem` drops: unmaps what was mapped
            mem.len += PAGE;
        }
        Ok(mem)
    }

    /// Address of byte 0: what generated code gets as its memory base.
    #[must_use]
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Accessible bytes; the guard starts here.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a memory has at least one page.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole reservation: every address generated code can form from [`base`](Self::base).
    #[must_use]
    pub fn reservation(&self) -> (u64, u64) {
        let start = self.base - LOW_GUARD;
        (start, start + RESERVATION)
    }

    fn check(&self, offset: u64, n: usize) -> Result<u64, JitError> {
        match offset.checked_add(n as u64) {
            Some(end) if end <= self.len => Ok(self.base + offset),
            _ => Err(JitError::LinearMemory("access past the accessible bytes")),
        }
    }

    /// Copies bytes out of the memory.
    ///
    /// # Errors
    /// [`JitError::LinearMemory`] when the range is not accessible.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), JitError> {
        let at = self.check(offset, buf.len())?;
        // SAFETY: `check` keeps the range inside the mapped, readable bytes this memory owns; no
        // Rust reference to them exists (generated code reaches them only by raw address).
        unsafe { core::ptr::copy_nonoverlapping(at as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies bytes into the memory.
    ///
    /// # Errors
    /// [`JitError::LinearMemory`] when the range is not accessible.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), JitError> {
        let at = self.check(offset, data.len())?;
        // SAFETY: as in `read`; the pages are writable, and `&mut self` means no call into
        // generated code is using the memory now.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), at as *mut u8, data.len()) };
        Ok(())
    }

    /// The little-endian `u32` at `offset`.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_u32(&self, offset: u64) -> Result<u32, JitError> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Stores a little-endian `u32` at `offset`.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn write_u32(&mut self, offset: u64, value: u32) -> Result<(), JitError> {
        self.write(offset, &value.to_le_bytes())
    }
}

impl Drop for LinearMemory {
    fn drop(&mut self) {
        // Unmap every page (and flush this CPU), keeping the frames: other CPUs may still cache
        // translations of the pages (generated code or the kernel read the memory there), so a
        // frame may be reused only once every CPU dropped them.
        let mut unmapped: Vec<PhysFrame> = Vec::new();
        let mut tables = memory::page_table();
        for va in (self.base..self.base + self.len).step_by(PAGE as usize) {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
            if let Ok((frame, flush)) = tables.unmap(page) {
                flush.flush();
                unmapped.push(frame);
            }
        }
        drop(tables);
        // No lock held: other CPUs may need them to get to our request. More than
        // `MAX_FLUSH_PAGES` pages become one full flush on each CPU.
        let pages = (self.len / PAGE) as usize;
        if pages <= MAX_FLUSH_PAGES {
            let addrs: [usize; MAX_FLUSH_PAGES] =
                core::array::from_fn(|i| (self.base + i as u64 * PAGE) as usize);
            crate::smp::shootdown(&addrs[..pages], false);
        } else {
            crate::smp::shootdown(&[], true);
        }
        let mut frames = memory::frames();
        for frame in unmapped {
            // SAFETY: the frame was allocated for this page by `map_fresh_page` and is mapped
            // nowhere else but the direct map; the page is gone from this CPU's TLB (flushed
            // above) and every other CPU's (the shootdown returned after all invalidated it), so
            // neither generated nor kernel code can reach the frame through `va` any more.
            unsafe { frames.deallocate_frame(frame) };
        }
        drop(frames);
        SLOTS_TAKEN.fetch_and(!(1 << self.slot), Ordering::SeqCst);
    }
}

/// Takes the lowest free reservation slot.
fn take_slot() -> Option<u32> {
    let mut cur = SLOTS_TAKEN.load(Ordering::SeqCst);
    loop {
        let slot = (!cur).trailing_zeros();
        if slot >= SLOTS {
            return None;
        }
        match SLOTS_TAKEN.compare_exchange(
            cur,
            cur | (1 << slot),
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => return Some(slot),
            Err(now) => cur = now,
        }
    }
}
