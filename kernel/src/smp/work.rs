//! Test work on other CPUs: [`run_on`] and [`on_each_cpu`] hand a borrowed closure to idle CPUs,
//! wait for them with a per-CPU deadline, and report a panic, a fault or a timeout by CPU.
//!
//! Each CPU has one work slot, a small state machine:
//!
//! ```text
//! IDLE --owner claims (CAS)--> CLAIMED --owner writes job--> POSTED --worker--> RUNNING
//!   ^                                                                              |
//!   +---------------- owner takes the outcome <-- DONE <-- worker stores outcome --+
//! ```
//!
//! Only the owner (the CPU that claimed the slot) writes the job; only the worker writes the
//! outcome; each hand-over is a Release store read with Acquire. The worker runs the job inside
//! `catch`, so a panic or an unhandled fault ends the job, not the CPU, and the CPU goes back to
//! its idle loop. A job past its deadline is stopped with an NMI whose handler returns into that
//! `catch` — only at a point where the worker holds nothing shared (interrupts were on where it
//! was interrupted: codespace's critical sections below the module layer, like the serial and
//! heap locks, run with them off; not inside a codespace module call, whose lock is held with
//! interrupts as the caller had them ([`module_call`]); no exception or IPI handler, no mailbox
//! service; see [`stoppable`]); the owner re-sends the NMI until it lands, and stops the kernel
//! if it cannot within [`STOP_GRACE`]. The owner never returns while a worker may still call
//! its closure, so the borrow is sound.

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use core::time::Duration;

use super::{apic_id, cpu_online, idle_hook, online_mask};
use crate::cpu::catch::{self, catch, CatchPoint, Caught};
use crate::cpu::interrupts::{FaultInfo, TrapFrame};
use crate::cpu::percpu::CpuPrefix;
use crate::cpu::percpu::{current_cpu, PerCpu};
use crate::cpu::time::Deadline;

/// Deadline of a work item when none is given (TCG with several vCPUs on a small host is slow).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the owner keeps trying to stop a timed-out job before it gives up on the kernel.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

const IDLE: u8 = 0;
const CLAIMED: u8 = 1;
const POSTED: u8 = 2;
const RUNNING: u8 = 3;
const DONE: u8 = 4;

type Job = dyn Fn(usize) + Sync;

struct Slot {
    state: AtomicU8,
    /// Written by the owner in CLAIMED, taken by the worker in RUNNING.
    job: UnsafeCell<Option<*const Job>>,
    /// Written by the worker before DONE, taken by the owner after it.
    outcome: UnsafeCell<Option<Caught>>,
    /// The owner asks the worker's NMI handler to stop the job.
    stop: AtomicBool,
    /// The job's catch frame while it runs (0 otherwise), for the NMI handler.
    point: AtomicUsize,
}

// SAFETY: `job` and `outcome` are handed over by the state machine above (Release/Acquire on
// `state`), so they are never accessed by two CPUs at once; the job is `Sync`.
unsafe impl Sync for Slot {}

static SLOTS: PerCpu<Slot> = crate::per_cpu!(Slot {
    state: AtomicU8::new(IDLE),
    job: UnsafeCell::new(None),
    outcome: UnsafeCell::new(None),
    stop: AtomicBool::new(false),
    point: AtomicUsize::new(0),
});

/// Calls into a codespace `CodeModule` in progress on each CPU (see [`module_call`]).
static MODULE_CALLS: PerCpu<AtomicUsize> = crate::per_cpu!(AtomicUsize::new(0));

/// Per CPU: sections a layer above declared never to be abandoned by the stop NMI (a scheduler
/// run: stopping it would abandon every task). Counted, so they nest.
static STOP_VETOES: PerCpu<AtomicUsize> = crate::per_cpu!(AtomicUsize::new(0));

/// Until the matching [`allow_stops`], the stop NMI leaves this CPU's job running. Call with
/// interrupts off or from the CPU itself (it is this CPU's counter).
pub fn veto_stops() {
    // SeqCst, as the NMI handler's load on this CPU.
    STOP_VETOES.this().fetch_add(1, Ordering::SeqCst);
}

/// Ends a [`veto_stops`] section of this CPU.
pub fn allow_stops() {
    STOP_VETOES.this().fetch_sub(1, Ordering::SeqCst);
}

