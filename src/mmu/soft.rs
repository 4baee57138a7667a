//! [`Mmu`] as a software model of x86-64 4-level paging in host memory, in safe code.
//!
//! [`SoftMmu`] owns a physical memory of 4 KiB frames (storage allocated lazily, so a model with
//! 10^5 frames is cheap) and a PML4 in one of them. Page tables are frames of the same pool whose
//! bytes hold 512 little-endian `u64` entries with the real x86 bits; every walk goes
//! PML4 → PDPT → PD → PT through the physical addresses stored in the entries. Running out of
//! frames while creating an intermediate table is therefore modelled, and tests can assert the
//! raw entries with [`SoftMmu::raw_entries`].
//!
//! Each leaf-entry update is a separate store, and the model records whether any store ever left
//! a leaf writable and executable ([`SoftMmu::wx_ever_observed`]). EFER.NXE and CR0.WP are two
//! switches ([`SoftMmu::set_nxe`], [`SoftMmu::set_wp`]) that only
//! [`Mmu::check_protection_support`] looks at. The TLB is not simulated beyond counting the
//! invalidations [`Mmu::flush`] would issue.
//!
//! Page-table pages are never freed once created (like the `x86_64` crate's mapper).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use core::fmt;

use super::{
    FlushStats, Mmu, MmuError, PageMapping, Protection, TlbFlush, PTE_ADDR_MASK, PTE_NO_EXECUTE,
    PTE_PRESENT, PTE_WRITABLE,
};
use crate::range::page_round_down;
use crate::{AddressRange, PAGE_SIZE};

/// Physical address of frame 0 of a [`SoftMmu`]; frame `i` sits at `PHYS_BASE + i * 4096`.
pub const PHYS_BASE: u64 = 0x10_0000;

/// Flags of every intermediate entry the model creates.
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE;
/// Shift of the table index at each level: PML4, PDPT, PD, PT.
const LEVEL_SHIFT: [u32; 4] = [39, 30, 21, 12];
/// Bytes per entry.
const ENTRY_SIZE: usize = 8;
/// Size of a page as a `u64`.
const PAGE: u64 = PAGE_SIZE as u64;

type FrameData = Box<[u8; PAGE_SIZE]>;

fn zeroed() -> FrameData {
    Box::new([0; PAGE_SIZE])
}

/// Whether bits 63..47 of `va` are all equal.
fn canonical(va: u64) -> bool {
    let signed = va as i64;
    (signed << 16) >> 16 == signed
}

/// Sign-extends a 48-bit address.
fn sign_extend(va: u64) -> u64 {
    (((va << 16) as i64) >> 16) as u64
}

/// Index into the table at `level` (0 = PML4) for `va`.
fn index(va: u64, level: usize) -> usize {
    ((va >> LEVEL_SHIFT[level]) & 0x1FF) as usize
}

fn present(entry: u64) -> bool {
    entry & PTE_PRESENT != 0
}

/// Whether a present leaf is both writable and executable.
fn is_wx(entry: u64) -> bool {
    present(entry) && entry & PTE_WRITABLE != 0 && entry & PTE_NO_EXECUTE == 0
}

/// A software x86-64 MMU: 4-level page tables and physical frames in host memory.
///
/// `PartialEq` compares everything (tables, frame contents, free pool, counters and switches),
/// so `let before = mmu.clone(); …; assert_eq!(mmu, before)` checks that an operation changed
/// nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct SoftMmu {
    /// Frames in the physical memory.
    total: usize,
    /// Frames at or above this index were never handed out (or all came back).
    next_fresh: usize,
    /// Frames below `next_fresh` that are free again.
    freed: BTreeSet<usize>,
    /// Frames holding page tables (the PML4 included).
    tables: BTreeSet<usize>,
    /// Contents of frames; a frame without storage reads as zeros.
    memory: BTreeMap<usize, FrameData>,
    /// Frame of the PML4 (CR3).
    pml4: usize,
    stats: FlushStats,
    nxe: bool,
    wp: bool,
    leaf_stores: u64,
    wx_stores: u64,
}

impl SoftMmu {
    /// A model with `frames` physical frames, one of which becomes the PML4. NXE and WP are on.
    ///
    /// # Panics
    /// If `frames` is 0 (no room for the PML4) or the frames would not fit in 52-bit physical
    /// addresses.
    #[must_use]
    pub fn new(frames: usize) -> Self {
        assert!(frames > 0, "SoftMmu needs a frame for the PML4");
        assert!(
            (frames as u64)
                .checked_mul(PAGE)
                .and_then(|size| size.checked_add(PHYS_BASE))
                .is_some_and(|end| end - 1 <= (PTE_ADDR_MASK | (PAGE - 1))),
            "SoftMmu frames exceed the physical address space"
        );
        let mut mmu = SoftMmu {
            total: frames,
            next_fresh: 0,
            freed: BTreeSet::new(),
            tables: BTreeSet::new(),
            memory: BTreeMap::new(),
            pml4: 0,
            stats: FlushStats::default(),
            nxe: true,
            wp: true,
            leaf_stores: 0,
            wx_stores: 0,
        };
        mmu.pml4 = mmu.alloc_table().expect("frames > 0");
        mmu
    }

    /// Frames in the physical memory (page tables included).
    #[must_use]
    pub fn total_frames(&self) -> usize {
        self.total
    }

    /// Frames used by page tables, the PML4 included.
    #[must_use]
    pub fn table_frames(&self) -> usize {
        self.tables.len()
    }

    /// Physical address of the PML4 (what CR3 would hold).
    #[must_use]
    pub fn cr3(&self) -> u64 {
        Self::phys(self.pml4)
    }

