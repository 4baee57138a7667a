//! Symmetric multiprocessing for the test kernel: CPU identity, application-processor start-up,
//! cross-CPU requests (TLB shootdown, core serialization, function calls) and test work on other
//! CPUs.
//!
//! - Identity: [`current_cpu`] (GS-based, dense, boot CPU = 0), [`online_cpus`], [`max_cpus`].
//! - Requests over IPIs ([`ipi`]): [`shootdown`], [`sync_cores`], [`call_on_others`] — callable
//!   with interrupts off, deadlock-free when CPUs call them at once; counted by [`ipi_stats`].
//! - Work ([`work`]): [`run_on`], [`on_each_cpu`], with deadlines and failures named by CPU.
//! - APs run an idle loop that calls the [`set_idle_hook`] hook each iteration and sleeps in
//!   `hlt` until an IPI brings a request or work.

pub mod apic;
mod boot;
pub mod ipi;
pub mod madt;
pub mod work;

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub use crate::cpu::percpu::{current_cpu, MAX_CPUS};
pub use ipi::{call_on_others, ipi_stats, shootdown, sync_cores, IpiSnapshot, IpiStats};
pub use work::{
    on_each_cpu, on_each_cpu_timeout, run_on, run_on_timeout, CpuFailure, WorkError, WorkFailure,
};

use crate::cpu::interrupts::TrapFrame;

/// Bit `i`: CPU `i` is online (answers IPIs). Set once per CPU, never cleared.
static ONLINE: AtomicU64 = AtomicU64::new(1);
/// CPUs started at boot (indices `0..STARTED`).
static STARTED: AtomicUsize = AtomicUsize::new(1);
/// APIC ID of each CPU index.
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// The idle hook as a `fn(usize)` address, 0 for none.
static IDLE_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Number of CPUs online.
#[must_use]
pub fn online_cpus() -> usize {
    online_mask().count_ones() as usize
}

/// CPU indices are `0..max_cpus()`: the CPUs started at boot (fixed once `main` runs).
#[must_use]
pub fn max_cpus() -> usize {
    STARTED.load(Ordering::SeqCst)
}

/// Whether CPU `cpu` is online.
#[must_use]
pub fn cpu_online(cpu: usize) -> bool {
    cpu < MAX_CPUS && online_mask() & (1 << cpu) != 0
}

/// The APIC ID of CPU `cpu`.
#[must_use]
pub fn apic_id(cpu: usize) -> u32 {
    APIC_IDS[cpu].load(Ordering::Relaxed)
}

pub(crate) fn online_mask() -> u64 {
    ONLINE.load(Ordering::SeqCst)
}

/// Installs `hook`, called with the CPU's index on every idle-loop iteration of every AP and on
/// every iteration of the work framework's wait loop (both are quiescent points: no lookup or
/// generated code is running there), or removes it. The hook runs with interrupts enabled or
/// disabled, must be short, and must not issue cross-CPU requests that wait for the caller.
pub fn set_idle_hook(hook: Option<fn(usize)>) {
    IDLE_HOOK.store(hook.map_or(0, |h| h as usize), Ordering::SeqCst);
}

pub(crate) fn idle_hook() -> Option<fn(usize)> {
    match IDLE_HOOK.load(Ordering::SeqCst) {
        0 => None,
        // SAFETY: only `set_idle_hook` stores here, and it stores `fn(usize)` addresses.
        h => Some(unsafe { core::mem::transmute::<usize, fn(usize)>(h) }),
    }
}

/// Starts every CPU the MADT lists (boot CPU, after memory and time are set up). Without a
/// usable local APIC or MADT the kernel runs on the boot CPU alone, and says why.
pub(crate) fn init(boot: &crate::BootInfo) {
    work::close_boot_cpu_slot();
    match crate::smp::apic::init() {
        Ok(_) => {
            APIC_IDS[0].store(crate::smp::apic::id(), Ordering::Relaxed);
            // Before any AP starts: the PIT is the boot CPU's alone.
            crate::smp::apic::calibrate_timer();
        }
        Err(why) => {
            crate::println!("smp: no usable local APIC ({why:?}); running on one CPU");
            return;
        }
    }
    match crate::smp::madt::cpus() {
        Ok(list) => boot::start_aps(&list, boot),
        Err(why) => crate::println!("smp: no CPU list ({why:?}); running on one CPU"),
    }
}

/// The IPI vector's handler (interrupts off, an atomic context): serves this CPU's mailbox
/// and acknowledges the interrupt (the `ipi` hook of `interrupts::Hooks`).
pub(crate) fn ipi_interrupt() {
    ipi::interrupt();
    apic::eoi();
}

/// The NMI handler.
pub(crate) fn nmi(frame: &mut TrapFrame) {
    work::nmi(frame);
}