/// Runs `f`, a call into a codespace `CodeModule`, as a section the stop NMI never abandons.
///
/// A module's lock is held with interrupts as the caller had them (`lock_interruptible`: the
/// manager's lock, taken under it, must know whether the caller can wait), so RFLAGS.IF says
/// nothing about it: a job stopped inside a module call would keep that module's lock for ever.
/// The kernel's module glue ([`JitModule`](crate::jit::JitModule)) makes every module call
/// through this; a stoppable job that calls a `CodeModule` directly must too.
///
/// The count is this CPU's at entry and is taken back from the same CPU: a call that migrates
/// (a preempted task resumed elsewhere) keeps the first CPU's count up until it returns, which
/// only delays stops there (the safe direction).
pub fn module_call<R>(f: impl FnOnce() -> R) -> R {
    let count = MODULE_CALLS.get(current_cpu());
    // SeqCst, as the NMI handler's load: it runs on this CPU, after the increment in program
    // order, whenever it interrupts `f`.
    count.fetch_add(1, Ordering::SeqCst);
    let result = f();
    count.fetch_sub(1, Ordering::SeqCst);
    result
}

/// How a work item failed on one CPU.
#[non_exhaustive]
pub enum WorkFailure {
    /// It panicked; the panic message (`panicked at file:line:col:\nmessage`).
    Panicked(String),
    /// It raised a fault no fixup handled.
    Faulted(FaultInfo),
    /// It ran past its deadline and was stopped.
    TimedOut(Duration),
    /// The CPU is not online.
    Offline,
    /// The CPU's work slot is taken by another caller, or it is the boot CPU (which runs the
    /// tests, not an idle loop) asked from another CPU.
    Busy,
}

/// A work item that failed, and on which CPU.
pub struct CpuFailure {
    /// The CPU's index.
    pub cpu: usize,
    /// What happened.
    pub failure: WorkFailure,
}

impl fmt::Display for CpuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu {}: ", self.cpu)?;
        match &self.failure {
            WorkFailure::Panicked(msg) => f.write_str(msg),
            WorkFailure::Faulted(info) => write!(f, "unexpected fault: {info}"),
            WorkFailure::TimedOut(d) => write!(f, "timed out after {} s", d.as_secs_f32()),
            WorkFailure::Offline => f.write_str("not online"),
            WorkFailure::Busy => f.write_str("busy (another caller's work, or the boot CPU)"),
        }
    }
}

impl fmt::Debug for CpuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Every CPU whose work failed, in CPU order. `Debug` prints the same lines as `Display`, so
/// `.unwrap()` in a test reports `cpu 2: panicked at ...`.
pub struct WorkError {
    /// The failures, one per CPU, in CPU order.
    pub failures: Vec<CpuFailure>,
}

impl WorkError {
    /// The failure of `cpu`, if it failed.
    #[must_use]
    pub fn of(&self, cpu: usize) -> Option<&WorkFailure> {
        self.failures
            .iter()
            .find(|f| f.cpu == cpu)
            .map(|f| &f.failure)
    }
}

impl fmt::Display for WorkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, failure) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for WorkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn failure(cpu: usize, caught: Caught, timeout: Duration) -> CpuFailure {
    let failure = match caught {
        Caught::Panic(msg) => WorkFailure::Panicked(String::from(msg.as_str())),
        Caught::Fault(info) => WorkFailure::Faulted(info),
        Caught::Stopped => WorkFailure::TimedOut(timeout),
    };
    CpuFailure { cpu, failure }
}

/// Runs `f` on CPU `cpu` and waits for it, for at most [`DEFAULT_TIMEOUT`]. On the calling CPU
/// it runs in place (under `catch`, without a deadline).
///
/// # Errors
/// One [`CpuFailure`] naming `cpu`: it panicked, faulted, timed out, is offline or busy. The CPU is
/// back in its idle loop, usable, in every case but offline.
pub fn run_on(cpu: usize, f: impl Fn() + Sync) -> Result<(), WorkError> {
    run_on_timeout(cpu, DEFAULT_TIMEOUT, f)
}

/// [`run_on`] with deadline `timeout`.
///
/// # Errors
/// As [`run_on`].
pub fn run_on_timeout(cpu: usize, timeout: Duration, f: impl Fn() + Sync) -> Result<(), WorkError> {
    run_on_set(
        1u64.checked_shl(cpu as u32).unwrap_or(0),
        cpu,
        timeout,
        &|_| f(),
    )
}

