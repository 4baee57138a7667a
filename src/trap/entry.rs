//! One registered code range of the trap table, in one allocation:
//!
//! ```text
//! header    code size u32 | landing-pad offset u32 | words u32 | flags u32         16 B
//! offsets   the protected offsets: u16 when the code is at most 64 KiB, else u32, padded to
//!           whole 8-byte words by repeating the last one; sorted when there are more than a
//!           scan covers (`scanned_whole`), else in the order given
//! serial    u64                                                                   8 B
//! [fault]   accepted fault-address ranges: start, end (usize each), as many as the flags'
//!           count (`FAULT_SHIFT`; none: any address)                     16 B each
//! [vectors] only with `VECTORS`: a u64 count, then the sites of other vectors than #PF as
//!           sorted u64 keys `offset << 8 | vector number` (see `vectors`)   8 B + 8 B each
//! ```
//! The #PF offsets are the only ones in the scanned words, so a page-fault lookup can never hit
//! an instruction registered for #UD or #DE; [`EntryRef::has_site`] binary-searches the keys
//! with the vector in them, so a #UD lookup never hits a #DE site either.
//! A function of 32 protected loads under 64 KiB takes 16 + 64 + 8 bytes; one accepted range
//! adds 16 (as when a registration had at most one), each further range 16 more. The index stores a
//! thin pointer to the header. The offsets always start at byte 16, so their loads need only the
//! entry pointer, not the header; what only `release` and the fault-address check read (serial,
//! fault range) goes after them. The header stores the number of offset words, which a lookup
//! dispatches on: one straight-line block per count up to 16 words compares the offset against
//! four (or two) offsets per word at once, every word independently; longer lists are
//! binary-searched.

use alloc::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::index::IndexValue;
use crate::range::AddressRange;

#[repr(C)]
struct Header {
    size: u32,
    landing: u32,
    /// Offset words (padding included): what a lookup dispatches on, without a division.
    words: u32,
    /// `NARROW`, the number of padding offsets from `PAD_SHIFT`, the number of accepted
    /// fault-address ranges from `FAULT_SHIFT`.
    flags: u32,
}

/// The offsets are `u16`.
const NARROW: u32 = 1;
/// Sites of other vectors follow the fault ranges.
const VECTORS: u32 = 2;
/// Where the padding count (`0..per_word`, two bits) starts in the flags.
const PAD_SHIFT: u32 = 8;
const PAD_MASK: u32 = 0b11;
/// Where the number of accepted fault-address ranges (16 bits) starts in the flags.
const FAULT_SHIFT: u32 = 16;
/// Most accepted fault-address ranges one registration may give.
pub(super) const MAX_FAULT_RANGES: usize = u16::MAX as usize;
/// Longest offset list scanned word by word; longer ones are binary-searched.
const SCAN_MAX_WORDS: usize = 16;

/// Whether a lookup scans all `count` offsets of code of `size` bytes (so their order does not
/// matter) rather than binary-searching them (so they must be sorted).
pub(super) const fn scanned_whole(count: usize, size: u32) -> bool {
    let kind = if is_narrow(size) { NARROW } else { 0 };
    count.div_ceil(per_word(kind)) <= SCAN_MAX_WORDS
}

/// Whether code of `size` bytes stores its offsets as `u16`.
const fn is_narrow(size: u32) -> bool {
    size <= 1 << 16
}

/// Where the offsets start: right after the header, whatever the flags.
const OFFSETS_AT: usize = core::mem::size_of::<Header>();

/// Where the serial (then the fault range) starts: after the offset words.
const fn tail_at(words: usize) -> usize {
    OFFSETS_AT + words * 8
}

/// Offsets per 8-byte word.
const fn per_word(flags: u32) -> usize {
    if flags & NARROW != 0 {
        4
    } else {
        2
    }
}

/// Offsets of an entry (its words hold `words * per_word` slots, the last ones padding).
fn words_count(h: &Header) -> usize {
    h.words as usize * per_word(h.flags) - ((h.flags >> PAD_SHIFT) & PAD_MASK) as usize
}

/// Number of accepted fault-address ranges in `flags`.
const fn fault_count(flags: u32) -> usize {
    (flags >> FAULT_SHIFT) as usize
}

/// Where the vector section starts: after the serial and the fault ranges.
const fn vectors_at(words: usize, flags: u32) -> usize {
    tail_at(words) + 8 + 16 * fault_count(flags)
}

