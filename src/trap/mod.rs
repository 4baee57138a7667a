//! Trap table: which faulting instructions of generated code resume at a landing pad.
//!
//! Generated code (JIT or wasm compiled into ring 0) skips explicit bounds checks: a load past
//! the end of a linear memory hits a guard page, and the page-fault handler asks
//! [`TrapTable::lookup_fault`] whether the faulting PC is one of the *protected* instructions of
//! some registered code range, and whether the faulting address lies in the memory that
//! registration accepts faults on. On a hit the handler resumes at the range's landing pad (V8's
//! trap handler, Linux exception tables; V8 checks the PC only).
//!
//! Lookups run inside the page-fault handler: lock-free, wait-free, allocation-free and
//! panic-free, O(log n + log k) — a descent of the shared range index
//! ([`crate::index`]) to the range holding the PC, then a binary search of its protected offsets.
//! Updates copy the O(log n) nodes on their path and publish them with one store, so a lookup
//! sees the whole table before or after an update, also when the fault interrupted that update
//! on the same CPU; replaced memory is freed after a grace period of the table's
//! [`GraceDomain`]. The `index` module documents the protocol.

#[cfg(all(test, not(loom)))]
mod concurrency_tests;
mod entry;
#[cfg(all(test, not(loom)))]
mod tests;

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use self::entry::{EntryBox, EntryRef, NewEntry};
use crate::index::{IndexMemory, RangeIndex, UpdateStep};
use crate::range::AddressRange;
use crate::sync::grace::GraceDomain;

/// Serial numbers of registrations, unique across every table of the program: a handle names
/// one registration of one table, so a table answers a handle issued by another one (or a
/// released one) with [`TrapError::UnknownHandle`].
static SERIALS: AtomicU64 = AtomicU64::new(1);

/// Identifies one registration; pass it to [`TrapTable::release`].
///
/// It holds the range start (to find the entry in O(log n)) and a serial number unique across
/// all tables and never reused, so a stale handle or one from another table is always rejected.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TrapHandle {
    start: usize,
    serial: u64,
}

/// A successful lookup: the faulting PC is a protected instruction.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TrapHit {
    code: AddressRange,
    landing_pad: usize,
    offset: u32,
}

impl TrapHit {
    /// Address at which the faulting code resumes.
    #[must_use]
    pub const fn landing_pad(&self) -> usize {
        self.landing_pad
    }

    /// Start of the registered code range that holds the PC.
    #[must_use]
    pub const fn code_start(&self) -> usize {
        self.code.start()
    }

    /// The registered code range that holds the PC.
    #[must_use]
    pub const fn code(&self) -> AddressRange {
        self.code
    }

    /// Offset of the PC from [`code_start`](Self::code_start): one of the protected offsets.
    #[must_use]
    pub const fn offset(&self) -> u32 {
        self.offset
    }

    /// The faulting PC itself (`code_start() + offset()`).
    #[must_use]
    pub const fn pc(&self) -> usize {
        self.code.start() + self.offset as usize
    }
}

/// Why a registration or release was refused; the table is unchanged.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TrapError {
    /// The code range holds no byte.
    EmptyCode,
    /// The code range is 4 GiB or larger (offsets are 32-bit).
    CodeTooLarge {
        /// Its size.
        size: usize,
    },
    /// A protected offset is not below the code size (the first such offset, in input order).
    OffsetOutOfRange {
        /// The offending offset.
        offset: u32,
    },
    /// A protected offset was given twice (the smallest such offset).
    DuplicateOffset {
        /// The repeated offset.
        offset: u32,
    },
    /// The landing pad lies outside the code range.
    LandingPadOutsideCode {
        /// The landing pad given.
        landing_pad: usize,
    },
    /// The accepted fault-address range is empty: it would accept no fault.
    EmptyFaultRange,
    /// The code range overlaps a registered one (or another one of the same batch).
    Overlap {
        /// The range it overlaps (the lowest one if several do).
        existing: AddressRange,
    },
    /// The handle does not name a live registration of this table (never issued by it, already
    /// released, or given twice in one batch).
    UnknownHandle,
}

