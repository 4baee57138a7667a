//! Physical memory: the direct map, the frame allocator, the active page table and the heap.

pub mod layout;
pub mod wx_audit;

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use spin::Once;
use talc::base::Talc;
use talc::source::Manual;
use talc::DefaultBinning;

use codespace::mmu::x86::{IrqMutex, IrqMutexGuard};
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags,
    PhysFrame, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use crate::cpu::percpu::PerCpu;

/// Where all physical memory below [`PHYS_MAPPED_LIMIT`] is mapped (PML4 slot 256), like
/// `bootloader_api`'s `physical_memory_offset`.
pub const PHYS_OFFSET: u64 = 0xFFFF_8000_0000_0000;
/// Physical memory mapped by the boot page tables (and so usable by the frame allocator).
pub const PHYS_MAPPED_LIMIT: u64 = 4 << 30;
/// A PML4 slot (320) that nothing maps at boot: tests map scratch pages here.
pub const SCRATCH_BASE: u64 = 0xFFFF_A000_0000_0000;
/// A PML4 slot (288) for the APs' stacks, each with an unmapped guard page below it.
pub const STACKS_BASE: u64 = 0xFFFF_9000_0000_0000;
/// Size of the kernel heap.
pub const HEAP_SIZE: usize = 16 << 20;

const FRAME_SIZE: u64 = 4096;
const MAX_FRAMES: usize = (PHYS_MAPPED_LIMIT / FRAME_SIZE) as usize;
const BITMAP_WORDS: usize = MAX_FRAMES / 64;

/// Virtual address of physical address `phys` in the direct map.
#[must_use]
pub fn phys_to_virt(phys: PhysAddr) -> VirtAddr {
    VirtAddr::new(PHYS_OFFSET + phys.as_u64())
}

/// Physical frames, one bit each (1 = free), over the first 4 GiB.
pub struct FrameBitmap {
    words: [u64; BITMAP_WORDS],
    free: usize,
    usable: usize,
    next_word: usize,
}

impl FrameBitmap {
    const fn new() -> Self {
        FrameBitmap {
            words: [0; BITMAP_WORDS],
            free: 0,
            usable: 0,
            next_word: 0,
        }
    }

    /// Marks the whole frames inside `[start, end)` free.
    pub(crate) fn add_usable(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(FRAME_SIZE);
        let last = end.min(PHYS_MAPPED_LIMIT) / FRAME_SIZE;
        for frame in first..last {
            if self.set(frame as usize, true) {
                self.usable += 1;
            }
        }
    }

    /// Marks every frame touching `[start, end)` used (kernel image, boot structures).
    pub(crate) fn reserve(&mut self, start: u64, end: u64) {
        let first = start / FRAME_SIZE;
        let last = end.min(PHYS_MAPPED_LIMIT).div_ceil(FRAME_SIZE);
        for frame in first..last {
            if self.set(frame as usize, false) {
                self.usable -= 1;
            }
        }
    }

    /// Sets frame `index` to `free`; returns whether that changed it.
    fn set(&mut self, index: usize, free: bool) -> bool {
        let (w, b) = (index / 64, index % 64);
        let was_free = self.words[w] & (1 << b) != 0;
        if was_free == free {
            return false;
        }
        self.words[w] ^= 1 << b;
        if free {
            self.free += 1;
        } else {
            self.free -= 1;
        }
        true
    }

    /// Number of frames free now.
    #[must_use]
    pub fn free_frames(&self) -> usize {
        self.free
    }

    /// Number of frames the allocator manages (free or handed out).
    #[must_use]
    pub fn usable_frames(&self) -> usize {
        self.usable
    }

    /// Whether `frame` is currently free.
    #[must_use]
    pub fn is_free(&self, frame: PhysFrame) -> bool {
        let index = (frame.start_address().as_u64() / FRAME_SIZE) as usize;
        index < MAX_FRAMES && self.words[index / 64] & (1 << (index % 64)) != 0
    }
}

// SAFETY: a frame's bit is cleared when it is handed out and set only when it comes back, so no
// frame is handed out twice; only RAM the memory map calls available is ever marked free.
unsafe impl FrameAllocator<Size4KiB> for FrameBitmap {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        for i in 0..BITMAP_WORDS {
            let w = (self.next_word + i) % BITMAP_WORDS;
            if self.words[w] != 0 {
                let index = w * 64 + self.words[w].trailing_zeros() as usize;
                self.set(index, false);
                self.next_word = w;
                return Some(PhysFrame::containing_address(PhysAddr::new(
                    index as u64 * FRAME_SIZE,
                )));
            }
        }
        None
    }
}