/// The allocation's layout: header, offset words, serial, fault ranges, `sites` vector keys.
fn layout(words: usize, flags: u32, sites: usize) -> Layout {
    let vectors = if flags & VECTORS != 0 {
        8 + 8 * sites
    } else {
        0
    };
    // `words` and `sites` are at most the code size, below 2^32 (each), and there are at most
    // 2^16 ranges: the size is far below `isize::MAX`, so the fallback is unreachable.
    Layout::from_size_align(vectors_at(words, flags) + vectors, 8)
        .unwrap_or(Layout::new::<Header>())
}

/// What a registration stores: validated by the trap table before it gets here.
pub(super) struct NewEntry<'a> {
    pub(super) serial: u64,
    /// Code size, `<= u32::MAX`.
    pub(super) size: u32,
    /// Landing pad offset, below `size`.
    pub(super) landing: u32,
    /// At most [`MAX_FAULT_RANGES`], none empty.
    pub(super) fault_ranges: &'a [AddressRange],
    /// Distinct, below `size`; sorted unless [`scanned_whole`].
    pub(super) offsets: &'a [u32],
    /// Keys of the sites of other vectors (`vectors::key`), distinct and sorted.
    pub(super) sites: &'a [u64],
}

/// Owner of one entry allocation (the index keeps it as a raw pointer).
pub(super) struct EntryBox(NonNull<Header>);

// SAFETY: the allocation is never written after construction; it is plain data.
unsafe impl Send for EntryBox {}
// SAFETY: as above.
unsafe impl Sync for EntryBox {}

impl EntryBox {
    pub(super) fn new(e: &NewEntry<'_>) -> EntryBox {
        let narrow = is_narrow(e.size);
        let kind = (u32::from(narrow) * NARROW) | (u32::from(!e.sites.is_empty()) * VECTORS);
        let count = e.offsets.len();
        let words = count.div_ceil(per_word(kind));
        let slots = words * per_word(kind);
        // `slots - count < per_word <= 4`; `count` is below the code size, below 2^32; the
        // number of ranges is at most `MAX_FAULT_RANGES` (checked by `prepare`).
        let flags = kind
            | ((slots - count) as u32) << PAD_SHIFT
            | (e.fault_ranges.len().min(MAX_FAULT_RANGES) as u32) << FAULT_SHIFT;
        let l = layout(words, flags, e.sites.len());
        // SAFETY: `l` has a non-zero size (the header).
        let base = unsafe { alloc(l) };
        let Some(base) = NonNull::new(base) else {
            handle_alloc_error(l)
        };
        let header = Header {
            size: e.size,
            landing: e.landing,
            words: words as u32,
            flags,
        };
        // SAFETY: `base` is a fresh allocation of layout `l` (align 8): the header at 0, `slots`
        // offsets of the flagged width from `OFFSETS_AT`, the serial at `tail_at` and the
        // flagged number of fault ranges after it, each aligned.
        unsafe {
            base.cast::<Header>().write(header);
            let tail = base.add(tail_at(words)).cast::<u64>();
            tail.write(e.serial);
            let ranges = tail.add(1).cast::<[usize; 2]>();
            for (i, r) in e.fault_ranges.iter().take(fault_count(flags)).enumerate() {
                ranges.add(i).write([r.start(), r.end()]);
            }
            if flags & VECTORS != 0 {
                let v = base.add(vectors_at(words, flags)).cast::<u64>();
                v.write(e.sites.len() as u64);
                for (i, &k) in e.sites.iter().enumerate() {
                    v.add(1 + i).write(k);
                }
            }
            let offsets = base.add(OFFSETS_AT);
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

/// The protected offsets of an entry (sorted unless [`scanned_whole`]).
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
        layout(h.words as usize, h.flags, self.sites().len())
    }

    /// Keys of the sites of other vectors than #PF (`vectors::key`), sorted.
    #[inline]
    pub(super) fn sites(&self) -> &'a [u64] {
        let h = self.header();
        if h.flags & VECTORS == 0 {
            return &[];
        }
        let at = vectors_at(h.words as usize, h.flags);
        // SAFETY: flagged, so a count and that many keys start at `at`, 8-aligned (see `new`),
        // never written again; alive for `'a`.
        unsafe {
            let v = self.ptr.as_ptr().cast::<u8>().add(at).cast::<u64>();
            core::slice::from_raw_parts(v.add(1), v.read() as usize)
        }
    }

