//! Per-CPU identity and storage.
//!
//! Each CPU's GS base points at its own [`CpuLocal`], whose first word is the CPU's dense index
//! (0 = the boot CPU). [`current_cpu`] is one `mov %gs:0` — no lock, no APIC read. GS base is set
//! once per CPU before anything else runs on it and never changes, and nothing in this kernel
//! migrates a running context between CPUs, so the value is stable even with interrupts enabled.
//!
//! Per-CPU state lives in [`PerCpu`] arrays indexed by that number, one cache line per CPU so
//! CPUs never write each other's lines.

use core::arch::asm;
use x86_64::registers::model_specific::GsBase;
use x86_64::VirtAddr;

/// Most CPUs this kernel runs (bitmasks of CPUs are one `u64`).
pub const MAX_CPUS: usize = 64;

/// What GS points at on each CPU.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct CpuLocal {
    /// Dense CPU index; must stay the first field (`current_cpu` reads `%gs:0`).
    index: usize,
}

static LOCALS: [CpuLocal; MAX_CPUS] = {
    let mut locals = [const { CpuLocal { index: 0 } }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        locals[i].index = i;
        i += 1;
    }
    locals
};

/// Points this CPU's GS base at the [`CpuLocal`] of index `cpu`. Called first thing on every CPU
/// (the boot CPU in `kernel_entry`, each AP in `ap_main`), before any code that asks
/// [`current_cpu`] — the fault path does.
pub(crate) fn init_cpu(cpu: usize) {
    let local = &LOCALS[cpu];
    // `GsBase::write` is safe: the value is a canonical kernel address of a static.
    GsBase::write(VirtAddr::from_ptr(local));
}

/// Dense index of the CPU running this code: 0 for the boot CPU, then 1.. in MADT order.
#[inline]
#[must_use]
pub fn current_cpu() -> usize {
    let index: usize;
    // SAFETY: GS base points at this CPU's `CpuLocal` (set by `init_cpu` before any caller runs),
    // whose first word is its index; the read has no side effects.
    unsafe {
        asm!("mov {}, gs:[0]", out(reg) index, options(nostack, preserves_flags, readonly));
    }
    index
}

/// A value padded to its own cache line.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CachePadded<T>(pub T);

/// One `T` per CPU, each on its own cache line. Build it with [`per_cpu!`](crate::per_cpu).
#[derive(Debug)]
pub struct PerCpu<T>(pub [CachePadded<T>; MAX_CPUS]);

impl<T> PerCpu<T> {
    /// This CPU's value.
    #[inline]
    pub fn this(&self) -> &T {
        &self.0[current_cpu()].0
    }

    /// CPU `cpu`'s value.
    ///
    /// # Panics
    /// When `cpu >= MAX_CPUS`.
    #[inline]
    pub fn get(&self, cpu: usize) -> &T {
        &self.0[cpu].0
    }
}

/// A [`PerCpu`] whose every slot starts as the const expression `$init`.
#[macro_export]
macro_rules! per_cpu {
    ($init:expr) => {
        $crate::cpu::percpu::PerCpu(
            [const { $crate::cpu::percpu::CachePadded($init) }; $crate::cpu::percpu::MAX_CPUS],
        )
    };
}

/// Set once a second CPU came online (by the SMP layer): from then on fatal messages name
/// their CPU.
static SEVERAL_ONLINE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Called by the SMP layer when a CPU other than the boot CPU comes online.
pub fn note_several_cpus_online() {
    SEVERAL_ONLINE.store(true, core::sync::atomic::Ordering::SeqCst);
}

/// Prints `cpu N: ` before a message once more than one CPU is online (fatal paths).
#[derive(Debug, Clone, Copy)]
pub struct CpuPrefix;

impl core::fmt::Display for CpuPrefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if SEVERAL_ONLINE.load(core::sync::atomic::Ordering::SeqCst) {
            write!(f, "cpu {}: ", current_cpu())
        } else {
            Ok(())
        }
    }
}
