//! Grace periods: free memory only after every CPU has stopped using it.
//!
//! codespace's readers never lock and never write: a page-fault handler looks up the trap table
//! with one acquire load of a root pointer, and CPUs run generated code without telling anyone.
//! So a writer cannot know who still holds what. It can know when everybody *has let go*: a CPU
//! that passes a **quiescent state** — a point where it is inside no lookup and is not executing,
//! or about to return into, generated code — holds nothing it picked up before. Once every CPU
//! passed one after an object was unlinked, nobody can reach the object any more. That interval
//! is a **grace period** (Linux RCU-sched; QSBR in the literature). Readers pay nothing.
//!
//! The kernel reports quiescent states ([`GraceDomain::quiescent`]) from places that are
//! quiescent by construction: its idle loop, its scheduler between tasks, the end of a system
//! call. Not from a timer tick that may have interrupted generated code.
//!
//! # Protocol
//!
//! State: a global `epoch` and, per CPU, the epoch it `announced` at its last quiescent state
//! (or `OFFLINE`). All accesses are `SeqCst`.
//! ```text
//! quiescent(cpu): announced[cpu] = epoch; fence(SeqCst)
//! defer():        fence(SeqCst); t = epoch            (after unlinking the object)
//! advance():      g = epoch; if every online CPU announced g: CAS epoch g -> g+1
//! over(t):        epoch >= t + 2
//! ```
//! Why `t + 2` suffices: let a reader use an object between two announcements `A1 < R < A2`
//! (program order) and the writer unlink it at `U`, then take `t` at `T`. The epoch reaches
//! `t + 2` only after every online CPU announced `t + 1`, which it read after the CAS `t -> t+1`,
//! which follows `T` (T read `t`). If the reader's announcement of `t + 1` were `A1`, its fence
//! would follow the writer's fence in the single `SeqCst` order, so every load in `R` would see
//! the unlink and could not reach the object. Hence it is `A2` or later, so `R` is over; and `R`
//! happens-before the free, because the advancing CPU's `SeqCst` load of `announced` read the
//! reader's release store. With `t + 1` the argument breaks: a reader that announced `t` before
//! `U` and then entered `R` would block nothing (the loom model checks this).
//!
//! A CPU marked offline is ignored; [`cpu_online`](GraceDomain::cpu_online) announces the
//! current epoch, which is as good as a quiescent state: the CPU held nothing while offline.
//!
//! # Preemptive kernels: per-task holds
//!
//! A CPU is quiescent when *it* holds nothing; in a preemptive kernel a task can hold something
//! without running: a timer tick that preempts a task inside generated code (or a jump table,
//! or between a lookup and its use) and switches to another task leaves the preempted task's
//! return into that code pending. Reporting the CPU quiescent at that switch ("from the
//! scheduler between tasks") would let the code be freed under the task — why Linux added
//! RCU-Tasks for trampolines. The rule for preemptive kernels:
//!
//! - Report a CPU quiescent only where the CPU itself holds nothing: the idle loop, a task
//!   switch, the end of a system call; never from an interrupt handler (a kernel that installs a
//!   [context check](GraceDomain::with_context_check) has such reports refused, not taken).
//! - At a switch, a task switched out while it may hold something (preempted inside generated
//!   code: saved PC in the code window, or a call into generated code still on its stack) first
//!   gets a [`GraceHold`] ([`GraceDomain::hold`]), kept in the task. The hold stands in for the
//!   task: no grace period that was still open when the hold was taken can end while it is
//!   outstanding. Dropping the hold releases it: do that once the task holds nothing again — at
//!   its next voluntary switch outside generated code, when it is next switched out outside
//!   generated code, or when it exits.
//!
//! A switch can only see where a task *is*. A task that keeps what it picked up across points
//! where it may be preempted outside generated code — an address from `function_code` it calls
//! later, a pointer from a lookup — takes a hold itself, with preemption off, before the lookup
//! and drops it after the last use (a preemptible read-side section, as `rcu_read_lock` under
//! preemptible RCU). Generated code the scheduler should recognise by more than its RIP (it
//! calls out into kernel functions) is entered through a per-task entry record the scheduler
//! can read, as the test kernel's `jit::enter`.
//!
//! Holds extend the protocol: `hold(cpu)` reads `a = announced[cpu]` (the epoch of the CPU's
//! last quiescent state, which precedes everything the task picked up on this CPU) and counts
//! it in `holds[a % 2]`; `advance()` from `g` also requires `holds[(g - 1) % 2] == 0`. A hold of
//! `a` thus keeps the epoch at or below `a + 1` — exactly what the CPU's own slot would do had
//! it never announced again — so the argument above applies unchanged, with the hold in the
//! place of the CPU's next announcement. Two counters suffice: an online CPU's `announced` is
//! `g - 1` or `g` (the epoch left `g - 1` only after every online CPU announced it), so a hold is
//! taken at `g - 1` or `g`, and the epoch cannot pass `a + 1` while it stands: outstanding holds
//! always have one of two adjacent epochs, told apart by parity. See [`hold`](GraceDomain::hold)
//! for the orderings.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use super::irq_lock::IrqLock;
use super::CachePadded;
use crate::mmu::InterruptControl;