impl FrameDeallocator<Size4KiB> for FrameBitmap {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        let index = (frame.start_address().as_u64() / FRAME_SIZE) as usize;
        assert!(
            index < MAX_FRAMES,
            "frame {frame:?} is outside the managed memory"
        );
        assert!(self.set(index, true), "double free of frame {frame:?}");
    }
}

/// Bitmap words of one 2 MiB frame (512 frames of 4 KiB).
const HUGE_WORDS: usize = 512 / 64;

impl FrameBitmap {
    /// Takes the highest wholly free 2 MiB aligned run: 4 KiB frames are taken from the bottom
    /// up, so whole runs last longest at the top. All 512 bits are cleared, so none of its
    /// frames is handed out again until [`deallocate_huge`](Self::deallocate_huge).
    fn allocate_huge(&mut self) -> Option<PhysFrame<Size2MiB>> {
        let run = (0..BITMAP_WORDS / HUGE_WORDS).rev().find(|&r| {
            self.words[r * HUGE_WORDS..(r + 1) * HUGE_WORDS]
                .iter()
                .all(|&w| w == u64::MAX)
        })?;
        self.words[run * HUGE_WORDS..(run + 1) * HUGE_WORDS].fill(0);
        self.free -= 512;
        Some(PhysFrame::containing_address(PhysAddr::new(
            (run * 512) as u64 * FRAME_SIZE,
        )))
    }

    fn deallocate_huge(&mut self, frame: PhysFrame<Size2MiB>) {
        let first = (frame.start_address().as_u64() / FRAME_SIZE) as usize;
        assert!(
            first + 512 <= MAX_FRAMES,
            "frame {frame:?} is outside the managed memory"
        );
        for index in first..first + 512 {
            assert!(self.set(index, true), "double free in frame {frame:?}");
        }
    }
}

/// 2 MiB frames out of the kernel's one frame bitmap (for ROX code, see
/// `X86Mmu::with_huge_frames`): each call takes the bitmap's lock, after this adapter's.
pub struct HugeFrames;

// SAFETY: `allocate_huge` hands out a 2 MiB aligned run none of whose frames is handed out again
// (by either size) until it comes back; only RAM the memory map calls available is free.
unsafe impl FrameAllocator<Size2MiB> for HugeFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size2MiB>> {
        frames().allocate_huge()
    }
}

impl FrameDeallocator<Size2MiB> for HugeFrames {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size2MiB>) {
        frames().deallocate_huge(frame);
    }
}

static HUGE_FRAMES: IrqMutex<HugeFrames> = IrqMutex::new(HugeFrames);

/// The 2 MiB frame allocator's lock (taken before the frame bitmap's).
pub fn huge_frames_lock() -> &'static IrqMutex<HugeFrames> {
    &HUGE_FRAMES
}

impl fmt::Debug for FrameBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameBitmap")
            .field("free", &self.free)
            .field("usable", &self.usable)
            .finish()
    }
}

static FRAMES: IrqMutex<FrameBitmap> = IrqMutex::new(FrameBitmap::new());
static PAGE_TABLE: Once<IrqMutex<OffsetPageTable<'static>>> = Once::new();

#[global_allocator]
static ALLOCATOR: KernelHeap = KernelHeap {
    heap: spin::Mutex::new(Talc::new(Manual)),
    peak: AtomicUsize::new(0),
};

/// How many heap operations each CPU is inside (the NMI that stops a timed-out work item waits
/// until its CPU holds no heap lock, or the heap would stay locked for everyone).
static IN_HEAP: PerCpu<AtomicU32> = crate::per_cpu!(AtomicU32::new(0));

/// The heap: counts per CPU who is inside it, keeps interrupts off while its lock is held (so
/// an interrupt handler that allocates, such as a tier-up compile, never finds the heap locked
/// by the code it interrupted), and remembers the most bytes it ever had in use.
///
/// The allocator is `talc` (segregated free lists, O(1) bins): the earlier `linked_list_allocator`
/// walks one free list per operation, and with the 10^4 live allocations of a large module
/// each operation cost ~10^5 cycles, 97 % of the module-load benchmark.
type RawHeap = spin::Mutex<Talc<Manual, DefaultBinning>>;