    /// The raw entries on the walk to `addr` (any address inside the page): PML4, PDPT, PD, PT.
    /// The first non-present entry is still reported; the levels past it are `None`. All `None`
    /// for a non-canonical address.
    #[must_use]
    pub fn raw_entries(&self, addr: usize) -> [Option<u64>; 4] {
        let mut out = [None; 4];
        let va = addr as u64;
        if !canonical(va) {
            return out;
        }
        let mut table = self.pml4;
        for (level, slot) in out.iter_mut().enumerate() {
            let entry = self.entry(table, index(va, level));
            *slot = Some(entry);
            if !present(entry) || level == 3 {
                break;
            }
            table = Self::frame_of(entry);
        }
        out
    }

    /// Sets EFER.NXE (on by default); only [`Mmu::check_protection_support`] reads it.
    pub fn set_nxe(&mut self, on: bool) {
        self.nxe = on;
    }

    /// Sets CR0.WP (on by default); only [`Mmu::check_protection_support`] reads it.
    pub fn set_wp(&mut self, on: bool) {
        self.wp = on;
    }

    /// Whether any leaf-entry store ever left a present page writable and executable.
    #[must_use]
    pub fn wx_ever_observed(&self) -> bool {
        self.wx_stores != 0
    }

    /// Leaf-entry stores so far (a map or unmap is one, a protection change one per bit).
    #[must_use]
    pub fn leaf_stores(&self) -> u64 {
        self.leaf_stores
    }

    // ---- frames ----

    fn phys(frame: usize) -> u64 {
        PHYS_BASE + frame as u64 * PAGE
    }

    /// The frame an entry points at. Only valid for entries the model wrote.
    fn frame_of(entry: u64) -> usize {
        ((entry & PTE_ADDR_MASK).wrapping_sub(PHYS_BASE) / PAGE) as usize
    }

    fn free_count(&self) -> usize {
        self.total - self.next_fresh + self.freed.len()
    }

    fn is_allocated(&self, frame: usize) -> bool {
        frame < self.next_fresh && !self.freed.contains(&frame)
    }

    /// Takes the lowest free frame; its contents read as zeros.
    fn alloc_frame(&mut self) -> Option<usize> {
        let frame = match self.freed.pop_first() {
            Some(f) => f,
            None if self.next_fresh < self.total => {
                self.next_fresh += 1;
                self.next_fresh - 1
            }
            None => return None,
        };
        self.memory.remove(&frame);
        Some(frame)
    }

    fn alloc_table(&mut self) -> Option<usize> {
        let frame = self.alloc_frame()?;
        self.tables.insert(frame);
        Some(frame)
    }

    /// Returns `frame` to the pool, keeping the pool's representation canonical (so equal pools
    /// compare equal however they got there).
    fn free_frame(&mut self, frame: usize) {
        self.memory.remove(&frame);
        self.freed.insert(frame);
        while self.next_fresh > 0 && self.freed.remove(&(self.next_fresh - 1)) {
            self.next_fresh -= 1;
        }
    }

    // ---- entries ----

    fn entry(&self, table: usize, i: usize) -> u64 {
        self.memory.get(&table).map_or(0, |bytes| {
            let mut raw = [0; ENTRY_SIZE];
            raw.copy_from_slice(&bytes[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE]);
            u64::from_le_bytes(raw)
        })
    }

    fn set_entry(&mut self, table: usize, i: usize, value: u64) {
        let bytes = self.memory.entry(table).or_insert_with(zeroed);
        bytes[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE].copy_from_slice(&value.to_le_bytes());
    }

    /// One store to a leaf entry, watched for W+X.
    fn store_leaf(&mut self, table: usize, i: usize, value: u64) {
        self.set_entry(table, i, value);
        self.leaf_stores += 1;
        if is_wx(value) {
            self.wx_stores += 1;
        }
    }

    /// The page tables on the walk to `va`, PML4 first; `None` from the first absent one.
    fn tables_on_walk(&self, va: u64) -> [Option<usize>; 4] {
        let mut out = [None; 4];
        out[0] = Some(self.pml4);
        for level in 0..3 {
            let Some(table) = out[level] else { break };
            let entry = self.entry(table, index(va, level));
            if !present(entry) {
                break;
            }
            out[level + 1] = Some(Self::frame_of(entry));
        }
        out
    }

    /// The page table and index of the present leaf for `page`.
    fn leaf_slot(&self, page: usize) -> Result<(usize, usize), MmuError> {
        let va = page as u64;
        let table = self.tables_on_walk(va)[3].ok_or(MmuError::NotMapped { page })?;
        let i = index(va, 3);
        if present(self.entry(table, i)) {
            Ok((table, i))
        } else {
            Err(MmuError::NotMapped { page })
        }
    }

    /// Checks that `page` is an aligned canonical address.
    fn check_page(page: usize) -> Result<u64, MmuError> {
        if !page.is_multiple_of(PAGE_SIZE) {
            return Err(MmuError::Unaligned { addr: page });
        }
        let va = page as u64;
        if !canonical(va) {
            return Err(MmuError::OutOfRange { addr: page });
        }
        Ok(va)
    }

    fn translate(&self, va: u64) -> Option<PageMapping> {
        if !canonical(va) {
            return None;
        }
        let mut table = self.pml4;
        let mut entry = 0;
        let (mut writable, mut nx, mut intermediate_nx) = (true, false, false);
        for level in 0..4 {
            entry = self.entry(table, index(va, level));
            if !present(entry) {
                return None;
            }
            writable &= entry & PTE_WRITABLE != 0;
            if entry & PTE_NO_EXECUTE != 0 {
                nx = true;
                intermediate_nx |= level < 3;
            }
            table = Self::frame_of(entry);
        }
        Some(PageMapping {
            frame: entry & PTE_ADDR_MASK,
            writable,
            executable: !nx,
            intermediate_nx,
        })
    }