/// Most CPUs a [`GraceDomain`] tracks (CPU indices are `0..MAX_CPUS`).
#[cfg(not(loom))]
pub const MAX_CPUS: usize = 256;
/// Most CPUs a [`GraceDomain`] tracks (small under loom to keep the models small).
#[cfg(loom)]
pub const MAX_CPUS: usize = 3;

/// `announced` value of a CPU that takes part in no grace period.
const OFFLINE: u64 = u64::MAX;

mod hold;
pub use hold::GraceHold;

/// Answers whether the caller runs where a quiescent state may be reported (task context: no
/// interrupt or exception handler active); see [`GraceDomain::with_context_check`].
pub type ContextCheck = fn() -> bool;

/// Proof of when something was unlinked; see [`GraceDomain::defer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a ticket tells when deferred memory may be freed"]
pub struct GraceTicket(u64);

/// The CPUs whose quiescent states end grace periods; see the module docs.
///
/// Usable as a `static` ([`GraceDomain::new`] is `const`). Every CPU index `0..MAX_CPUS` starts
/// online at epoch 0: until the kernel says how many CPUs exist
/// ([`set_possible_cpus`](Self::set_possible_cpus)) or takes some offline, a grace period
/// waits for all of them, which is safe (memory stays allocated) but never ends.
pub struct GraceDomain {
    epoch: CachePadded<AtomicU64>,
    /// Values whose drop waits for a grace period ([`defer_drop`](Self::defer_drop)).
    ///
    /// An [`IrqLock`] held with interrupts off (through `irq`), never answering `Busy`: a
    /// module dropped in an interrupt handler defers its teardown here, and were the lock held
    /// with interrupts on, the handler could find it held by the code it interrupted on its own
    /// CPU and spin forever. Holders only push or swap-remove (the drops run after the lock is
    /// released) and wait for no other CPU, so a waiter — also one with interrupts off — waits
    /// a bounded time, and `Busy` (which would make `defer_drop` fallible and leave a dropped
    /// module nowhere to go) is not needed.
    deferred: IrqLock<Vec<(GraceTicket, Box<dyn Send>)>>,
    /// How the deferred list's lock turns interrupts off; see
    /// [`with_interrupt_control`](Self::with_interrupt_control).
    irq: InterruptControl,
    /// `deferred.len()`, readable without the lock.
    pending: AtomicUsize,
    /// One past the highest CPU index that may be online: the scan bound of `advance`.
    limit: CachePadded<AtomicUsize>,
    announced: [CachePadded<AtomicU64>; MAX_CPUS],
    /// Outstanding [`GraceHold`]s by the parity of the epoch they hold (see the module docs).
    holds: [CachePadded<AtomicU64>; 2],
    /// The kernel's check that a caller of `quiescent` is in task context, if it gave one.
    context_check: Option<ContextCheck>,
    /// Reports `quiescent` refused because the context check failed.
    refused: AtomicU64,
}

