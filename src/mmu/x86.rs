//! [`Mmu`] over a kernel's live page tables: the `x86_64` crate's [`OffsetPageTable`] and any
//! frame allocator implementing its [`FrameAllocator`] and [`FrameDeallocator`] traits.
//!
//! This is the arch layer: the only place where codespace dereferences raw addresses of code
//! pages (writes through checked writable mappings, zeroing fresh frames through the direct map,
//! reading page-table entries) and executes `invlpg` or reloads CR3.

use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;
use x86_64::registers::control::{Cr0, Cr0Flags, Efer, EferFlags};
use x86_64::structures::paging::mapper::{MapToError, UnmapError};
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, OffsetPageTable, Page, PageTable,
    PageTableFlags as Flags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::{
    FlushStats, Mmu, MmuError, PageMapping, Protection, TlbFlush, PTE_ADDR_MASK, PTE_NO_EXECUTE,
    PTE_PRESENT, PTE_WRITABLE,
};
use crate::{AddressRange, PAGE_SIZE};

const HUGE: u64 = 1 << 7;
/// Frames a 4 KiB mapping can need at most: the page itself and a PDPT, PD and PT (the PML4
/// exists).
const FRAMES_PER_MAPPING: usize = 4;

/// The kernel's page tables and frame allocator, each behind the kernel's own lock.
///
/// Lock order: page table, then frames.
pub struct X86Mmu<'a, A> {
    tables: &'a Mutex<OffsetPageTable<'static>>,
    frames: &'a Mutex<A>,
    free_count: Option<fn(&A) -> usize>,
    stats: FlushStats,
}

