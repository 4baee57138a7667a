//! The ordered-range index behind the trap table and the PC → code map: a persistent B+-tree
//! keyed by range start, read without locks, updated by path copying, reclaimed through grace
//! periods (RCU).
//!
//! # Structure
//!
//! Leaves hold up to 31 `(start, value)` entries, inner nodes up to 31 children with the
//! smallest key under each; every node is 512 bytes, its keys in the first four cache lines, one
//! 8-key group per line (see `node`). A value is one thin owning pointer (`IndexValue`). Ranges
//! are disjoint, so the range holding an address is the one with the greatest start `<=` the
//! address, if it reaches that far. Removals keep nodes (but the root and the right edge) at
//! least half full; insertions even out a full node with a neighbour before splitting it
//! (B*-tree style), and fill nodes completely when entries arrive in ascending order or in a
//! large batch (rebuilt bottom-up, see `bulk`), so 10^5 ranges take four levels. Steady-state
//! updates take their nodes from a small pool of nodes whose grace period ended, not from the
//! allocator.
//!
//! # Concurrency
//!
//! **Readers** (`RangeIndex::find`) do one `Acquire` load of `root` and walk nodes that never
//! change once published: no lock, no store, no retry, no allocation, no panic.
//!
//! **Writers** serialize on the writer lock (`RangeIndex::update`). An update never changes a
//! published node: it copies each node on the path it changes (the copy is *fresh*: allocated in
//! this update, unreachable by readers, so the writer edits it in place; a batch copies each
//! node at most once), links the copies to each other, and publishes the new tree with one
//! `Release` store of `root`. The copies' contents are written before that store, so a reader
//! whose `Acquire` load returns the new root sees them complete (release/acquire); a reader
//! that loaded the old root walks the old nodes, which stay untouched. So every lookup sees the
//! complete table before or after an update, never a mix. This holds for a page fault that
//! interrupts the writer on the same CPU (the handler's lookup sees whichever root was stored
//! last, and needs nothing the writer holds) and for readers on other CPUs.
//!
//! **Reclamation.** Right after the store, the update takes a grace ticket
//! ([`GraceDomain::defer`], which orders the unlink before the ticket) and queues the nodes it
//! replaced and the values it removed under it (`retire`). They are freed by a later update or
//! `RangeIndex::reclaim` once [`GraceDomain::is_over`] says every CPU passed a quiescent state
//! since: a reader holding the old root was inside a lookup, so not quiescent, so it finished
//! before the free. Writers never wait for readers; memory waits instead.
//!
//! A reader must not report a quiescent state while it holds anything from a lookup (the
//! contract of [`GraceDomain::quiescent`]); `find` scopes what it hands out to a closure. Writers
//! may run in interrupt context only when the index holds its writer lock with interrupts off
//! (`set_interrupt_control`); else a handler could spin on the lock the code it interrupted
//! holds. A kernel that never
//! reports quiescent states is safe but never frees replaced memory.
//!
//! The loom models (`loom_models`) check this protocol under every interleaving within a
//! preemption bound; they fail when retired memory is freed without waiting, when the root is
//! published `Relaxed`, or when the ticket is taken before the root store. The step-hook tests
//! (`set_step_hook` on the trap table and code map) look up after every step of an update and
//! fail when a published node is changed in place.

mod bulk;
#[cfg(all(test, not(loom)))]
mod concurrency_tests;
mod node;
mod remove;
mod retire;
#[cfg(all(test, not(loom)))]
mod tests;
mod update;
mod value;

#[cfg(all(test, loom))]
mod loom_models;

use alloc::vec::Vec;
use core::fmt;
use core::ptr::{self, NonNull};

pub(crate) use self::node::prefetch;
use self::node::{Node, NodePool};
use self::retire::RetireQueue;
pub(crate) use self::value::{HasRange, IndexValue};
use crate::mmu::InterruptControl;
use crate::range::AddressRange;
use crate::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use crate::sync::grace::GraceDomain;
use crate::sync::irq_lock::{IrqGuard, IrqLock};

/// A step of an update that a reader could in principle observe; a test hook
/// (`set_step_hook` of [`TrapTable`](crate::trap::TrapTable) and
/// [`CodeMap`](crate::code_map::CodeMap)) runs after each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpdateStep {
    /// A node was allocated (a copy of a published node, or a new one).
    Allocate,
    /// A fresh (unpublished) node was changed.
    Modify,
    /// The new root was published: lookups see the update from here on.
    Publish,
    /// A replaced node or removed value was queued for its grace period.
    Retire,
    /// A retired node or value was freed, its grace period over.
    Free,
}

/// Bytes an index uses (allocator overhead not included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexMemory {
    /// Tree nodes reachable from the root.
    pub nodes: usize,
    /// Heap bytes the stored values own (trap entries and their offsets; 0 for shared values).
    pub values: usize,
    /// Nodes and values unlinked but waiting for their grace period.
    pub retired: usize,
    /// Free nodes kept for reuse by later updates (at most 32 KiB).
    pub spare: usize,
}

