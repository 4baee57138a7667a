//! Code pointer table: entry addresses of generated code, addressed by handle, for indirect
//! calls (V8's `WasmCodePointerTable`).
//!
//! Direct calls between generated functions go through jump tables
//! ([`jump_table`](crate::jump_table)); *indirect* calls (`call_indirect`, function references,
//! calls into wrappers) go through this table instead. A [`CodePointer`] is a small integer
//! handle that generated code and data structures store in place of a raw code address, and the
//! call site loads the current entry:
//!
//! ```text
//! call qword ptr [table_base + index*8]      ; table_base = CodePointerTable::base_address()
//! ```
//!
//! The entries live in one boxed slice allocated by [`CodePointerTable::with_capacity`] that is
//! never moved or grown, so [`CodePointerTable::base_address`] and
//! [`CodePointerTable::entry_address`] stay valid for the table's lifetime and can be embedded in
//! generated code. Swapping the code behind a handle (tier-up, deoptimization, unloading) is
//! one atomic store ([`CodePointerTable::update`]); no call site has to be patched.
//!
//! # Soundness
//!
//! Every entry is a jump target for ring-0 code, so whatever an entry holds runs. The table
//! therefore takes raw addresses only through `unsafe` functions whose contract is that the
//! address is code the caller owns and keeps alive until it replaces the entry or frees the
//! handle ([`allocate`](CodePointerTable::allocate), [`update`](CodePointerTable::update),
//! [`with_capacity_and_trap`](CodePointerTable::with_capacity_and_trap)), and releases handles
//! only through the `unsafe` [`free`](CodePointerTable::free) (its caller owns the handle).
//! The safe path is a [`CodeModule`](crate::module::CodeModule) with the table set: it aims
//! entries only at code it installed and resets them before that code is retired.
//! [`allocate_trap`](CodePointerTable::allocate_trap) (a handle holding the trap address) and the
//! readers are safe.
//!
//! # Concurrency
//!
//! * Readers ([`CodePointerTable::get`], and generated code loading an entry) are lock-free and
//!   allocation-free: one `Acquire` load (a plain aligned 8-byte load in generated code, which
//!   x86-64 makes atomic). They may run in any context, including interrupt handlers.
//! * Writers ([`allocate`](CodePointerTable::allocate), [`free`](CodePointerTable::free),
//!   [`update`](CodePointerTable::update)) serialize on an [`IrqLock`] that guards the free
//!   list and the allocation bitmap; each changes an entry with exactly one `Release` store made
//!   while holding the lock, so an `update` can never land in an entry that a concurrent `free`
//!   already reset. Writers never allocate memory (the free list's capacity is reserved up
//!   front).
//! * Writers may run in interrupt context (a timer handler patching a module's slots updates
//!   the function's entry) when the table is built
//!   [`with_interrupt_control`](CodePointerTable::with_interrupt_control): the lock is then held
//!   with interrupts off, so a handler never finds it held by the code it interrupted on its own
//!   CPU. **Decision: `IrqLock`, waited for, never `Busy`.** A holder runs a constant number of
//!   steps and waits for no other CPU (no IPI, no other lock; the grace check it may make is
//!   lock-free), so a waiter on another CPU — also one with interrupts off — waits a bounded
//!   time; answering `Busy` would only make `free` fallible on paths (module teardown) that
//!   cannot retry.
//! * A reader racing an update sees the old or the new entry, never a torn value. Publishing the
//!   *code* an entry points to (its bytes, protection and cache maintenance) is the caller's
//!   business and must happen before `update`/`allocate`; the `Release` store orders it before
//!   any `Acquire` read that sees the new entry.
//!
//! # Freed handles
//!
//! Freeing a handle resets its entry to the table's *trap address* (0 by default, see
//! [`CodePointerTable::with_capacity_and_trap`]) at once, so a stale call through a freed handle
//! jumps to the trap (or faults on address 0) instead of into freed code. The handle itself is
//! handed out again only after a grace period of the table's [`GraceDomain`]: a CPU that read
//! the handle from a function table before the free, and calls through it a moment later,
//! reaches the trap, never an unrelated function (of another signature) that took the handle
//! in between. CPUs therefore must not hold a handle they read across a quiescent state, the
//! same rule as for every lookup the domain protects. Freed handles are reused in FIFO order,
//! each once its grace period is over.
//!
//! # Who gets a handle
//!
//! The table does not enforce ownership; by convention (V8's rule):
//! **anonymous code (wrappers) gets its own handle, functions share their slot's handle.**
//! Each function of a module owns one handle for its function index; every table, reference and
//! call site that names that function uses the same handle, and replacing the function's code
//! (lazy compilation, tier-up) is one [`update`](CodePointerTable::update) that all of them see.
//! Code with no function slot (import wrappers, adapter thunks, other anonymous stubs) allocates
//! a handle of its own and frees it when the code dies. Freeing a function's shared handle while
//! another user still holds it would send that user's calls to the trap, or, after reuse, to
//! unrelated code: free a handle only when its last user is gone (the contract of `free`).

