//! The kernel's own mappings, W^X: nothing is ever writable and executable, and no frame that is
//! executable anywhere is writable anywhere.
//!
//! The boot tables map the first 4 GiB twice with writable, executable 2 MiB pages, identity
//! (PML4 slot 0) and direct map (slot 256) sharing one PDPT. [`build`] replaces that, on the boot
//! CPU before any other CPU starts:
//!
//! - **Direct map** (slot 256, [`PHYS_OFFSET`]): a PDPT and PDs of its own, every page
//!   writable and NX, except the kernel text's frames, which are read-only (4 KiB pages).
//! - **Identity map** (slot 0, the boot PDPT/PDs): the image in 4 KiB pages — text R+X, the
//!   Multiboot header and rodata R+NX, data and bss RW+NX; page 0 (null dereferences) and the
//!   guard page below the boot CPU's stack unmapped; everything else RW+NX.
//!
//! The 2 MiB regions up to the end of rodata, and the one holding the stack guard, get 4 KiB pages
//! in both maps; all others stay 2 MiB pages (their pages' flags are all alike). The first 2 MiB
//! being split lets the AP trampoline page below 1 MiB be flipped alone
//! ([`set_trampoline_executable`], [`retire_trampoline`]).

use x86_64::instructions::tlb;
use x86_64::structures::paging::page_table::PageTableEntry;
use x86_64::structures::paging::{FrameAllocator, PageTable, PageTableFlags as F, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};

use crate::memory::{self, phys_to_virt, PHYS_MAPPED_LIMIT, PHYS_OFFSET};

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const REGIONS_PER_GIB: usize = 512;
const GIBS: usize = (PHYS_MAPPED_LIMIT >> 30) as usize;
const IDENTITY_SLOT: usize = 0;
const DIRECT_SLOT: usize = 256;

extern "C" {
    static __kernel_start: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    #[link_name = "boot_stack_guard"]
    static BOOT_STACK_GUARD: u8;
}

/// Physical (= identity) bounds of the image's parts, from the linker script.
#[derive(Debug, Clone, Copy)]
struct Sections {
    image_start: u64,
    text_start: u64,
    text_end: u64,
    rodata_end: u64,
    stack_guard: u64,
}

fn sections() -> Sections {
    Sections {
        image_start: &raw const __kernel_start as u64,
        text_start: &raw const __text_start as u64,
        text_end: &raw const __text_end as u64,
        rodata_end: &raw const __rodata_end as u64,
        stack_guard: &raw const BOOT_STACK_GUARD as u64,
    }
}

/// Bytes of the boot CPU's stack (above its guard page). Debug builds of the tests need room:
/// some frames hold several KiB of per-CPU statistics.
pub const BOOT_STACK_SIZE: usize = 256 << 10;

/// The unmapped page below the boot CPU's stack.
#[must_use]
pub fn boot_stack_guard() -> u64 {
    sections().stack_guard
}

/// Physical range of the kernel's text (the only kernel memory that executes).
#[must_use]
pub fn kernel_text() -> (u64, u64) {
    let s = sections();
    (s.text_start, s.text_end)
}

const RW_NX: F = F::PRESENT.union(F::WRITABLE).union(F::NO_EXECUTE);
const RO_NX: F = F::PRESENT.union(F::NO_EXECUTE);
const RX: F = F::PRESENT;

/// Leaf flags of the identity page at `phys`; `None`: not mapped.
fn identity_flags(phys: u64, s: &Sections) -> Option<F> {
    if phys < PAGE || phys == s.stack_guard {
        None
    } else if (s.text_start..s.text_end).contains(&phys) {
        Some(RX)
    } else if (s.image_start..s.rodata_end).contains(&phys) {
        Some(RO_NX)
    } else {
        Some(RW_NX)
    }
}

/// Leaf flags of the direct-map page of `phys`.
fn direct_flags(phys: u64, s: &Sections) -> Option<F> {
    if (s.text_start..s.text_end).contains(&phys) {
        Some(RO_NX)
    } else {
        Some(RW_NX)
    }
}

/// A page table freshly allocated and zeroed, and its frame.
fn new_table() -> (PhysFrame, &'static mut PageTable) {
    let frame = memory::frames()
        .allocate_frame()
        .expect("frames for the kernel's page tables at boot");
    let table = phys_to_virt(frame.start_address()).as_mut_ptr::<PageTable>();
    // SAFETY: the frame was just allocated, so nothing else refers to it; it is reached through
    // the direct map, and a zeroed `PageTable` is valid (all entries unused).
    unsafe {
        table.write(PageTable::new());
        (frame, &mut *table)
    }
}