/// Runs `f(cpu)` on every online CPU at once, the calling one included, and waits for all, each
/// for at most [`DEFAULT_TIMEOUT`]. `f` learns which CPU runs it, so each can do different work.
/// The caller's own share runs in place under `catch`, without a deadline (nothing could stop
/// it); the other CPUs' deadlines count from when their shares were posted.
///
/// # Errors
/// One [`CpuFailure`] per CPU whose share failed; the others' shares completed.
pub fn on_each_cpu(f: impl Fn(usize) + Sync) -> Result<(), WorkError> {
    on_each_cpu_timeout(DEFAULT_TIMEOUT, f)
}

/// [`on_each_cpu`] with deadline `timeout` for every CPU.
///
/// # Errors
/// As [`on_each_cpu`].
pub fn on_each_cpu_timeout(timeout: Duration, f: impl Fn(usize) + Sync) -> Result<(), WorkError> {
    run_on_set(online_mask(), usize::MAX, timeout, &f)
}

/// Runs `f` on every CPU in `mask` (and reports `wanted` offline when it is not in the mask).
fn run_on_set(
    mask: u64,
    wanted: usize,
    timeout: Duration,
    f: &(dyn Fn(usize) + Sync + '_),
) -> Result<(), WorkError> {
    let me = current_cpu();
    let mut failures = Vec::new();
    if wanted != usize::MAX && !cpu_online(wanted) {
        failures.push(CpuFailure {
            cpu: wanted,
            failure: WorkFailure::Offline,
        });
        return Err(WorkError { failures });
    }
    // SAFETY: only the lifetime is erased; this function does not return before every worker
    // finished with `f` (DONE) — `wait` stops the kernel rather than return early.
    let job = unsafe { core::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(f) };
    let mut posted = 0u64;
    for cpu in cpus(mask & !(1 << me)) {
        let slot = SLOTS.get(cpu);
        if slot
            .state
            .compare_exchange(IDLE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            failures.push(CpuFailure {
                cpu,
                failure: WorkFailure::Busy,
            });
            continue;
        }
        // SAFETY: we claimed the slot: no other owner writes it, and the worker reads the job
        // only after the POSTED store below.
        unsafe { *slot.job.get() = Some(job) };
        slot.state.store(POSTED, Ordering::Release);
        super::ipi::send_ipi(cpu); // wakes it from `hlt`
        posted |= 1 << cpu;
    }
    let deadline = Deadline::after(timeout);
    if mask & (1 << me) != 0 {
        if let Err(caught) = catch(|| f(me)) {
            failures.push(failure(me, caught, timeout));
        }
    }
    for cpu in cpus(posted) {
        if let Some(caught) = wait(cpu, deadline, timeout) {
            failures.push(failure(cpu, caught, timeout));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        failures.sort_by_key(|f| f.cpu);
        Err(WorkError { failures })
    }
}

fn cpus(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |c| mask & (1 << c) != 0)
}

/// Waits for `cpu`'s job; stops it with NMIs once `deadline` passed. Returns its failure.
fn wait(cpu: usize, deadline: Deadline, timeout: Duration) -> Option<Caught> {
    let slot = SLOTS.get(cpu);
    let me = current_cpu();
    let mut give_up: Option<Deadline> = None;
    let mut next_nmi = deadline;
    loop {
        if slot.state.load(Ordering::Acquire) == DONE {
            // SAFETY: DONE (Acquire) hands the outcome to us; the worker no longer touches it.
            let outcome = unsafe { (*slot.outcome.get()).take() };
            slot.stop.store(false, Ordering::SeqCst);
            slot.state.store(IDLE, Ordering::Release);
            return outcome;
        }
        // This loop is a quiescent point and answers cross-CPU requests (we may be waiting
        // with interrupts off).
        if let Some(hook) = idle_hook() {
            hook(me);
        }
        super::ipi::service();
        core::hint::spin_loop();
        if next_nmi.expired() {
            if give_up.is_none() {
                slot.stop.store(true, Ordering::SeqCst);
                give_up = Some(Deadline::after(STOP_GRACE));
            }
            if give_up.is_some_and(Deadline::expired) {
                crate::cpu::serial::force_unlock();
                crate::println!(
                    "\n{CpuPrefix}work on cpu {cpu} timed out after {} s and could not be stopped",
                    timeout.as_secs_f32()
                );
                crate::exit(crate::ExitCode::Failure);
            }
            crate::smp::apic::send_nmi(apic_id(cpu));
            next_nmi = Deadline::after(Duration::from_millis(20));
        }
    }
}

/// Marks the boot CPU's slot taken for good: it runs the tests and never an idle loop, so work
/// posted to it would never start.
pub(crate) fn close_boot_cpu_slot() {
    SLOTS.get(0).state.store(CLAIMED, Ordering::SeqCst);
}

/// Runs the job posted to this CPU, if any; returns whether it ran one. Idle loop only.
fn run_posted(cpu: usize) -> bool {
    let slot = SLOTS.get(cpu);
    if slot.state.load(Ordering::Acquire) != POSTED {
        return false;
    }
    slot.state.store(RUNNING, Ordering::Relaxed);
    // SAFETY: POSTED (Acquire) handed the job to us; the owner does not touch it until DONE.
    let job = unsafe { (*slot.job.get()).take() };
    let result = catch(|| {
        if let Some(point) = catch::innermost() {
            slot.point.store(point.addr(), Ordering::SeqCst);
        }
        if let Some(job) = job {
            // SAFETY: the owner keeps the closure alive until it saw DONE (see `run_on_set`).
            unsafe { (*job)(cpu) };
        }
        slot.point.store(0, Ordering::SeqCst);
    });
    slot.point.store(0, Ordering::SeqCst);
    // SAFETY: RUNNING: the outcome is ours to write until the DONE store publishes it.
    unsafe { *slot.outcome.get() = result.err() };
    slot.state.store(DONE, Ordering::Release);
    true
}

/// The idle loop of every AP: report a quiescent state through the idle hook, run posted work,
/// else sleep until an IPI (mailbox request or new work) wakes the CPU.
pub(crate) fn idle_loop(cpu: usize) -> ! {
    loop {
        if let Some(hook) = idle_hook() {
            hook(cpu);
        }
        if run_posted(cpu) {
            continue;
        }
        x86_64::instructions::interrupts::disable();
        if SLOTS.get(cpu).state.load(Ordering::Acquire) == POSTED {
            x86_64::instructions::interrupts::enable();
            continue;
        }
        // `sti; hlt`: an IPI arriving after the check above is taken right after `sti` and ends
        // the `hlt`, so no wake-up is lost.
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}

/// The NMI handler: stops this CPU's job when its owner asked and the interrupted code holds
/// nothing shared (see [`stoppable`]). Any other NMI is ignored.
pub(crate) fn nmi(frame: &mut TrapFrame) {
    let slot = SLOTS.this();
    if !slot.stop.load(Ordering::SeqCst) {
        return;
    }
    let point = slot.point.load(Ordering::SeqCst);
    if point == 0 || !stoppable(frame) {
        return; // the owner sends another NMI shortly
    }
    slot.point.store(0, Ordering::SeqCst);
    catch::stop_at(frame, CatchPoint::from_addr(point));
}

/// Whether a job interrupted at `frame` (by the stop NMI) may be abandoned: it holds nothing
/// shared. Not where:
/// - the interrupted frame had interrupts off (RFLAGS.IF clear). Codespace's critical sections
///   below the module layer run with interrupts off — the manager's and registries'
///   `IrqLock`s, the page-table and frame-allocator locks (`IrqSpin`), a patch on the private
///   poke PML4 (the CPU may be on that address space right now), a shootdown or serialization
///   wait — as do the serial console and the heap; abandoning the job there would keep those
///   locks held for ever, or leave the CPU on the poke address space. The job is stopped once
///   it re-enables interrupts (the owner keeps sending NMIs until [`STOP_GRACE`] runs out);
/// - this CPU is inside a codespace module call ([`module_call`]): a `CodeModule`'s own lock
///   is held with interrupts as the caller had them, so the flag above does not cover it;
/// - an exception, IPI or mailbox handler runs, or the entry/exit assembly around them;
/// - this CPU holds the serial lock or is inside the heap (belt and braces: both also run with
///   interrupts off);
/// - a scheduler run is active on this CPU (`sched::run`): stopping would abandon every task.
pub fn stoppable(frame: &TrapFrame) -> bool {
    const RFLAGS_IF: u64 = 1 << 9;
    frame.rflags & RFLAGS_IF != 0
        && MODULE_CALLS.this().load(Ordering::SeqCst) == 0
        && !crate::cpu::interrupts::interrupted_handler(frame)
        && !crate::cpu::serial::holds_lock()
        && !crate::memory::in_heap()
        && STOP_VETOES.this().load(Ordering::SeqCst) == 0
}