impl<'a, A> X86Mmu<'a, A>
where
    A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>,
{
    /// A backend over `tables` (whose physical-memory offset maps all page-table frames and all
    /// frames `frames` hands out) and `frames`.
    #[must_use]
    pub fn new(tables: &'a Mutex<OffsetPageTable<'static>>, frames: &'a Mutex<A>) -> Self {
        X86Mmu {
            tables,
            frames,
            free_count: None,
            stats: FlushStats::default(),
        }
    }

    /// Lets [`Mmu::free_frames`] report the allocator's free count.
    #[must_use]
    pub fn with_free_count(mut self, count: fn(&A) -> usize) -> Self {
        self.free_count = Some(count);
        self
    }

    fn page(addr: usize) -> Result<Page<Size4KiB>, MmuError> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(MmuError::Unaligned { addr });
        }
        let va = VirtAddr::try_new(addr as u64).map_err(|_| MmuError::OutOfRange { addr })?;
        Ok(Page::containing_address(va))
    }

    /// The four entries on the walk to `addr` (None past a non-present level).
    fn walk(&self, tables: &OffsetPageTable<'static>, addr: usize) -> [Option<u64>; 4] {
        let mut out = [None; 4];
        let Ok(va) = VirtAddr::try_new(addr as u64) else {
            return out;
        };
        let indices = [va.p4_index(), va.p3_index(), va.p2_index(), va.p1_index()];
        let offset = tables.phys_offset();
        let mut table: &PageTable = tables.level_4_table();
        for (level, index) in indices.into_iter().enumerate() {
            let entry = table[index].flags().bits() | table[index].addr().as_u64();
            out[level] = Some(entry);
            if entry & PTE_PRESENT == 0 || level == 3 || entry & HUGE != 0 {
                if entry & PTE_PRESENT == 0 {
                    out[level] = None;
                }
                break;
            }
            let next = offset + (entry & PTE_ADDR_MASK);
            // SAFETY: a present non-leaf entry points at a page-table frame, which the
            // physical-memory offset maps; we only read it while holding the table lock.
            table = unsafe { &*next.as_ptr::<PageTable>() };
        }
        out
    }

    fn mapping_of(entries: [Option<u64>; 4]) -> Option<PageMapping> {
        let leaf = entries[3]?;
        let all = entries.iter().flatten();
        Some(PageMapping {
            frame: leaf & PTE_ADDR_MASK,
            writable: all.clone().all(|e| e & PTE_WRITABLE != 0),
            executable: all.clone().all(|e| e & PTE_NO_EXECUTE == 0),
            intermediate_nx: entries[..3]
                .iter()
                .flatten()
                .any(|e| e & PTE_NO_EXECUTE != 0),
        })
    }

    /// The raw entries on the walk to `addr`: PML4, PDPT, PD, PT (None past a non-present level).
    #[must_use]
    pub fn raw_entries(&self, addr: usize) -> [Option<u64>; 4] {
        let tables = self.tables.lock();
        self.walk(&tables, addr)
    }

    fn set_leaf_flags(
        tables: &mut OffsetPageTable<'static>,
        page: Page<Size4KiB>,
        flags: Flags,
    ) -> Result<(), MmuError> {
        // SAFETY: only the protection bits of a mapped code page change; the frame stays.
        unsafe { tables.update_flags(page, flags) }
            .map(|f| f.ignore())
            .map_err(|_| MmuError::NotMapped {
                page: page.start_address().as_u64() as usize,
            })
    }

    /// Maps `page` RW+NX to `frame`, or to a fresh zeroed frame when `None`. Takes exactly the
    /// frames the mapping needs (missing page tables, the fresh frame) before touching the
    /// tables, so it either succeeds or changes nothing; an alias over existing tables takes none.
    fn map_leaf(&mut self, page: usize, frame: Option<PhysFrame>) -> Result<(), MmuError> {
        let p = Self::page(page)?;
        let mut tables = self.tables.lock();
        let entries = self.walk(&tables, page);
        if entries[3].is_some() {
            return Err(MmuError::AlreadyMapped { page });
        }
        if entries[..3].iter().flatten().any(|e| e & HUGE != 0) {
            return Err(MmuError::HugePage { page });
        }
        // A missing PML4, PDPT or PD entry means a PDPT, PD or PT to create.
        let missing_tables = entries[..3].iter().filter(|e| e.is_none()).count();
        let mut frames = self.frames.lock();
        let needed = missing_tables + usize::from(frame.is_none());
        let mut reserve = Reserve::take(&mut *frames, needed).ok_or(MmuError::OutOfFrames)?;
        let (frame, fresh) = match frame {
            Some(f) => (f, false),
            None => (reserve.allocate_frame().ok_or(MmuError::OutOfFrames)?, true),
        };
        if fresh {
            let zero = tables.phys_offset() + frame.start_address().as_u64();
            // SAFETY: the frame was just allocated and is reachable through the physical-memory
            // offset; nothing else refers to it yet.
            unsafe { core::ptr::write_bytes(zero.as_mut_ptr::<u8>(), 0, PAGE_SIZE) };
        }
        let flags = Flags::from_bits_truncate(Protection::ReadWrite.leaf_flags());
        // SAFETY: `page` is unmapped (checked above). A fresh frame aliases nothing; an alias
        // frame is mapped elsewhere on purpose (a writable, non-executable view of code) and the
        // caller unmaps the alias before the frame is freed. Intermediate tables get
        // PRESENT|WRITABLE and never NX.
        let result = unsafe {
            tables.map_to_with_table_flags(
                p,
                frame,
                flags,
                Flags::PRESENT | Flags::WRITABLE,
                &mut reserve,
            )
        };
        match result {
            Ok(f) => {
                f.ignore();
                Ok(())
            }
            Err(e) => {
                if fresh {
                    // SAFETY: the fresh frame was not mapped.
                    unsafe { reserve.source.deallocate_frame(frame) };
                }
                Err(match e {
                    MapToError::FrameAllocationFailed => MmuError::OutOfFrames,
                    MapToError::ParentEntryHugePage => MmuError::HugePage { page },
                    MapToError::PageAlreadyMapped(_) => MmuError::AlreadyMapped { page },
                })
            }
        }
    }

    /// Checks that every page of `[addr, addr + len)` is mapped writable.
    fn check_writable(&self, addr: usize, len: usize) -> Result<(), MmuError> {
        let range =
            AddressRange::from_start_size(addr, len).ok_or(MmuError::OutOfRange { addr })?;
        for page in range.pages() {
            match self.query(page) {
                None => return Err(MmuError::NotMapped { page }),
                Some(m) if !m.writable => return Err(MmuError::NotWritable { page }),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// A handful of frames taken up front, so a mapping either gets every frame it needs or fails
/// before touching the tables.
struct Reserve<'r, A: FrameDeallocator<Size4KiB>> {
    frames: [Option<PhysFrame>; FRAMES_PER_MAPPING],
    source: &'r mut A,
}

impl<'r, A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>> Reserve<'r, A> {
    /// Takes `n` (at most [`FRAMES_PER_MAPPING`]) frames, or none at all.
    fn take(source: &'r mut A, n: usize) -> Option<Self> {
        let mut r = Reserve {
            frames: [None; FRAMES_PER_MAPPING],
            source,
        };
        for slot in r.frames.iter_mut().take(n) {
            *slot = Some(r.source.allocate_frame()?);
        }
        Some(r)
    }
}

// SAFETY: hands out frames the source allocator gave us and nobody else holds.
unsafe impl<A: FrameDeallocator<Size4KiB>> FrameAllocator<Size4KiB> for Reserve<'_, A> {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        self.frames.iter_mut().find_map(Option::take)
    }
}

