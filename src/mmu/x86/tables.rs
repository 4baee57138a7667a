//! Raw access to x86-64 page tables through the kernel's physical-memory mapping: walks,
//! leaf slots, huge-page splitting and whole-table visits.
//!
//! Every function here reads or writes page-table entries through pointers the kernel's
//! [`PageTableFrameMapping`] gives for table frames; callers hold the page-table lock, so no
//! other CPU edits the tables meanwhile (hardware walks may read them at any time, which is
//! why entries are written with single aligned stores).

use x86_64::structures::paging::mapper::PageTableFrameMapping;
use x86_64::structures::paging::{PageTable, PhysFrame};
use x86_64::PhysAddr;

use crate::mmu::Leaf;

pub(super) use crate::mmu::pte::{ADDR, NX, P, PS, STAGED, W};
pub(super) const US: u64 = 1 << 2;
/// PAT bit of a 4 KiB leaf; in a huge leaf the PAT bit is bit 12 instead.
const PAT_4K: u64 = 1 << 7;
const PAT_HUGE: u64 = 1 << 12;
const SHIFT: [u32; 4] = [39, 30, 21, 12];

/// An entry's location: the table (as a pointer into the physical-memory mapping), index and
/// level (0 = PML4 ... 3 = PT).
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    table: *mut u64,
    pub index: usize,
    pub level: usize,
}

impl Slot {
    /// Entry `index` of the table at `table` (a pointer from [`Tables::table`]), at `level`.
    pub fn at(table: *mut u64, index: usize, level: usize) -> Self {
        Slot {
            table,
            index,
            level,
        }
    }

    pub fn get(&self) -> u64 {
        // SAFETY: `table` points at a page-table frame through the kernel's physical mapping
        // (established by `Tables::table`), and `index < 512`. A volatile read: the CPU's page
        // walker may set accessed/dirty bits concurrently.
        unsafe { self.table.add(self.index).read_volatile() }
    }

    /// Stores `value`: one aligned 64-bit store, so a concurrent hardware walk sees the old or
    /// the new entry.
    pub fn set(&self, value: u64) {
        // SAFETY: as in `get`; the caller holds the page-table lock, so no other software edits
        // this entry, and what it stores is the caller's responsibility (staging rules).
        unsafe { self.table.add(self.index).write_volatile(value) }
    }
}

pub(super) fn index(va: u64, level: usize) -> usize {
    ((va >> SHIFT[level]) & 0x1FF) as usize
}

fn sign_extend(va: u64) -> u64 {
    (((va << 16) as i64) >> 16) as u64
}

/// Page tables rooted at one PML4, seen through the kernel's physical-memory mapping.
pub(super) struct Tables<'f, F> {
    pub phys: &'f F,
    pub pml4: u64,
}

