//! The simulated machine's memory: physical frames, x86-64 4-level page tables stored in them,
//! and an optional direct map of all frames in 2 MiB pages.
//!
//! Entries hold real x86 bits and every walk follows the physical addresses in them, so running
//! out of frames while creating a table, huge pages on the walk, and splitting a 2 MiB page are
//! modelled. Tables the machine created for the window, and tables splitting a huge page created,
//! are `freeable`: the backend frees them once empty (or collapses a split table back into its
//! huge page) after a flush; the PML4 and the direct map's own tables stay.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};

use crate::mmu::{Leaf, PageMapping};
use crate::PAGE_SIZE;

/// Physical address of frame 0; frame `i` sits at `PHYS_BASE + i * 4096`.
pub const PHYS_BASE: u64 = 0x10_0000;

pub(super) use crate::mmu::pte::{leaf_frame, ADDR, NX, P, PS, STAGED, W};
const TABLE_FLAGS: u64 = P | W;
const SHIFT: [u32; 4] = [39, 30, 21, 12];
const PAGE: u64 = PAGE_SIZE as u64;
pub(super) const HUGE: u64 = 2 << 20;

pub(super) type FrameData = Box<[u8; PAGE_SIZE]>;

fn zeroed() -> FrameData {
    Box::new([0; PAGE_SIZE])
}

pub(super) fn canonical(va: u64) -> bool {
    let s = va as i64;
    (s << 16) >> 16 == s
}

fn sign_extend(va: u64) -> u64 {
    (((va << 16) as i64) >> 16) as u64
}

pub(super) fn index(va: u64, level: usize) -> usize {
    ((va >> SHIFT[level]) & 0x1FF) as usize
}

pub(super) fn present(entry: u64) -> bool {
    entry & P != 0
}

/// Where a leaf entry lives: table frame, index, level (2 = 2 MiB leaf, 3 = 4 KiB leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub table: usize,
    pub index: usize,
    pub level: usize,
}

/// Memory of the machine. `PartialEq` compares everything.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Memory {
    total: usize,
    next_fresh: usize,
    freed: BTreeSet<usize>,
    pub tables: BTreeSet<usize>,
    /// Tables the backend may free: created for window pages (below the PML4) or by a split.
    pub freeable: BTreeSet<usize>,
    pub data: BTreeMap<usize, FrameData>,
    /// Frames whose bytes not written yet read as INT3 (committed code frames), not zeros.
    pub int3: BTreeSet<usize>,
    pub pml4: usize,
    /// Virtual base of the direct map, when the machine has one.
    pub direct_map: Option<u64>,
}

impl Memory {
    pub fn new(total: usize) -> Self {
        let mut m = Memory {
            total,
            next_fresh: 0,
            freed: BTreeSet::new(),
            tables: BTreeSet::new(),
            freeable: BTreeSet::new(),
            data: BTreeMap::new(),
            int3: BTreeSet::new(),
            pml4: 0,
            direct_map: None,
        };
        m.pml4 = m.alloc_table().expect("a frame for the PML4");
        m
    }

    pub fn phys(frame: usize) -> u64 {
        PHYS_BASE + frame as u64 * PAGE
    }

    /// The frame index of a physical address of this machine, if it is one.
    pub fn frame_index(&self, phys: u64) -> Option<usize> {
        let i = usize::try_from(phys.checked_sub(PHYS_BASE)? / PAGE).ok()?;
        (i < self.total).then_some(i)
    }

