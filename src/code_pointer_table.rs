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
//! # Concurrency
//!
//! * Readers ([`CodePointerTable::get`], and generated code loading an entry) are lock-free and
//!   allocation-free: one `Acquire` load (a plain aligned 8-byte load in generated code, which
//!   x86-64 makes atomic). They may run in any context, including interrupt handlers.
//! * Writers ([`allocate`](CodePointerTable::allocate), [`free`](CodePointerTable::free),
//!   [`update`](CodePointerTable::update)) serialize on a [`spin::Mutex`] that guards the free
//!   list and the allocation bitmap; each changes an entry with exactly one `Release` store made
//!   while holding the lock, so an `update` can never land in an entry that a concurrent `free`
//!   already reset. Writers never allocate memory (the free list's capacity is reserved up
//!   front) and must not run in interrupt context (the mutex is not reentrant).
//! * A reader racing an update sees the old or the new entry, never a torn value. Publishing the
//!   *code* an entry points to (its bytes, protection and cache maintenance) is the caller's
//!   business and must happen before `update`/`allocate`; the `Release` store orders it before
//!   any `Acquire` read that sees the new entry.
//!
//! # Freed handles
//!
//! Freeing a handle resets its entry to the table's *trap address* (0 by default, see
//! [`CodePointerTable::with_capacity_and_trap`]), so a stale call through a freed handle jumps
//! to the trap (or faults on address 0) instead of into freed code. Handles are reused in LIFO
//! order: the most recently freed handle is handed out first. Entries that were never allocated
//! also hold the trap address.
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
//! unrelated code: free a handle only when its last user is gone.

use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::Mutex;
use alloc::boxed::Box;
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
    /// A made-up handle is harmless: the table rejects it with an error in
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
    /// The handle's index is not below the table's capacity.
    OutOfRange(CodePointer),
    /// The handle is not allocated (freed already, or never handed out).
    NotAllocated(CodePointer),
}

impl fmt::Display for CodePointerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodePointerError::CapacityExhausted { capacity } => {
                write!(f, "code pointer table full ({capacity} entries)")
            }
            CodePointerError::OutOfRange(h) => {
                write!(f, "code pointer {} is out of the table's range", h.index())
            }
            CodePointerError::NotAllocated(h) => {
                write!(f, "code pointer {} is not allocated", h.index())
            }
        }
    }
}

impl core::error::Error for CodePointerError {}

/// Writer-side bookkeeping, guarded by the table's mutex.
struct State {
    /// Freed indices, most recently freed last (LIFO); capacity reserved for every entry.
    free: Vec<u32>,
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
    state: Mutex<State>,
    trap: usize,
}

