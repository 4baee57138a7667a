//! One registered code range of the trap table, in one allocation:
//!
//! ```text
//! header    serial u64 | code size u32 | landing-pad offset u32 | count u32 | flags u32   24 B
//! [fault]   accepted fault-address range: start, end (usize each)   only with FAULT_RANGE 16 B
//! offsets   count protected offsets, sorted: u16 when the code is at most 64 KiB, else u32
//! ```
//! A function of 32 protected loads under 64 KiB takes 24 + 64 bytes. The index stores a thin
//! pointer to the header; lookups read the header line, then binary-search the offsets.

use alloc::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::index::IndexValue;
use crate::range::AddressRange;

#[repr(C)]
struct Header {
    serial: u64,
    size: u32,
    landing: u32,
    count: u32,
    flags: u32,
}

/// The offsets are `u16`.
const NARROW: u32 = 1;
/// An accepted fault-address range follows the header.
const FAULT_RANGE: u32 = 2;

/// The allocation's layout and where the offsets start in it.
fn layout(count: usize, flags: u32) -> (Layout, usize) {
    let mut l = Layout::new::<Header>();
    if flags & FAULT_RANGE != 0 {
        l = extend(l, Layout::new::<[usize; 2]>()).0;
    }
    let width = if flags & NARROW != 0 { 2 } else { 4 };
    // `count` is at most the code size, which is below 2^32: no overflow on 64-bit targets.
    let offsets = Layout::from_size_align(count * width, width).unwrap_or(Layout::new::<u32>());
    let (l, at) = extend(l, offsets);
    (l.pad_to_align(), at)
}

fn extend(l: Layout, next: Layout) -> (Layout, usize) {
    // Sizes here are far below `isize::MAX` (see `layout`); the fallback is unreachable.
    l.extend(next).unwrap_or((l, l.size()))
}

/// What a registration stores: validated by the trap table before it gets here.
pub(super) struct NewEntry<'a> {
    pub(super) serial: u64,
    /// Code size, `<= u32::MAX`.
    pub(super) size: u32,
    /// Landing pad offset, below `size`.
    pub(super) landing: u32,
    pub(super) fault_range: Option<AddressRange>,
    /// Sorted, distinct, below `size`.
    pub(super) offsets: &'a [u32],
}

/// Owner of one entry allocation (the index keeps it as a raw pointer).
pub(super) struct EntryBox(NonNull<Header>);

// SAFETY: the allocation is never written after construction; it is plain data.
unsafe impl Send for EntryBox {}
// SAFETY: as above.
unsafe impl Sync for EntryBox {}

impl EntryBox {
    pub(super) fn new(e: &NewEntry<'_>) -> EntryBox {
        let narrow = e.size <= 1 << 16;
        let flags = u32::from(narrow) * NARROW | u32::from(e.fault_range.is_some()) * FAULT_RANGE;
        let count = e.offsets.len();
        let (l, at) = layout(count, flags);
        // SAFETY: `l` has a non-zero size (the header).
        let base = unsafe { alloc(l) };
        let Some(base) = NonNull::new(base) else {
            handle_alloc_error(l)
        };
        let header = Header {
            serial: e.serial,
            size: e.size,
            landing: e.landing,
            count: count as u32,
            flags,
        };
        // SAFETY: `base` is a fresh allocation of layout `l`, which holds the header at 0, the
        // fault range right after it (when flagged) and `count` offsets of the flagged width at
        // `at`, each suitably aligned (`Layout::extend`).
        unsafe {
            base.cast::<Header>().write(header);
            if let Some(r) = e.fault_range {
                let p = base
                    .add(core::mem::size_of::<Header>())
                    .cast::<[usize; 2]>();
                p.write([r.start(), r.end()]);
            }
            let offsets = base.add(at);
            for (i, &o) in e.offsets.iter().enumerate() {
                if narrow {
                    // `o < size <= 2^16`.
                    offsets.cast::<u16>().add(i).write(o as u16);
                } else {
                    offsets.cast::<u32>().add(i).write(o);
                }
            }
        }
        EntryBox(base.cast())
    }