/// Writer-only state, behind the writer lock.
struct Writer<V> {
    /// Root of the tree being built; between updates the published root.
    draft: *mut Node,
    len: usize,
    /// Published nodes the running update replaced or unlinked.
    replaced: Vec<*mut Node>,
    /// Values the running update removed, with their heap bytes.
    removed: Vec<(V, usize)>,
    retired: RetireQueue<V>,
    /// Spare nodes for the next updates.
    pool: NodePool,
    hook: Option<fn(UpdateStep)>,
    /// Nodes in the draft tree.
    nodes: usize,
    /// Heap bytes of the values in the draft tree.
    value_bytes: usize,
    /// The running update changed the draft.
    dirty: bool,
}

/// A lock-free ordered map from range starts to values covering disjoint address ranges; see
/// the module docs.
pub(crate) struct RangeIndex<V: IndexValue> {
    root: AtomicPtr<Node>,
    len: AtomicUsize,
    grace: &'static GraceDomain,
    writer: IrqLock<Writer<V>>,
    /// How the writer lock keeps interrupts off on its CPU while held; see
    /// [`set_interrupt_control`](Self::set_interrupt_control).
    irq: InterruptControl,
}

// SAFETY: the raw pointers are owned tree nodes and `V`s (`IndexValue::into_raw`). Readers on
// any thread get shared views of values (`V: Sync`) and of immutable nodes; values may be
// dropped on any thread (`V: Send`); writer state is behind the mutex.
unsafe impl<V: IndexValue> Send for RangeIndex<V> {}
// SAFETY: as above.
unsafe impl<V: IndexValue> Sync for RangeIndex<V> {}

impl<V: IndexValue> fmt::Debug for RangeIndex<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeIndex")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl<V: IndexValue> Writer<V> {
    const fn new() -> Self {
        Writer {
            draft: ptr::null_mut(),
            len: 0,
            replaced: Vec::new(),
            removed: Vec::new(),
            retired: RetireQueue::new(),
            pool: NodePool::new(),
            hook: None,
            nodes: 0,
            value_bytes: 0,
            dirty: false,
        }
    }
}

impl<V: IndexValue> RangeIndex<V> {
    /// An empty index whose retired memory waits for grace periods of `grace`.
    #[cfg(not(loom))]
    pub(crate) const fn new(grace: &'static GraceDomain) -> Self {
        RangeIndex {
            root: AtomicPtr::new(ptr::null_mut()),
            len: AtomicUsize::new(0),
            grace,
            writer: IrqLock::new(Writer::new()),
            irq: InterruptControl::NONE,
        }
    }

    /// An empty index (loom atomics are not `const`).
    #[cfg(loom)]
    pub(crate) fn new(grace: &'static GraceDomain) -> Self {
        RangeIndex {
            root: AtomicPtr::new(ptr::null_mut()),
            len: AtomicUsize::new(0),
            grace,
            writer: IrqLock::new(Writer::new()),
            irq: InterruptControl::NONE,
        }
    }

    /// The index, holding its writer lock with interrupts disabled through `irq`: an interrupt
    /// handler that updates it (a JIT installing code from a timer tick) then never finds the
    /// lock held by the code it interrupted on its own CPU, which would spin forever. Holders on
    /// other CPUs never wait for anything while holding it (no IPI, no other lock), so waiting
    /// for it is bounded whatever the waiter's interrupt state
    /// ([`IrqLock::lock_spinning`]). Readers are unaffected (they take no lock).
    pub(crate) const fn set_interrupt_control(&mut self, irq: InterruptControl) {
        self.irq = irq;
    }

    /// Takes the writer lock with interrupts off on this CPU until the guard drops.
    fn lock_writer(&self) -> IrqGuard<'_, Writer<V>> {
        self.writer.lock_spinning(self.irq)
    }

    /// The grace domain retired memory waits for.
    pub(crate) fn grace(&self) -> &'static GraceDomain {
        self.grace
    }

    /// Calls `f` with the entry of greatest start `<= key` (its start and value); `None` when
    /// there is none. Whether the range reaches `key` is the caller's check.
    ///
    /// Lock-free, wait-free, allocation-free, panic-free; safe in a fault handler that
    /// interrupted a writer on the same CPU.
    #[inline(always)]
    pub(crate) fn find<R>(&self, key: usize, f: impl FnOnce(usize, V::View<'_>) -> R) -> Option<R> {
        // Acquire: pairs with the Release store that published this root, so every node and
        // value reachable from it is seen as built.
        let root = self.root.load(Ordering::Acquire);
        // SAFETY: `root` is null or a published tree; its nodes and values are freed only after a
        // grace period that cannot end while this call runs (the caller is not quiescent), and
        // published nodes are never written.
        let (start, value) = unsafe { update::find(root, key) }?;
        // SAFETY: `value` came from `IndexValue::into_raw`, owned by the tree; it stays alive for
        // the call, as above.
        Some(f(start, unsafe { V::view(value) }))
    }

    /// Number of entries (of the last published update). Lock-free.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Takes the writer lock: queries and changes through the returned [`Update`] are published
    /// together, with one root store, when it is dropped.
    pub(crate) fn update(&self) -> Update<'_, V> {
        Update {
            index: self,
            w: self.lock_writer(),
        }
    }

    /// Frees retired memory whose grace period is over. Never waits.
    pub(crate) fn reclaim(&self) {
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        w.retired.reclaim(self.grace, w.hook, &mut w.pool);
    }

    /// Number of retired nodes and values not freed yet.
    pub(crate) fn retired_count(&self) -> usize {
        self.lock_writer().retired.len()
    }

    /// Test hook run after every step of every later update and reclaim; see [`UpdateStep`].
    /// It runs with the writer lock held: it may look up, not update. `None` removes it.
    #[cfg(any(test, feature = "test-hooks"))]
    pub(crate) fn set_step_hook(&self, hook: Option<fn(UpdateStep)>) {
        self.lock_writer().hook = hook;
    }
}

