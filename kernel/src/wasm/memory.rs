//! Linear memories and wasmtime's other mappings: reservations in a PML4 slot of their own
//! ([`WASM_BASE`], 512 GiB), pages committed when wasmtime makes them accessible (a 4 GiB
//! reservation costs page-table entries only for the pages the guest may touch), never
//! executable.
//!
//! Locking: the reservation list is behind an [`IrqMutex`]; page-table edits take the kernel's
//! page-table and frame locks (in that order, as everywhere in this kernel) per page range. A
//! page that loses access or its frame is invalidated on every CPU (`smp::shootdown` plus a local
//! `invlpg`) before its frame is freed, so no stale translation reaches a reused frame.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::ptr::NonNull;

use codespace_wasmtime::{Access, MemoryError};
use x86_64::instructions::tlb;
use x86_64::structures::paging::mapper::MapToError;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, Page, PageTableFlags as F, PhysFrame, Size4KiB,
};
use x86_64::VirtAddr;

use crate::memory::{self, phys_to_virt};
use codespace::mmu::x86::IrqMutex;

/// Base of the wasm slot (PML4 slot 352), which nothing else in this kernel maps.
pub const WASM_BASE: usize = 0xFFFF_B000_0000_0000;
/// Size of the wasm slot.
pub const WASM_SIZE: usize = 512 << 30;
const PAGE: usize = 4096;

/// One reservation: its range and the pages committed in it.
struct Reservation {
    start: usize,
    len: usize,
    committed: BTreeSet<usize>,
}

/// Live reservations and freed address ranges for reuse.
struct Space {
    live: Vec<Reservation>,
    free: Vec<(usize, usize)>,
    next: usize,
    committed: usize,
}

static SPACE: IrqMutex<Space> = IrqMutex::new(Space {
    live: Vec::new(),
    free: Vec::new(),
    next: WASM_BASE,
    committed: 0,
});

/// Reserves `len` bytes of the wasm slot.
fn reserve_range(len: usize) -> Result<usize, MemoryError> {
    let mut space = SPACE.lock();
    let start = if let Some(i) = space.free.iter().position(|&(_, l)| l == len) {
        space.free.swap_remove(i).0
    } else {
        let start = space.next;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= WASM_BASE + WASM_SIZE)
            .ok_or(MemoryError::OutOfAddressSpace)?;
        space.next = end;
        start
    };
    space.live.push(Reservation {
        start,
        len,
        committed: BTreeSet::new(),
    });
    Ok(start)
}

fn flags(access: Access) -> Option<F> {
    match access {
        Access::None => None,
        Access::Read => Some(F::PRESENT | F::NO_EXECUTE),
        Access::ReadWrite => Some(F::PRESENT | F::WRITABLE | F::NO_EXECUTE),
    }
}

fn page(va: usize) -> Page<Size4KiB> {
    Page::containing_address(VirtAddr::new(va as u64))
}

/// Invalidates `changed` pages on every CPU, then frees `frames`.
fn flush_and_free(changed: &[usize], frames: Vec<PhysFrame>) {
    for &va in changed {
        tlb::flush(VirtAddr::new(va as u64));
    }
    if !changed.is_empty() {
        crate::smp::shootdown(changed, changed.len() > 64);
    }
    if !frames.is_empty() {
        let mut alloc = memory::frames();
        for frame in frames {
            // SAFETY: the frame was unmapped and invalidated on every CPU above; nothing else
            // maps it (it was allocated for this page only).
            unsafe { alloc.deallocate_frame(frame) };
        }
    }
}