impl core::fmt::Debug for GraceDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GraceDomain")
            .field("epoch", &self.epoch())
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .field("holds", &self.holds())
            .finish_non_exhaustive()
    }
}

#[cfg(not(loom))]
impl Default for GraceDomain {
    fn default() -> Self {
        Self::new()
    }
}

impl GraceDomain {
    /// A domain with every CPU index online at epoch 0.
    #[cfg(not(loom))]
    #[must_use]
    pub const fn new() -> Self {
        GraceDomain {
            epoch: CachePadded(AtomicU64::new(0)),
            deferred: IrqLock::new(Vec::new()),
            irq: InterruptControl::NONE,
            pending: AtomicUsize::new(0),
            limit: CachePadded(AtomicUsize::new(MAX_CPUS)),
            announced: [const { CachePadded(AtomicU64::new(0)) }; MAX_CPUS],
            holds: [const { CachePadded(AtomicU64::new(0)) }; 2],
            context_check: None,
            refused: AtomicU64::new(0),
        }
    }

    /// A domain with every CPU index online at epoch 0 (loom atomics are not `const`).
    #[cfg(loom)]
    #[must_use]
    pub fn new() -> Self {
        GraceDomain {
            epoch: CachePadded(AtomicU64::new(0)),
            deferred: IrqLock::new(Vec::new()),
            irq: InterruptControl::NONE,
            pending: AtomicUsize::new(0),
            limit: CachePadded(AtomicUsize::new(MAX_CPUS)),
            announced: core::array::from_fn(|_| CachePadded(AtomicU64::new(0))),
            holds: core::array::from_fn(|_| CachePadded(AtomicU64::new(0))),
            context_check: None,
            refused: AtomicU64::new(0),
        }
    }

    /// The domain, holding the lock of its deferred list with interrupts disabled through `irq`
    /// (for example [`X86_INTERRUPTS`](crate::mmu::x86::X86_INTERRUPTS)), so that
    /// [`defer_drop`](Self::defer_drop) and [`reclaim`](Self::reclaim) may run in interrupt
    /// context (a module dropped from a timer tick). Without it, call them with interrupts on
    /// only. Grace periods themselves take no lock and are unaffected.
    ///
    /// ```
    /// # use codespace::sync::grace::GraceDomain;
    /// # fn disable() -> bool { true }
    /// # fn restore(_: bool) {}
    /// use codespace::mmu::InterruptControl;
    /// static GRACE: GraceDomain =
    ///     GraceDomain::new().with_interrupt_control(InterruptControl { disable, restore });
    /// # assert_eq!(GRACE.deferred(), 0);
    /// ```
    #[must_use]
    pub const fn with_interrupt_control(mut self, irq: InterruptControl) -> Self {
        self.irq = irq;
        self
    }

    /// Installs the kernel's check of where quiescent states may be reported: `check()` returns
    /// `true` in task context (no interrupt, exception or NMI handler active on the calling CPU)
    /// and `false` elsewhere. [`quiescent`](Self::quiescent) then refuses a report from the wrong
    /// place: it announces nothing (the safe direction: a grace period waits longer) and counts
    /// the refusal ([`refused_reports`](Self::refused_reports)). A handler cannot know what the
    /// code it interrupted holds — a lookup result, an address from `function_code`, a return
    /// into generated code — so a report from there could end a grace period under it.
    ///
    /// `check` must be cheap (it runs on every report) and callable from any context.
    #[must_use]
    pub const fn with_context_check(mut self, check: ContextCheck) -> Self {
        self.context_check = Some(check);
        self
    }