/// Fills PD `pd` (covering `[gib << 30, (gib + 1) << 30)`) with leaves from `flags`: a new 4 KiB
/// page table for regions starting below `split_below` or holding the stack guard, a 2 MiB leaf
/// for the others (where both flag functions are constant).
fn fill_pd(
    pd: &mut PageTable,
    gib: usize,
    flags: fn(u64, &Sections) -> Option<F>,
    split_below: u64,
) {
    let s = sections();
    for (i, entry) in pd.iter_mut().enumerate() {
        let base = ((gib * REGIONS_PER_GIB + i) as u64) * HUGE;
        if base >= split_below && !(base..base + HUGE).contains(&s.stack_guard) {
            match flags(base, &s) {
                Some(f) => entry.set_addr(PhysAddr::new(base), f | F::HUGE_PAGE),
                None => entry.set_unused(),
            }
            continue;
        }
        let (frame, pt) = new_table();
        for (p, pte) in pt.iter_mut().enumerate() {
            let phys = base + p as u64 * PAGE;
            match flags(phys, &s) {
                Some(f) => pte.set_addr(PhysAddr::new(phys), f),
                None => pte.set_unused(),
            }
        }
        // Non-leaf entries allow everything; the leaves decide.
        entry.set_frame(frame, F::PRESENT | F::WRITABLE);
    }
}

/// Builds the W^X layout described in the module docs and switches to it (boot CPU, before any
/// AP runs, so a local flush is all it takes). The 2 MiB regions up to the end of rodata get 4 KiB
/// pages (the image's parts differ page by page; the trampoline page sits below 1 MiB).
pub(crate) fn build() {
    let s = sections();
    let split_below = s.rodata_end.max(1);
    let mut tables = memory::page_table();
    let pml4 = tables.level_4_table_mut();

    // 1. A direct map of its own, then switch slot 256 to it. Until then slot 256 still shares
    //    the boot PDs, which must not change under it.
    let (pdpt_frame, pdpt) = new_table();
    for (gib, entry) in pdpt.iter_mut().take(GIBS).enumerate() {
        let (pd_frame, pd) = new_table();
        fill_pd(pd, gib, direct_flags, split_below);
        entry.set_frame(pd_frame, F::PRESENT | F::WRITABLE);
    }
    pml4[DIRECT_SLOT].set_frame(pdpt_frame, F::PRESENT | F::WRITABLE | F::NO_EXECUTE);
    tlb::flush_all();

    // 2. The identity map, rewritten in place: every new leaf maps the same frame as before with
    //    equal or fewer rights, and the code doing this stays executable, its stack writable.
    let pdpt = table_at(pml4[IDENTITY_SLOT].addr());
    for (gib, entry) in pdpt.iter_mut().take(GIBS).enumerate() {
        fill_pd(table_at(entry.addr()), gib, identity_flags, split_below);
    }
    tlb::flush_all();
}

/// The page table in frame `phys`, through the direct map.
fn table_at(phys: PhysAddr) -> &'static mut PageTable {
    // SAFETY: `phys` comes from a present non-leaf entry of the live tables, so it is a page
    // table frame inside the direct map; callers hold the page-table lock, so no other `&mut`
    // to it exists while they use it.
    unsafe { &mut *((PHYS_OFFSET + phys.as_u64()) as *mut PageTable) }
}

/// The leaf entry (2 MiB or 4 KiB) mapping `va`, if present. Caller holds the page-table lock.
fn leaf(pml4: &mut PageTable, va: u64) -> Option<&'static mut PageTableEntry> {
    let va = VirtAddr::new(va);
    let pml4e = &pml4[va.p4_index()];
    if !pml4e.flags().contains(F::PRESENT) {
        return None;
    }
    let pdpt = table_at(pml4e.addr());
    let pdpt_entry = &pdpt[va.p3_index()];
    if !pdpt_entry.flags().contains(F::PRESENT) || pdpt_entry.flags().contains(F::HUGE_PAGE) {
        return None;
    }
    let pd = table_at(pdpt_entry.addr());
    if pd[va.p2_index()].flags().contains(F::HUGE_PAGE) {
        return Some(&mut pd[va.p2_index()]);
    }
    if !pd[va.p2_index()].flags().contains(F::PRESENT) {
        return None;
    }
    let pt = table_at(pd[va.p2_index()].addr());
    Some(&mut pt[va.p1_index()])
}

/// Makes the identity and direct-map leaves holding physical address `phys` uncached (PCD|PWT:
/// UC under the default PAT), for device registers such as the local APIC's.
pub(crate) fn make_uncached(phys: u64) {
    let mut tables = memory::page_table();
    let pml4 = tables.level_4_table_mut();
    for va in [phys, PHYS_OFFSET + phys] {
        if let Some(e) = leaf(pml4, va) {
            e.set_flags(e.flags() | F::NO_CACHE | F::WRITE_THROUGH);
        }
        tlb::flush(VirtAddr::new(va));
    }
}

