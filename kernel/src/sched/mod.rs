//! A small preemptive scheduler: several tasks per CPU, switched by the local APIC timer.
//!
//! [`run`] runs a set of jobs as tasks on the calling CPU, round robin, one timer period each,
//! until every job returned; the caller is a task too (it waits by yielding). Tasks never move
//! between CPUs. Each task has its own stack, its own chain of `catch` frames (a panic or fault
//! in a job fails that job, not the CPU) and its own `jit::enter` record (a task switched out
//! inside generated code unwinds to its own entry). Every switch — a timer tick
//! ([`TIMER_VECTOR`]) or a voluntary [`yield_now`] ([`YIELD_VECTOR`]) — happens in the entry
//! stub of `switch`, with interrupts off.
//!
//! # Quiescent states
//!
//! Every switch reports the CPU quiescent to [`GRACE`]: the CPU itself holds nothing there (the
//! switched-out context is parked on its own stack). What the switched-out *task* holds is the
//! question of issue 18's item 3, and [`QuiescentRule`] selects the answer:
//!
//! - [`QuiescentRule::Tasks`] (the rule codespace documents for preemptive kernels): a task
//!   switched out while in generated code — its saved RIP in the code window, or an `enter`
//!   on its stack — first gets a [`GraceHold`] (merged with one it still has); a task switched
//!   out outside generated code drops its hold, and so does one that exits. So code a
//!   preempted task may return into is not freed until the task left it.
//! - [`QuiescentRule::Switch`] ("today's rule": report between tasks and nothing else), kept to
//!   show the hazard: the code a preempted task is inside can be freed before it resumes.
//!
//! Generated code called directly (not through `jit::enter`) is recognised by its RIP only, so
//! it must not call out into kernel functions; and a task that keeps a code address or lookup
//! result across possible preemption outside generated code takes a `GraceHold` itself (see
//! `codespace::sync::grace`).
//!
//! Tasks run with interrupts on and may use codespace (its locks are held with interrupts off,
//! so a switch never parks a lock holder); a spin lock held with interrupts on only makes the
//! other tasks spin until the next tick. The work framework's NMI never stops a CPU whose
//! scheduler runs (it would abandon every task), see `smp::work`.

mod switch;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use core::time::Duration;

use codespace::sync::grace::GraceHold;

use crate::code::{CODE_WINDOW, GRACE};
use crate::cpu::catch::{catch, Caught};
use crate::cpu::interrupts::{self, TrapFrame};
use crate::cpu::percpu::{current_cpu, PerCpu};

pub use switch::{timer_stub, yield_stub};
pub use switch::{TIMER_VECTOR, YIELD_VECTOR};

/// Words of each task's stack (128 KiB: codespace calls in a debug build are deep, and
/// interrupt and IPI handlers run on the interrupted task's stack).
const STACK_WORDS: usize = 16 * 1024;
/// Written at the bottom of each task stack; checked when the run ends (no guard page).
const CANARY: u64 = 0x5CED_57AC_CA4A_4135;

/// When the scheduler reports the CPU quiescent at a switch, what covers the task it switched
/// away from (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuiescentRule {
    /// A task preempted in generated code gets a [`GraceHold`] first (codespace's rule).
    Tasks,
    /// Nothing: the switch report alone (the rule README gave before issue 18; unsafe).
    Switch,
}

/// Settings of a [`run`].
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// What covers switched-out tasks.
    pub rule: QuiescentRule,
    /// Timer period (one time slice).
    pub period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rule: QuiescentRule::Tasks,
            period: Duration::from_millis(1),
        }
    }
}

/// What a [`run`] did on its CPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Timer ticks taken.
    pub ticks: u64,
    /// Switches to another task.
    pub switches: u64,
    /// Timer ticks that interrupted a task with its RIP in the code window.
    pub preempted_in_code: u64,
    /// Holds taken for tasks switched out in generated code (rule `Tasks`).
    pub holds: u64,
    /// Voluntary switches ([`yield_now`]).
    pub yields: u64,
}

