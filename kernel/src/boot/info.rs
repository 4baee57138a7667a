//! What the boot loader told us, copied out of the Multiboot structures with the `multiboot` crate.

use multiboot::information::{MemoryManagement, MemoryType, Multiboot, PAddr, SIGNATURE_EAX};

use crate::memory::{PHYS_MAPPED_LIMIT, PHYS_OFFSET};

const MAX_REGIONS: usize = 32;
const MAX_CMDLINE: usize = 256;
const MAX_MODULES: usize = 16;
const MAX_MODULE_NAME: usize = 64;

/// A Multiboot module the loader placed in memory (QEMU: `-initrd a,b,...`).
#[derive(Debug, Clone, Copy)]
pub struct BootModule {
    start: u64,
    end: u64,
    name: [u8; MAX_MODULE_NAME],
    name_len: usize,
}

impl BootModule {
    const EMPTY: BootModule = BootModule {
        start: 0,
        end: 0,
        name: [0; MAX_MODULE_NAME],
        name_len: 0,
    };

    /// The last path component of the module's string (QEMU passes the file's path).
    #[must_use]
    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len]).unwrap_or("")
    }

    /// The module's bytes, read through the direct map. Its frames are reserved at boot, so
    /// nothing else ever uses them.
    #[must_use]
    pub fn bytes(&self) -> &'static [u8] {
        // SAFETY: `parse` keeps only modules inside the first 4 GiB, which the direct map maps
        // for the kernel's lifetime; their frames are reserved from the frame allocator and
        // nothing writes them.
        unsafe {
            core::slice::from_raw_parts(
                (PHYS_OFFSET + self.start) as *const u8,
                (self.end - self.start) as usize,
            )
        }
    }
}

/// One entry of the firmware memory map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First physical address.
    pub start: u64,
    /// First physical address past the region.
    pub end: u64,
    /// Whether the firmware calls it available RAM.
    pub usable: bool,
}

/// Boot facts the kernel keeps after the Multiboot structures may be overwritten.
#[derive(Debug)]
pub struct BootInfo {
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    modules: [BootModule; MAX_MODULES],
    module_count: usize,
    /// Physical ranges the boot structures occupy (info block, memory map, command line, the
    /// module table with its strings, the modules' contents).
    pub(crate) boot_structures: [(u64, u64); 5],
}

impl BootInfo {
    /// The memory map.
    #[must_use]
    pub fn memory_regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// The Multiboot modules, in the loader's order.
    #[must_use]
    pub fn modules(&self) -> &[BootModule] {
        &self.modules[..self.module_count]
    }

    /// The module whose name is `name`.
    #[must_use]
    pub fn module(&self, name: &str) -> Option<&BootModule> {
        self.modules().iter().find(|m| m.name() == name)
    }

    /// Bytes of RAM the memory map calls available.
    #[must_use]
    pub fn usable_bytes(&self) -> u64 {
        self.memory_regions()
            .iter()
            .filter(|r| r.usable)
            .map(|r| r.end - r.start)
            .sum()
    }

    /// The kernel command line (QEMU `-append`), without the image path the loader puts first.
    #[must_use]
    pub fn command_line(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Whether the command line contains the word `word`.
    #[must_use]
    pub fn has_arg(&self, word: &str) -> bool {
        self.command_line()
            .split_ascii_whitespace()
            .any(|w| w == word)
    }
}

/// Reads Multiboot structures through the direct map.
struct DirectMap;

impl MemoryManagement for DirectMap {
    unsafe fn paddr_to_slice(&self, addr: PAddr, length: usize) -> Option<&'static [u8]> {
        let end = addr.checked_add(length as u64)?;
        if end > PHYS_MAPPED_LIMIT {
            return None;
        }
        // SAFETY: [addr, end) lies in the first 4 GiB, which the boot tables map at PHYS_OFFSET
        // for the kernel's lifetime; the loader's structures are only read.
        Some(unsafe { core::slice::from_raw_parts((PHYS_OFFSET + addr) as *const u8, length) })
    }

    unsafe fn allocate(&mut self, _length: usize) -> Option<(PAddr, &mut [u8])> {
        None
    }

    unsafe fn deallocate(&mut self, _addr: PAddr) {}
}

fn phys_of(ptr: *const u8) -> u64 {
    (ptr as u64).wrapping_sub(PHYS_OFFSET)
}