use crate::mmu::InterruptControl;
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::grace::{GraceDomain, GraceTicket};
use crate::sync::irq_lock::{IrqGuard, IrqLock};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

/// Size of one entry in bytes (the scale of `call [table + index*8]`).
pub const ENTRY_SIZE: usize = core::mem::size_of::<usize>();
#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<AtomicUsize>() == ENTRY_SIZE);

/// Largest capacity of a table: handles are `u32` indices `0..MAX_CAPACITY`.
pub const MAX_CAPACITY: usize = u32::MAX as usize;

/// Handle of one entry of a [`CodePointerTable`]: the entry's index.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CodePointer(u32);

impl CodePointer {
    /// The handle with index `index` (e.g. read back from generated code or a data structure).
    ///
    /// A made-up handle is harmless to the table: it rejects it with an error in
    /// [`free`](CodePointerTable::free) and [`update`](CodePointerTable::update) unless it is
    /// allocated, and [`get`](CodePointerTable::get) returns the trap address for it unless it
    /// is allocated.
    #[must_use]
    pub const fn from_index(index: u32) -> Self {
        CodePointer(index)
    }

    /// The entry's index in the table.
    #[must_use]
    pub const fn index(self) -> u32 {
        self.0
    }

    /// Byte offset of the entry from the table base (`index × ENTRY_SIZE`).
    #[must_use]
    pub const fn offset(self) -> usize {
        self.0 as usize * ENTRY_SIZE
    }
}

/// Why a [`CodePointerTable`] operation refused; the table is unchanged.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CodePointerError {
    /// Every entry is allocated.
    CapacityExhausted {
        /// The table's capacity.
        capacity: usize,
    },
    /// No handle is free now, but `waiting` freed handles become reusable once their grace
    /// period is over: report quiescent states and try again.
    AwaitingGracePeriod {
        /// Freed handles whose grace period is not over yet.
        waiting: usize,
    },
    /// The handle's index is not below the table's capacity.
    OutOfRange(CodePointer),
    /// The handle is not allocated (freed already, or never handed out).
    NotAllocated(CodePointer),
    /// The table's handles are reused after grace periods of another domain than the one the
    /// code it would point to is retired through (a module's registries).
    OtherGraceDomain,
}

impl fmt::Display for CodePointerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodePointerError::CapacityExhausted { capacity } => {
                write!(f, "code pointer table full ({capacity} entries)")
            }
            CodePointerError::AwaitingGracePeriod { waiting } => write!(
                f,
                "code pointer table full until {waiting} freed handles pass a grace period"
            ),
            CodePointerError::OutOfRange(h) => {
                write!(f, "code pointer {} is out of the table's range", h.index())
            }
            CodePointerError::NotAllocated(h) => {
                write!(f, "code pointer {} is not allocated", h.index())
            }
            CodePointerError::OtherGraceDomain => {
                f.write_str("code pointer table uses another grace domain")
            }
        }
    }
}