impl fmt::Display for TrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrapError::EmptyCode => f.write_str("empty code range"),
            TrapError::CodeTooLarge { size } => {
                write!(f, "code range of {size:#x} bytes is 4 GiB or larger")
            }
            TrapError::OffsetOutOfRange { offset } => {
                write!(
                    f,
                    "protected offset {offset:#x} lies outside the code range"
                )
            }
            TrapError::DuplicateOffset { offset } => {
                write!(f, "protected offset {offset:#x} given twice")
            }
            TrapError::LandingPadOutsideCode { landing_pad } => {
                write!(
                    f,
                    "landing pad {landing_pad:#x} lies outside the code range"
                )
            }
            TrapError::EmptyFaultRange => f.write_str("empty accepted fault-address range"),
            TrapError::Overlap { existing } => {
                write!(f, "code range overlaps registered range {existing:?}")
            }
            TrapError::UnknownHandle => f.write_str("unknown or already released trap handle"),
        }
    }
}

impl core::error::Error for TrapError {}

/// One registration: code, its protected instructions, where they resume, and optionally the
/// fault addresses they may fault on.
#[derive(Clone, Copy, Debug)]
pub struct TrapRegistration<'a> {
    /// The code range.
    pub code: AddressRange,
    /// Offsets from `code.start()` of the protected instructions, any order.
    pub protected: &'a [u32],
    /// Where a protected fault resumes; inside `code`.
    pub landing_pad: usize,
    /// The fault addresses the protected instructions may fault on (e.g. a linear memory and
    /// its guard region); a fault elsewhere is not this table's. `None`: any address (V8).
    pub fault_range: Option<AddressRange>,
}

/// Bytes a [`TrapTable`] uses (allocator overhead not included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrapMemory {
    /// Registered ranges.
    pub ranges: usize,
    /// Protected instructions of all ranges.
    pub protected: usize,
    /// Index nodes.
    pub index: usize,
    /// Entry headers (with accepted fault ranges and padding), one per range.
    pub headers: usize,
    /// Protected offsets (2 or 4 bytes each).
    pub offsets: usize,
    /// Unlinked memory waiting for its grace period.
    pub retired: usize,
}

/// Lock-free table from protected instruction addresses of generated code to landing pads.
///
/// Usable as a `static` ([`TrapTable::new`] is `const`). Lookups never lock, wait, allocate or
/// panic and may run in a page-fault handler that interrupted an update on the same CPU.
/// Writers allocate, serialize on a spin lock, never wait for readers, and must not run in
/// interrupt context.
pub struct TrapTable {
    index: RangeIndex<EntryBox>,
}

impl fmt::Debug for TrapTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrapTable")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// Validated, allocated, not yet published.
struct Prepared {
    code: AddressRange,
    serial: u64,
    entry: EntryBox,
}

impl TrapTable {
    /// An empty table whose replaced memory waits for grace periods of `grace`.
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new(grace: &'static GraceDomain) -> Self {
        TrapTable {
            index: RangeIndex::new(grace),
        }
    }