impl CodePointerTable {
    /// A table of `capacity` entries (clamped to [`MAX_CAPACITY`]), all free, whose trap address
    /// is 0.
    ///
    /// Allocates all memory the table will ever use: the entries and the free list.
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_and_trap(capacity, 0)
    }

    /// A table of `capacity` entries (clamped to [`MAX_CAPACITY`]) whose free entries hold
    /// `trap`: the address a call through a freed (or never allocated) handle goes to.
    #[must_use]
    pub fn with_capacity_and_trap(capacity: usize, trap: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let entries = (0..capacity).map(|_| AtomicUsize::new(trap)).collect();
        let state = State {
            free: Vec::with_capacity(capacity),
            next: 0,
            allocated: alloc::vec![0; capacity.div_ceil(64)],
            len: 0,
        };
        CodePointerTable {
            entries,
            state: Mutex::new(state),
            trap,
        }
    }

    /// Number of entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Number of allocated handles.
    #[must_use]
    pub fn len(&self) -> usize {
        self.state.lock().len
    }

    /// Whether no handle is allocated.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address free entries hold.
    #[must_use]
    pub fn trap_address(&self) -> usize {
        self.trap
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
        index < self.capacity() && self.state.lock().is_allocated(index)
    }

    /// A fresh handle whose entry holds `entry`: the most recently freed one if any, else the
    /// lowest never-used index.
    ///
    /// # Errors
    /// [`CapacityExhausted`](CodePointerError::CapacityExhausted) when every entry is allocated;
    /// nothing changes then.
    pub fn allocate(&self, entry: usize) -> Result<CodePointer, CodePointerError> {
        let mut state = self.state.lock();
        let index = match state.free.pop() {
            Some(index) => index,
            None if state.next < self.capacity() => {
                // `next < capacity <= MAX_CAPACITY = u32::MAX`, so it fits.
                let index = state.next as u32;
                state.next += 1;
                index
            }
            None => {
                return Err(CodePointerError::CapacityExhausted {
                    capacity: self.capacity(),
                })
            }
        };
        self.entries[index as usize].store(entry, Ordering::Release);
        state.set_allocated(index as usize, true);
        state.len += 1;
        Ok(CodePointer(index))
    }

    /// Releases `h`: its entry is reset to the trap address and the handle becomes the next one
    /// [`allocate`](Self::allocate) hands out.
    ///
    /// # Errors
    /// [`OutOfRange`](CodePointerError::OutOfRange), or
    /// [`NotAllocated`](CodePointerError::NotAllocated) for a double free; nothing changes then.
    pub fn free(&self, h: CodePointer) -> Result<(), CodePointerError> {
        let mut state = self.state.lock();
        let index = self.check_allocated(&state, h)?;
        self.entries[index].store(self.trap, Ordering::Release);
        state.set_allocated(index, false);
        // Never reallocates: at most `capacity` indices are ever free, and that much is reserved.
        state.free.push(h.index());
        state.len -= 1;
        Ok(())
    }

    /// Points `h` at `entry` with one atomic (`Release`) store; readers see the old or the new
    /// entry.
    ///
    /// # Errors
    /// [`OutOfRange`](CodePointerError::OutOfRange) or
    /// [`NotAllocated`](CodePointerError::NotAllocated); nothing changes then.
    pub fn update(&self, h: CodePointer, entry: usize) -> Result<(), CodePointerError> {
        let state = self.state.lock();
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
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    #[test]
    fn allocate_free_reuse_lifo() {
        let t = CodePointerTable::with_capacity(4);
        assert_eq!(t.capacity(), 4);
        assert!(t.is_empty());
        let a = t.allocate(0xA000).unwrap();
        let b = t.allocate(0xB000).unwrap();
        let c = t.allocate(0xC000).unwrap();
        assert_eq!([a.index(), b.index(), c.index()], [0, 1, 2]);
        assert_eq!([t.get(a), t.get(b), t.get(c)], [0xA000, 0xB000, 0xC000]);
        assert_eq!(t.len(), 3);

        t.free(b).unwrap();
        t.free(a).unwrap();
        assert_eq!(t.len(), 1);
        assert!(!t.is_allocated(a) && !t.is_allocated(b) && t.is_allocated(c));
        assert_eq!(t.get(a), 0);
        assert_eq!(t.get(b), 0);
        // LIFO: a (freed last) first, then b, then the never-used index 3.
        assert_eq!(t.allocate(0xA1).unwrap(), a);
        assert_eq!(t.allocate(0xB1).unwrap(), b);
        assert_eq!(t.allocate(0xD1).unwrap().index(), 3);
        assert_eq!([t.get(a), t.get(b), t.get(c)], [0xA1, 0xB1, 0xC000]);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn double_free_and_bad_handles() {
        let t = CodePointerTable::with_capacity(2);
        let a = t.allocate(0x1000).unwrap();
        t.free(a).unwrap();
        assert_eq!(t.free(a), Err(CodePointerError::NotAllocated(a)));
        assert_eq!(t.update(a, 0x2000), Err(CodePointerError::NotAllocated(a)));
        assert_eq!(t.get(a), 0);
        let never = CodePointer::from_index(1);
        assert_eq!(t.free(never), Err(CodePointerError::NotAllocated(never)));
        let out = CodePointer::from_index(2);
        assert_eq!(t.free(out), Err(CodePointerError::OutOfRange(out)));
        assert_eq!(t.update(out, 1), Err(CodePointerError::OutOfRange(out)));
        assert_eq!(t.get(out), 0);
        assert_eq!(t.get(CodePointer::from_index(u32::MAX)), 0);
        assert_eq!(t.entry_address(out), None);
        assert!(!t.is_allocated(out));
        assert_eq!(t.len(), 0);
        // The double free did not push `a` twice: two allocations give two distinct handles.
        let x = t.allocate(1).unwrap();
        let y = t.allocate(2).unwrap();
        assert_ne!(x, y);
        assert!(t.allocate(3).is_err());
        assert!(!CodePointerError::NotAllocated(a).to_string().is_empty());
    }

    #[test]
    fn capacity_exhausted_changes_nothing() {
        let t = CodePointerTable::with_capacity(3);
        let hs: Vec<_> = (0..3)
            .map(|i| t.allocate(0x100 * (i + 1)).unwrap())
            .collect();
        let err = t.allocate(0xDEAD);
        assert_eq!(
            err,
            Err(CodePointerError::CapacityExhausted { capacity: 3 })
        );
        assert_eq!(t.len(), 3);
        for (i, &h) in hs.iter().enumerate() {
            assert_eq!(t.get(h), 0x100 * (i + 1));
        }
        t.free(hs[1]).unwrap();
        assert_eq!(t.allocate(0xEE).unwrap(), hs[1]);

        let empty = CodePointerTable::with_capacity(0);
        assert_eq!(
            empty.allocate(1),
            Err(CodePointerError::CapacityExhausted { capacity: 0 })
        );
        assert_eq!(empty.len(), 0);
        assert_eq!(empty.get(CodePointer::from_index(0)), 0);
    }

    #[test]
    fn freed_entries_hold_trap_address() {
        let trap = 0xFFFF_FFFF_8000_DEAD;
        let t = CodePointerTable::with_capacity_and_trap(8, trap);
        assert_eq!(t.trap_address(), trap);
        assert_eq!(t.get(CodePointer::from_index(5)), trap); // never allocated
        let h = t.allocate(0x1234).unwrap();
        t.update(h, 0x5678).unwrap();
        assert_eq!(t.get(h), 0x5678);
        t.free(h).unwrap();
        assert_eq!(t.get(h), trap);
        assert_eq!(t.get(CodePointer::from_index(8)), trap); // out of range
    }

    #[test]
    fn entry_addresses_match_generated_code_view() {
        let t = CodePointerTable::with_capacity(16);
        let hs: Vec<_> = (0..16).map(|i| t.allocate(0x4000 + i).unwrap()).collect();
        assert_eq!(t.base_address() % ENTRY_SIZE, 0);
        for &h in &hs {
            let addr = t.entry_address(h).unwrap();
            assert_eq!(addr, t.base_address() + h.index() as usize * 8);
            assert_eq!(addr, t.base_address() + h.offset());
            // SAFETY: `addr` is the address of an `AtomicUsize` entry owned by `t`, which is alive.
            let loaded = unsafe { (*(addr as *const AtomicUsize)).load(Ordering::Acquire) };
            assert_eq!(loaded, t.get(h));
        }
        let dbg = format!("{t:?}");
        assert!(
            dbg.contains("capacity: 16") && dbg.contains("len: 16"),
            "{dbg}"
        );
    }

    #[test]
    fn concurrent_readers_see_old_or_new_entry() {
        const A: usize = 0xFFFF_C000_0000_1000;
        const B: usize = 0x0000_7FFF_FFFF_F000;
        let t = Arc::new(CodePointerTable::with_capacity(4));
        let _pad = t.allocate(1).unwrap();
        let h = t.allocate(A).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let t = Arc::clone(&t);
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let (mut reads, mut bad, mut seen_a, mut seen_b) = (0u64, 0u64, false, false);
                    loop {
                        match t.get(h) {
                            A => seen_a = true,
                            B => seen_b = true,
                            _ => bad += 1,
                        }
                        reads += 1;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    (reads, bad, seen_a, seen_b)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut updates = 0u32;
        while updates < 100_000 && Instant::now() < deadline {
            t.update(h, if updates.is_multiple_of(2) { B } else { A })
                .unwrap();
            updates += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for r in readers {
            let (reads, bad, seen_a, seen_b) = r.join().unwrap();
            assert_eq!(bad, 0, "a reader saw a value that was never stored");
            assert!(seen_a || seen_b);
            total += reads;
        }
        assert!(total > 0 && updates > 0);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn concurrent_allocate_free_gives_distinct_handles() {
        let t = Arc::new(CodePointerTable::with_capacity(64));
        let workers: Vec<_> = (0..2usize)
            .map(|w| {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    for round in 0..500usize {
                        let mine: Vec<_> = (0..16)
                            .map(|k| (t.allocate(w << 32 | round << 8 | k).unwrap(), k))
                            .collect();
                        for &(h, k) in &mine {
                            assert_eq!(t.get(h), w << 32 | round << 8 | k);
                        }
                        for (h, _) in mine {
                            t.free(h).unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(t.len(), 0);
    }
}

/// Model checks of the table's protocol: every interleaving of writers against a reader, for a
/// handle whose code moves. Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    const TRAP: usize = 0xDEAD;

    fn checked(f: impl Fn() + Send + Sync + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound.get_or_insert(3);
        builder.check(f);
    }

    /// A reader calling through the handle while the writer moves it from code A to code B
    /// sees A or B, never anything else, never B then A, and sees B's bytes once it sees B
    /// (the writer publishes the code before `update`, as callers must).
    #[test]
    fn loom_code_pointer_readers_see_the_old_or_the_new_entry() {
        checked(|| {
            let table = Arc::new(CodePointerTable::with_capacity_and_trap(2, TRAP));
            // "Code bytes" behind the entries: 0 = not written yet.
            let code = Arc::new([UnsafeCell::new(1u8), UnsafeCell::new(0u8)]);
            let h = table.allocate(0xA000).unwrap();
            let reader = {
                let (table, code) = (Arc::clone(&table), Arc::clone(&code));
                loom::thread::spawn(move || {
                    let mut seen_new = false;
                    for _ in 0..2 {
                        let entry = table.get(h);
                        assert!(entry == 0xA000 || entry == 0xB000, "torn entry {entry:#x}");
                        if entry == 0xB000 {
                            // SAFETY: loom tracks the cell; a read racing the writer's write
                            // is reported, which is what this model checks for.
                            let byte = unsafe { code[1].with(|b| *b) };
                            assert_eq!(byte, 0xC3, "the new code was not visible");
                            seen_new = true;
                        } else {
                            assert!(!seen_new, "went back to the old entry");
                        }
                    }
                })
            };
            // SAFETY: loom tracks the cell (see the reader).
            unsafe { code[1].with_mut(|b| *b = 0xC3) };
            table.update(h, 0xB000).unwrap();
            reader.join().unwrap();
            assert_eq!(table.get(h), 0xB000);
        });
    }

    /// An `update` racing a `free` of the same handle never lands after the free: the entry
    /// ends at the trap address, whichever goes first.
    #[test]
    fn loom_code_pointer_update_never_revives_a_freed_entry() {
        checked(|| {
            let table = Arc::new(CodePointerTable::with_capacity_and_trap(2, TRAP));
            let h = table.allocate(0xA000).unwrap();
            let updater = {
                let table = Arc::clone(&table);
                loom::thread::spawn(move || {
                    let _ = table.update(h, 0xB000);
                })
            };
            table.free(h).unwrap();
            updater.join().unwrap();
            assert_eq!(table.get(h), TRAP);
            assert!(!table.is_allocated(h));
        });
    }
}