impl core::error::Error for CodePointerError {}

/// Writer-side bookkeeping, guarded by the table's lock.
struct State {
    /// Freed indices with the grace ticket taken when they were freed, oldest first. Tickets
    /// never decrease along the queue (taken under the lock from a monotonic epoch), so the
    /// front is the first to become reusable. Capacity reserved for every entry.
    freed: VecDeque<(GraceTicket, u32)>,
    /// First index never handed out; indices `next..capacity` are implicitly free.
    next: usize,
    /// One bit per entry: set while allocated.
    allocated: Vec<u64>,
    /// Number of allocated handles.
    len: usize,
}

impl State {
    fn is_allocated(&self, index: usize) -> bool {
        self.allocated[index / 64] & (1 << (index % 64)) != 0
    }

    fn set_allocated(&mut self, index: usize, allocated: bool) {
        let bit = 1u64 << (index % 64);
        if allocated {
            self.allocated[index / 64] |= bit;
        } else {
            self.allocated[index / 64] &= !bit;
        }
    }
}

/// A fixed-capacity table of code entry addresses addressed by [`CodePointer`] handles (see the
/// module docs).
pub struct CodePointerTable {
    entries: Box<[AtomicUsize]>,
    /// Free list and bitmap; held with interrupts off through `irq` (see the module docs,
    /// "Concurrency", for why this is an `IrqLock` that waits rather than answers `Busy`).
    state: IrqLock<State>,
    irq: InterruptControl,
    trap: usize,
    /// Freed handles are reused only after a grace period of this domain.
    grace: &'static GraceDomain,
}

impl CodePointerTable {
    /// A table of `capacity` entries (clamped to [`MAX_CAPACITY`]), all free, whose trap address
    /// is 0 and whose freed handles are reused after grace periods of `grace` (the domain the
    /// CPUs calling through the table report quiescent states to: a module's registries').
    ///
    /// Allocates all memory the table will ever use: the entries and the free list.
    #[must_use]
    pub fn with_capacity(capacity: usize, grace: &'static GraceDomain) -> Self {
        // SAFETY: a call through address 0 faults (page 0 is never mapped in a kernel using
        // codespace; the module docs say so), it never runs anything.
        unsafe { Self::with_capacity_and_trap(capacity, grace, 0) }
    }