    /// An empty table (loom atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new(grace: &'static GraceDomain) -> Self {
        TrapTable {
            index: RangeIndex::new(grace),
        }
    }

    /// The grace domain replaced memory waits for.
    #[must_use]
    pub fn grace(&self) -> &'static GraceDomain {
        self.index.grace()
    }

    /// Registers `code` with its protected instructions at `code.start() + offset` for each of
    /// `protected` (any order); a fault at one of them resumes at `landing_pad`, whatever the
    /// faulting address. See [`register_with`](Self::register_with).
    ///
    /// # Errors
    /// As [`register_with`](Self::register_with).
    pub fn register(
        &self,
        code: AddressRange,
        protected: &[u32],
        landing_pad: usize,
    ) -> Result<TrapHandle, TrapError> {
        self.register_with(&TrapRegistration {
            code,
            protected,
            landing_pad,
            fault_range: None,
        })
    }

    /// Registers one range: O(log n) for n registered ranges, published in one step.
    ///
    /// # Errors
    /// In this order of precedence, leaving the table unchanged: [`TrapError::EmptyCode`],
    /// [`TrapError::CodeTooLarge`], [`TrapError::OffsetOutOfRange`],
    /// [`TrapError::DuplicateOffset`], [`TrapError::LandingPadOutsideCode`],
    /// [`TrapError::EmptyFaultRange`], [`TrapError::Overlap`] (a range reused for new code must
    /// be released first).
    pub fn register_with(&self, reg: &TrapRegistration<'_>) -> Result<TrapHandle, TrapError> {
        let p = prepare(reg)?;
        let mut update = self.index.update();
        if let Some(existing) = update.first_overlap(p.code) {
            return Err(TrapError::Overlap { existing });
        }
        let handle = TrapHandle {
            start: p.code.start(),
            serial: p.serial,
        };
        update.insert(p.code.start(), p.entry);
        Ok(handle)
    }

    /// Registers a whole module: all or nothing, published to lookups in one step, O(k log(n +
    /// k)) for k registrations into a table of n. Handles come back in input order.
    ///
    /// # Errors
    /// The first registration that [`register_with`](Self::register_with) would refuse, in
    /// input order; then [`TrapError::Overlap`] for two registrations of the batch that overlap
    /// (naming the lower one) or one that overlaps the table. Nothing is registered.
    pub fn register_batch(
        &self,
        regs: &[TrapRegistration<'_>],
    ) -> Result<Vec<TrapHandle>, TrapError> {
        let mut prepared = regs.iter().map(prepare).collect::<Result<Vec<_>, _>>()?;
        let handles = prepared
            .iter()
            .map(|p| TrapHandle {
                start: p.code.start(),
                serial: p.serial,
            })
            .collect();
        prepared.sort_unstable_by_key(|p| p.code.start());
        for w in prepared.windows(2) {
            if w[0].code.end() > w[1].code.start() {
                return Err(TrapError::Overlap {
                    existing: w[0].code,
                });
            }
        }
        let mut update = self.index.update();
        for p in &prepared {
            if let Some(existing) = update.first_overlap(p.code) {
                return Err(TrapError::Overlap { existing });
            }
        }
        for p in prepared {
            update.insert(p.code.start(), p.entry);
        }
        Ok(handles)
    }

    /// Removes a registration: its PCs stop resolving once this returns. O(log n).
    ///
    /// # Errors
    /// [`TrapError::UnknownHandle`] if `handle` was not issued by this table or was already
    /// released; the table is unchanged.
    pub fn release(&self, handle: TrapHandle) -> Result<(), TrapError> {
        self.release_batch(core::slice::from_ref(&handle))
    }

    /// Removes several registrations, all or nothing, in one published step.
    ///
    /// # Errors
    /// [`TrapError::UnknownHandle`] if any handle is unknown to this table, released, or given
    /// twice; the table is unchanged.
    pub fn release_batch(&self, handles: &[TrapHandle]) -> Result<(), TrapError> {
        if has_duplicates(handles) {
            return Err(TrapError::UnknownHandle);
        }
        let mut update = self.index.update();
        let live = |h: &TrapHandle| update.get(h.start).is_some_and(|e| e.serial() == h.serial);
        if !handles.iter().all(live) {
            return Err(TrapError::UnknownHandle);
        }
        for h in handles {
            update.remove(h.start);
        }
        Ok(())
    }

    /// The protected instruction at `pc`, if any, whatever the faulting address.
    ///
    /// Lock-free, wait-free, allocation-free, panic-free, O(log n + log k); safe in a page-fault
    /// handler that interrupted a writer on the same CPU.
    #[must_use]
    #[inline]
    pub fn lookup(&self, pc: usize) -> Option<TrapHit> {
        self.find(pc, None)
    }

    /// The protected instruction at `pc` if its registration accepts a fault at `fault_addr`
    /// (it gave no accepted range, or `fault_addr` lies in it): what the page-fault handler asks
    /// with the faulting RIP and CR2. Same guarantees as [`lookup`](Self::lookup).
    #[must_use]
    #[inline]
    pub fn lookup_fault(&self, pc: usize, fault_addr: usize) -> Option<TrapHit> {
        self.find(pc, Some(fault_addr))
    }

    #[inline]
    fn find(&self, pc: usize, fault_addr: Option<usize>) -> Option<TrapHit> {
        self.index
            .find(pc, |start, e: EntryRef<'_>| {
                // `start <= pc` (the index returns the greatest start not above `pc`).
                let offset = pc.wrapping_sub(start);
                if offset >= e.size() || !e.is_protected(offset as u32) {
                    return None;
                }
                if let (Some(addr), Some(accepted)) = (fault_addr, e.fault_range()) {
                    if !accepted.contains(addr) {
                        return None;
                    }
                }
                Some(TrapHit {
                    code: AddressRange::new(start, start + e.size()),
                    landing_pad: start + e.landing(),
                    offset: offset as u32,
                })
            })
            .flatten()
    }

    /// Whether `pc` is a protected instruction (same as `lookup(pc).is_some()`).
    #[must_use]
    pub fn is_protected(&self, pc: usize) -> bool {
        self.lookup(pc).is_some()
    }

    /// Number of registered code ranges. Lock-free.
    #[must_use]
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no code range is registered. Lock-free.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees replaced memory whose grace period is over (updates do this too). Never waits.
    pub fn reclaim(&self) {
        self.index.reclaim();
    }

    /// Nodes and entries unlinked but not freed yet (waiting for a grace period).
    #[must_use]
    pub fn retired_count(&self) -> usize {
        self.index.retired_count()
    }

    /// Bytes used, by kind. Takes the writer lock and walks the entries: statistics, not for
    /// hot paths.
    #[must_use]
    pub fn memory(&self) -> TrapMemory {
        let update = self.index.update();
        let IndexMemory { nodes, retired, .. } = update.memory();
        let mut m = TrapMemory {
            index: nodes,
            retired,
            ..TrapMemory::default()
        };
        update.for_each(|_, e: EntryRef<'_>| {
            let (headers, offsets) = e.bytes();
            m.ranges += 1;
            m.protected += match e.offsets() {
                entry::Offsets::Narrow(o) => o.len(),
                entry::Offsets::Wide(o) => o.len(),
            };
            m.headers += headers;
            m.offsets += offsets;
        });
        m
    }

    /// Test hook: `hook` runs after every step of every later update and reclaim (each node
    /// allocated or changed, the publication, each retire and free), with the writer lock held.
    /// A test looks up from it (or raises a page fault) to check that lookups see the complete
    /// old table before [`UpdateStep::Publish`] and the complete new one after. It must not
    /// update the same table. `None` removes it.
    #[doc(hidden)]
    pub fn set_step_hook(&self, hook: Option<fn(UpdateStep)>) {
        self.index.set_step_hook(hook);
    }
}