/// How a [`run`] ended: counts, and each job that panicked or faulted (by job index).
#[derive(Debug)]
pub struct Report {
    /// Counts.
    pub stats: Stats,
    /// `(job index, what happened)` for every job that did not return.
    pub failures: Vec<(usize, Caught)>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Swaps the running task's word of CPU-local state kept by a layer above (the JIT's entry
/// record: which `enter` a trap unwinds to), returning the outgoing task's; installed at boot.
static TASK_WORD_SWAP: spin::Once<fn(usize) -> usize> = spin::Once::new();

/// Installs the swap of the tasks' word of CPU-local state (once; later calls are ignored).
/// Nonzero means "inside generated code" for the grace holds (see `in_generated_code`).
pub fn set_task_word_swap(swap: fn(usize) -> usize) {
    TASK_WORD_SWAP.call_once(|| swap);
}

struct Task {
    /// The saved frame while switched out (on the task's stack).
    frame: *mut TrapFrame,
    /// Empty for the task that called [`run`] (it keeps its own stack).
    stack: Vec<u64>,
    job: Option<Job>,
    /// Its `jit::enter` record and catch chain while switched out.
    entry_record: usize,
    catch_top: usize,
    hold: Option<GraceHold<'static>>,
    done: bool,
    failure: Option<Caught>,
}

/// One CPU's tasks. Task 0 is the caller of [`run`].
struct RunQueue {
    tasks: Vec<Task>,
    current: usize,
    rule: QuiescentRule,
    stats: Stats,
}

/// Each CPU's run queue while its [`run`] is active. Only that CPU touches it, with
/// interrupts off (the switch, a task's start and exit), or after its timer stopped.
static QUEUES: PerCpu<AtomicPtr<RunQueue>> = crate::per_cpu!(AtomicPtr::new(core::ptr::null_mut()));

/// The hook [`TIMER_VECTOR`] calls first on every tick (as an interrupt handler), 0 for none.
static TICK_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs `hook`, called on every timer tick of every CPU as an interrupt handler (inside
/// [`interrupts::in_interrupt`]), before the scheduler's own work; or removes it. Arm a tick on
/// a CPU without a scheduler with `apic::one_shot_timer(TIMER_VECTOR, ..)`.
pub fn set_tick_hook(hook: Option<fn()>) {
    TICK_HOOK.store(hook.map_or(0, |h| h as usize), Ordering::SeqCst);
}

/// Whether a [`run`] is active on this CPU.
#[must_use]
pub fn active() -> bool {
    !QUEUES.this().load(Ordering::SeqCst).is_null()
}

/// Gives the CPU to the next task (a voluntary switch). Does nothing without a [`run`] active
/// on this CPU, apart from an interrupt round trip.
pub fn yield_now() {
    // SAFETY: `int 0xE1` enters the scheduler's stub, which saves and restores every register
    // and returns here (now or after other tasks ran).
    unsafe { core::arch::asm!("int 0xE1") };
}

/// Runs `jobs` as tasks on this CPU, preemptively, with the caller as one more task, until every
/// job returned (or failed). Interrupts are on meanwhile; the timer is stopped and the interrupt
/// state restored before it returns.
///
/// # Panics
/// When a run is already active on this CPU, the CPU has no calibrated APIC timer, or a task
/// overflowed its stack.
pub fn run(jobs: Vec<Box<dyn FnOnce() + Send + '_>>, config: Config) -> Report {
    assert!(!active(), "sched::run is not reentrant");
    assert!(
        crate::smp::apic::available() && crate::smp::apic::timer_per_ms() > 0,
        "sched::run needs a calibrated local APIC timer"
    );
    let mut tasks = Vec::with_capacity(jobs.len() + 1);
    tasks.push(Task::new(Vec::new(), None));
    for job in jobs {
        // SAFETY: only the lifetime is erased; every job returns (or fails) before `run` does:
        // `run` waits until all tasks are done, and nothing stops it early (the work
        // framework's NMI refuses to while a run is active).
        let job: Job = unsafe { core::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
        let mut stack = alloc::vec![0u64; STACK_WORDS];
        stack[0] = CANARY;
        let mut task = Task::new(stack, Some(job));
        task.frame = switch::initial_frame(&mut task.stack, task_entry);
        tasks.push(task);
    }
    let queue = Box::into_raw(Box::new(RunQueue {
        tasks,
        current: 0,
        rule: config.rule,
        stats: Stats::default(),
    }));
    let enabled = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::disable();
    QUEUES.this().store(queue, Ordering::SeqCst);
    crate::smp::work::veto_stops();
    crate::smp::apic::start_periodic_timer(TIMER_VECTOR, config.period);
    x86_64::instructions::interrupts::enable();
    // The caller's task: wait, giving the CPU away, until every job is done.
    while !x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: this CPU's queue, read with interrupts off (no switch can run meanwhile).
        unsafe { (&(*queue).tasks)[1..].iter().all(|t| t.done) }
    }) {
        yield_now();
    }
    x86_64::instructions::interrupts::disable();
    crate::smp::apic::stop_timer();
    QUEUES.this().store(core::ptr::null_mut(), Ordering::SeqCst);
    crate::smp::work::allow_stops();
    if enabled {
        x86_64::instructions::interrupts::enable();
    }
    // SAFETY: unpublished above with interrupts off and the timer stopped: ours alone again.
    let queue = unsafe { Box::from_raw(queue) };
    let mut failures = Vec::new();
    for (i, task) in queue.tasks.into_iter().enumerate().skip(1) {
        assert!(task.stack[0] == CANARY, "task {i} overflowed its stack");
        if let Some(caught) = task.failure {
            failures.push((i - 1, caught));
        }
    }
    Report {
        stats: queue.stats,
        failures,
    }
}

impl Task {
    fn new(stack: Vec<u64>, job: Option<Job>) -> Self {
        Task {
            frame: core::ptr::null_mut(),
            stack,
            job,
            entry_record: 0,
            catch_top: 0,
            hold: None,
            done: false,
            failure: None,
        }
    }
}

/// This CPU's run queue.
///
/// # Safety
/// Interrupts are off and a run is active on this CPU; the reference is dropped before
/// interrupts go back on.
unsafe fn queue<'a>() -> &'a mut RunQueue {
    // SAFETY: the caller's contract: the pointer is this CPU's live queue, touched by nothing
    // else while interrupts are off.
    unsafe { &mut *QUEUES.this().load(Ordering::SeqCst) }
}

/// Where every new task starts (interrupts on, on its own stack): runs its job under `catch`,
/// records how it ended, and leaves the CPU for good.
extern "C" fn task_entry() -> ! {
    let job = x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: interrupts off, a run is active (this task belongs to it).
        let q = unsafe { queue() };
        let current = q.current;
        q.tasks[current].job.take()
    });
    let result = catch(|| {
        if let Some(job) = job {
            job();
        }
    });
    x86_64::instructions::interrupts::disable();
    // SAFETY: interrupts off, the run is active until this task is done.
    let q = unsafe { queue() };
    let current = q.current;
    let task = &mut q.tasks[current];
    task.failure = result.err();
    task.hold = None; // an exited task holds nothing
    task.done = true;
    // A done task is never picked again: this switch does not come back.
    x86_64::instructions::interrupts::enable();
    loop {
        yield_now();
    }
}

