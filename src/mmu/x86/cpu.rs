//! Instructions that act on the calling CPU only: control-register checks, local TLB
//! invalidation, CR3 switches, interrupt masking and serialization.

use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags, Efer, EferFlags};
use x86_64::VirtAddr;

use crate::mmu::InterruptControl;

/// Whether EFER.NXE and CR0.WP are on: (nxe, wp).
pub(super) fn protection_enabled() -> (bool, bool) {
    (
        Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE),
        Cr0::read().contains(Cr0Flags::WRITE_PROTECT),
    )
}

/// Invalidates `pages` (or everything when `full`) in this CPU's TLB and paging-structure
/// caches; returns whether it flushed everything.
///
/// `invlpg` and a CR3 reload act on the current PCID only, and a CR3 reload keeps global
/// entries. With PCIDs on, or for a full flush while global pages are enabled, toggling CR4.PGE
/// flushes every entry of every PCID (Intel SDM 4.10.4.1), so no address space this CPU
/// switched away from keeps a stale translation of the window or of a direct-map alias.
pub(super) fn flush_local(pages: &[usize], full: bool) -> bool {
    let cr4 = Cr4::read();
    let pcid = cr4.contains(Cr4Flags::PCID);
    let pge = cr4.contains(Cr4Flags::PAGE_GLOBAL);
    if pcid || (full && pge) {
        // SAFETY: toggling PGE changes no translation, it only empties the TLBs; the second
        // write restores the original CR4.
        unsafe {
            Cr4::write(cr4 ^ Cr4Flags::PAGE_GLOBAL);
            Cr4::write(cr4);
        }
        true
    } else if full {
        x86_64::instructions::tlb::flush_all();
        true
    } else {
        for &p in pages {
            x86_64::instructions::tlb::flush(VirtAddr::new_truncate(p as u64));
        }
        false
    }
}

/// CR3 with its PCID bits.
pub(super) fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Loads `value` into CR3, bit 63 clear: the CPU also flushes the non-global entries of the
/// PCID in `value`.
///
/// # Safety
/// `value` names a PML4 that maps everything the caller touches until the next switch (code,
/// stack, data), and interrupts are disabled for as long as it is not the kernel's own.
pub(super) unsafe fn write_cr3(value: u64) {
    let value = value & !(1 << 63);
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Invalidates one page of the current address space.
pub(super) fn invlpg(addr: u64) {
    x86_64::instructions::tlb::flush(VirtAddr::new_truncate(addr));
}

/// Serializes this CPU's instruction stream (`cpuid`, which every x86-64 CPU has).
pub(super) fn serialize() {
    let _ = core::arch::x86_64::__cpuid(0);
}

fn disable() -> bool {
    let enabled = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::disable();
    enabled
}

fn restore(enabled: bool) {
    if enabled {
        x86_64::instructions::interrupts::enable();
    }
}

/// `cli` / `sti` with the previous state remembered: interrupt control at ring 0 on x86-64
/// (exported as [`X86_INTERRUPTS`](super::X86_INTERRUPTS)).
pub const INTERRUPTS: InterruptControl = InterruptControl { disable, restore };