/// Parses the Multiboot information at physical address `info` handed over in EBX.
///
/// # Errors
/// A message when `magic` is not the Multiboot signature or the structure cannot be read.
pub(crate) fn parse(magic: u32, info: u32) -> Result<BootInfo, &'static str> {
    if magic != SIGNATURE_EAX {
        return Err("not booted by a Multiboot loader (bad EAX signature)");
    }
    let mut mm = DirectMap;
    // SAFETY: a Multiboot loader passed `info` with the signature checked above; DirectMap
    // translates its physical pointers through the direct map.
    let mb = unsafe { Multiboot::from_ptr(u64::from(info), &mut mm) }
        .ok_or("Multiboot information is not mapped")?;
    let mut boot = BootInfo {
        regions: [MemoryRegion::default(); MAX_REGIONS],
        region_count: 0,
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        modules: [BootModule::EMPTY; MAX_MODULES],
        module_count: 0,
        boot_structures: [
            (u64::from(info), u64::from(info) + 128),
            (0, 0),
            (0, 0),
            (0, 0),
            (0, 0),
        ],
    };
    let regions = mb.memory_regions().ok_or("the loader gave no memory map")?;
    let (mut lo, mut hi) = (u64::MAX, 0);
    for entry in regions {
        let at = phys_of((entry as *const multiboot::information::MemoryEntry).cast());
        lo = lo.min(at.saturating_sub(4));
        hi = hi.max(at + 24);
        if boot.region_count < MAX_REGIONS {
            boot.regions[boot.region_count] = MemoryRegion {
                start: entry.base_address(),
                end: entry.base_address().saturating_add(entry.length()),
                usable: entry.memory_type() == MemoryType::Available,
            };
            boot.region_count += 1;
        }
    }
    if hi > lo {
        boot.boot_structures[1] = (lo, hi);
    }
    if let Some(cmdline) = mb.command_line() {
        let at = phys_of(cmdline.as_ptr());
        boot.boot_structures[2] = (at, at + cmdline.len() as u64 + 1);
        // QEMU's Multiboot loader puts the image path first, then the `-append` text.
        let args = cmdline
            .trim()
            .split_once(' ')
            .map_or("", |(_, rest)| rest.trim());
        let bytes = args.as_bytes();
        let n = bytes.len().min(MAX_CMDLINE);
        boot.cmdline[..n].copy_from_slice(&bytes[..n]);
        boot.cmdline_len = n;
    }
    parse_modules(&mb, info, &mut boot);
    Ok(boot)
}

/// Copies the module list out of the Multiboot structures and records the physical ranges of the
/// table, its strings and the contents, so the frame allocator never hands them out.
fn parse_modules(mb: &Multiboot<'_, '_>, info: u32, boot: &mut BootInfo) {
    let Some(modules) = mb.modules() else {
        return;
    };
    let (mut table_lo, mut table_hi) = (u64::MAX, 0);
    let (mut data_lo, mut data_hi) = (u64::MAX, 0);
    for module in modules {
        if module.end < module.start || module.end > PHYS_MAPPED_LIMIT {
            continue;
        }
        data_lo = data_lo.min(module.start);
        data_hi = data_hi.max(module.end);
        let mut entry = BootModule {
            start: module.start,
            end: module.end,
            ..BootModule::EMPTY
        };
        if let Some(string) = module.string {
            let at = phys_of(string.as_ptr());
            table_lo = table_lo.min(at);
            table_hi = table_hi.max(at + string.len() as u64 + 1);
            let name = string.split_ascii_whitespace().next().unwrap_or("");
            let name = name.rsplit('/').next().unwrap_or(name).as_bytes();
            let n = name.len().min(MAX_MODULE_NAME);
            entry.name[..n].copy_from_slice(&name[..n]);
            entry.name_len = n;
        }
        if boot.module_count < MAX_MODULES {
            boot.modules[boot.module_count] = entry;
            boot.module_count += 1;
        }
    }
    // The table itself: `mods_count` 16-byte entries at `mods_addr` (info offsets 20 and 24;
    // the `multiboot` crate does not expose the address).
    // SAFETY: `info` is the Multiboot information block (at least 28 bytes with `mods_*`
    // valid, which `mb.modules()` returning `Some` proved), mapped by the direct map.
    let (count, addr) = unsafe {
        let base = (PHYS_OFFSET + u64::from(info)) as *const u32;
        (base.add(5).read_unaligned(), base.add(6).read_unaligned())
    };
    table_lo = table_lo.min(u64::from(addr));
    table_hi = table_hi.max(u64::from(addr) + u64::from(count) * 16);
    if table_hi > table_lo {
        boot.boot_structures[3] = (table_lo, table_hi);
    }
    if data_hi > data_lo {
        boot.boot_structures[4] = (data_lo, data_hi);
    }
}
