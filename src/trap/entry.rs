//! One registered code range of the trap table, in one allocation:
//!
//! ```text
//! header    code size u32 | landing-pad offset u32 | count u32 | flags u32 | serial u64   24 B
//! [fault]   accepted fault-address range: start, end (usize each)   only with FAULT_RANGE 16 B
//! offsets   the protected offsets, sorted: u16 when the code is at most 64 KiB, else u32,
//!           padded to whole 8-byte words by repeating the last one
//! ```
//! A function of 32 protected loads under 64 KiB takes 24 + 64 bytes. The index stores a thin
//! pointer to the header. A lookup reads the header, then compares the offset against four
//! (or two) offsets per word at once, every word independently, so no load waits for another;
//! long lists are binary-searched instead.

use alloc::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::index::IndexValue;
use crate::range::AddressRange;

#[repr(C)]
struct Header {
    size: u32,
    landing: u32,
    count: u32,
    flags: u32,
    serial: u64,
}

/// The offsets are `u16`.
const NARROW: u32 = 1;
/// An accepted fault-address range follows the header.
const FAULT_RANGE: u32 = 2;
/// Longest offset list scanned word by word; longer ones are binary-searched.
const SCAN_MAX_WORDS: usize = 16;

/// Where the offsets start.
const fn offsets_at(flags: u32) -> usize {
    core::mem::size_of::<Header>() + if flags & FAULT_RANGE != 0 { 16 } else { 0 }
}

/// Offsets per 8-byte word.
const fn per_word(flags: u32) -> usize {
    if flags & NARROW != 0 {
        4
    } else {
        2
    }
}

/// The allocation's layout: header, fault range, `count` offsets in whole words.
fn layout(count: usize, flags: u32) -> Layout {
    let words = count.div_ceil(per_word(flags));
    // `count` is at most the code size, below 2^32: the size is far below `isize::MAX`, so the
    // fallback is unreachable.
    Layout::from_size_align(offsets_at(flags) + words * 8, 8).unwrap_or(Layout::new::<Header>())
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
        let flags =
            (u32::from(narrow) * NARROW) | (u32::from(e.fault_range.is_some()) * FAULT_RANGE);
        let count = e.offsets.len();
        let l = layout(count, flags);
        // SAFETY: `l` has a non-zero size (the header).
        let base = unsafe { alloc(l) };
        let Some(base) = NonNull::new(base) else {
            handle_alloc_error(l)
        };
        let header = Header {
            size: e.size,
            landing: e.landing,
            count: count as u32,
            flags,
            serial: e.serial,
        };
        let slots = count.div_ceil(per_word(flags)) * per_word(flags);
        // SAFETY: `base` is a fresh allocation of layout `l` (align 8): the header at 0, the
        // fault range at 24 when flagged, and `slots` offsets of the flagged width from
        // `offsets_at(flags)` to the end, each aligned.
        unsafe {
            base.cast::<Header>().write(header);
            if let Some(r) = e.fault_range {
                let p = base
                    .add(core::mem::size_of::<Header>())
                    .cast::<[usize; 2]>();
                p.write([r.start(), r.end()]);
            }
            let offsets = base.add(offsets_at(flags));
            // Padding repeats the last offset: matching it means matching a protected offset.
            let last = e.offsets.last().copied().unwrap_or(0);
            for i in 0..slots {
                let o = e.offsets.get(i).copied().unwrap_or(last);
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
        let l = self.view().layout();
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
    #[inline]
    fn header(&self) -> &'a Header {
        // SAFETY: the allocation outlives `'a` (whoever made this view guarantees it).
        unsafe { self.ptr.as_ref() }
    }

    fn layout(&self) -> Layout {
        let h = self.header();
        layout(h.count as usize, h.flags)
    }

    pub(super) fn serial(&self) -> u64 {
        self.header().serial
    }

    #[inline]
    pub(super) fn size(&self) -> usize {
        self.header().size as usize
    }

    #[inline]
    pub(super) fn landing(&self) -> usize {
        self.header().landing as usize
    }

    /// Starts loading the entry's second cache line together with the header, so the offsets
    /// arrive while the header is read (a prefetch never faults, even past a short entry).
    #[inline(always)]
    pub(super) fn prefetch(&self) {
        crate::index::prefetch(self.ptr.as_ptr().cast::<u8>().wrapping_add(64));
    }

    /// The accepted fault-address range, if the registration gave one.
    #[inline]
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

    /// The offsets as whole words (padding included).
    #[inline]
    fn words(&self) -> &'a [u64] {
        let h = self.header();
        let words = (h.count as usize).div_ceil(per_word(h.flags));
        // SAFETY: `words` initialized 8-byte words live at `offsets_at` (see `new`), 8-aligned,
        // never written again; alive for `'a`.
        unsafe {
            core::slice::from_raw_parts(
                self.ptr
                    .cast::<u8>()
                    .add(offsets_at(h.flags))
                    .cast::<u64>()
                    .as_ptr(),
                words,
            )
        }
    }

    /// The sorted protected offsets (without padding).
    #[inline]
    pub(super) fn offsets(&self) -> Offsets<'a> {
        let h = self.header();
        let p = self.words().as_ptr();
        // SAFETY: the words hold at least `count` offsets of the flagged width (see `new`).
        unsafe {
            if h.flags & NARROW != 0 {
                Offsets::Narrow(core::slice::from_raw_parts(p.cast(), h.count as usize))
            } else {
                Offsets::Wide(core::slice::from_raw_parts(p.cast(), h.count as usize))
            }
        }
    }

    /// Whether `offset` is protected. Short lists: every word compared at once (SWAR "has a
    /// zero lane" on `word ^ offset-in-every-lane`), no load depending on another; long ones:
    /// binary search. Panic-free.
    #[inline]
    pub(super) fn is_protected(&self, offset: u32) -> bool {
        let h = self.header();
        let narrow = h.flags & NARROW != 0;
        let words = self.words();
        if words.len() > SCAN_MAX_WORDS {
            return match self.offsets() {
                Offsets::Narrow(o) => {
                    u16::try_from(offset).is_ok_and(|x| o.binary_search(&x).is_ok())
                }
                Offsets::Wide(o) => o.binary_search(&offset).is_ok(),
            };
        }
        let (ones, highs) = if narrow {
            if offset > 0xFFFF {
                return false;
            }
            (0x0001_0001_0001_0001u64, 0x8000_8000_8000_8000u64)
        } else {
            (0x0000_0001_0000_0001u64, 0x8000_0000_8000_0000u64)
        };
        let pattern = u64::from(offset).wrapping_mul(ones);
        let mut zero_lanes = 0;
        for &w in words {
            let v = w ^ pattern;
            zero_lanes |= v.wrapping_sub(ones) & !v & highs;
        }
        zero_lanes != 0
    }

    /// Bytes of the allocation: `(header and fault range, offsets)`.
    pub(super) fn bytes(&self) -> (usize, usize) {
        let at = offsets_at(self.header().flags);
        (at, self.layout().size() - at)
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
