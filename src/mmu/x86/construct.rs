//! Building the backend (`new`, the linear maps, the 2 MiB frame source) and the frame reserve
//! a mapping takes up front.

use super::*;

impl<'a, R, M, A, F> X86Mmu<'a, R, M, A, F>
where
    R: RawMutex,
    M: Mapper<Size4KiB> + Translate,
    A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>,
    F: PageTableFrameMapping,
{
    /// A backend over the kernel's `tables` and `frames`; takes four frames for the private
    /// alias address space, which claims PML4 slot `poke_slot` there.
    ///
    /// # Errors
    /// [`MmuError::OutOfFrames`]; [`MmuError::OutOfRange`] for a slot past 511.
    ///
    /// # Safety
    /// - `tables` is the page table every CPU runs codespace operations, generated code and
    ///   lookups on (or shares its entries for the code window and the linear maps);
    /// - `phys` maps every page-table frame and every frame `frames` hands out, writable;
    /// - `frames` hands out frames nothing else uses, usable as code and as page tables;
    /// - `smp` keeps [`Smp`]'s promises;
    /// - nothing the kernel runs with interrupts disabled during a codespace operation touches
    ///   addresses in PML4 slot `poke_slot` (an unused lower-half slot such as 255 is ideal).
    pub unsafe fn new(
        tables: &'a Mutex<R, M>,
        frames: &'a Mutex<R, A>,
        phys: F,
        smp: &'a dyn Smp,
        poke_slot: usize,
    ) -> Result<Self, MmuError> {
        if poke_slot >= 512 {
            return Err(MmuError::OutOfRange { addr: poke_slot });
        }
        let poke = {
            let _tables = tables.lock();
            let mut frames = frames.lock();
            let mut taken = [0u64; 4];
            for i in 0..4 {
                match frames.allocate_frame() {
                    Some(f) => taken[i] = f.start_address().as_u64(),
                    None => {
                        for &f in &taken[..i] {
                            // SAFETY: allocated just above and not used.
                            unsafe { frames.deallocate_frame(frame(f)) };
                        }
                        return Err(MmuError::OutOfFrames);
                    }
                }
            }
            let view = Tables {
                phys: &phys,
                pml4: cpu::read_cr3() & ADDR,
            };
            PokeSpace::new(taken, poke_slot, &view)
        };
        Ok(X86Mmu {
            tables,
            frames,
            phys,
            smp,
            linear: &[],
            poke,
            free_count: None,
            stats: FlushStats::default(),
            owned: BTreeSet::new(),
            deferred: Vec::new(),
            huge: None,
            huge_frames: BTreeSet::new(),
            _tables: PhantomData,
        })
    }

    /// Also keeps the kernel's linear maps of physical memory (a direct map, an identity map)
    /// free of writable aliases of code frames: a frame's alias there becomes read-only before
    /// the frame becomes executable (splitting huge pages as needed), and writable again when
    /// the frame is unmapped.
    ///
    /// # Safety
    /// Each map really maps `[phys, phys + size)` at `virt` in `tables`, its entries may be
    /// split and edited by this backend under the page-table lock, and nothing accesses a
    /// code frame through it.
    #[must_use]
    pub unsafe fn with_linear_maps(mut self, maps: &'a [LinearMap]) -> Self {
        self.linear = maps;
        self
    }

    /// Gives the backend 2 MiB frames, for code on 2 MiB pages that are never writable
    /// ([`Mmu::map_rox`], the ROX mode of [`ManagerConfig::rox_code`](crate::ManagerConfig)).
    /// Without it `map_rox` answers [`MmuError::Unsupported`] and ROX code spaces fall back
    /// to 4 KiB pages.
    ///
    /// # Safety
    /// The kernel obligation of the ROX mode: `frames` hands out 2 MiB aligned frames that
    /// nothing else uses, usable as code, each mapped writable by the physical mapping `phys`
    /// given to [`new`](Self::new) (the INT3 fill goes through it) and, if anywhere else, only
    /// in linear maps given to [`with_linear_maps`](Self::with_linear_maps) (sealed read-only
    /// while the frame holds code).
    #[must_use]
    pub unsafe fn with_huge_frames(mut self, frames: &'a Mutex<R, dyn HugeFrames + 'a>) -> Self {
        self.huge = Some(frames);
        self
    }

    /// Lets [`Mmu::free_frames`] report the allocator's free count.
    #[must_use]
    pub fn with_free_count(mut self, count: fn(&A) -> usize) -> Self {
        self.free_count = Some(count);
        self
    }

    /// The page tables of the calling CPU, seen through the physical mapping.
    pub(super) fn view(&self) -> Tables<'_, F> {
        Tables {
            phys: &self.phys,
            pml4: cpu::read_cr3() & ADDR,
        }
    }

    /// The raw entries on the walk to `addr`: PML4, PDPT, PD, PT (`None` past a non-present or
    /// huge level). For tests and diagnostics.
    #[must_use]
    pub fn raw_entries(&self, addr: usize) -> [Option<u64>; 4] {
        let _guard = self.tables.lock();
        let view = self.view();
        let mut out = [None; 4];
        let mut table = view.table(view.pml4);
        for (level, slot) in out.iter_mut().enumerate() {
            let i = tables::index(addr as u64, level);
            // SAFETY: a table frame through the physical mapping, index < 512.
            let e = unsafe { table.add(i).read_volatile() };
            *slot = Some(e);
            if e & P == 0 || e & tables::PS != 0 {
                break;
            }
            table = view.table(e);
        }
        out
    }

    /// The leaf of a committed page: its own 4 KiB leaf, or the 2 MiB leaf (present or
    /// staged) of `map_rox` holding its frame at the page's offset.
    pub(super) fn mapped_leaf(
        view: &Tables<'_, F>,
        page: &CommittedPage,
    ) -> Result<Slot, MmuError> {
        match view.leaf(page.page() as u64) {
            Some(s)
                if s.level == 2
                    && s.get() & tables::PS != 0
                    && crate::mmu::pte::leaf_frame(s.get(), 2)
                        + (page.page() % crate::mmu::HUGE_PAGE_SIZE) as u64
                        == page.frame() =>
            {
                Ok(s)
            }
            _ => Self::leaf_of(view, page),
        }
    }

    /// The 4 KiB leaf of a committed page (present or staged, mapping its frame).
    pub(super) fn leaf_of(view: &Tables<'_, F>, page: &CommittedPage) -> Result<Slot, MmuError> {
        match view.leaf(page.page() as u64) {
            Some(s) if s.level == 3 && s.get() & ADDR == page.frame() => Ok(s),
            _ => Err(MmuError::NotMapped { page: page.page() }),
        }
    }

    /// Takes a zeroed frame for a split page table.
    pub(super) fn table_frame(&self, view: &Tables<'_, F>) -> Result<u64, MmuError> {
        let f = self
            .frames
            .lock()
            .allocate_frame()
            .ok_or(MmuError::OutOfFrames)?;
        let phys = f.start_address().as_u64();
        // SAFETY: a fresh frame from the allocator, reachable through the physical mapping.
        unsafe { core::ptr::write_bytes(view.table(phys), 0, 512) };
        Ok(phys)
    }
}

/// Frames the allocator gives for one mapping, taken up front so the mapping either gets all it
/// needs or fails before touching the tables.
pub(super) struct Reserve<'r, A: FrameDeallocator<Size4KiB>> {
    frames: [Option<PhysFrame>; 4],
    /// What it handed out, in order: the leaf's frame first, then tables the mapper built.
    pub(super) given: [Option<PhysFrame>; 4],
    pub(super) source: &'r mut A,
}

impl<'r, A: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB>> Reserve<'r, A> {
    pub(super) fn take(source: &'r mut A, n: usize) -> Option<Self> {
        let mut r = Reserve {
            frames: [None; 4],
            given: [None; 4],
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
        let f = self.frames.iter_mut().find_map(Option::take)?;
        if let Some(slot) = self.given.iter_mut().find(|g| g.is_none()) {
            *slot = Some(f);
        }
        Some(f)
    }
}

impl<A: FrameDeallocator<Size4KiB>> Drop for Reserve<'_, A> {
    fn drop(&mut self) {
        for f in self.frames.iter_mut().filter_map(Option::take) {
            // SAFETY: the frame came from `source` and was never mapped.
            unsafe { self.source.deallocate_frame(f) };
        }
    }
}
