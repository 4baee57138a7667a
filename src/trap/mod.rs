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
//! ([`crate::index`]) to the range holding the PC, then a check of its protected offsets: up to
//! 64 (2-byte) or 32 (4-byte) compared all at once, word by word, in any order; longer lists
//! sorted and binary-searched.
//! Updates copy the O(log n) nodes on their path and publish them with one store, so a lookup
//! sees the whole table before or after an update, also when the fault interrupted that update
//! on the same CPU; replaced memory is freed after a grace period of the table's
//! [`GraceDomain`]. The `index` module documents the protocol.

#[cfg(all(test, not(loom)))]
mod concurrency_tests;
mod entry;
#[cfg(all(test, not(loom)))]
mod model_tests;
mod prepare;
#[cfg(all(test, not(loom)))]
mod test_register;
#[cfg(all(test, not(loom)))]
mod tests;
mod types;
#[cfg(all(test, not(loom)))]
mod vector_tests;
mod vectors;

use alloc::vec::Vec;
use core::fmt;

use self::entry::{EntryBox, EntryRef};
use self::prepare::{has_duplicates, prepare};
pub use self::types::{TrapError, TrapHandle, TrapHit, TrapMemory, TrapRegistration};
pub use self::vectors::TrapVector;
#[cfg(any(test, feature = "test-hooks"))]
use crate::index::UpdateStep;
use crate::index::{prefetch, IndexMemory, RangeIndex};
use crate::mmu::InterruptControl;
use crate::range::AddressRange;
use crate::sync::grace::GraceDomain;

