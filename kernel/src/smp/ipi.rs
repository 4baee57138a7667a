//! Cross-CPU requests: one mailbox per CPU and one IPI vector.
//!
//! # Protocol
//! Every CPU owns one *outbox* (the request it is broadcasting) and one *pending* bitmask (bit
//! `s`: CPU `s` has a request for me). A broadcast from CPU `s`, with interrupts off throughout:
//!
//! 1. writes its outbox (only `s` writes it, and only while `remaining == 0`, i.e. no CPU is
//!    reading it: the previous broadcast waited for every acknowledgement);
//! 2. sets `remaining` to the number of targets, then for each target `t` sets bit `s` in
//!    `pending[t]` (AcqRel, publishing the outbox) and sends the IPI only when `pending[t]` was
//!    empty — otherwise an earlier sender's IPI is on its way, or `t` is polling, and `t`'s next
//!    `swap` collects our bit too;
//! 3. spins until `remaining == 0`, **servicing its own pending bits** while it spins.
//!
//! A target swaps its pending mask to 0 (Acquire, seeing each sender's outbox), executes each
//! request and decrements that sender's `remaining` (Release, after its last read of the outbox).
//!
//! # Why two CPUs broadcasting at once do not deadlock
//! A waiter never waits for anything but acknowledgements, and while it waits it executes every
//! request addressed to it: if A waits for B and B waits for A, each services the other's request
//! from its own spin loop, with interrupts off or on. No lock is held while waiting. A request
//! runs in an atomic context (`interrupts::in_atomic`) and must not broadcast itself — that would
//! need the outbox its own CPU may be waiting on; [`broadcast`] refuses with a panic (a kernel
//! bug), which is fatal there.
//!
//! # Stopped work
//! A work item that runs past its deadline is stopped by an NMI (see `work`). Posting (step 2)
//! is an atomic context, so it is never stopped half-way; a broadcast stopped while waiting
//! leaves acknowledgements outstanding, which the CPU's next broadcast waits out first.
//!
//! # CPUs coming online
//! Targets are the CPUs online when the sender reads the mask (SeqCst, after its page-table
//! writes). A CPU sets its online bit (SeqCst) and only then flushes its whole TLB, so a CPU the
//! sender missed flushes after the sender's page-table writes: it holds no stale entry.

use core::arch::x86_64::__cpuid;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use x86_64::instructions::interrupts;
use x86_64::instructions::tlb;
use x86_64::VirtAddr;

use super::{apic_id, online_mask};
use crate::cpu::interrupts::{in_atomic, IPI_VECTOR};
use crate::cpu::percpu::{current_cpu, PerCpu, MAX_CPUS};

/// Most pages a shootdown invalidates one by one; more become a full flush (Linux's ceiling).
pub const MAX_FLUSH_PAGES: usize = 32;

/// A function run on other CPUs by [`call_on_others`], given the CPU's index.
type CallFn = dyn Fn(usize) + Sync;

/// What a broadcast asks of every other CPU.
struct Request {
    /// `invlpg` these pages (`count` of them) ...
    pages: [usize; MAX_FLUSH_PAGES],
    count: usize,
    /// ... or reload CR3.
    flush_all: bool,
    /// Execute a serializing instruction.
    serialize: bool,
    /// Run this function (lifetime erased: the sender waits until every target ran it).
    call: Option<*const CallFn>,
}

/// A CPU's outgoing request and how many targets have not acknowledged it.
struct Outbox {
    request: UnsafeCell<Request>,
    remaining: AtomicUsize,
}

// SAFETY: `request` is written only by its own CPU while `remaining == 0` and read by targets
// only while `remaining > 0` (see the module protocol); `call` points at a `Sync` function.
unsafe impl Sync for Outbox {}

static OUTBOX: PerCpu<Outbox> = crate::per_cpu!(Outbox {
    request: UnsafeCell::new(Request {
        pages: [0; MAX_FLUSH_PAGES],
        count: 0,
        flush_all: false,
        serialize: false,
        call: None,
    }),
    remaining: AtomicUsize::new(0),
});

/// Bit `s` of CPU `t`'s mask: CPU `s` has a request for `t`.
static PENDING: PerCpu<AtomicU64> = crate::per_cpu!(AtomicU64::new(0));

/// Counters of one CPU; each written only by its own CPU.
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    requests: AtomicU64,
    pages: AtomicU64,
    full_flushes: AtomicU64,
    serializations: AtomicU64,
    calls: AtomicU64,
}

static COUNTERS: PerCpu<Counters> = crate::per_cpu!(Counters {
    sent: AtomicU64::new(0),
    received: AtomicU64::new(0),
    requests: AtomicU64::new(0),
    pages: AtomicU64::new(0),
    full_flushes: AtomicU64::new(0),
    serializations: AtomicU64::new(0),
    calls: AtomicU64::new(0),
});