    /// Quiescent-state reports refused by the [context check](Self::with_context_check).
    #[must_use]
    pub fn refused_reports(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes CPU indices `n..MAX_CPUS` offline, so grace periods wait for CPUs `0..n` only.
    ///
    /// # Safety
    /// No CPU with an index of `n` or more runs lookups of structures this domain protects or
    /// executes generated code freed through it, until it calls [`cpu_online`](Self::cpu_online).
    pub unsafe fn set_possible_cpus(&self, n: usize) {
        let n = n.min(MAX_CPUS);
        for slot in &self.announced[n..] {
            slot.store(OFFLINE, Ordering::SeqCst);
        }
        self.limit.store(n, Ordering::SeqCst);
    }

    /// Brings `cpu` into the domain (again): it counts as having just passed a quiescent state.
    /// Call it on `cpu` before it runs lookups or generated code. Out-of-range indices are
    /// ignored (such a CPU must not use codespace).
    ///
    /// # Safety
    /// Announcing for a CPU ends the grace periods it took part in, exactly as
    /// [`quiescent`](Self::quiescent) does: `cpu` holds no reference from a lookup of a structure
    /// this domain protects and is not executing, or about to return into, code freed through
    /// it. Calling it on `cpu` itself while it comes online (it held nothing while offline)
    /// satisfies this; calling it for another CPU that is running does not.
    pub unsafe fn cpu_online(&self, cpu: usize) {
        let Some(slot) = self.announced.get(cpu) else {
            return;
        };
        slot.store(self.epoch.load(Ordering::SeqCst), Ordering::SeqCst);
        self.limit.fetch_max(cpu + 1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Takes `cpu` out of the domain: grace periods stop waiting for it.
    ///
    /// # Safety
    /// `cpu` is quiescent now (see [`quiescent`](Self::quiescent)) and stays so until it calls
    /// [`cpu_online`](Self::cpu_online).
    pub unsafe fn cpu_offline(&self, cpu: usize) {
        if let Some(slot) = self.announced.get(cpu) {
            slot.store(OFFLINE, Ordering::SeqCst);
        }
    }

    /// Reports that `cpu` passed a quiescent state. One load and one store to the CPU's own
    /// cache line, plus a fence: cheap enough for every idle-loop iteration.
    ///
    /// Where to call it: the idle loop, a task switch, the end of a system call — never an
    /// interrupt handler, which cannot know what the code it interrupted holds. With a
    /// [context check](Self::with_context_check) installed, a report from where the check fails
    /// is refused (nothing is announced). In a preemptive kernel, a switch reports the CPU
    /// quiescent only after the task it switches away from got a [`GraceHold`] if it may hold
    /// something (see [`hold`](Self::hold) and the module docs).
    ///
    /// # Safety
    /// The caller runs on CPU `cpu`, and that CPU is quiescent: it holds no reference obtained
    /// from a lookup of a structure this domain protects (it is not inside such a lookup,
    /// including one it interrupted: the caller is not an interrupt handler), and it is not
    /// executing — nor will it return into — code freed through this domain. A task the CPU
    /// switched away from since its last report and that may hold such a reference or return
    /// into such code (it was preempted inside generated code) has a [`GraceHold`] taken on this
    /// CPU before this call. Reporting too early lets memory be freed under a reader.
    pub unsafe fn quiescent(&self, cpu: usize) {
        if let Some(check) = self.context_check {
            if !check() {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Some(slot) = self.announced.get(cpu) {
            slot.store(self.epoch.load(Ordering::SeqCst), Ordering::SeqCst);
            // Orders this announcement before every load of the CPU's next read-side section:
            // the half of the argument in the module docs that keeps `A1` from counting.
            fence(Ordering::SeqCst);
        }
    }

    /// Call right after unlinking something readers may still hold; the ticket is
    /// [over](Self::is_over) once every online CPU passed a quiescent state after this call.
    pub fn defer(&self) -> GraceTicket {
        // Orders the unlink before the epoch load: the writer's fence in the module docs.
        fence(Ordering::SeqCst);
        GraceTicket(self.epoch.load(Ordering::SeqCst))
    }

    /// Whether the grace period of `ticket` is over, advancing the epoch first when every
    /// online CPU allows it. Never waits. What the ticket protects may be freed once this
    /// returns `true`.
    pub fn is_over(&self, ticket: GraceTicket) -> bool {
        for _ in 0..2 {
            if self.epoch.load(Ordering::SeqCst) >= ticket.0 + 2 {
                return true;
            }
            if !self.try_advance() {
                break;
            }
        }
        self.epoch.load(Ordering::SeqCst) >= ticket.0 + 2
    }

    /// Advances the epoch by one if every online CPU announced the current one; returns whether
    /// it (or a racing caller) did.
    pub fn try_advance(&self) -> bool {
        let g = self.epoch.load(Ordering::SeqCst);
        let limit = self.limit.load(Ordering::SeqCst).min(MAX_CPUS);
        let behind = self.announced[..limit].iter().any(|slot| {
            let a = slot.load(Ordering::SeqCst);
            a != OFFLINE && a != g
        });
        if behind {
            return false;
        }
        // Holds of `g - 1` keep the epoch at `g` (module docs). Read after the slots: a hold is
        // counted before its CPU's next announcement (both `SeqCst`), so an advancer that saw
        // that announcement sees the hold too; one that saw the older announcement stopped above.
        // The fence pairs with the one in an offline CPU's `hold` (count for `g - 1`, fence,
        // re-read the epoch): either that re-read sees `g` and the hold retries, or this load
        // sees the count.
        fence(Ordering::SeqCst);
        if g > 0 && self.holds[((g - 1) & 1) as usize].load(Ordering::SeqCst) != 0 {
            return false;
        }
        // A failed exchange means another caller advanced from `g`: progress all the same.
        let _ = self
            .epoch
            .compare_exchange(g, g + 1, Ordering::SeqCst, Ordering::SeqCst);
        true
    }

    /// Keeps `value` alive until the grace period of `ticket` is over, then drops it in a later
    /// [`reclaim`](Self::reclaim) (Linux's `call_rcu`). For teardown that cannot wait where it
    /// starts, such as dropping a module whose code other CPUs may still be running.
    pub fn defer_drop(&self, ticket: GraceTicket, value: Box<dyn Send>) {
        // Interrupts off while held (see the field): a handler on this CPU cannot find it held.
        let mut deferred = self.deferred.lock_spinning(self.irq);
        deferred.push((ticket, value));
        self.pending.store(deferred.len(), Ordering::Relaxed);
    }

    /// Drops every value given to [`defer_drop`](Self::defer_drop) whose grace period is over;
    /// returns how many. Call it now and then (an idle loop, after reporting a quiescent
    /// state): deferred values are never dropped otherwise (a leak, not a hazard). Drops happen
    /// outside the domain's lock, so they may defer more.
    pub fn reclaim(&self) -> usize {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let due: Vec<Box<dyn Send>> = {
            // Never waits: a busy list is looked at by the next call.
            let Some(mut deferred) = self.deferred.try_lock(self.irq) else {
                return 0;
            };
            let mut due = Vec::new();
            let mut i = 0;
            while i < deferred.len() {
                if self.is_over(deferred[i].0) {
                    due.push(deferred.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
            self.pending.store(deferred.len(), Ordering::Relaxed);
            due
        };
        let n = due.len();
        drop(due);
        n
    }

    /// Values waiting in [`defer_drop`](Self::defer_drop).
    #[must_use]
    pub fn deferred(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The current epoch (statistics and tests).
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The first online CPU that has not announced the current epoch, if any: who a grace
    /// period is waiting for (diagnostics). `None` while outstanding [`GraceHold`]s
    /// ([`holds`](Self::holds)) keep the epoch: then it waits for preempted tasks.
    #[must_use]
    pub fn waiting_for(&self) -> Option<usize> {
        let g = self.epoch.load(Ordering::SeqCst);
        let limit = self.limit.load(Ordering::SeqCst).min(MAX_CPUS);
        self.announced[..limit].iter().position(|slot| {
            let a = slot.load(Ordering::SeqCst);
            a != OFFLINE && a != g
        })
    }
}

#[cfg(all(test, loom))]
mod loom_models;
#[cfg(all(test, not(loom)))]
mod tests;