/// Makes the AP trampoline page at `phys` (below 2 MiB) executable: its direct-map page
/// read-only first, then its identity page R+X, so W^X holds after every step on this CPU (the
/// frame is never writable through one page while executable through the other). Only while no
/// other CPU is online (before the first SIPI), so the local flush is the whole shootdown: no
/// other CPU can hold a translation of either page.
pub(crate) fn set_trampoline_executable(phys: u64) {
    let mut tables = memory::page_table();
    let pml4 = tables.level_4_table_mut();
    for (va, flags) in [(PHYS_OFFSET + phys, RO_NX), (phys, RX)] {
        write_trampoline_leaf(pml4, va, Some(flags));
    }
}

/// Makes the AP trampoline page at `phys` ordinary memory again (identity RW+NX, direct map
/// RW+NX) while other CPUs are online, in the library's order for taking rights away:
///
/// 1. both leaves not present (flushed here);
/// 2. `shootdown` of both pages on every other CPU — when it returns no CPU holds the R+X
///    identity translation (nor the read-only alias), and none can load a new one: x86 never
///    caches a not-present entry;
/// 3. the final RW+NX leaves.
///
/// Changing the present entries in place (R+X → RW+NX, read-only → writable) and shooting down
/// afterwards would leave a window in which other CPUs still execute through the R+X identity
/// translation while this CPU already holds a writable one of the same frame.
///
/// The page-table lock is not held across the shootdown: a CPU spinning on it with interrupts
/// off could never acknowledge the IPI.
pub(crate) fn retire_trampoline(phys: u64, shootdown: impl FnOnce(&[usize])) {
    let pages = [phys, PHYS_OFFSET + phys];
    {
        let mut tables = memory::page_table();
        let pml4 = tables.level_4_table_mut();
        for va in pages {
            write_trampoline_leaf(pml4, va, None);
        }
    }
    shootdown(&trampoline_pages(phys));
    record_trampoline_step(TrampolineStep::Shootdown);
    let mut tables = memory::page_table();
    let pml4 = tables.level_4_table_mut();
    for va in pages {
        write_trampoline_leaf(pml4, va, Some(RW_NX));
    }
}

/// Writes the trampoline leaf at `va` (`None`: not present, same frame kept) and flushes it on
/// this CPU; records the write for [`trampoline_steps`].
fn write_trampoline_leaf(pml4: &mut PageTable, va: u64, flags: Option<F>) {
    let e = leaf(pml4, va).expect("the first 2 MiB are mapped with 4 KiB pages");
    assert!(
        !e.flags().contains(F::HUGE_PAGE),
        "trampoline region is split"
    );
    let frame = e.addr();
    match flags {
        Some(f) => e.set_addr(frame, f),
        // The frame stays in the entry (ignored while not present) so step 3 maps the same one.
        None => e.set_addr(frame, F::empty()),
    }
    tlb::flush(VirtAddr::new(va));
    record_trampoline_step(TrampolineStep::Entry {
        va,
        entry: e.flags().bits(),
    });
}

/// One step of the trampoline's flips, as recorded for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrampolineStep {
    /// The leaf mapping `va` was set to `entry` (its flag bits) and flushed on this CPU.
    Entry {
        /// The virtual page (identity or direct map).
        va: u64,
        /// The flag bits written (`PRESENT`, `WRITABLE`, `NO_EXECUTE`, ...).
        entry: u64,
    },
    /// Every other online CPU flushed both pages.
    Shootdown,
}

/// Enough for both flips (2 + 2 + 1 + 2 steps).
const MAX_TRAMPOLINE_STEPS: usize = 16;
static TRAMPOLINE_STEPS: spin::Mutex<([Option<TrampolineStep>; MAX_TRAMPOLINE_STEPS], usize)> =
    spin::Mutex::new(([None; MAX_TRAMPOLINE_STEPS], 0));

fn record_trampoline_step(step: TrampolineStep) {
    let mut log = TRAMPOLINE_STEPS.lock();
    let (steps, len) = &mut *log;
    if let Some(slot) = steps.get_mut(*len) {
        *slot = Some(step);
        *len += 1;
    }
}

/// Every page-table write and shootdown of the AP trampoline's flips since boot, in order (so a
/// test can check that no CPU could hold a writable and an executable translation of the page at
/// once), and the trampoline's physical page.
#[must_use]
pub fn trampoline_steps() -> alloc::vec::Vec<TrampolineStep> {
    let log = TRAMPOLINE_STEPS.lock();
    log.0[..log.1].iter().flatten().copied().collect()
}

/// The two virtual pages the trampoline's flips change.
#[must_use]
pub(crate) fn trampoline_pages(phys: u64) -> [usize; 2] {
    [phys as usize, (PHYS_OFFSET + phys) as usize]
}