    /// Maps `page` RW+NX to `frame`, or to a fresh zeroed frame when `None`, creating the missing
    /// tables; checks everything (including the frame count) before changing anything.
    fn map_leaf(
        &mut self,
        page: usize,
        frame: Option<usize>,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        let va = Self::check_page(page)?;
        let walk = self.tables_on_walk(va);
        if let Some(pt) = walk[3] {
            if present(self.entry(pt, index(va, 3))) {
                return Err(MmuError::AlreadyMapped { page });
            }
        }
        let missing = walk.iter().filter(|t| t.is_none()).count();
        if self.free_count() < missing + usize::from(frame.is_none()) {
            return Err(MmuError::OutOfFrames);
        }
        let mut table = self.pml4;
        for level in 0..3 {
            let i = index(va, level);
            let entry = self.entry(table, i);
            table = if present(entry) {
                Self::frame_of(entry)
            } else {
                let next = self.alloc_table().ok_or(MmuError::OutOfFrames)?;
                self.set_entry(table, i, Self::phys(next) | TABLE_FLAGS);
                next
            };
        }
        let frame = match frame {
            Some(f) => f,
            None => self.alloc_frame().ok_or(MmuError::OutOfFrames)?,
        };
        let leaf = Self::phys(frame) | Protection::ReadWrite.leaf_flags();
        self.store_leaf(table, index(va, 3), leaf);
        // A not-present entry is never cached (SDM 4.10.2.3): mapping needs no invalidation.
        let _ = tlb;
        Ok(())
    }