impl<A: FrameDeallocator<Size4KiB>> Drop for Reserve<'_, A> {
    fn drop(&mut self) {
        for frame in self.frames.iter_mut().filter_map(Option::take) {
            // SAFETY: the frame came from `source` and was never mapped.
            unsafe { self.source.deallocate_frame(frame) };
        }
    }
}

impl<A> Mmu for X86Mmu<'_, A>
where
    A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>,
{
    fn check_protection_support(&self) -> Result<(), MmuError> {
        if !Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE) {
            return Err(MmuError::NoExecuteDisabled);
        }
        if !Cr0::read().contains(Cr0Flags::WRITE_PROTECT) {
            return Err(MmuError::WriteProtectDisabled);
        }
        Ok(())
    }

    fn map_fresh(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        // A not-present entry is never cached (SDM 4.10.2.3): mapping needs no invalidation.
        let _ = tlb;
        self.map_leaf(page, None)
    }

    fn unmap(&mut self, page: usize, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        let p = Self::page(page)?;
        let mut tables = self.tables.lock();
        let (frame, flush) = tables.unmap(p).map_err(|e| match e {
            UnmapError::ParentEntryHugePage => MmuError::HugePage { page },
            _ => MmuError::NotMapped { page },
        })?;
        flush.ignore();
        tlb.add(page);
        // SAFETY: the frame was this page's only mapping (map_fresh gave it out) and is unmapped.
        unsafe { self.frames.lock().deallocate_frame(frame) };
        Ok(())
    }

    fn protect(
        &mut self,
        page: usize,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        let p = Self::page(page)?;
        let mut tables = self.tables.lock();
        let leaf = self.walk(&tables, page)[3].ok_or(MmuError::NotMapped { page })?;
        let current = Flags::from_bits_truncate(leaf & !PTE_ADDR_MASK);
        let rights = Flags::WRITABLE | Flags::NO_EXECUTE;
        let target = (current - rights) | Flags::from_bits_truncate(prot.leaf_flags());
        if current & rights == target & rights {
            return Ok(());
        }
        // Never W+X on the way: NX goes on before W, W comes off before NX.
        let step = match prot {
            Protection::ReadWrite => current | Flags::NO_EXECUTE,
            Protection::ReadExecute => current - Flags::WRITABLE,
        };
        Self::set_leaf_flags(&mut tables, p, step)?;
        Self::set_leaf_flags(&mut tables, p, target)?;
        tlb.add(page);
        Ok(())
    }

    fn query(&self, page: usize) -> Option<PageMapping> {
        let tables = self.tables.lock();
        Self::mapping_of(self.walk(&tables, page & !(PAGE_SIZE - 1)))
    }

    fn for_each_mapping(&self, range: AddressRange, f: &mut dyn FnMut(usize, PageMapping)) {
        let tables = self.tables.lock();
        let mut addr = range.start() & !(PAGE_SIZE - 1);
        while addr < range.end() {
            let entries = self.walk(&tables, addr);
            // Skip a whole absent subtree: the first None level tells its span.
            let span = match entries.iter().position(Option::is_none) {
                Some(0) => 1usize << 39,
                Some(1) => 1 << 30,
                Some(2) => 1 << 21,
                _ => PAGE_SIZE,
            };
            if let Some(m) = Self::mapping_of(entries) {
                f(addr, m);
            }
            match (addr & !(span - 1)).checked_add(span) {
                Some(next) => addr = next,
                None => break,
            }
        }
    }

    fn map_alias(&mut self, alias: usize, frame: u64, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        // Not-present entries are never cached: nothing to invalidate.
        let _ = tlb;
        let frame = PhysFrame::containing_address(PhysAddr::new(frame));
        self.map_leaf(alias, Some(frame))
    }

    fn unmap_alias(&mut self, alias: usize, tlb: &mut TlbFlush) -> Result<(), MmuError> {
        let p = Self::page(alias)?;
        let mut tables = self.tables.lock();
        let (_, flush) = tables
            .unmap(p)
            .map_err(|_| MmuError::NotMapped { page: alias })?;
        flush.ignore();
        tlb.add(alias);
        Ok(())
    }

    fn write(&mut self, addr: usize, data: &[u8]) -> Result<(), MmuError> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_writable(addr, data.len())?;
        // SAFETY: every destination page is mapped writable in the current address space
        // (checked above) and belongs to code the caller owns.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
        Ok(())
    }

    fn write_u64_atomic(&mut self, addr: usize, value: u64) -> Result<(), MmuError> {
        if !addr.is_multiple_of(8) {
            return Err(MmuError::Unaligned { addr });
        }
        self.check_writable(addr, 8)?;
        // SAFETY: aligned, mapped writable (checked); an AtomicU64 store is one `mov` qword.
        unsafe { AtomicU64::from_ptr(addr as *mut u64).store(value, Ordering::SeqCst) };
        Ok(())
    }

    fn read(&self, addr: usize, buf: &mut [u8]) -> Result<(), MmuError> {
        if buf.is_empty() {
            return Ok(());
        }
        let range =
            AddressRange::from_start_size(addr, buf.len()).ok_or(MmuError::OutOfRange { addr })?;
        for page in range.pages() {
            self.query(page).ok_or(MmuError::NotMapped { page })?;
        }
        // SAFETY: every source page is mapped (checked above).
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn flush(&mut self, tlb: TlbFlush) {
        if tlb.is_full() {
            x86_64::instructions::tlb::flush_all();
            self.stats.full += 1;
        } else {
            for &page in tlb.pages() {
                x86_64::instructions::tlb::flush(VirtAddr::new(page as u64));
                self.stats.single_pages += 1;
            }
        }
    }

    fn serialize(&self) {
        // cpuid is serializing on every x86-64 CPU (`serialize` is newer and not universal).
        let _ = core::arch::x86_64::__cpuid(0);
    }

    fn flush_stats(&self) -> FlushStats {
        self.stats
    }

    fn free_frames(&self) -> Option<usize> {
        self.free_count.map(|count| count(&self.frames.lock()))
    }
}