    /// Whether `offset` is a site of `vector` (never #PF: those are the scanned offsets).
    /// Binary search; panic-free.
    #[inline]
    pub(super) fn has_site(&self, offset: u32, vector: super::TrapVector) -> bool {
        self.sites()
            .binary_search(&super::vectors::key(offset, vector))
            .is_ok()
    }

    /// Where the serial and the fault range are.
    fn tail(&self) -> *const u64 {
        let h = self.header();
        self.ptr
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(tail_at(h.words as usize))
            .cast()
    }

    pub(super) fn serial(&self) -> u64 {
        // SAFETY: the serial is written at `tail_at` in `new`, 8-aligned; alive for `'a`.
        unsafe { self.tail().read() }
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

    /// The accepted fault-address ranges, `[start, end)` each (empty: any address).
    #[inline]
    pub(super) fn fault_ranges(&self) -> &'a [[usize; 2]] {
        let count = fault_count(self.header().flags);
        // SAFETY: `count` ranges follow the serial, 8-aligned (see `new`), never written again;
        // alive for `'a`.
        unsafe { core::slice::from_raw_parts(self.tail().add(1).cast::<[usize; 2]>(), count) }
    }

    /// Whether a protected instruction of this entry may fault at `addr`: the registration gave
    /// no accepted range, or `addr` lies in one of them. One range costs what it did when a
    /// registration could have only one: a flag test and two compares.
    #[inline]
    pub(super) fn accepts(&self, addr: usize) -> bool {
        let ranges = self.fault_ranges();
        ranges.is_empty() || ranges.iter().any(|&[s, e]| s <= addr && addr < e)
    }

    /// The offsets as whole words (padding included).
    #[inline]
    fn words(&self) -> &'a [u64] {
        let h = self.header();
        let words = h.words as usize;
        // SAFETY: `words` initialized 8-byte words live at `OFFSETS_AT` (see `new`), 8-aligned,
        // never written again; alive for `'a`.
        unsafe {
            core::slice::from_raw_parts(
                self.ptr.cast::<u8>().add(OFFSETS_AT).cast::<u64>().as_ptr(),
                words,
            )
        }
    }

    /// The protected offsets (without padding); sorted unless [`scanned_whole`].
    #[inline]
    pub(super) fn offsets(&self) -> Offsets<'a> {
        let h = self.header();
        let p = self.words().as_ptr();
        let count = words_count(h);
        // SAFETY: the words hold `count` offsets of the flagged width and the padding (see `new`).
        unsafe {
            if h.flags & NARROW != 0 {
                Offsets::Narrow(core::slice::from_raw_parts(p.cast(), count))
            } else {
                Offsets::Wide(core::slice::from_raw_parts(p.cast(), count))
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
        // One straight-line block per word count: a loop over a count read from the header
        // measured 6 ns slower per lookup (its setup and remainder handling cost more than the
        // eight word comparisons themselves).
        macro_rules! by_count {
            ($($n:literal)*) => {
                match words.len() {
                    $($n => zero_lanes::<$n>(words, pattern, ones),)*
                    _ => 0,
                }
            };
        }
        const _: () = assert!(SCAN_MAX_WORDS == 16);
        by_count!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16) & highs != 0
    }

    /// Bytes of the allocation: `(header, serial and fault range; offsets)`.
    pub(super) fn bytes(&self) -> (usize, usize) {
        let h = self.header();
        let offsets = tail_at(h.words as usize) - OFFSETS_AT + 8 * self.sites().len();
        (self.layout().size() - offsets, offsets)
    }
}

/// `(v - ones) & !v` of `v = word ^ pattern`, ORed over `N` words: a lane's high bit (`highs`)
/// is set in the result exactly when that lane of some word equals the pattern's (SWAR "has a
/// zero lane"; masking with `highs` after the OR is the same as masking each term). 0 when
/// `words` does not hold `N` words.
#[inline(always)]
fn zero_lanes<const N: usize>(words: &[u64], pattern: u64, ones: u64) -> u64 {
    <&[u64; N]>::try_from(words).map_or(0, |words| {
        words.iter().fold(0, |acc, &w| {
            let v = w ^ pattern;
            acc | (v.wrapping_sub(ones) & !v)
        })
    })
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