fn bump(counter: &AtomicU64, n: u64) {
    // Only this CPU writes its counters; readers tolerate a stale value.
    counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// IPI counts of one CPU since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpiStats {
    /// IPIs this CPU sent (mailbox requests and wake-ups).
    pub sent: u64,
    /// IPIs this CPU took.
    pub received: u64,
    /// Mailbox requests it executed (some without an IPI, while polling).
    pub requests: u64,
    /// Pages it invalidated with `invlpg` for others.
    pub pages: u64,
    /// Full TLB flushes it did for others.
    pub full_flushes: u64,
    /// Serializing instructions it executed for others.
    pub serializations: u64,
    /// Functions it ran for [`call_on_others`].
    pub calls: u64,
}

impl core::ops::Sub for IpiStats {
    type Output = IpiStats;
    fn sub(self, o: IpiStats) -> IpiStats {
        IpiStats {
            sent: self.sent - o.sent,
            received: self.received - o.received,
            requests: self.requests - o.requests,
            pages: self.pages - o.pages,
            full_flushes: self.full_flushes - o.full_flushes,
            serializations: self.serializations - o.serializations,
            calls: self.calls - o.calls,
        }
    }
}

impl core::ops::Add for IpiStats {
    type Output = IpiStats;
    fn add(self, o: IpiStats) -> IpiStats {
        IpiStats {
            sent: self.sent + o.sent,
            received: self.received + o.received,
            requests: self.requests + o.requests,
            pages: self.pages + o.pages,
            full_flushes: self.full_flushes + o.full_flushes,
            serializations: self.serializations + o.serializations,
            calls: self.calls + o.calls,
        }
    }
}

/// Per-CPU IPI counts at one instant (for benchmarks: take one before and one after, subtract).
#[derive(Debug, Clone, Copy)]
pub struct IpiSnapshot {
    cpus: [IpiStats; MAX_CPUS],
}

impl IpiSnapshot {
    /// CPU `cpu`'s counts.
    #[must_use]
    pub fn cpu(&self, cpu: usize) -> IpiStats {
        self.cpus[cpu]
    }

    /// Sum over all CPUs.
    #[must_use]
    pub fn total(&self) -> IpiStats {
        self.cpus.iter().fold(IpiStats::default(), |a, &b| a + b)
    }
}

impl core::ops::Sub for IpiSnapshot {
    type Output = IpiSnapshot;
    fn sub(self, o: IpiSnapshot) -> IpiSnapshot {
        let mut cpus = self.cpus;
        for (c, o) in cpus.iter_mut().zip(o.cpus) {
            *c = *c - o;
        }
        IpiSnapshot { cpus }
    }
}

/// The IPI counters of every CPU.
#[must_use]
pub fn ipi_stats() -> IpiSnapshot {
    let mut cpus = [IpiStats::default(); MAX_CPUS];
    for (i, s) in cpus.iter_mut().enumerate() {
        let c = COUNTERS.get(i);
        *s = IpiStats {
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            pages: c.pages.load(Ordering::Relaxed),
            full_flushes: c.full_flushes.load(Ordering::Relaxed),
            serializations: c.serializations.load(Ordering::Relaxed),
            calls: c.calls.load(Ordering::Relaxed),
        };
    }
    IpiSnapshot { cpus }
}

/// Sends the IPI vector to `cpu` (counted).
pub(crate) fn send_ipi(cpu: usize) {
    crate::smp::apic::send_fixed(apic_id(cpu), IPI_VECTOR);
    bump(&COUNTERS.this().sent, 1);
}

/// The IPI handler (interrupts off): executes this CPU's pending requests.
pub(crate) fn interrupt() {
    bump(&COUNTERS.this().received, 1);
    service();
}

/// Executes every request pending for this CPU and acknowledges each. Called by the IPI handler
/// and by every waiting loop (a broadcast's, the work framework's), so a CPU that waits with
/// interrupts off still answers.
pub(crate) fn service() {
    let me = current_cpu();
    let mut bits = PENDING.get(me).swap(0, Ordering::Acquire);
    if bits == 0 {
        return;
    }
    in_atomic(|| {
        while bits != 0 {
            let sender = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let outbox = OUTBOX.get(sender);
            // SAFETY: the sender wrote its outbox before setting our bit (its AcqRel fetch_or
            // pairs with our Acquire swap) and leaves it unchanged until `remaining` reaches 0,
            // which needs the acknowledgement below, after our last read.
            let request = unsafe { &*outbox.request.get() };
            execute(request, me);
            outbox.remaining.fetch_sub(1, Ordering::Release);
        }
    });
}