    fn view(&self) -> EntryRef<'_> {
        EntryRef {
            ptr: self.0,
            _borrow: PhantomData,
        }
    }
}

impl Drop for EntryBox {
    fn drop(&mut self) {
        let (l, _) = self.view().layout();
        // SAFETY: allocated in `new` with this layout (recomputed from the same header).
        unsafe { dealloc(self.0.as_ptr().cast(), l) };
    }
}

/// A borrowed entry.
#[derive(Clone, Copy)]
pub(super) struct EntryRef<'a> {
    ptr: NonNull<Header>,
    _borrow: PhantomData<&'a Header>,
}

/// The sorted protected offsets of an entry.
#[derive(Clone, Copy, Debug)]
pub(super) enum Offsets<'a> {
    Narrow(&'a [u16]),
    Wide(&'a [u32]),
}

impl<'a> EntryRef<'a> {
    fn header(&self) -> &'a Header {
        // SAFETY: the allocation outlives `'a` (whoever made this view guarantees it).
        unsafe { self.ptr.as_ref() }
    }

    fn layout(&self) -> (Layout, usize) {
        let h = self.header();
        layout(h.count as usize, h.flags)
    }

    pub(super) fn serial(&self) -> u64 {
        self.header().serial
    }

    pub(super) fn size(&self) -> usize {
        self.header().size as usize
    }

    pub(super) fn landing(&self) -> usize {
        self.header().landing as usize
    }

    /// The accepted fault-address range, if the registration gave one.
    pub(super) fn fault_range(&self) -> Option<AddressRange> {
        if self.header().flags & FAULT_RANGE == 0 {
            return None;
        }
        // SAFETY: flagged, so the range follows the header (see `new`); alive for `'a`.
        let [start, end] = unsafe {
            self.ptr
                .cast::<u8>()
                .add(core::mem::size_of::<Header>())
                .cast::<[usize; 2]>()
                .read()
        };
        Some(AddressRange::new(start, end))
    }

    pub(super) fn offsets(&self) -> Offsets<'a> {
        let h = self.header();
        let at = self.layout().1;
        // SAFETY: `count` offsets of the flagged width live at `at` (see `new`), initialized
        // and never written again; alive for `'a`.
        unsafe {
            let p = self.ptr.cast::<u8>().add(at);
            if h.flags & NARROW != 0 {
                Offsets::Narrow(core::slice::from_raw_parts(
                    p.cast::<u16>().as_ptr(),
                    h.count as usize,
                ))
            } else {
                Offsets::Wide(core::slice::from_raw_parts(
                    p.cast::<u32>().as_ptr(),
                    h.count as usize,
                ))
            }
        }
    }

    /// Whether `offset` is protected. Binary search; panic-free.
    #[inline]
    pub(super) fn is_protected(&self, offset: u32) -> bool {
        match self.offsets() {
            Offsets::Narrow(o) => u16::try_from(offset).is_ok_and(|x| o.binary_search(&x).is_ok()),
            Offsets::Wide(o) => o.binary_search(&offset).is_ok(),
        }
    }

    /// Bytes of the allocation: `(header and fault range, offsets)`.
    pub(super) fn bytes(&self) -> (usize, usize) {
        let (l, at) = self.layout();
        (at, l.size() - at)
    }
}

// SAFETY: `into_raw`/`from_raw` hand the pointer over without touching the allocation, which
// never moves; views only read.
unsafe impl IndexValue for EntryBox {
    type View<'a> = EntryRef<'a>;

    fn into_raw(self) -> NonNull<()> {
        let p = self.0.cast();
        core::mem::forget(self);
        p
    }

    unsafe fn from_raw(p: NonNull<()>) -> Self {
        EntryBox(p.cast())
    }

    unsafe fn view<'a>(p: NonNull<()>) -> EntryRef<'a> {
        EntryRef {
            ptr: p.cast(),
            _borrow: PhantomData,
        }
    }

    fn end(view: EntryRef<'_>, start: usize) -> usize {
        start + view.size()
    }

    fn heap_bytes(view: EntryRef<'_>) -> usize {
        let (head, offsets) = view.bytes();
        head + offsets
    }
}