/// Sets every page of the range to `access`: commits zeroed frames for pages without one,
/// changes the flags of the others, and (for [`Access::None`]) unmaps and frees them.
/// With `fresh`, committed pages are replaced by zeroed ones. On an error, the pages handled
/// before it keep their new state (wasmtime treats the mapping as failed and releases it).
fn apply(start: usize, len: usize, access: Access, fresh: bool) -> Result<(), MemoryError> {
    let mut changed = Vec::new();
    let mut freed = Vec::new();
    let result = {
        let mut space = SPACE.lock();
        let space = &mut *space;
        let Some(res) = space
            .live
            .iter_mut()
            .find(|r| r.start <= start && start + len <= r.start + r.len)
        else {
            return Err(MemoryError::NotReserved);
        };
        let mut table = memory::page_table();
        // 1. Drop what must go: every committed page for `None` or `fresh`.
        if fresh || access == Access::None {
            let gone: Vec<usize> = res.committed.range(start..start + len).copied().collect();
            for va in gone {
                if let Ok((frame, flush)) = table.unmap(page(va)) {
                    flush.ignore();
                    freed.push(frame);
                }
                changed.push(va);
                res.committed.remove(&va);
                space.committed -= 1;
            }
        }
        // 2. Give every page of the range the new access.
        let mut result = Ok(());
        if let Some(new_flags) = flags(access) {
            for va in (start..start + len).step_by(PAGE) {
                if res.committed.contains(&va) {
                    // SAFETY: a committed page of a reservation wasmtime owns; only its access
                    // changes, never to executable.
                    if let Ok(flush) = unsafe { table.update_flags(page(va), new_flags) } {
                        flush.ignore();
                        changed.push(va);
                    }
                    continue;
                }
                let mut frames = memory::frames();
                let Some(frame) = frames.allocate_frame() else {
                    result = Err(MemoryError::OutOfMemory);
                    break;
                };
                // SAFETY: the frame was just allocated (nothing else uses it) and is zeroed
                // through the direct map before it becomes visible; the page is not mapped (not
                // committed) and lies in the wasm slot, which nothing else maps.
                let mapped = unsafe {
                    core::ptr::write_bytes(
                        phys_to_virt(frame.start_address()).as_mut_ptr::<u8>(),
                        0,
                        PAGE,
                    );
                    table.map_to_with_table_flags(
                        page(va),
                        frame,
                        new_flags,
                        F::PRESENT | F::WRITABLE,
                        &mut *frames,
                    )
                };
                match mapped {
                    Ok(flush) => {
                        flush.ignore();
                        res.committed.insert(va);
                        space.committed += 1;
                    }
                    Err(e) => {
                        // SAFETY: never mapped: the frame is still ours alone.
                        unsafe { frames.deallocate_frame(frame) };
                        result = Err(match e {
                            MapToError::FrameAllocationFailed => MemoryError::OutOfMemory,
                            _ => MemoryError::NotReserved,
                        });
                        break;
                    }
                }
            }
        }
        result
    };
    flush_and_free(&changed, freed);
    result
}

/// [`Platform::reserve`](codespace_wasmtime::Platform::reserve) for the kernel.
pub(super) fn reserve(len: usize, access: Access) -> Result<NonNull<u8>, MemoryError> {
    let start = reserve_range(len)?;
    if access != Access::None {
        if let Err(e) = apply(start, len, access, false) {
            // Roll back: drop what was committed and the reservation itself.
            let _ = release(start, len);
            return Err(e);
        }
    }
    NonNull::new(start as *mut u8).ok_or(MemoryError::OutOfAddressSpace)
}

/// [`Platform::set_access`](codespace_wasmtime::Platform::set_access) for the kernel.
pub(super) fn set_access(start: usize, len: usize, access: Access) -> Result<(), MemoryError> {
    apply(start, len, access, false)
}

/// [`Platform::discard`](codespace_wasmtime::Platform::discard) for the kernel.
pub(super) fn discard(start: usize, len: usize, access: Access) -> Result<(), MemoryError> {
    apply(start, len, access, true)
}

/// [`Platform::release`](codespace_wasmtime::Platform::release) for the kernel: unmaps the range,
/// and returns a whole reservation's address space for reuse.
pub(super) fn release(start: usize, len: usize) -> Result<(), MemoryError> {
    apply(start, len, Access::None, false)?;
    let mut space = SPACE.lock();
    if let Some(i) = space
        .live
        .iter()
        .position(|r| (r.start, r.len) == (start, len))
    {
        space.live.swap_remove(i);
        space.free.push((start, len));
    }
    Ok(())
}

/// Pages committed in the wasm slot (what live linear memories and wasmtime's other mappings
/// hold; a dropped store gives its pages back).
#[must_use]
pub fn committed_pages() -> usize {
    SPACE.lock().committed
}

/// Live reservations (count, bytes).
#[must_use]
pub fn reservations() -> (usize, usize) {
    let space = SPACE.lock();
    (space.live.len(), space.live.iter().map(|r| r.len).sum())
}