impl<F: PageTableFrameMapping> Tables<'_, F> {
    /// Pointer to the entries of the table frame at `phys`.
    pub fn table(&self, phys: u64) -> *mut u64 {
        let frame = PhysFrame::containing_address(PhysAddr::new(phys & ADDR));
        self.phys
            .frame_to_pointer(frame)
            .cast::<PageTable>()
            .cast::<u64>()
    }

    /// The slot of the leaf mapping `va` (4 KiB, a present huge leaf, or a staged 2 MiB leaf
    /// of `map_rox`), or `None` when a non-leaf entry on the walk is not present.
    pub fn leaf(&self, va: u64) -> Option<Slot> {
        let mut table = self.table(self.pml4);
        for level in 0..4 {
            let slot = Slot {
                table,
                index: index(va, level),
                level,
            };
            let e = slot.get();
            let staged_huge = level == 2 && e & PS != 0 && e & STAGED != 0;
            if level == 3 || (level > 0 && e & P != 0 && e & PS != 0) || staged_huge {
                return Some(slot);
            }
            if e & P == 0 {
                return None;
            }
            table = self.table(e);
        }
        None
    }

    /// The slots on the walk to `va`'s 4 KiB leaf: `[PML4, PDPT, PD, PT]` entries, `None` past
    /// a non-present or huge entry.
    pub fn path(&self, va: u64) -> [Option<Slot>; 4] {
        let mut out = [None; 4];
        let mut table = self.table(self.pml4);
        for (level, slot) in out.iter_mut().enumerate() {
            let s = Slot {
                table,
                index: index(va, level),
                level,
            };
            *slot = Some(s);
            let e = s.get();
            if e & P == 0 || (level > 0 && e & PS != 0) {
                break;
            }
            table = self.table(e);
        }
        out
    }

    /// What all levels grant together for `va`: (leaf entry, writable, executable), when
    /// present.
    pub fn translate(&self, va: u64) -> Option<(u64, u64, bool, bool)> {
        let mut table = self.table(self.pml4);
        let (mut writable, mut nx) = (true, false);
        for (level, &shift) in SHIFT.iter().enumerate() {
            let e = Slot {
                table,
                index: index(va, level),
                level,
            }
            .get();
            if e & P == 0 {
                return None;
            }
            writable &= e & W != 0;
            nx |= e & NX != 0;
            if level == 3 || (level > 0 && e & PS != 0) {
                let size = 1u64 << shift;
                let frame = (e & ADDR & !(size - 1)) + (va & (size - 1) & !0xFFF);
                return Some((e, frame, writable, !nx));
            }
            table = self.table(e);
        }
        None
    }

    /// Splits the huge leaf in `slot` into a table of 512 leaves one level down with the same
    /// frames and permissions, in `new_table` (a zeroed, unused frame). Translations do not
    /// change, so CPUs may keep using the old huge entry until the caller's flush.
    pub fn split(&self, slot: Slot, new_table: u64) {
        let huge = slot.get();
        let child_level = slot.level + 1;
        let child_size = 1u64 << SHIFT[child_level];
        let size = 1u64 << SHIFT[slot.level];
        // ADDR covers bit 12, which in a huge leaf is PAT: keep it where the child keeps it.
        let pat = huge & PAT_HUGE != 0;
        let mut flags = huge & !ADDR;
        if child_level == 3 {
            flags &= !PS;
            if pat {
                flags |= PAT_4K;
            }
        } else if pat {
            flags |= PAT_HUGE;
        }
        let base = huge & ADDR & !(size - 1);
        let child = self.table(new_table);
        for i in 0..512 {
            let e = (base + i as u64 * child_size) | flags;
            // SAFETY: `child` is the caller's fresh table frame through the physical mapping;
            // nothing else refers to it yet.
            unsafe { child.add(i).write_volatile(e) };
        }
        // Intermediate entries grant everything the leaves may grant; the leaves decide.
        slot.set((new_table & ADDR) | P | W | (huge & US));
    }

    /// Calls `f` for every present leaf intersecting `[lo, last]`, in address order,
    /// skipping absent subtrees wholesale.
    pub fn visit_range(&self, lo: u64, last: u64, f: &mut dyn FnMut(&Leaf)) {
        self.visit_table(self.table(self.pml4), 0, 0, (lo, last), (true, false), f);
    }

    fn visit_table(
        &self,
        table: *mut u64,
        level: usize,
        base: u64,
        (lo, last): (u64, u64),
        inherited: (bool, bool),
        f: &mut dyn FnMut(&Leaf),
    ) {
        let span = 1u64 << SHIFT[level];
        for i in 0..512 {
            let e = Slot {
                table,
                index: i,
                level,
            }
            .get();
            if e & P == 0 {
                continue;
            }
            let start = if level == 0 {
                sign_extend((i as u64) << SHIFT[0])
            } else {
                base + i as u64 * span
            };
            if start + (span - 1) < lo || start > last {
                continue;
            }
            let writable = inherited.0 && e & W != 0;
            let nx = inherited.1 || e & NX != 0;
            if level == 3 || (level > 0 && e & PS != 0) {
                f(&Leaf {
                    virt: start as usize,
                    size: span as usize,
                    frame: e & ADDR & !(span - 1),
                    writable,
                    executable: !nx,
                });
            } else {
                self.visit_table(
                    self.table(e),
                    level + 1,
                    start,
                    (lo, last),
                    (writable, nx),
                    f,
                );
            }
        }
    }
}
