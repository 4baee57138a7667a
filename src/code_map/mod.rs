//! PC → code object lookup, lock-free for readers.
//!
//! [`CodeMap`] answers "which [`CodeObject`] holds this PC?" for stack walkers, profilers and
//! fault handlers (V8 keeps a `std::map` under a mutex plus a hashed cache; Linux looks modules
//! up through a latch tree). It is the shared range index ([`crate::index`]) over the code
//! objects' instruction ranges: a lookup is one descent of a B+-tree, O(log n), without locks,
//! waiting, retries or allocation, correct in a fault handler that interrupted a writer on the
//! same CPU. Inserts and removals copy the O(log n) nodes on their path; a batch copies each
//! node at most once and is published in one step. The map's own reference to a removed code
//! object, like the replaced nodes, is dropped after a grace period of the map's
//! [`GraceDomain`], so a reader that found the object just before the removal can still use it.

use alloc::sync::Arc;
use core::fmt;

use crate::code_object::CodeObject;
#[cfg(any(test, feature = "test-hooks"))]
use crate::index::UpdateStep;
use crate::index::{HasRange, IndexMemory, RangeIndex};
use crate::mmu::InterruptControl;
use crate::range::AddressRange;
use crate::sync::grace::GraceDomain;

/// Why [`CodeMap::insert`] refused; the map is unchanged.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CodeMapError {
    /// The code's range overlaps a mapped one (or another one of the same batch); remove that
    /// one first.
    Overlap {
        /// The mapped range that overlaps (the lowest one if several do).
        existing: AddressRange,
    },
}

impl fmt::Display for CodeMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeMapError::Overlap { existing } => {
                write!(f, "code range overlaps mapped code {existing:?}")
            }
        }
    }
}

impl core::error::Error for CodeMapError {}

impl HasRange for CodeObject {
    fn range_end(&self, _start: usize) -> usize {
        self.instructions().end()
    }
}

/// Lock-free map from PCs to the [`CodeObject`]s whose instructions hold them.
///
/// Usable as a `static` ([`CodeMap::new`] is `const`). [`lookup`](Self::lookup),
/// [`lookup_with`](Self::lookup_with) and [`len`](Self::len) never lock or allocate; writers
/// ([`insert`](Self::insert), [`insert_batch`](Self::insert_batch), [`remove`](Self::remove))
/// serialize on a spin lock, allocate and never wait for readers; they may run in an interrupt
/// handler when the map was built [`with_interrupt_control`](Self::with_interrupt_control),
/// else not in interrupt context.
pub struct CodeMap {
    index: RangeIndex<Arc<CodeObject>>,
}

impl fmt::Debug for CodeMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeMap")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl CodeMap {
    /// An empty map whose replaced memory waits for grace periods of `grace`.
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new(grace: &'static GraceDomain) -> Self {
        CodeMap {
            index: RangeIndex::new(grace),
        }
    }

    /// An empty map (loom atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new(grace: &'static GraceDomain) -> Self {
        CodeMap {
            index: RangeIndex::new(grace),
        }
    }

    /// The map, holding its writer lock with interrupts disabled through `irq`, as
    /// [`TrapTable::with_interrupt_control`](crate::trap::TrapTable::with_interrupt_control).
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

    /// Maps `code`'s instructions to it. O(log n).
    ///
    /// # Errors
    ///
    /// [`CodeMapError::Overlap`] when the instructions overlap mapped code (adjacent is fine);
    /// the map is unchanged.
    pub fn insert(&self, code: Arc<CodeObject>) -> Result<(), CodeMapError> {
        let range = code.instructions();
        let mut update = self.index.update();
        if let Some(existing) = update.first_overlap(range) {
            return Err(CodeMapError::Overlap { existing });
        }
        update.insert(range.start(), code);
        Ok(())
    }

    /// Maps a batch of code objects (any order), published in one step: O(k log(n + k)) for k
    /// objects into a map of n, each node copied at most once.
    ///
    /// # Errors
    ///
    /// [`CodeMapError::Overlap`] naming the lowest range (mapped, or of the batch) that
    /// overlaps another; the map is unchanged.
    pub fn insert_batch(
        &self,
        batch: impl IntoIterator<Item = Arc<CodeObject>>,
    ) -> Result<(), CodeMapError> {
        let batch = batch
            .into_iter()
            .map(|c| (c.instruction_start(), c))
            .collect();
        self.index
            .update()
            .insert_batch(batch)
            .map_err(|existing| CodeMapError::Overlap { existing })
    }

    /// Unmaps the code object whose instructions start exactly at `start` and returns it;
    /// `None` if there is none. Its PCs stop resolving once this returns. The map's own
    /// reference is dropped after a grace period (a reader that found the object just before
    /// may still use it).
    pub fn remove(&self, start: usize) -> Option<Arc<CodeObject>> {
        let mut update = self.index.update();
        let code = update.get(start)?.to_arc();
        update.remove(start);
        Some(code)
    }

    /// Unmaps every code object whose instructions start at one of `starts` (starts mapping
    /// nothing are skipped), published in one step: O(k log n), each node copied at most once,
    /// so tearing down a large module retires one tree's worth of nodes, not one path per
    /// object. Returns how many objects were unmapped; their map references go after a grace
    /// period, as with [`remove`](Self::remove).
    pub fn remove_batch(&self, starts: &[usize]) -> usize {
        let mut update = self.index.update();
        starts.iter().filter(|&&s| update.remove(s)).count()
    }

    /// The code object whose instructions hold `pc`.
    ///
    /// Lock-free, O(log n). Cloning the `Arc` is one atomic increment, no allocation; dropping
    /// the clone may free the object if it was removed meanwhile, so a fault handler should use
    /// [`lookup_with`](Self::lookup_with) instead.
    #[must_use]
    pub fn lookup(&self, pc: usize) -> Option<Arc<CodeObject>> {
        self.index
            .find(pc, |_, code| code.contains(pc).then(|| code.to_arc()))
            .flatten()
    }

    /// Runs `f` on the code object whose instructions hold `pc` and returns its result; `None`
    /// when no code holds `pc` (`f` is not called).
    ///
    /// Lock-free, wait-free, allocation-free, O(log n), no reference-count traffic: usable from a
    /// fault handler that interrupted a writer on the same CPU. `f` must not report a quiescent
    /// state of the map's grace domain.
    pub fn lookup_with<R>(&self, pc: usize, f: impl FnOnce(&CodeObject) -> R) -> Option<R> {
        self.index
            .find(pc, |_, code| code.contains(pc).then(|| f(&code)))
            .flatten()
    }

    /// Number of mapped code objects. Lock-free.
    #[must_use]
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no code is mapped. Lock-free.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees replaced memory (and drops removed objects' map references) whose grace period is
    /// over; updates do this too. Never waits.
    pub fn reclaim(&self) {
        self.index.reclaim();
    }

    /// Bytes of index nodes (the code objects are not the map's) and of memory waiting for its
    /// grace period.
    #[must_use]
    pub fn memory(&self) -> IndexMemory {
        self.index.update().memory()
    }

    /// Test hook: `hook` runs after every step of every later update and reclaim, with the
    /// writer lock held; see [`TrapTable::set_step_hook`](crate::trap::TrapTable::set_step_hook).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn set_step_hook(&self, hook: Option<fn(UpdateStep)>) {
        self.index.set_step_hook(hook);
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