/// Whether `frame` was interrupted inside generated code: its RIP in the code window, or a
/// call into generated code (`jit::enter`) still active on the task's stack (its RIP may be in
/// a host function that generated code called).
fn in_generated_code(frame: &TrapFrame, entry_record: usize) -> bool {
    CODE_WINDOW.contains(frame.rip as usize) || entry_record != 0
}

/// The Rust side of the scheduler's stub (interrupts off): the tick hook, then a switch to the
/// next task when a run is active. Returns the frame to resume.
#[no_mangle]
extern "C" fn sched_switch(frame: &mut TrapFrame) -> *mut TrapFrame {
    let timer = frame.vector == u64::from(TIMER_VECTOR);
    if timer {
        let hook = TICK_HOOK.load(Ordering::SeqCst);
        if hook != 0 {
            // SAFETY: only `set_tick_hook` stores here, and it stores `fn()` values.
            let hook = unsafe { core::mem::transmute::<usize, fn()>(hook) };
            interrupts::as_interrupt(hook);
        }
        crate::smp::apic::eoi();
    }
    let frame: *mut TrapFrame = frame;
    if !active() || interrupts::in_interrupt() {
        return frame;
    }
    // SAFETY: interrupts off (interrupt gate), a run is active on this CPU.
    let q = unsafe { queue() };
    let cpu = current_cpu();
    let cur = q.current;
    // SAFETY: `frame` is the live frame the stub passed.
    let rip_in_code = CODE_WINDOW.contains(unsafe { (*frame).rip } as usize);
    if timer {
        q.stats.ticks += 1;
        q.stats.preempted_in_code += u64::from(rip_in_code);
    } else {
        q.stats.yields += 1;
    }
    let n = q.tasks.len();
    let Some(next) = (1..=n).map(|i| (cur + i) % n).find(|&i| !q.tasks[i].done) else {
        return frame; // unreachable: task 0 is never done
    };
    if next == cur {
        return frame;
    }
    q.stats.switches += 1;
    // No guard page: a stack that ran over its bottom word stops the kernel here, loudly (a
    // panic could not unwind out of this handler into the task).
    if q.tasks[cur].stack.first().is_some_and(|&w| w != CANARY) {
        crate::cpu::serial::force_unlock();
        crate::println!("\nsched: cpu {cpu}: task {cur} overflowed its stack");
        crate::exit(crate::ExitCode::Failure);
    }
    let record = TASK_WORD_SWAP
        .get()
        .map_or(0, |swap| swap(q.tasks[next].entry_record));
    let top = crate::cpu::catch::swap_top(q.tasks[next].catch_top);
    let rule = q.rule;
    let out = &mut q.tasks[cur];
    out.frame = frame;
    out.entry_record = record;
    out.catch_top = top;
    if rule == QuiescentRule::Tasks && !out.done {
        // SAFETY: the parked frame stays valid until this task is switched in again.
        if in_generated_code(unsafe { &*frame }, record) {
            let hold = GRACE.hold(cpu);
            out.hold = Some(match out.hold.take() {
                Some(older) => older.merge(hold),
                None => hold,
            });
            q.stats.holds += 1;
        } else {
            // Outside generated code it holds nothing: what it held before is released.
            out.hold = None;
        }
    }
    // SAFETY: the CPU holds nothing here: the interrupted task is parked on its own stack, and
    // (rule `Tasks`) covered by its hold if it was inside generated code; this is not an
    // interrupt handler's report (`in_interrupt` is false: the stub counts as the switch).
    // Under rule `Switch` this is exactly the unsound report the rule exists to show.
    unsafe { GRACE.quiescent(cpu) };
    GRACE.try_advance();
    q.current = next;
    q.tasks[next].frame
}
