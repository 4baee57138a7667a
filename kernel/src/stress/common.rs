//! What the SMP scenarios share: machine code to publish, calls into it, phases that line CPUs
//! up, faults a scenario expects, and a manager per scenario that is torn down completely.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use core::time::Duration;

use alloc::vec::Vec;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame};
use x86_64::PhysAddr;

use codespace::module::{CodeModule, ModuleConfig};
use codespace::{CodeManager, ManagerConfig};

use crate::code::{self, test_window, KernelMmu, REGISTRIES};
use crate::cpu::catch::{catch, Caught};
use crate::cpu::interrupts::{FaultInfo, PAGE_FAULT};
use crate::cpu::time::Deadline;
use crate::memory;
use crate::smp;
use x86_64::instructions::interrupts;

/// How long a CPU waits for another one to reach a phase before the scenario fails (TCG with
/// four vCPUs on a loaded two-core host can stall a vCPU for a long time).
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(30);

/// A manager over code-window slice `window` (4 GiB, see [`test_window`]), default settings
/// in the kernel's code mode ([`code::manager`]).
///
/// # Panics
/// When the manager cannot be created (a bug of the scenario: the slice is still in use).
#[must_use]
pub fn manager(window: usize) -> CodeManager<KernelMmu> {
    code::manager(test_window(window), ManagerConfig::default()).expect("a code manager")
}

/// A module of one function slot on `manager`, the registries every scenario shares.
pub fn one_function_module(manager: &CodeManager<KernelMmu>) -> CodeModule<KernelMmu> {
    CodeModule::new(
        manager,
        &REGISTRIES,
        code::module_config(
            manager,
            ModuleConfig {
                functions: 1,
                ..ModuleConfig::default()
            },
        ),
    )
    .expect("module")
}

/// Ends a scenario: waits for a grace period on every CPU (the caller runs no generated code
/// and holds no lookup reference; every other CPU is idle), drops what dropped modules left to
/// it, and checks that `manager` gave everything back.
///
/// # Panics
/// When code stayed committed or the audit finds a problem.
pub fn settle(manager: &CodeManager<KernelMmu>) {
    // SAFETY: called by the scenario driver between scenarios: no generated code on its stack,
    // no lookup reference held; the other CPUs are back in their idle loops.
    unsafe { code::synchronize() };
    REGISTRIES.grace().reclaim();
    // Modules dropped while another module's teardown ran may need a second period.
    // SAFETY: as above.
    unsafe { code::synchronize() };
    REGISTRIES.grace().reclaim();
    // Modules dropped with interrupts off (the tick's reclaim, or this driver's, which may run
    // with them off) only queued their code spaces; this is task context.
    manager.release_pending().expect("release");
    if code::rox() {
        // A scenario claiming the mode got 2 MiB frames for every space it asked for.
        assert_eq!(manager.stats().rox_fallbacks, 0, "ROX spaces fell back");
    }
    let audit = manager.audit().expect("audit");
    assert!(audit.is_clean(), "audit at the end: {audit:?}");
    assert_eq!(manager.committed(), 0, "every page decommitted at the end");
}

/// `mov eax, imm32; ret`.
#[must_use]
pub fn ret_const(v: u32) -> [u8; 6] {
    let b = v.to_le_bytes();
    [0xB8, b[0], b[1], b[2], b[3], 0xC3]
}

/// Calls published code (or a jump slot leading to it) that takes no argument and returns
/// `eax`/`rax`.
#[must_use]
pub fn call0(addr: usize) -> u64 {
    // SAFETY: every caller passes code this scenario published (or a slot jumping to such
    // code), following the C ABI with no arguments and an integer result.
    let f: extern "C" fn() -> u64 = unsafe { core::mem::transmute(addr) };
    f()
}

/// Calls published code that takes one integer argument.
#[must_use]
pub fn call1(addr: usize, a: u64) -> u64 {
    // SAFETY: as `call0`, with one integer argument.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(addr) };
    f(a)
}

/// One aligned 8-byte load from `addr` (one `mov`): what another CPU's code fetch of a jump
/// slot sees, never split.
#[must_use]
pub fn load_u64(addr: usize) -> u64 {
    // SAFETY: callers pass an 8-aligned address of published, present code.
    unsafe { AtomicU64::from_ptr(addr as *mut u64).load(Ordering::SeqCst) }
}

/// Phases of a scenario: one counter that CPUs advance and wait for.
#[derive(Debug, Default)]
pub struct Phase(AtomicU32);

impl Phase {
    /// Phase 0.
    #[must_use]
    pub const fn new() -> Self {
        Phase(AtomicU32::new(0))
    }

    /// Enters phase `step`.
    pub fn set(&self, step: u32) {
        self.0.store(step, Ordering::SeqCst);
    }

    /// Adds one to the counter (CPUs arriving at a barrier); returns the new value.
    pub fn arrive(&self) -> u32 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The current phase.
    #[must_use]
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until the counter reached `step`.
    ///
    /// # Panics
    /// After [`PHASE_TIMEOUT`].
    pub fn wait(&self, step: u32) {
        self.wait_with(step, || {});
    }

    /// Waits until the counter reached `step`, reporting quiescent states meanwhile.
    ///
    /// # Safety
    /// As [`quiescent`]: the caller runs no generated code and holds no lookup reference.
    pub unsafe fn wait_quiescent(&self, step: u32) {
        // SAFETY: the caller's contract.
        self.wait_with(step, || unsafe { quiescent() });
    }