struct KernelHeap {
    heap: RawHeap,
    peak: AtomicUsize,
}

impl KernelHeap {
    fn enter<R>(&self, f: impl FnOnce(&RawHeap) -> R) -> R {
        let count = IN_HEAP.this();
        count.fetch_add(1, Ordering::SeqCst);
        let r = x86_64::instructions::interrupts::without_interrupts(|| f(&self.heap));
        count.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

// SAFETY: allocation and deallocation are `talc`'s, under its lock; `GlobalAlloc` callers pass a
// non-zero size (what `Talc::allocate` needs) and give back only what `alloc` returned for the
// same layout (what `Talc::deallocate` needs). The peak is read under the same lock.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.enter(|h| {
            let mut heap = h.lock();
            // SAFETY: `layout.size()` is non-zero (the `GlobalAlloc::alloc` contract).
            let ptr =
                unsafe { heap.allocate(layout) }.map_or(core::ptr::null_mut(), NonNull::as_ptr);
            self.peak
                .fetch_max(heap.counters().allocated_bytes, Ordering::Relaxed);
            ptr
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !ptr.is_null() {
            // SAFETY: the caller passes memory `alloc` returned for `layout`.
            self.enter(|h| unsafe { h.lock().deallocate(ptr, layout) });
        }
    }
}

/// Whether this CPU is inside a heap operation.
pub(crate) fn in_heap() -> bool {
    IN_HEAP.this().load(Ordering::SeqCst) != 0
}

#[repr(C, align(4096))]
struct HeapSpace([u8; HEAP_SIZE]);
static mut HEAP_SPACE: HeapSpace = HeapSpace([0; HEAP_SIZE]);

/// The physical frame allocator.
pub fn frames() -> IrqMutexGuard<'static, FrameBitmap> {
    FRAMES.lock()
}

/// The frame allocator's lock itself, for backends that lock per operation.
pub fn frames_lock() -> &'static IrqMutex<FrameBitmap> {
    &FRAMES
}

/// The page table's lock itself, for backends that lock per operation.
///
/// # Panics
/// Before the boot path called `init`.
pub fn page_table_lock() -> &'static IrqMutex<OffsetPageTable<'static>> {
    PAGE_TABLE.get().expect("memory::init has run")
}

/// The active page table, editable through the direct map.
///
/// # Panics
/// Before the boot path called `init`.
pub fn page_table() -> IrqMutexGuard<'static, OffsetPageTable<'static>> {
    PAGE_TABLE.get().expect("memory::init has run").lock()
}

/// Sets up the frame allocator from `usable` RAM minus `reserved`, the page table and the heap.
pub(crate) fn init(usable: impl Iterator<Item = (u64, u64)>, reserved: &[(u64, u64)]) {
    let mut frames = FRAMES.lock();
    for (start, end) in usable {
        frames.add_usable(start.max(1 << 20), end);
    }
    for &(start, end) in reserved {
        frames.reserve(start, end);
    }
    drop(frames);

    PAGE_TABLE.call_once(|| {
        let (pml4, _) = Cr3::read();
        let table = phys_to_virt(pml4.start_address()).as_mut_ptr::<PageTable>();
        // SAFETY: CR3 holds the boot PML4, mapped through the direct map for the kernel's
        // lifetime; this is the only `&mut` to it, kept behind the mutex.
        unsafe {
            IrqMutex::new(OffsetPageTable::new(
                &mut *table,
                VirtAddr::new(PHYS_OFFSET),
            ))
        }
    });

    crate::memory::layout::build();

    // SAFETY: HEAP_SPACE is a static used by nothing but the allocator, claimed once here.
    let claimed = unsafe {
        ALLOCATOR
            .heap
            .lock()
            .claim((&raw mut HEAP_SPACE).cast::<u8>(), HEAP_SIZE)
    };
    assert!(claimed.is_some(), "the heap space holds talc's metadata");
}

