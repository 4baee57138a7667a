//! The CPU list from the ACPI MADT, through the `acpi` crate.
//!
//! Multiboot 1 hands over no RSDP, so the crate's BIOS search scans the first KiB of the EBDA and
//! 0xE0000..=0xFFFFF. Tables are read through the direct map.

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::cpu::percpu::MAX_CPUS;
use crate::memory::{PHYS_MAPPED_LIMIT, PHYS_OFFSET};

/// The processors the firmware lists as enabled.
#[derive(Debug, Clone, Copy)]
pub struct CpuList {
    /// APIC IDs, in MADT order.
    pub apic_ids: [u32; MAX_CPUS],
    /// How many entries of `apic_ids` are valid.
    pub count: usize,
    /// Enabled processors past [`MAX_CPUS`] or only reachable in x2APIC mode, left unused.
    pub ignored: usize,
}

/// Why there is no CPU list.
#[derive(Debug)]
#[non_exhaustive]
pub enum MadtError {
    /// No valid RSDP, RSDT/XSDT or MADT.
    Acpi(acpi::AcpiError),
    /// The MADT lists no enabled processor.
    NoProcessors,
}

/// Maps ACPI tables through the direct map (no mapping work; nothing to unmap).
#[derive(Debug, Clone, Copy)]
struct DirectMap;

/// Zeros read in place of a table above the direct map: its header then fails validation, so
/// such firmware degrades to one CPU instead of reading unmapped memory.
static ZEROS: [u8; 4096] = [0; 4096];

impl AcpiHandler for DirectMap {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let inside = (phys as u64)
            .checked_add(size as u64)
            .is_some_and(|end| end <= PHYS_MAPPED_LIMIT);
        // Outside the direct map every byte reads as zero: every length the crate would go on to
        // map comes from those bytes (0), so it never asks for more than ZEROS holds.
        let (virt, len) = if inside {
            ((PHYS_OFFSET + phys as u64) as *mut T, size)
        } else {
            (ZEROS.as_ptr().cast_mut().cast::<T>(), size.min(ZEROS.len()))
        };
        // SAFETY: `virt` is non-null (a direct-map address or a static); the direct map covers
        // the first 4 GiB for the kernel's lifetime, and the tables are only read.
        unsafe { PhysicalMapping::new(phys, NonNull::new_unchecked(virt), len, len, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Reads the enabled local APICs from the MADT.
pub(crate) fn cpus() -> Result<CpuList, MadtError> {
    // SAFETY: this is a PC BIOS platform (Multiboot 1 under QEMU/SeaBIOS): the BDA's EBDA pointer
    // and the BIOS area exist, and the crate validates signature and checksum before trusting
    // anything it finds.
    let tables = unsafe { AcpiTables::search_for_rsdp_bios(DirectMap) }.map_err(MadtError::Acpi)?;
    let madt = tables.find_table::<Madt>().map_err(MadtError::Acpi)?;
    let mut list = CpuList {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        ignored: 0,
    };
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(lapic) => {
                // Bit 0: enabled (bit 1, online-capable, means "could be hot-added": skip).
                if { lapic.flags } & 1 == 0 {
                    continue;
                }
                if list.count < MAX_CPUS {
                    list.apic_ids[list.count] = u32::from(lapic.apic_id);
                    list.count += 1;
                } else {
                    list.ignored += 1;
                }
            }
            MadtEntry::LocalX2Apic(x2) if { x2.flags } & 1 != 0 => list.ignored += 1,
            _ => {}
        }
    }
    if list.count == 0 {
        return Err(MadtError::NoProcessors);
    }
    Ok(list)
}