    fn wait_with(&self, step: u32, mut tick: impl FnMut()) {
        let deadline = Deadline::after(PHASE_TIMEOUT);
        while self.get() < step {
            assert!(
                !deadline.expired(),
                "cpu {}: waited {} s for phase {step} (at {})",
                smp::current_cpu(),
                PHASE_TIMEOUT.as_secs(),
                self.get()
            );
            tick();
            core::hint::spin_loop();
        }
    }
}

/// Tells the CPUs of a scenario to stop.
#[derive(Debug, Default)]
pub struct Stop(AtomicBool);

impl Stop {
    /// Not stopped.
    #[must_use]
    pub const fn new() -> Self {
        Stop(AtomicBool::new(false))
    }

    /// Stops.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether to stop.
    #[must_use]
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Waits until `done()` holds, for at most [`PHASE_TIMEOUT`]; returns whether it did.
pub fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after(PHASE_TIMEOUT);
    while !done() {
        if deadline.expired() {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Page-fault error-code bit: the page was present (a protection violation).
pub const PF_PRESENT: u64 = 1 << 0;
/// Page-fault error-code bit: the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// Page-fault error-code bit: the access was an instruction fetch.
pub const PF_FETCH: u64 = 1 << 4;

/// What an access that should have faulted did instead.
pub enum Access {
    /// It faulted as expected; what the CPU reported.
    Faulted(FaultInfo),
    /// It completed (and read this value, for loads and calls).
    Completed(u64),
}

/// Runs `access`, which should raise a page fault; reports what happened. Other failures (a
/// panic, another exception) fail the caller.
///
/// # Panics
/// When `access` panicked or raised something other than a page fault.
pub fn try_access(access: impl FnOnce() -> u64) -> Access {
    let value = AtomicU64::new(0);
    match catch(|| value.store(access(), Ordering::SeqCst)) {
        Ok(()) => Access::Completed(value.load(Ordering::SeqCst)),
        Err(Caught::Fault(info)) if info.vector == PAGE_FAULT => Access::Faulted(info),
        Err(Caught::Fault(info)) => panic!("cpu {}: unexpected {info}", smp::current_cpu()),
        Err(Caught::Panic(msg)) => panic!("{}", msg.as_str()),
        Err(Caught::Stopped) => panic!("cpu {}: stopped", smp::current_cpu()),
    }
}

/// Checks that `info` is a page fault at `addr` whose error code has every bit of `set` and
/// none of `clear`; `what` names the access in the message.
///
/// # Panics
/// Otherwise.
pub fn check_fault(info: &FaultInfo, addr: u64, set: u64, clear: u64, what: &str) {
    let ok = info.cr2 == addr && info.error_code & set == set && info.error_code & clear == 0;
    assert!(
        ok,
        "cpu {}: {what}: expected a page fault at {addr:#x} with error bits {set:#x} set and \
         {clear:#x} clear, got {info}",
        smp::current_cpu()
    );
}

/// Runs `f(cpu)` on every online CPU at once and fails with every CPU's failure.
///
/// The boot CPU runs its share with interrupts on, like the APs: it then answers other CPUs'
/// shootdown and serialization IPIs while it spins, and waits for a contended codespace lock
/// instead of getting `Busy` (the test framework runs it with interrupts off otherwise).
///
/// # Panics
/// When any CPU's share failed (panicked, faulted or timed out).
pub fn on_each_cpu(f: impl Fn(usize) + Sync) {
    let enabled = interrupts::are_enabled();
    interrupts::enable();
    let result = smp::on_each_cpu(f);
    if !enabled {
        interrupts::disable();
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Reports quiescent states until `done()` holds, for at most [`PHASE_TIMEOUT`]; returns
/// whether it did. Every 64 polls it wakes the idle CPUs, which sleep in `hlt` and report
/// only when woken.
///
/// # Safety
/// As [`quiescent`].
pub unsafe fn poll_grace(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after(PHASE_TIMEOUT);
    let mut polls = 0u32;
    while !done() {
        if deadline.expired() {
            return false;
        }
        // SAFETY: the caller's contract.
        unsafe { quiescent() };
        polls += 1;
        if polls.is_multiple_of(64) {
            smp::sync_cores();
        }
        core::hint::spin_loop();
    }
    true
}

pub use crate::code::{quiescent, settle_slot, under_tcg};

/// Allocates frames until `frame` comes back; gives the others back. The frame allocator hands
/// out the lowest free frame at or after its cursor, so this is usually the first allocation.
///
/// # Panics
/// When the frame never comes back (it is not free).
pub fn take_frame(frame: u64) -> PhysFrame {
    let wanted = PhysFrame::containing_address(PhysAddr::new(frame));
    let mut frames = memory::frames();
    let mut others = Vec::new();
    let got = if frames.is_free(wanted) {
        loop {
            match frames.allocate_frame() {
                Some(f) if f == wanted => break Some(f),
                Some(f) => others.push(f),
                None => break None,
            }
        }
    } else {
        None
    };
    for f in others {
        // SAFETY: allocated just above and never used.
        unsafe { frames.deallocate_frame(f) };
    }
    drop(frames);
    got.unwrap_or_else(|| panic!("frame {frame:#x} did not go back to the frame allocator"))
}

/// Gives a frame [`take_frame`] took back to the frame allocator.
pub fn release(frame: PhysFrame) {
    // SAFETY: the caller took the frame with `take_frame` and no longer uses it; it is mapped
    // nowhere but the linear maps.
    unsafe { memory::frames().deallocate_frame(frame) };
}