/// Maps a fresh, zeroed frame at the 4 KiB page `va` with `flags` (outside the code window: test
/// scratch pages, a demo's linear memory).
///
/// # Errors
/// No free frame, or the page is mapped already (or under a huge page).
pub fn map_fresh_page(va: u64, flags: PageTableFlags) -> Result<PhysFrame, &'static str> {
    let page =
        Page::<Size4KiB>::from_start_address(VirtAddr::new(va)).map_err(|_| "unaligned page")?;
    let mut tables = page_table();
    let mut frames = frames();
    let frame = frames.allocate_frame().ok_or("no free frame")?;
    // SAFETY: the frame was just allocated, so nothing else uses it; it is zeroed through the
    // direct map before it becomes visible at `va`.
    unsafe {
        core::ptr::write_bytes(
            phys_to_virt(frame.start_address()).as_mut_ptr::<u8>(),
            0,
            4096,
        );
        match tables.map_to(page, frame, flags, &mut *frames) {
            Ok(flush) => flush.flush(),
            Err(_) => {
                frames.deallocate_frame(frame);
                return Err("page already mapped");
            }
        }
    }
    Ok(frame)
}

/// Maps `pages` fresh zeroed frames RW+NX ending at `top` (page-aligned), with the page below
/// them left unmapped as a guard: an overflow faults instead of running into other memory.
/// Returns `top`. Used for the APs' kernel and IST stacks at [`STACKS_BASE`].
///
/// # Errors
/// No free frame, or a page already mapped.
pub fn map_stack(top: u64, pages: u64) -> Result<VirtAddr, &'static str> {
    for i in 1..=pages {
        map_fresh_page(
            top - i * 4096,
            PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE,
        )?;
    }
    Ok(VirtAddr::new(top))
}

/// The raw entries on the walk to `va`: PML4, PDPT, PD, PT (`None` from the first non-present
/// level, and past a huge leaf), read through the direct map, for tests and diagnostics.
#[must_use]
pub fn raw_entries(va: u64) -> [Option<u64>; 4] {
    let tables = page_table();
    let mut out = [None; 4];
    let mut table: &PageTable = tables.level_4_table();
    let indices = [
        (va >> 39) & 511,
        (va >> 30) & 511,
        (va >> 21) & 511,
        (va >> 12) & 511,
    ];
    for (level, &i) in indices.iter().enumerate() {
        let e = &table[i as usize];
        if !e.flags().contains(PageTableFlags::PRESENT) {
            break;
        }
        out[level] = Some(e.flags().bits() | e.addr().as_u64());
        if level == 3 || e.flags().contains(PageTableFlags::HUGE_PAGE) {
            break;
        }
        // SAFETY: a present non-leaf entry points at a page-table frame, mapped by the direct
        // map; the page-table lock is held while reading it.
        table = unsafe { &*phys_to_virt(e.addr()).as_ptr::<PageTable>() };
    }
    out
}

/// The present leaf entry (4 KiB, 2 MiB or 1 GiB) mapping `va`, for diagnostics.
#[must_use]
pub fn leaf_entry(va: u64) -> Option<u64> {
    let entries = raw_entries(va);
    let last = entries.iter().rposition(Option::is_some)?;
    let e = entries[last]?;
    (last == 3 || e & PageTableFlags::HUGE_PAGE.bits() != 0).then_some(e)
}

/// The size of the present leaf mapping `va` (4 KiB, 2 MiB or 1 GiB): how much one iTLB
/// entry for it covers.
#[must_use]
pub fn leaf_size(va: u64) -> Option<u64> {
    let entries = raw_entries(va);
    let last = entries.iter().rposition(Option::is_some)?;
    let e = entries[last]?;
    match last {
        3 => Some(4 << 10),
        2 if e & PageTableFlags::HUGE_PAGE.bits() != 0 => Some(2 << 20),
        1 if e & PageTableFlags::HUGE_PAGE.bits() != 0 => Some(1 << 30),
        _ => None,
    }
}

/// Bytes of heap in use and free.
#[must_use]
pub fn heap_usage() -> (usize, usize) {
    ALLOCATOR.enter(|h| {
        let heap = h.lock();
        let c = heap.counters();
        (c.allocated_bytes, c.available_bytes)
    })
}

/// Most heap bytes in use at once since the last [`reset_heap_peak`] (or boot).
#[must_use]
pub fn heap_peak() -> usize {
    ALLOCATOR.peak.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the bytes in use now; returns them.
pub fn reset_heap_peak() -> usize {
    ALLOCATOR.enter(|h| {
        let used = h.lock().counters().allocated_bytes;
        ALLOCATOR.peak.store(used, Ordering::Relaxed);
        used
    })
}