/// Lock-free table from protected instruction addresses of generated code to landing pads.
///
/// Registering is `unsafe` (issue 18, item 14): a registration decides where a faulting CPU
/// resumes, so a range over kernel text would turn a later fault there into a jump to a
/// "landing pad" of the caller's choosing. Modules register their own code through
/// [`CodeModule::add_code`](crate::module::CodeModule::add_code), whose protected offsets and
/// landing pad are checked to lie in the code being added; that is the safe path. Releasing
/// and looking up are safe.
///
/// Usable as a `static` ([`TrapTable::new`] is `const`). Lookups never lock, wait, allocate or
/// panic and may run in a page-fault handler that interrupted an update on the same CPU.
/// Writers allocate, serialize on a spin lock and never wait for readers. They may run in an
/// interrupt handler when the table was built [`with_interrupt_control`](Self::with_interrupt_control)
/// (the lock is then held with interrupts off, so the handler never finds it held by the code
/// it interrupted); without it, not in interrupt context.
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

    /// The table, holding its writer lock with interrupts disabled through `irq` (for example
    /// [`X86_INTERRUPTS`](crate::mmu::x86::X86_INTERRUPTS)), so updates may also come from
    /// interrupt handlers. A holder on another CPU waits for nothing while it holds the lock.
    #[must_use]
    pub const fn with_interrupt_control(mut self, irq: InterruptControl) -> Self {
        self.set_interrupt_control(irq);
        self
    }

    /// In-place form of [`with_interrupt_control`](Self::with_interrupt_control), for owners
    /// built in `const` context.
    pub(crate) const fn set_interrupt_control(&mut self, irq: InterruptControl) {
        self.index.set_interrupt_control(irq);
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
    ///
    /// # Safety
    /// As [`register_with`](Self::register_with).
    pub unsafe fn register(
        &self,
        code: AddressRange,
        protected: &[u32],
        landing_pad: usize,
    ) -> Result<TrapHandle, TrapError> {
        // SAFETY: the caller's contract is `register_with`'s.
        unsafe {
            self.register_with(&TrapRegistration {
                code,
                protected,
                landing_pad,
                sites: &[],
                fault_ranges: &[],
            })
        }
    }

    /// Registers one range: O(log n) for n registered ranges, published in one step.
    ///
    /// # Errors
    /// In this order of precedence, leaving the table unchanged: [`TrapError::EmptyCode`],
    /// [`TrapError::CodeTooLarge`], [`TrapError::OffsetOutOfRange`],
    /// [`TrapError::DuplicateOffset`], [`TrapError::LandingPadOutsideCode`],
    /// [`TrapError::EmptyFaultRange`], [`TrapError::TooManyFaultRanges`], [`TrapError::Overlap`] (a range reused for new code must
    /// be released first).
    ///
    /// # Safety
    /// A fault handler that consults this table resumes a faulting CPU at the landing pad with
    /// the registers of the faulting instruction, so: `reg.code` is generated code the caller
    /// owns (no kernel text, no other owner's code), its protected offsets are instructions of
    /// it whose faults that code expects, and `reg.landing_pad` is code of it written to be
    /// entered that way; all of it stays so until the caller
    /// [`release`](Self::release)s the handle (and the range is not freed or reused before).
    /// A [`CodeModule`](crate::module::CodeModule) registers its code's protected instructions
    /// this way: that is the safe path.
    pub unsafe fn register_with(
        &self,
        reg: &TrapRegistration<'_>,
    ) -> Result<TrapHandle, TrapError> {
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
    /// input order; then [`TrapError::Overlap`] naming the lowest range (registered, or of the
    /// batch) that overlaps another. Nothing is registered.
    ///
    /// # Safety
    /// Each registration satisfies the contract of [`register_with`](Self::register_with).
    pub unsafe fn register_batch(
        &self,
        regs: &[TrapRegistration<'_>],
    ) -> Result<Vec<TrapHandle>, TrapError> {
        let mut prepared = Vec::with_capacity(regs.len());
        let mut handles = Vec::with_capacity(regs.len());
        for (i, reg) in regs.iter().enumerate() {
            // The callers' offset arrays are scattered allocations: start loading the ones a few
            // registrations ahead while this one is validated and copied.
            if let Some(ahead) = regs.get(i + 8) {
                prefetch(ahead.protected.as_ptr().cast());
                prefetch(ahead.protected.as_ptr().wrapping_add(16).cast());
            }
            let p = prepare(reg)?;
            handles.push(TrapHandle {
                start: p.code.start(),
                serial: p.serial,
            });
            prepared.push((p.code.start(), p.entry));
        }
        let mut update = self.index.update();
        update
            .insert_batch(prepared)
            .map_err(|existing| TrapError::Overlap { existing })?;
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

    /// The #PF-protected instruction at `pc`, if any, whatever the faulting address.
    ///
    /// Lock-free, wait-free, allocation-free, panic-free, O(log n + log k); safe in a page-fault
    /// handler that interrupted a writer on the same CPU.
    #[must_use]
    #[inline]
    pub fn lookup(&self, pc: usize) -> Option<TrapHit> {
        self.find(pc, None)
    }

    /// The protected instruction at `pc` if its registration accepts a fault at `fault_addr`
    /// (it gave no accepted range, or `fault_addr` lies in one of them): what the page-fault handler asks
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
                e.prefetch();
                // `start <= pc` (the index returns the greatest start not above `pc`).
                let offset = pc.wrapping_sub(start);
                if offset >= e.size() || !e.is_protected(offset as u32) {
                    return None;
                }
                if fault_addr.is_some_and(|addr| !e.accepts(addr)) {
                    return None;
                }
                Some(TrapHit {
                    code: AddressRange::new(start, start + e.size()),
                    landing_pad: start + e.landing(),
                    offset: offset as u32,
                    vector: TrapVector::PageFault,
                })
            })
            .flatten()
    }

    /// The protected instruction at `pc` registered for `vector`, a vector without a faulting
    /// address (#UD, #DE): what those exception handlers ask with the faulting RIP. A site
    /// registered for another vector is no hit. For #PF this answers `None`: page faults go
    /// through [`lookup_fault`](Self::lookup_fault), which also checks the faulting address.
    ///
    /// Lock-free, wait-free, allocation-free, panic-free, O(log n + log k) for k sites of other
    /// vectors in the range; safe in an exception handler that interrupted a writer on the same
    /// CPU.
    #[must_use]
    #[inline]
    pub fn lookup_trap(&self, vector: TrapVector, pc: usize) -> Option<TrapHit> {
        if vector == TrapVector::PageFault {
            return None;
        }
        self.index
            .find(pc, |start, e: EntryRef<'_>| {
                let offset = pc.wrapping_sub(start);
                if offset >= e.size() || !e.has_site(offset as u32, vector) {
                    return None;
                }
                Some(TrapHit {
                    code: AddressRange::new(start, start + e.size()),
                    landing_pad: start + e.landing(),
                    offset: offset as u32,
                    vector,
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
            } + e.sites().len();
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
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn set_step_hook(&self, hook: Option<fn(UpdateStep)>) {
        self.index.set_step_hook(hook);
    }
}