impl<V: IndexValue> Drop for RangeIndex<V> {
    fn drop(&mut self) {
        let w = self.writer.get_mut();
        // `&mut self`: no reader or writer exists, so everything goes now.
        // SAFETY: the draft is the published tree (no update is running), owned by the index.
        unsafe { update::free_tree::<V>(w.draft) };
        w.draft = ptr::null_mut();
        w.retired.clear(&mut w.pool);
        w.pool.clear();
    }
}

/// The writer lock and an update in progress; see [`RangeIndex::update`]. Queries see the table
/// as changed so far. Dropping it publishes the changes (if any) and reclaims what it can.
pub(crate) struct Update<'a, V: IndexValue> {
    index: &'a RangeIndex<V>,
    w: IrqGuard<'a, Writer<V>>,
}

impl<V: IndexValue> Update<'_, V> {
    /// The value whose start is exactly `start`.
    pub(crate) fn get(&self, start: usize) -> Option<V::View<'_>> {
        // SAFETY: the draft tree is the writer's (we hold the lock): published nodes are
        // immutable, fresh ones change only through `&mut self`; values live until retired at
        // the end of the update, after this borrow.
        let (s, v) = unsafe { update::find(self.w.draft, start) }?;
        // SAFETY: as above.
        (s == start).then(|| unsafe { V::view(v) })
    }

    /// The lowest entry whose range overlaps `range`, as `(start, end)`.
    pub(crate) fn first_overlap(&self, range: AddressRange) -> Option<AddressRange> {
        if range.is_empty() {
            return None;
        }
        // SAFETY: as in `get`.
        let (before, after) = unsafe { update::neighbours(self.w.draft, range.start()) };
        let entry = |(s, v): (usize, NonNull<()>)| {
            // SAFETY: as in `get`.
            AddressRange::new(s, V::end(unsafe { V::view(v) }, s))
        };
        let before = before.map(entry).filter(|r| r.end() > range.start());
        let after = after.map(entry).filter(|r| r.start() < range.end());
        before.or(after)
    }

    /// Bytes used, changes included.
    pub(crate) fn memory(&self) -> IndexMemory {
        IndexMemory {
            nodes: self.w.nodes * core::mem::size_of::<Node>(),
            values: self.w.value_bytes,
            retired: self.w.retired.bytes,
            spare: self.w.pool.bytes(),
        }
    }

    /// Calls `f` on every entry, in key order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(usize, V::View<'_>)) {
        // SAFETY: as in `get`; each value pointer is the tree's.
        unsafe { update::for_each(self.w.draft, &mut |k, v| f(k, V::view(v))) };
    }

    /// Adds `value` at `start`. The caller made sure its range overlaps no entry and is not
    /// empty (so `start < usize::MAX`, which lookups rely on).
    pub(crate) fn insert(&mut self, start: usize, value: V) {
        debug_assert!(self.get(start).is_none() && start < usize::MAX);
        self.w.insert(start, value.into_raw());
    }

    /// Adds `batch` (any order) unless some range overlaps another, of the table or of the
    /// batch: then returns the lowest such range, drops the batch and changes nothing. Ranges
    /// are not empty (as for [`insert`](Self::insert)). One by
    /// one when the batch is small against the table, O(k log n); else by merging and rebuilding
    /// the tree bottom-up, O(n + k).
    pub(crate) fn insert_batch(&mut self, mut batch: Vec<(usize, V)>) -> Result<(), AddressRange> {
        if !batch.is_sorted_by_key(|e| e.0) {
            batch.sort_unstable_by_key(|e| e.0);
        }
        let raw = batch.into_iter().map(|(k, v)| (k, v.into_raw())).collect();
        self.w.insert_batch(raw)
    }

    /// Removes the entry at exactly `start`; its value is retired when the update is published.
    /// Returns whether there was one.
    pub(crate) fn remove(&mut self, start: usize) -> bool {
        if self.get(start).is_none() {
            return false;
        }
        self.w.remove(start);
        true
    }
}

impl<V: IndexValue> Drop for Update<'_, V> {
    fn drop(&mut self) {
        self.w
            .commit(&self.index.root, &self.index.len, self.index.grace);
    }
}