    /// Clears the leaf of `page`, returning the frame it mapped.
    fn unmap_leaf(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<usize, MmuError> {
        Self::check_page(page)?;
        let (table, i) = self.leaf_slot(page)?;
        let frame = Self::frame_of(self.entry(table, i));
        self.store_leaf(table, i, 0);
        tlb.add(page);
        Ok(frame)
    }

    /// Checks that every page of `[addr, addr + len)` (`len > 0`) is mapped (and writable when
    /// asked).
    fn check_access(&self, addr: usize, len: usize, write: bool) -> Result<(), MmuError> {
        // Inclusive end, so the last bytes of the address space are reachable.
        let last = addr
            .checked_add(len - 1)
            .ok_or(MmuError::OutOfRange { addr })?;
        let pages = page_round_down(addr) / PAGE_SIZE..=page_round_down(last) / PAGE_SIZE;
        for page in pages.map(|p| p * PAGE_SIZE) {
            if !canonical(page as u64) {
                return Err(MmuError::OutOfRange { addr: page });
            }
            match self.translate(page as u64) {
                None => return Err(MmuError::NotMapped { page }),
                Some(m) if write && !m.writable => return Err(MmuError::NotWritable { page }),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The frame (index) behind the mapped address `at`.
    fn frame_at(&self, at: usize) -> Option<usize> {
        let mapping = self.translate(page_round_down(at) as u64)?;
        Some(Self::frame_of(mapping.frame))
    }

    /// Visits the present entries of `table` (at `level`, covering addresses from `base`) that
    /// intersect `[lo, last]`, calling `f` for leaves.
    #[allow(clippy::too_many_arguments)]
    fn visit(
        &self,
        table: usize,
        level: usize,
        base: u64,
        lo: u64,
        last: u64,
        inherited: (bool, bool),
        f: &mut dyn FnMut(usize, PageMapping),
    ) {
        let span = 1u64 << LEVEL_SHIFT[level];
        for i in 0..512 {
            let start = if level == 0 {
                sign_extend((i as u64) << LEVEL_SHIFT[0])
            } else {
                base + i as u64 * span
            };
            let end = start + (span - 1);
            if end < lo {
                continue;
            }
            if start > last {
                break;
            }
            let entry = self.entry(table, i);
            if !present(entry) {
                continue;
            }
            let writable = inherited.0 && entry & PTE_WRITABLE != 0;
            let nx = entry & PTE_NO_EXECUTE != 0;
            if level == 3 {
                let mapping = PageMapping {
                    frame: entry & PTE_ADDR_MASK,
                    writable,
                    executable: !inherited.1 && !nx,
                    intermediate_nx: inherited.1,
                };
                f(start as usize, mapping);
            } else {
                let child = Self::frame_of(entry);
                self.visit(
                    child,
                    level + 1,
                    start,
                    lo,
                    last,
                    (writable, inherited.1 || nx),
                    f,
                );
            }
        }
    }
}

impl fmt::Debug for SoftMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftMmu")
            .field("frames", &self.total)
            .field("free", &self.free_count())
            .field("tables", &self.tables.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Mmu for SoftMmu {
    fn check_protection_support(&self) -> Result<(), MmuError> {
        if !self.nxe {
            return Err(MmuError::NoExecuteDisabled);
        }
        if !self.wp {
            return Err(MmuError::WriteProtectDisabled);
        }
        Ok(())
    }

    fn map_fresh(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        self.map_leaf(page, None, tlb)
    }

    fn unmap(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        let frame = self.unmap_leaf(page, tlb)?;
        if self.is_allocated(frame) && !self.tables.contains(&frame) {
            self.free_frame(frame);
        }
        Ok(())
    }

    fn protect(
        &mut self,
        page: usize,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        Self::check_page(page)?;
        let (table, i) = self.leaf_slot(page)?;
        let mut entry = self.entry(table, i);
        // The two bits change in two stores, ordered so that no step is W+X.
        let steps = match prot {
            Protection::ReadWrite => [(PTE_NO_EXECUTE, true), (PTE_WRITABLE, true)],
            Protection::ReadExecute => [(PTE_WRITABLE, false), (PTE_NO_EXECUTE, false)],
        };
        let mut changed = false;
        for (bit, set) in steps {
            let next = if set { entry | bit } else { entry & !bit };
            if next != entry {
                entry = next;
                self.store_leaf(table, i, entry);
                changed = true;
            }
        }
        if changed {
            tlb.add(page);
        }
        Ok(())
    }

    fn query(&self, page: usize) -> Option<PageMapping> {
        self.translate(page_round_down(page) as u64)
    }

    fn for_each_mapping(&self, range: AddressRange, f: &mut dyn FnMut(usize, PageMapping)) {
        if range.is_empty() {
            return;
        }
        let lo = page_round_down(range.start()) as u64;
        let last = range.end() as u64 - 1;
        self.visit(self.pml4, 0, 0, lo, last, (true, false), f);
    }

    /// `frame` must be a page-aligned physical address of an allocated data frame of this model
    /// ([`MmuError::Unaligned`] / [`MmuError::OutOfRange`] with the frame address otherwise).
    fn map_alias(&mut self, alias: usize, frame: u64, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        Self::check_page(alias)?;
        let bad = MmuError::OutOfRange {
            addr: frame as usize,
        };
        if !frame.is_multiple_of(PAGE) {
            return Err(MmuError::Unaligned {
                addr: frame as usize,
            });
        }
        let index = frame.checked_sub(PHYS_BASE).ok_or(bad)? / PAGE;
        let index = usize::try_from(index).map_err(|_| bad)?;
        if index >= self.total || !self.is_allocated(index) || self.tables.contains(&index) {
            return Err(bad);
        }
        self.map_leaf(alias, Some(index), tlb)
    }

    fn unmap_alias(&mut self, alias: usize, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        self.unmap_leaf(alias, tlb).map(|_| ())
    }

    fn write(&mut self, addr: usize, data: &[u8]) -> Result<(), MmuError> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_access(addr, data.len(), true)?;
        let mut done = 0;
        while done < data.len() {
            let at = addr + done;
            let frame = self.frame_at(at).ok_or(MmuError::NotMapped {
                page: page_round_down(at),
            })?;
            let offset = at % PAGE_SIZE;
            let n = (PAGE_SIZE - offset).min(data.len() - done);
            let bytes = self.memory.entry(frame).or_insert_with(zeroed);
            bytes[offset..offset + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn write_u64_atomic(&mut self, addr: usize, value: u64) -> Result<(), MmuError> {
        if !addr.is_multiple_of(8) {
            return Err(MmuError::Unaligned { addr });
        }
        // Aligned, so within one page: a single copy, like the single store it models.
        self.write(addr, &value.to_le_bytes())
    }

    fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), MmuError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.check_access(addr, buf.len(), false)?;
        let mut done = 0;
        while done < buf.len() {
            let at = addr + done;
            let frame = self.frame_at(at).ok_or(MmuError::NotMapped {
                page: page_round_down(at),
            })?;
            let offset = at % PAGE_SIZE;
            let n = (PAGE_SIZE - offset).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.memory.get(&frame) {
                Some(bytes) => dst.copy_from_slice(&bytes[offset..offset + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self, tlb: TlbFlush) {
        if tlb.is_full() {
            self.stats.full += 1;
        } else {
            self.stats.single_pages += tlb.pages().len() as u64;
        }
    }

    fn flush_stats(&self) -> FlushStats {
        self.stats
    }

    fn free_frames(&self) -> Option<usize> {
        Some(self.free_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// Start of a 512 GiB PML4 slot in the higher half (PML4 index 384).
    const BASE: usize = 0xFFFF_C000_0000_0000;
    const SLOT: usize = 1 << 39;

    fn mapped(frames: usize, pages: &[usize]) -> SoftMmu {
        let mut mmu = SoftMmu::new(frames);
        let mut tlb = TlbFlush::new();
        for &p in pages {
            mmu.map_fresh(p, &mut tlb).unwrap();
        }
        mmu.flush(tlb);
        mmu
    }

    #[test]
    fn new_allocates_only_the_pml4() {
        let mmu = SoftMmu::new(100_000);
        assert_eq!(mmu.total_frames(), 100_000);
        assert_eq!(mmu.table_frames(), 1);
        assert_eq!(mmu.free_frames(), Some(99_999));
        assert_eq!(mmu.cr3(), PHYS_BASE);
        assert_eq!(mmu.raw_entries(BASE), [Some(0), None, None, None]);
        assert_eq!(mmu.query(BASE), None);
        assert_eq!(mmu.check_protection_support(), Ok(()));
        assert!(!alloc::format!("{mmu:?}").is_empty());
    }

    #[test]
    fn map_fresh_creates_rw_nx_leaf_and_clean_intermediates() {
        let mut mmu = mapped(64, &[BASE + 0x5000]);
        let m = mmu.query(BASE + 0x5123).unwrap();
        assert!(m.writable && !m.executable && !m.intermediate_nx);
        assert_eq!(m.protection(), Some(Protection::ReadWrite));
        assert_eq!(m.frame % PAGE, 0);
        assert!(m.frame >= PHYS_BASE);
        let raw = mmu.raw_entries(BASE + 0x5000);
        for entry in &raw[..3] {
            let e = entry.unwrap();
            assert_eq!(e & !PTE_ADDR_MASK, PTE_PRESENT | PTE_WRITABLE, "{e:#x}");
        }
        let leaf = raw[3].unwrap();
        assert_eq!(
            leaf & !PTE_ADDR_MASK,
            PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE
        );
        assert_eq!(leaf & PTE_ADDR_MASK, m.frame);
        // The walk really goes through the tables: each entry points at a table frame.
        assert_eq!(mmu.table_frames(), 4);
        assert_eq!(mmu.free_frames(), Some(64 - 4 - 1));
        let mut buf = [0xAAu8; PAGE_SIZE];
        mmu.read(BASE + 0x5000, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // A reused frame comes back zeroed.
        let mut tlb = TlbFlush::new();
        mmu.write(BASE + 0x5000, &[0xFF; PAGE_SIZE]).unwrap();
        mmu.unmap(BASE + 0x5000, &mut tlb).unwrap();
        mmu.map_fresh(BASE + 0x6000, &mut tlb).unwrap();
        assert_eq!(mmu.query(BASE + 0x6000).unwrap().frame, m.frame);
        mmu.read(BASE + 0x6000, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        mmu.flush(tlb);
    }

    #[test]
    fn protect_flips_and_write_respects_protection() {
        let page = BASE + 0x1000;
        let mut mmu = mapped(64, &[page]);
        let mut tlb = TlbFlush::new();
        mmu.write(page + 10, b"code").unwrap();
        mmu.protect(page, Protection::ReadExecute, &mut tlb)
            .unwrap();
        let m = mmu.query(page).unwrap();
        assert!(!m.writable && m.executable);
        assert_eq!(m.protection(), Some(Protection::ReadExecute));
        assert_eq!(
            mmu.raw_entries(page)[3].unwrap() & !PTE_ADDR_MASK,
            PTE_PRESENT
        );
        assert_eq!(tlb.pages(), &[page]);

        let before = mmu.clone();
        assert_eq!(
            mmu.write(page + 10, b"evil"),
            Err(MmuError::NotWritable { page })
        );
        assert_eq!(
            mmu.write_u64_atomic(page + 8, 1),
            Err(MmuError::NotWritable { page })
        );
        assert_eq!(mmu, before);
        let mut buf = [0; 4];
        mmu.read(page + 10, &mut buf).unwrap();
        assert_eq!(&buf, b"code");

        mmu.protect(page, Protection::ReadWrite, &mut tlb).unwrap();
        assert_eq!(
            mmu.query(page).unwrap().protection(),
            Some(Protection::ReadWrite)
        );
        mmu.write(page + 10, b"new!").unwrap();
        mmu.read(page + 10, &mut buf).unwrap();
        assert_eq!(&buf, b"new!");
        mmu.flush(tlb);
        assert!(!mmu.wx_ever_observed());
    }

    #[test]
    fn protect_uses_two_stores_and_skips_no_ops() {
        let page = BASE;
        let mut mmu = mapped(64, &[page]);
        let stores = mmu.leaf_stores();
        let mut tlb = TlbFlush::new();
        mmu.protect(page, Protection::ReadExecute, &mut tlb)
            .unwrap();
        assert_eq!(mmu.leaf_stores(), stores + 2);
        mmu.protect(page, Protection::ReadWrite, &mut tlb).unwrap();
        assert_eq!(mmu.leaf_stores(), stores + 4);
        mmu.flush(tlb);
        // Already RW: nothing stored, nothing to flush.
        let mut tlb = TlbFlush::new();
        mmu.protect(page, Protection::ReadWrite, &mut tlb).unwrap();
        assert_eq!(mmu.leaf_stores(), stores + 4);
        assert!(tlb.is_empty());
    }

    #[test]
    fn wx_never_observed_across_many_flips() {
        let pages: Vec<usize> = (0..16).map(|i| BASE + i * PAGE_SIZE).collect();
        let mut mmu = mapped(64, &pages);
        for round in 0..200 {
            let mut tlb = TlbFlush::new();
            for (i, &p) in pages.iter().enumerate() {
                let prot = if (round + i) % 2 == 0 {
                    Protection::ReadExecute
                } else {
                    Protection::ReadWrite
                };
                mmu.protect(p, prot, &mut tlb).unwrap();
                let m = mmu.query(p).unwrap();
                assert_eq!(m.protection(), Some(prot));
            }
            mmu.flush(tlb);
        }
        assert!(mmu.leaf_stores() > 16 * 200);
        assert!(!mmu.wx_ever_observed());
    }

    #[test]
    fn wx_detector_fires_on_a_wx_store() {
        let page = BASE;
        let mut mmu = mapped(64, &[page]);
        let (table, i) = mmu.leaf_slot(page).unwrap();
        let leaf = mmu.entry(table, i);
        mmu.store_leaf(table, i, leaf & !PTE_NO_EXECUTE);
        assert!(mmu.wx_ever_observed());
        assert_eq!(mmu.query(page).unwrap().protection(), None);
    }

    #[test]
    fn unmap_frees_the_frame_but_keeps_tables() {
        let mut mmu = SoftMmu::new(64);
        let free = mmu.free_frames().unwrap();
        let mut tlb = TlbFlush::new();
        mmu.map_fresh(BASE, &mut tlb).unwrap();
        assert_eq!(mmu.free_frames(), Some(free - 4));
        mmu.unmap(BASE, &mut tlb).unwrap();
        assert_eq!(mmu.free_frames(), Some(free - 3));
        assert_eq!(mmu.table_frames(), 4);
        assert_eq!(mmu.query(BASE), None);
        assert_eq!(mmu.raw_entries(BASE)[3], Some(0));
        // Map and unmap again: same state as before, down to the free pool's representation.
        let before = mmu.clone();
        mmu.map_fresh(BASE + 0x1000, &mut tlb).unwrap();
        mmu.unmap(BASE + 0x1000, &mut tlb).unwrap();
        assert_eq!(mmu.free_frames(), before.free_frames());
        assert_eq!(mmu.leaf_stores(), before.leaf_stores() + 2);
        mmu.flush(tlb);
    }

    #[test]
    fn map_and_unmap_errors() {
        let mut mmu = mapped(64, &[BASE]);
        let mut tlb = TlbFlush::new();
        let before = mmu.clone();
        assert_eq!(
            mmu.map_fresh(BASE, &mut tlb),
            Err(MmuError::AlreadyMapped { page: BASE })
        );
        let other = BASE + PAGE_SIZE;
        assert_eq!(
            mmu.unmap(other, &mut tlb),
            Err(MmuError::NotMapped { page: other })
        );
        assert_eq!(
            mmu.unmap(BASE + SLOT, &mut tlb),
            Err(MmuError::NotMapped { page: BASE + SLOT })
        );
        assert_eq!(
            mmu.unmap_alias(other, &mut tlb),
            Err(MmuError::NotMapped { page: other })
        );
        assert_eq!(
            mmu.protect(other, Protection::ReadExecute, &mut tlb),
            Err(MmuError::NotMapped { page: other })
        );
        for addr in [BASE + 1, BASE + 0x800] {
            assert_eq!(
                mmu.map_fresh(addr, &mut tlb),
                Err(MmuError::Unaligned { addr })
            );
            assert_eq!(mmu.unmap(addr, &mut tlb), Err(MmuError::Unaligned { addr }));
            assert_eq!(
                mmu.protect(addr, Protection::ReadWrite, &mut tlb),
                Err(MmuError::Unaligned { addr })
            );
        }
        for addr in [
            0x0000_8000_0000_0000,
            0xFFFF_7FFF_FFFF_F000,
            0x1234_0000_0000_0000,
        ] {
            assert_eq!(
                mmu.map_fresh(addr, &mut tlb),
                Err(MmuError::OutOfRange { addr })
            );
            assert_eq!(
                mmu.unmap(addr, &mut tlb),
                Err(MmuError::OutOfRange { addr })
            );
            assert_eq!(
                mmu.map_alias(addr, PHYS_BASE, &mut tlb),
                Err(MmuError::OutOfRange { addr })
            );
            assert_eq!(mmu.query(addr), None);
            assert_eq!(mmu.raw_entries(addr), [None; 4]);
            assert_eq!(
                mmu.read(addr, &mut [0; 4]),
                Err(MmuError::OutOfRange { addr })
            );
            assert_eq!(mmu.write(addr, &[0; 4]), Err(MmuError::OutOfRange { addr }));
        }
        assert!(tlb.is_empty());
        assert_eq!(mmu, before);
        // Canonical extremes work.
        mmu.map_fresh(0x0000_7FFF_FFFF_F000, &mut tlb).unwrap();
        mmu.map_fresh(0xFFFF_8000_0000_0000, &mut tlb).unwrap();
        mmu.map_fresh(0xFFFF_FFFF_FFFF_F000, &mut tlb).unwrap();
        mmu.write(0xFFFF_FFFF_FFFF_FFF8, &[1; 8]).unwrap();
        assert_eq!(
            mmu.write(0xFFFF_FFFF_FFFF_FFF8, &[1; 9]),
            Err(MmuError::OutOfRange {
                addr: 0xFFFF_FFFF_FFFF_FFF8
            })
        );
        mmu.flush(tlb);
    }

    #[test]
    fn alias_shares_the_frame() {
        let page = BASE;
        let alias = 0xFFFF_9000_0000_0000;
        let mut mmu = mapped(64, &[page]);
        let mut tlb = TlbFlush::new();
        mmu.protect(page, Protection::ReadExecute, &mut tlb)
            .unwrap();
        let frame = mmu.query(page).unwrap().frame;
        mmu.map_alias(alias, frame, &mut tlb).unwrap();
        let a = mmu.query(alias).unwrap();
        assert_eq!(a.frame, frame);
        assert_eq!(a.protection(), Some(Protection::ReadWrite));
        mmu.write(alias + 0xFF8, &0xDEAD_BEEF_u64.to_le_bytes())
            .unwrap();
        mmu.write_u64_atomic(alias + 0x10, 0x1122_3344_5566_7788)
            .unwrap();
        let mut buf = [0; 8];
        mmu.read(page + 0xFF8, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0xDEAD_BEEF);
        mmu.read(page + 0x10, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
        assert_eq!(
            mmu.map_alias(alias, frame, &mut tlb),
            Err(MmuError::AlreadyMapped { page: alias })
        );

        let free = mmu.free_frames();
        mmu.unmap_alias(alias, &mut tlb).unwrap();
        assert_eq!(mmu.free_frames(), free);
        assert_eq!(mmu.query(alias), None);
        mmu.read(page + 0x10, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
        assert_eq!(mmu.query(page).unwrap().frame, frame);
        mmu.flush(tlb);
    }

    #[test]
    fn map_alias_rejects_bad_frames() {
        let mut mmu = mapped(64, &[BASE]);
        let mut tlb = TlbFlush::new();
        let before = mmu.clone();
        let frame = mmu.query(BASE).unwrap().frame;
        let alias = BASE + SLOT;
        let bad = |f: u64| MmuError::OutOfRange { addr: f as usize };
        assert_eq!(
            mmu.map_alias(alias, frame + 8, &mut tlb),
            Err(MmuError::Unaligned {
                addr: (frame + 8) as usize
            })
        );
        // Below the base, past the end, a free frame, a page table.
        for f in [
            0,
            PHYS_BASE + 64 * PAGE,
            frame + PAGE,
            mmu.cr3(),
            mmu.raw_entries(BASE)[2].unwrap() & PTE_ADDR_MASK,
        ] {
            assert_eq!(mmu.map_alias(alias, f, &mut tlb), Err(bad(f)), "{f:#x}");
        }
        assert_eq!(
            mmu.map_alias(alias + 1, frame, &mut tlb),
            Err(MmuError::Unaligned { addr: alias + 1 })
        );
        assert_eq!(mmu, before);
        assert!(tlb.is_empty());
    }

    #[test]
    fn write_and_read_cross_pages() {
        let pages = [BASE + 0x1F_F000, BASE + 0x20_0000]; // across a page-table boundary too
        let mut mmu = mapped(64, &pages);
        let data: Vec<u8> = (0..100u8).collect();
        mmu.write(pages[1] - 50, &data).unwrap();
        let mut buf = [0; 100];
        mmu.read(pages[1] - 50, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[..]);
        let mut tail = [0; 50];
        mmu.read(pages[1], &mut tail).unwrap();
        assert_eq!(&tail[..], &data[50..]);
        assert_ne!(
            mmu.query(pages[0]).unwrap().frame,
            mmu.query(pages[1]).unwrap().frame
        );
        mmu.write(pages[0], &[]).unwrap();
        mmu.read(0xFFFF_8000_0000_0000, &mut []).unwrap();

        // A write whose second page is read-only or missing changes nothing, not even page one.
        let mut tlb = TlbFlush::new();
        mmu.protect(pages[1], Protection::ReadExecute, &mut tlb)
            .unwrap();
        let before = mmu.clone();
        assert_eq!(
            mmu.write(pages[1] - 4, &[9; 8]),
            Err(MmuError::NotWritable { page: pages[1] })
        );
        assert_eq!(mmu, before);
        let end = pages[1] + PAGE_SIZE;
        mmu.protect(pages[1], Protection::ReadWrite, &mut tlb)
            .unwrap();
        let before = mmu.clone();
        assert_eq!(
            mmu.write(end - 4, &[9; 8]),
            Err(MmuError::NotMapped { page: end })
        );
        assert_eq!(
            mmu.read(end - 4, &mut [0; 8]),
            Err(MmuError::NotMapped { page: end })
        );
        assert_eq!(mmu, before);
        mmu.flush(tlb);
    }

    #[test]
    fn write_u64_atomic_needs_alignment() {
        let mut mmu = mapped(64, &[BASE]);
        let before = mmu.clone();
        for addr in [BASE + 1, BASE + 4, BASE + 0xFFC] {
            assert_eq!(
                mmu.write_u64_atomic(addr, 7),
                Err(MmuError::Unaligned { addr })
            );
        }
        assert_eq!(mmu, before);
        mmu.write_u64_atomic(BASE + 0xFF8, u64::MAX).unwrap();
        let mut buf = [0; 8];
        mmu.read(BASE + 0xFF8, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), u64::MAX);
        let page = BASE + PAGE_SIZE;
        assert_eq!(
            mmu.write_u64_atomic(page, 1),
            Err(MmuError::NotMapped { page })
        );
    }

    fn visited(mmu: &SoftMmu, range: AddressRange) -> Vec<usize> {
        let mut out = Vec::new();
        mmu.for_each_mapping(range, &mut |va, m| {
            assert_eq!(m.protection(), Some(Protection::ReadWrite));
            assert_eq!(m, mmu.query(va).unwrap());
            out.push(va);
        });
        out
    }

    #[test]
    fn for_each_mapping_is_ordered_and_sparse() {
        let pages = [
            BASE,
            BASE + 0x1000,
            BASE + 0x4000_0000,
            BASE + SLOT / 2,
            BASE + SLOT - 2 * PAGE_SIZE,
            BASE + SLOT - PAGE_SIZE,
            // Outside the slot.
            BASE - PAGE_SIZE,
            BASE + SLOT,
            0x1000,
            0xFFFF_FFFF_FFFF_F000,
        ];
        let mut mmu = mapped(128, &pages);
        let slot = AddressRange::from_start_size(BASE, SLOT).unwrap();
        assert_eq!(visited(&mmu, slot), &pages[..6]);

        // The whole address space, both halves, in address order.
        let mut all = pages.to_vec();
        all.sort_unstable();
        assert_eq!(visited(&mmu, AddressRange::new(0, usize::MAX)), all);

        // Partial ranges: pages the range touches.
        assert_eq!(
            visited(&mmu, AddressRange::new(BASE + 0xFFF, BASE + 0x1001)),
            &[BASE, BASE + 0x1000]
        );
        assert_eq!(
            visited(&mmu, AddressRange::new(BASE + 0x1000, BASE + 0x1000)),
            &[] as &[usize]
        );
        assert_eq!(
            visited(&mmu, AddressRange::new(BASE + 0x2000, BASE + 0x4000_0000)),
            &[] as &[usize]
        );

        // Protection is reported per page.
        let mut tlb = TlbFlush::new();
        mmu.protect(BASE + 0x1000, Protection::ReadExecute, &mut tlb)
            .unwrap();
        let mut seen = Vec::new();
        mmu.for_each_mapping(slot, &mut |va, m| seen.push((va, m.protection().unwrap())));
        assert_eq!(seen[1], (BASE + 0x1000, Protection::ReadExecute));
        assert!(seen
            .iter()
            .enumerate()
            .all(|(i, s)| i == 1 || s.1 == Protection::ReadWrite));
        mmu.flush(tlb);
    }

    #[test]
    fn for_each_mapping_reports_intermediate_nx() {
        let mut mmu = mapped(64, &[BASE]);
        // Corrupt the PD entry the way codespace never would.
        let pdpt = SoftMmu::frame_of(mmu.raw_entries(BASE)[0].unwrap());
        let i = index(BASE as u64, 1);
        let e = mmu.entry(pdpt, i);
        mmu.set_entry(pdpt, i, e | PTE_NO_EXECUTE);
        let m = mmu.query(BASE).unwrap();
        assert!(m.intermediate_nx && !m.executable);
        let mut got = None;
        mmu.for_each_mapping(AddressRange::new(BASE, BASE + PAGE_SIZE), &mut |_, m| {
            got = Some(m)
        });
        assert_eq!(got, Some(m));
    }

    #[test]
    fn out_of_frames_changes_nothing() {
        let mut tlb = TlbFlush::new();
        // 4 frames: PML4 + 3 free; a first mapping needs PDPT, PD, PT and the page.
        let mut mmu = SoftMmu::new(4);
        let before = mmu.clone();
        assert_eq!(mmu.map_fresh(BASE, &mut tlb), Err(MmuError::OutOfFrames));
        assert_eq!(mmu, before);

        // PDPT and PD for BASE exist; a page in another 2 MiB region needs a new PT and the page,
        // and one frame is left: the PT can't be allocated, and nothing may change.
        let mut mmu = mapped(6, &[BASE]);
        assert_eq!(mmu.free_frames(), Some(1));
        let before = mmu.clone();
        let far = BASE + 0x20_0000;
        assert_eq!(mmu.map_fresh(far, &mut tlb), Err(MmuError::OutOfFrames));
        assert_eq!(mmu, before);
        // An alias there needs only the PT, so it fits.
        let frame = mmu.query(BASE).unwrap().frame;
        mmu.map_alias(far, frame, &mut tlb).unwrap();
        assert_eq!(mmu.free_frames(), Some(0));
        // Same PT, but no frame for the page.
        let before = mmu.clone();
        assert_eq!(
            mmu.map_fresh(BASE + PAGE_SIZE, &mut tlb),
            Err(MmuError::OutOfFrames)
        );
        // An alias needing a PT with no frame left.
        assert_eq!(
            mmu.map_alias(BASE + 0x40_0000, frame, &mut tlb),
            Err(MmuError::OutOfFrames)
        );
        assert_eq!(mmu, before);
        // An alias in an existing PT needs no frame at all.
        mmu.map_alias(BASE + PAGE_SIZE, frame, &mut tlb).unwrap();
        // Freeing the page makes room again.
        mmu.unmap_alias(BASE + PAGE_SIZE, &mut tlb).unwrap();
        mmu.unmap_alias(far, &mut tlb).unwrap();
        mmu.unmap(BASE, &mut tlb).unwrap();
        mmu.map_fresh(BASE + PAGE_SIZE, &mut tlb).unwrap();
        assert_eq!(mmu.free_frames(), Some(0));
        mmu.flush(tlb);
    }

    #[test]
    fn flush_counts_singles_or_one_full() {
        let mut mmu = SoftMmu::new(128);
        let mut tlb = TlbFlush::new();
        for i in 0..33 {
            mmu.map_fresh(BASE + i * PAGE_SIZE, &mut tlb).unwrap();
        }
        assert!(
            tlb.is_empty(),
            "mapping a not-present page needs no invalidation"
        );
        mmu.flush(tlb);
        assert_eq!(mmu.flush_stats(), FlushStats::default());

        let mut tlb = TlbFlush::new();
        for i in 0..32 {
            mmu.protect(BASE + i * PAGE_SIZE, Protection::ReadExecute, &mut tlb)
                .unwrap();
        }
        assert!(!tlb.is_full());
        mmu.flush(tlb);
        assert_eq!(
            mmu.flush_stats(),
            FlushStats {
                single_pages: 32,
                full: 0
            }
        );

        let mut tlb = TlbFlush::new();
        for i in 0..32 {
            mmu.protect(BASE + i * PAGE_SIZE, Protection::ReadWrite, &mut tlb)
                .unwrap();
        }
        mmu.protect(BASE + 32 * PAGE_SIZE, Protection::ReadExecute, &mut tlb)
            .unwrap();
        assert!(tlb.is_full());
        mmu.flush(tlb);
        assert_eq!(
            mmu.flush_stats(),
            FlushStats {
                single_pages: 32,
                full: 1
            }
        );

        mmu.flush(TlbFlush::new());
        assert_eq!(
            mmu.flush_stats(),
            FlushStats {
                single_pages: 32,
                full: 1
            }
        );
    }

    #[test]
    fn protection_support_follows_the_switches() {
        let mut mmu = SoftMmu::new(1);
        assert_eq!(mmu.check_protection_support(), Ok(()));
        mmu.set_wp(false);
        assert_eq!(
            mmu.check_protection_support(),
            Err(MmuError::WriteProtectDisabled)
        );
        mmu.set_nxe(false);
        assert_eq!(
            mmu.check_protection_support(),
            Err(MmuError::NoExecuteDisabled)
        );
        mmu.set_wp(true);
        assert_eq!(
            mmu.check_protection_support(),
            Err(MmuError::NoExecuteDisabled)
        );
        mmu.set_nxe(true);
        assert_eq!(mmu.check_protection_support(), Ok(()));
    }

    #[test]
    fn entries_live_in_table_frames() {
        // Follow the raw entries by hand: each points at the next table, and reading that
        // table's frame bytes gives the next raw entry.
        let mmu = mapped(64, &[BASE + 0x3000]);
        let raw = mmu.raw_entries(BASE + 0x3000);
        let mut table = mmu.cr3();
        for (level, entry) in raw.iter().enumerate() {
            let frame = SoftMmu::frame_of(table);
            let i = index((BASE + 0x3000) as u64, level);
            let bytes = mmu.memory.get(&frame).unwrap();
            let mut le = [0; 8];
            le.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            assert_eq!(Some(u64::from_le_bytes(le)), *entry);
            if level < 3 {
                assert!(mmu.tables.contains(&SoftMmu::frame_of(entry.unwrap())));
            }
            table = entry.unwrap() & PTE_ADDR_MASK;
        }
    }
}