/// Validates a registration and builds its entry, before any lock is taken.
fn prepare(reg: &TrapRegistration<'_>) -> Result<Prepared, TrapError> {
    let code = reg.code;
    if code.is_empty() {
        return Err(TrapError::EmptyCode);
    }
    let size =
        u32::try_from(code.size()).map_err(|_| TrapError::CodeTooLarge { size: code.size() })?;
    if let Some(&offset) = reg.protected.iter().find(|&&o| o >= size) {
        return Err(TrapError::OffsetOutOfRange { offset });
    }
    let mut sorted = reg.protected.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(TrapError::DuplicateOffset { offset: w[0] });
    }
    if !code.contains(reg.landing_pad) {
        return Err(TrapError::LandingPadOutsideCode {
            landing_pad: reg.landing_pad,
        });
    }
    if reg.fault_range.is_some_and(|r| r.is_empty()) {
        return Err(TrapError::EmptyFaultRange);
    }
    let serial = SERIALS.fetch_add(1, Ordering::Relaxed);
    let entry = EntryBox::new(&NewEntry {
        serial,
        size,
        // Inside the code, so below `size`.
        landing: (reg.landing_pad - code.start()) as u32,
        fault_range: reg.fault_range,
        offsets: &sorted,
    });
    Ok(Prepared {
        code,
        serial,
        entry,
    })
}

/// Whether a handle appears twice.
fn has_duplicates(handles: &[TrapHandle]) -> bool {
    if handles.len() <= 16 {
        return handles
            .iter()
            .enumerate()
            .any(|(i, h)| handles[..i].contains(h));
    }
    let mut sorted = handles.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}