    fn frame_of(entry: u64) -> usize {
        ((entry & ADDR).wrapping_sub(PHYS_BASE) / PAGE) as usize
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free_count(&self) -> usize {
        self.total - self.next_fresh + self.freed.len()
    }

    pub fn is_allocated(&self, frame: usize) -> bool {
        frame < self.next_fresh && !self.freed.contains(&frame)
    }

    /// Takes the lowest free frame; it reads as zeros.
    pub fn alloc_frame(&mut self) -> Option<usize> {
        let frame = match self.freed.pop_first() {
            Some(f) => f,
            None if self.next_fresh < self.total => {
                self.next_fresh += 1;
                self.next_fresh - 1
            }
            None => return None,
        };
        self.data.remove(&frame);
        self.int3.remove(&frame);
        Some(frame)
    }

    pub fn alloc_table(&mut self) -> Option<usize> {
        let frame = self.alloc_frame()?;
        self.tables.insert(frame);
        Some(frame)
    }

    /// Returns `frame` to the pool, keeping the pool canonical so equal pools compare equal.
    pub fn free_frame(&mut self, frame: usize) {
        self.tables.remove(&frame);
        self.freeable.remove(&frame);
        self.data.remove(&frame);
        self.int3.remove(&frame);
        self.freed.insert(frame);
        while self.next_fresh > 0 && self.freed.remove(&(self.next_fresh - 1)) {
            self.next_fresh -= 1;
        }
    }

    /// Allocated frames that are not page tables.
    pub fn data_frames(&self) -> BTreeSet<usize> {
        (0..self.next_fresh)
            .filter(|f| !self.freed.contains(f) && !self.tables.contains(f))
            .collect()
    }

    pub fn entry(&self, table: usize, i: usize) -> u64 {
        self.data.get(&table).map_or(0, |b| {
            let mut raw = [0; 8];
            raw.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(raw)
        })
    }

    pub fn set_entry(&mut self, table: usize, i: usize, value: u64) {
        let b = self.data.entry(table).or_insert_with(zeroed);
        b[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }

    pub fn frame_bytes(&self, frame: usize) -> Option<&[u8; PAGE_SIZE]> {
        static INT3_PAGE: [u8; PAGE_SIZE] = [0xCC; PAGE_SIZE];
        match self.data.get(&frame) {
            Some(b) => Some(&**b),
            None if self.int3.contains(&frame) => Some(&INT3_PAGE),
            None => None,
        }
    }

    pub fn frame_bytes_mut(&mut self, frame: usize) -> &mut [u8; PAGE_SIZE] {
        let int3 = self.int3.contains(&frame);
        self.data.entry(frame).or_insert_with(|| {
            if int3 {
                Box::new([0xCC; PAGE_SIZE])
            } else {
                zeroed()
            }
        })
    }

    /// The slot of the leaf (present or staged) for `va`, and the tables missing on the way
    /// to a 4 KiB leaf (0 when the walk reaches a page table or a huge leaf).
    pub fn walk(&self, va: u64) -> (Option<Slot>, usize) {
        let mut table = self.pml4;
        for level in 0..4 {
            let i = index(va, level);
            let e = self.entry(table, i);
            // A 2 MiB leaf, present or staged (a staged leaf keeps its flags, PS included).
            let huge = level == 2 && e & PS != 0 && (present(e) || e & STAGED != 0);
            if level == 3 || huge {
                return (
                    Some(Slot {
                        table,
                        index: i,
                        level,
                    }),
                    0,
                );
            }
            if !present(e) {
                return (None, 3 - level);
            }
            table = Self::frame_of(e);
        }
        unreachable!("the loop returns at level 3")
    }

    /// The translation of the 4 KiB page holding `va`, with the permissions of all levels.
    pub fn translate(&self, va: u64) -> Option<PageMapping> {
        if !canonical(va) {
            return None;
        }
        let mut table = self.pml4;
        let (mut writable, mut nx) = (true, false);
        for level in 0..4 {
            let e = self.entry(table, index(va, level));
            if !present(e) {
                return None;
            }
            writable &= e & W != 0;
            nx |= e & NX != 0;
            if level == 3 || (level == 2 && e & PS != 0) {
                let offset = if level == 3 {
                    0
                } else {
                    va & (HUGE - 1) & !(PAGE - 1)
                };
                return Some(PageMapping {
                    frame: leaf_frame(e, level) + offset,
                    writable,
                    executable: !nx,
                });
            }
            table = Self::frame_of(e);
        }
        None
    }

    /// Creates the tables down to the 4 KiB leaf slot of `va` (the caller checked the frame
    /// count) and returns the slot.
    pub fn make_leaf_slot(&mut self, va: u64) -> Option<Slot> {
        self.make_slot(va, 3)
    }

    /// Creates the tables down to the 2 MiB leaf slot of `va` (the caller checked the frame
    /// count) and returns the slot; `None` when a 1 GiB leaf is on the way.
    pub fn make_huge_slot(&mut self, va: u64) -> Option<Slot> {
        self.make_slot(va, 2)
    }

    /// The slot of `va` at `level` (3: 4 KiB leaves, 2: 2 MiB leaves), creating the tables
    /// above it; `None` when a larger leaf is on the way.
    fn make_slot(&mut self, va: u64, level: usize) -> Option<Slot> {
        let mut table = self.pml4;
        for above in 0..level {
            let i = index(va, above);
            let e = self.entry(table, i);
            if present(e) && e & PS != 0 {
                return None;
            }
            table = if present(e) {
                Self::frame_of(e)
            } else {
                let next = self.alloc_table()?;
                self.freeable.insert(next);
                self.set_entry(table, i, Self::phys(next) | TABLE_FLAGS);
                next
            };
        }
        Some(Slot {
            table,
            index: index(va, level),
            level,
        })
    }

    /// Tables missing on the walk to the 2 MiB leaf slot of `va`.
    pub fn missing_to_huge(&self, va: u64) -> usize {
        let mut table = self.pml4;
        for level in 0..2 {
            let e = self.entry(table, index(va, level));
            if !present(e) {
                return 2 - level;
            }
            table = Self::frame_of(e);
        }
        0
    }

    /// Takes 512 free frames in a row starting on a 2 MiB aligned physical address (the lowest
    /// such run); they read as zeros. Frames skipped on the way stay free.
    pub fn alloc_huge(&mut self) -> Option<usize> {
        let per = (HUGE / PAGE) as usize;
        // The first frame index whose physical address is 2 MiB aligned.
        let first = ((HUGE - PHYS_BASE % HUGE) % HUGE / PAGE) as usize;
        let mut start = first;
        while start + per <= self.total {
            match (start..start + per).find(|&f| self.is_allocated(f)) {
                None => {
                    for f in start..start + per {
                        self.take(f);
                    }
                    return Some(start);
                }
                // The next aligned run past the allocated frame.
                Some(used) => start += (used - start) / per * per + per,
            }
        }
        None
    }

    /// Takes the free frame `f` out of the pool (the pool stays canonical).
    fn take(&mut self, f: usize) {
        if f >= self.next_fresh {
            self.freed.extend(self.next_fresh..f);
            self.next_fresh = f + 1;
        } else {
            self.freed.remove(&f);
        }
        self.data.remove(&f);
        self.int3.remove(&f);
    }

    /// The slots on the walk to `va`'s 4 KiB leaf: `[PML4, PDPT, PD, PT]` entries, `None` past a
    /// non-present or huge entry.
    pub fn path(&self, va: u64) -> [Option<Slot>; 4] {
        let mut out = [None; 4];
        let mut table = self.pml4;
        for (level, slot) in out.iter_mut().enumerate() {
            let s = Slot {
                table,
                index: index(va, level),
                level,
            };
            *slot = Some(s);
            let e = self.entry(table, s.index);
            if !present(e) || e & PS != 0 {
                break;
            }
            table = Self::frame_of(e);
        }
        out
    }

    /// The table an entry points to.
    pub fn child(&self, slot: Slot) -> usize {
        Self::frame_of(self.entry(slot.table, slot.index))
    }

    /// Whether every entry of `table` is empty (not even staged).
    pub fn is_empty_table(&self, table: usize) -> bool {
        (0..512).all(|i| self.entry(table, i) == 0)
    }

    /// The 2 MiB leaf equivalent to the split table `pt`: all 512 entries present, mapping
    /// consecutive frames with identical flags. (The machine's frames start at `PHYS_BASE`, so
    /// its 2 MiB leaves are not 2 MiB aligned physically; `split` only ever builds such tables
    /// from a huge leaf, whose first frame the first entry keeps.)
    pub fn collapsed(&self, pt: usize) -> Option<u64> {
        let first = self.entry(pt, 0);
        let (base, flags) = (first & ADDR, first & !ADDR);
        let same = |i: usize| self.entry(pt, i) == (base + i as u64 * PAGE) | flags;
        (present(first) && (0..512).all(same)).then_some(base | flags | PS)
    }

    /// Whether some present non-leaf entry reachable from the PML4 points to `table`.
    pub fn is_linked(&self, table: usize) -> bool {
        self.links_to(self.pml4, 0, table)
    }

    fn links_to(&self, t: usize, level: usize, target: usize) -> bool {
        level < 3
            && (0..512).any(|i| {
                let e = self.entry(t, i);
                present(e) && (level == 0 || e & PS == 0) && {
                    let child = Self::frame_of(e);
                    child == target || self.links_to(child, level + 1, target)
                }
            })
    }

    /// Replaces the 2 MiB leaf in `slot` by a page table of 512 4 KiB entries with the same
    /// frames and permissions: the same translations, so no CPU's view changes.
    pub fn split(&mut self, slot: Slot) -> Option<()> {
        let huge = self.entry(slot.table, slot.index);
        let pt = self.alloc_table()?;
        self.freeable.insert(pt);
        // Bit 12 of a huge leaf is its PAT bit, not an address bit: the direct map never sets
        // it (write-back), so it is simply dropped with the address bits.
        let flags = huge & !(ADDR | PS);
        for i in 0..512 {
            self.set_entry(pt, i, (leaf_frame(huge, 2) + i as u64 * PAGE) | flags);
        }
        self.set_entry(slot.table, slot.index, Self::phys(pt) | TABLE_FLAGS);
        Some(())
    }

    /// Maps every frame at `base + (phys - PHYS_BASE)` in 2 MiB RW+NX pages.
    pub fn build_direct_map(&mut self, base: u64) -> Option<()> {
        let bytes = self.total as u64 * PAGE;
        let mut off = 0;
        while off < bytes {
            let va = base + off;
            let mut table = self.pml4;
            for level in 0..2 {
                let i = index(va, level);
                let e = self.entry(table, i);
                table = if present(e) {
                    Self::frame_of(e)
                } else {
                    let next = self.alloc_table()?;
                    self.set_entry(table, i, Self::phys(next) | TABLE_FLAGS);
                    next
                };
            }
            self.set_entry(table, index(va, 2), (PHYS_BASE + off) | P | W | PS | NX);
            off += HUGE;
        }
        self.direct_map = Some(base);
        Some(())
    }

    /// Calls `f` for every present leaf intersecting `[lo, last]`, in address order.
    pub fn visit(&self, lo: u64, last: u64, f: &mut dyn FnMut(&Leaf)) {
        self.visit_table(self.pml4, 0, 0, lo, last, (true, false), f);
    }

    #[allow(clippy::too_many_arguments)]
    fn visit_table(
        &self,
        table: usize,
        level: usize,
        base: u64,
        lo: u64,
        last: u64,
        inherited: (bool, bool),
        f: &mut dyn FnMut(&Leaf),
    ) {
        let span = 1u64 << SHIFT[level];
        for i in 0..512 {
            let start = if level == 0 {
                sign_extend((i as u64) << SHIFT[0])
            } else {
                base + i as u64 * span
            };
            if start + (span - 1) < lo {
                continue;
            }
            if start > last {
                break;
            }
            let e = self.entry(table, i);
            if !present(e) {
                continue;
            }
            let writable = inherited.0 && e & W != 0;
            let nx = inherited.1 || e & NX != 0;
            if level == 3 || e & PS != 0 {
                f(&Leaf {
                    virt: start as usize,
                    size: span as usize,
                    frame: leaf_frame(e, level),
                    writable,
                    executable: !nx,
                });
            } else {
                let child = Self::frame_of(e);
                self.visit_table(child, level + 1, start, lo, last, (writable, nx), f);
            }
        }
    }
}