fn execute(request: &Request, me: usize) {
    let c = COUNTERS.get(me);
    bump(&c.requests, 1);
    if request.flush_all {
        tlb::flush_all();
        bump(&c.full_flushes, 1);
    } else {
        for &page in &request.pages[..request.count] {
            tlb::flush(VirtAddr::new_truncate(page as u64));
        }
        bump(&c.pages, request.count as u64);
    }
    if request.serialize {
        // CPUID serializes (Intel SDM Vol. 3, 9.1.3): the handler's `iretq` does too, but this
        // makes the promise explicit.
        let _ = __cpuid(0);
        bump(&c.serializations, 1);
    }
    if let Some(call) = request.call {
        // SAFETY: the sender is blocked in `broadcast` until we acknowledge, so the borrowed
        // function it points at is alive; it is `Sync`, so calling it from here is allowed.
        unsafe { (*call)(me) };
        bump(&c.calls, 1);
    }
}

/// Sends the request `fill` writes to every other online CPU and waits for all to acknowledge.
fn broadcast(fill: impl FnOnce(&mut Request)) {
    assert!(
        crate::cpu::interrupts::atomic_depth() == 0,
        "cross-CPU request issued from a request handler on cpu {}",
        current_cpu()
    );
    interrupts::without_interrupts(|| {
        let me = current_cpu();
        let outbox = OUTBOX.get(me);
        // A broadcast of ours stopped in its wait (a timed-out work item, see `work`) may still
        // have acknowledgements coming: every target got its bit, so they drain.
        wait_for_acks(outbox);
        let targets = online_mask() & !(1 << me);
        if targets == 0 {
            return;
        }
        // Posting is atomic (no NMI stops it half-way): a target without its bit would never
        // acknowledge, and the outbox would stay taken.
        in_atomic(|| {
            // SAFETY: only this CPU writes its outbox, and no target reads it: `remaining` is 0,
            // and interrupts are off, so nothing on this CPU starts another broadcast meanwhile.
            fill(unsafe { &mut *outbox.request.get() });
            outbox
                .remaining
                .store(targets.count_ones() as usize, Ordering::Relaxed);
            let mut rest = targets;
            while rest != 0 {
                let t = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                if PENDING.get(t).fetch_or(1 << me, Ordering::AcqRel) == 0 {
                    send_ipi(t);
                }
            }
        });
        wait_for_acks(outbox);
    });
}

/// Spins until every target acknowledged `outbox`, executing our own pending requests meanwhile
/// (this is what makes concurrent broadcasts deadlock-free).
fn wait_for_acks(outbox: &Outbox) {
    while outbox.remaining.load(Ordering::Acquire) != 0 {
        service();
        core::hint::spin_loop();
    }
}

/// Invalidates `pages` (virtual addresses) on every other online CPU, or their whole TLB when
/// `full` or when there are more than [`MAX_FLUSH_PAGES`]; returns after all acknowledged.
/// This CPU's own TLB is the caller's business.
///
/// Callable with interrupts disabled; two CPUs calling it at once do not deadlock (see the
/// module docs). Must not be called from a request handler (a [`call_on_others`] function).
pub fn shootdown(pages: &[usize], full: bool) {
    // The page-table writes this shootdown publishes come before the read of the online mask.
    core::sync::atomic::fence(Ordering::SeqCst);
    broadcast(|r| {
        r.call = None;
        r.serialize = false;
        r.flush_all = full || pages.len() > MAX_FLUSH_PAGES;
        r.count = if r.flush_all { 0 } else { pages.len() };
        r.pages[..r.count].copy_from_slice(&pages[..r.count]);
    });
}

/// Makes every other online CPU execute a serializing instruction (cross-modifying code, Intel
/// SDM Vol. 3 8.1.3); returns after all did. Same calling rules as [`shootdown`].
pub fn sync_cores() {
    core::sync::atomic::fence(Ordering::SeqCst);
    broadcast(|r| {
        r.call = None;
        r.flush_all = false;
        r.count = 0;
        r.serialize = true;
    });
}

/// Runs `f(cpu)` on every other online CPU from its IPI handler (interrupts off, atomic
/// context) and returns after all ran it. `f` must be short and must not block, fault, panic or
/// issue cross-CPU requests itself: a failure there stops the kernel. Same calling rules as
/// [`shootdown`]. (Test work that may fail or take long goes through `run_on` instead.)
pub fn call_on_others(f: &(dyn Fn(usize) + Sync)) {
    // SAFETY: only the lifetime is erased; `broadcast` returns only after every target ran `f`,
    // so no target uses the pointer after `f`'s borrow ends.
    let call =
        unsafe { core::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const CallFn>(f) };
    broadcast(|r| {
        r.flush_all = false;
        r.count = 0;
        r.serialize = false;
        r.call = Some(call);
    });
}