    /// A table of `capacity` entries (clamped to [`MAX_CAPACITY`]) whose free entries hold
    /// `trap`: the address a call through a freed (or never allocated) handle goes to.
    ///
    /// # Safety
    /// `trap` is 0 (unmapped) or code that stops a stray call safely (a trap stub) and stays so
    /// for the table's lifetime: every call through a freed or never allocated handle runs it,
    /// whatever the caller's signature.
    #[must_use]
    pub unsafe fn with_capacity_and_trap(
        capacity: usize,
        grace: &'static GraceDomain,
        trap: usize,
    ) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let entries = (0..capacity).map(|_| AtomicUsize::new(trap)).collect();
        let state = State {
            freed: VecDeque::with_capacity(capacity),
            next: 0,
            allocated: alloc::vec![0; capacity.div_ceil(64)],
            len: 0,
        };
        CodePointerTable {
            entries,
            state: IrqLock::new(state),
            irq: InterruptControl::NONE,
            trap,
            grace,
        }
    }

    /// The table, holding its lock with interrupts disabled through `irq` (for example
    /// [`X86_INTERRUPTS`](crate::mmu::x86::X86_INTERRUPTS)), so writers may also run in
    /// interrupt handlers (a module's [`patch_slots`](crate::module::CodeModule::patch_slots)
    /// from a timer tick updates its functions' entries). Without it, write only with
    /// interrupts on.
    #[must_use]
    pub fn with_interrupt_control(mut self, irq: InterruptControl) -> Self {
        self.irq = irq;
        self
    }

    /// Takes the lock, interrupts off on this CPU until the guard drops.
    fn lock(&self) -> IrqGuard<'_, State> {
        self.state.lock_spinning(self.irq)
    }

    /// Number of entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Number of allocated handles.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether no handle is allocated.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Freed handles not handed out again yet (those waiting for their grace period included).
    #[must_use]
    pub fn freed(&self) -> usize {
        self.lock().freed.len()
    }

    /// The address free entries hold.
    #[must_use]
    pub fn trap_address(&self) -> usize {
        self.trap
    }

    /// The grace domain freed handles wait for.
    #[must_use]
    pub fn grace(&self) -> &'static GraceDomain {
        self.grace
    }

    /// Address of entry 0; entry `i` lies at `base_address() + i × ENTRY_SIZE`. Stable for the
    /// table's lifetime.
    #[must_use]
    pub fn base_address(&self) -> usize {
        self.entries.as_ptr() as usize
    }

    /// Address of `h`'s entry, the operand of `call [addr]` in generated code, or `None` when
    /// `h` is out of range. The entry is an 8-aligned `AtomicUsize`, stable for the table's
    /// lifetime.
    #[must_use]
    pub fn entry_address(&self, h: CodePointer) -> Option<usize> {
        self.entry(h).map(|e| core::ptr::from_ref(e) as usize)
    }

    /// Whether `h` is currently allocated.
    #[must_use]
    pub fn is_allocated(&self, h: CodePointer) -> bool {
        let index = h.index() as usize;
        index < self.capacity() && self.lock().is_allocated(index)
    }

    /// A fresh handle whose entry holds `entry`: the longest-freed handle whose grace period is
    /// over if any, else the lowest never-used index.
    ///
    /// # Errors
    /// [`AwaitingGracePeriod`](CodePointerError::AwaitingGracePeriod) when every entry is
    /// allocated or freed within its grace period,
    /// [`CapacityExhausted`](CodePointerError::CapacityExhausted) when every entry is
    /// allocated; nothing changes then.
    ///
    /// # Safety
    /// `entry` is the trap address or the start of code the caller owns, published (bytes,
    /// protection, cache maintenance done) and callable with the signature every holder of the
    /// handle calls it with, and kept so until the caller [`update`](Self::update)s the entry
    /// away from it or [`free`](Self::free)s the handle and a grace period of
    /// [`grace`](Self::grace) passed.
    pub unsafe fn allocate(&self, entry: usize) -> Result<CodePointer, CodePointerError> {
        let mut state = self.lock();
        let index = self.take_index(&mut state)?;
        self.entries[index as usize].store(entry, Ordering::Release);
        state.set_allocated(index as usize, true);
        state.len += 1;
        Ok(CodePointer(index))
    }

    /// A fresh handle whose entry holds the trap address, as [`allocate`](Self::allocate) but
    /// safe: a call through it traps until its owner aims it at code.
    ///
    /// # Errors
    /// As [`allocate`](Self::allocate).
    pub fn allocate_trap(&self) -> Result<CodePointer, CodePointerError> {
        // SAFETY: the trap address is a safe target by the table's construction contract.
        unsafe { self.allocate(self.trap) }
    }

    /// The index `allocate` hands out, under the lock: a freed one past its grace period, else
    /// a never-used one.
    fn take_index(&self, state: &mut State) -> Result<u32, CodePointerError> {
        if let Some(&(ticket, index)) = state.freed.front() {
            // Lock-free check (it may advance the epoch); waits for nobody.
            if self.grace.is_over(ticket) {
                state.freed.pop_front();
                return Ok(index);
            }
        }
        if state.next < self.capacity() {
            // `next < capacity <= MAX_CAPACITY = u32::MAX`, so it fits.
            let index = state.next as u32;
            state.next += 1;
            return Ok(index);
        }
        Err(match state.freed.len() {
            0 => CodePointerError::CapacityExhausted {
                capacity: self.capacity(),
            },
            waiting => CodePointerError::AwaitingGracePeriod { waiting },
        })
    }

    /// Releases `h`: its entry is reset to the trap address at once, and the handle is handed
    /// out again only after a grace period of [`grace`](Self::grace), so a CPU that read `h`
    /// before this call and calls through it afterwards reaches the trap, never another
    /// function that took `h` in between.
    ///
    /// # Errors
    /// [`OutOfRange`](CodePointerError::OutOfRange), or
    /// [`NotAllocated`](CodePointerError::NotAllocated) for a double free; nothing changes then.
    ///
    /// # Safety
    /// The caller owns `h` (allocated it, or was given it by its owner) and releases it once:
    /// nothing that calls through `h` once this grace period is over still expects it to lead
    /// to its own code (after that the handle may lead to unrelated code).
    pub unsafe fn free(&self, h: CodePointer) -> Result<(), CodePointerError> {
        let mut state = self.lock();
        let index = self.check_allocated(&state, h)?;
        self.entries[index].store(self.trap, Ordering::Release);
        state.set_allocated(index, false);
        // Taken after the reset (`defer` fences): a CPU that reads the entry after this grace
        // period began sees the trap; one that read it before is waited for. Tickets taken under
        // the lock never decrease, which keeps `freed` ordered.
        let ticket = self.grace.defer();
        // Never reallocates: at most `capacity` indices are ever freed, and that much is reserved.
        state.freed.push_back((ticket, h.index()));
        state.len -= 1;
        Ok(())
    }

    /// Points `h` at `entry` with one atomic (`Release`) store; readers see the old or the new
    /// entry.
    ///
    /// # Errors
    /// [`OutOfRange`](CodePointerError::OutOfRange) or
    /// [`NotAllocated`](CodePointerError::NotAllocated); nothing changes then.
    ///
    /// # Safety
    /// The caller owns `h`, and `entry` satisfies the contract of [`allocate`](Self::allocate)
    /// (the trap address, or published code the caller owns, callable with the handle's
    /// signature, kept until replaced or freed and a grace period passed). The code the entry
    /// held before may still be running or about to be entered: retire it after a grace period.
    pub unsafe fn update(&self, h: CodePointer, entry: usize) -> Result<(), CodePointerError> {
        let state = self.lock();
        let index = self.check_allocated(&state, h)?;
        // Stored under the lock, so a concurrent `free` cannot be overwritten.
        self.entries[index].store(entry, Ordering::Release);
        Ok(())
    }

    /// The current entry of `h` (one `Acquire` load; lock-free, allocation-free, panic-free).
    ///
    /// Returns the trap address for a freed, never allocated or out-of-range handle. A read
    /// racing [`free`](Self::free) returns the old entry or the trap address.
    #[must_use]
    pub fn get(&self, h: CodePointer) -> usize {
        self.entry(h)
            .map_or(self.trap, |e| e.load(Ordering::Acquire))
    }

    fn entry(&self, h: CodePointer) -> Option<&AtomicUsize> {
        self.entries.get(usize::try_from(h.index()).ok()?)
    }

    fn check_allocated(&self, state: &State, h: CodePointer) -> Result<usize, CodePointerError> {
        let index = h.index() as usize;
        if index >= self.capacity() {
            return Err(CodePointerError::OutOfRange(h));
        }
        if !state.is_allocated(index) {
            return Err(CodePointerError::NotAllocated(h));
        }
        Ok(index)
    }
}

impl fmt::Debug for CodePointerTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodePointerTable")
            .field("base", &format_args!("{:#x}", self.base_address()))
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .field("trap", &format_args!("{:#x}", self.trap))
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

/// Model checks (loom): readers against writers, freed handles against readers holding them.
#[cfg(all(test, loom))]
mod loom_models;
