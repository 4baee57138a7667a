//! A small xAPIC layer: the local APIC's MMIO registers, EOI and inter-processor interrupts.
//!
//! QEMU's `qemu64` CPU has an xAPIC (no x2APIC), so registers are 32-bit MMIO at the APIC base.
//! The page is reached through the direct map, whose 2 MiB page holding it is made uncached by
//! [`crate::memory::layout::make_uncached`] before the first access (device registers must not be cached
//! or combined).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use core::time::Duration;
use x86_64::registers::model_specific::Msr;

use crate::memory::PHYS_OFFSET;

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

const REG_ID: usize = 0x20;
const REG_TPR: usize = 0x80;
const REG_EOI: usize = 0xB0;
const REG_SVR: usize = 0xF0;
const REG_ESR: usize = 0x280;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_TIMER: usize = 0x320;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_LINT1: usize = 0x360;
const REG_LVT_ERROR: usize = 0x370;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3E0;

/// Divide configuration 0b0011: the timer counts at the APIC bus clock / 16.
const TIMER_DIVIDE_16: u32 = 0b0011;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;

const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_LEVEL_TRIGGERED: u32 = 1 << 15;
const DELIVERY_FIXED: u32 = 0 << 8;
const DELIVERY_NMI: u32 = 4 << 8;
const DELIVERY_INIT: u32 = 5 << 8;
const DELIVERY_STARTUP: u32 = 6 << 8;
const DELIVERY_EXTINT: u32 = 7 << 8;

/// Vector of spurious APIC interrupts (no EOI is sent for them).
pub const SPURIOUS_VECTOR: u8 = crate::cpu::interrupts::SPURIOUS_VECTOR;

/// Virtual address of the local APIC registers; 0 until [`init`].
static BASE: AtomicU64 = AtomicU64::new(0);

/// Each CPU's timer rate (counts per millisecond at divide 16), measured against the PIT when
/// the CPU came up ([`calibrate_timer`]); 0 before.
static TIMER_PER_MS: crate::cpu::percpu::PerCpu<AtomicU32> = crate::per_cpu!(AtomicU32::new(0));

/// Why the local APIC cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApicError {
    /// CPUID says the CPU has no local APIC.
    NoApic,
    /// The firmware left the APIC in x2APIC mode, which this xAPIC layer does not drive.
    X2ApicMode,
    /// The APIC base is outside the direct map.
    BaseNotMapped(u64),
}

/// Finds the boot CPU's APIC (every CPU's sits at the same physical base), makes its page
/// uncached and enables it. Returns its physical base.
pub(crate) fn init() -> Result<u64, ApicError> {
    if core::arch::x86_64::__cpuid(1).edx & (1 << 9) == 0 {
        return Err(ApicError::NoApic);
    }
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (checked above); reading it has no
    // side effects.
    let msr = unsafe { Msr::new(IA32_APIC_BASE).read() };
    if msr & APIC_BASE_X2APIC != 0 {
        return Err(ApicError::X2ApicMode);
    }
    let phys = msr & 0x000F_FFFF_F000;
    if phys >= crate::memory::PHYS_MAPPED_LIMIT {
        return Err(ApicError::BaseNotMapped(phys));
    }
    crate::memory::layout::make_uncached(phys);
    if msr & APIC_BASE_ENABLE == 0 {
        // SAFETY: sets the global enable bit of this CPU's own APIC, at the base it already has.
        unsafe { Msr::new(IA32_APIC_BASE).write(msr | APIC_BASE_ENABLE) };
    }
    BASE.store(PHYS_OFFSET + phys, Ordering::SeqCst);
    enable_local(true);
    Ok(phys)
}

fn reg(offset: usize) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) as usize + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: BASE maps this CPU's APIC registers uncached (every CPU sees its own APIC at the
    // same address); `offset` is one of the 32-bit registers named above.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as in `read`; the writes below only program this CPU's own APIC.
    unsafe { reg(offset).write_volatile(value) }
}

/// Whether [`init`] succeeded (the APIC can be used).
#[must_use]
pub fn available() -> bool {
    BASE.load(Ordering::Relaxed) != 0
}

/// Software-enables this CPU's APIC: spurious vector, task priority 0, error LVT masked, timer
/// masked. The boot CPU keeps LINT0 as ExtINT (the 8259 PIC's IRQs arrive there) and LINT1 as
/// NMI; APs mask both.
pub(crate) fn enable_local(bsp: bool) {
    write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_TPR, 0);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    if bsp {
        write(REG_LVT_LINT0, DELIVERY_EXTINT);
        write(REG_LVT_LINT1, DELIVERY_NMI);
    } else {
        write(REG_LVT_LINT0, LVT_MASKED);
        write(REG_LVT_LINT1, LVT_MASKED);
    }
    // Clear any error the reset left (the ESR is cleared by a write).
    write(REG_ESR, 0);
}

/// This CPU's APIC ID.
#[must_use]
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Ends the interrupt being serviced.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Writes the interrupt command register with interrupts off (so no handler on this CPU can
/// interleave its own ICR writes) and waits until the APIC accepted the command.
fn command(apic_id: u32, low: u32) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
            core::hint::spin_loop();
        }
        write(REG_ICR_HIGH, apic_id << 24);
        write(REG_ICR_LOW, low);
        while read(REG_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
            core::hint::spin_loop();
        }
    });
}

/// Sends fixed interrupt `vector` to the CPU with APIC ID `apic_id`.
pub fn send_fixed(apic_id: u32, vector: u8) {
    command(apic_id, DELIVERY_FIXED | u32::from(vector));
}

/// Sends an NMI to the CPU with APIC ID `apic_id`.
pub fn send_nmi(apic_id: u32) {
    command(apic_id, DELIVERY_NMI);
}

/// Sends INIT (assert, then de-assert as the MP specification's sequence does).
pub(crate) fn send_init(apic_id: u32) {
    command(
        apic_id,
        DELIVERY_INIT | ICR_LEVEL_TRIGGERED | ICR_LEVEL_ASSERT,
    );
    command(apic_id, DELIVERY_INIT | ICR_LEVEL_TRIGGERED);
}

/// Sends a start-up IPI: the AP starts in real mode at physical address `page << 12`.
pub(crate) fn send_startup(apic_id: u32, page: u8) {
    command(apic_id, DELIVERY_STARTUP | u32::from(page));
}

/// Measures this CPU's APIC timer against PIT channel 2 (10 ms) and remembers its rate. Runs on
/// each CPU as it comes up, while no other CPU uses the PIT: the boot CPU before it starts the
/// APs, each AP before it says it is online (the boot CPU only waits for that meanwhile).
pub(crate) fn calibrate_timer() {
    const MS: u64 = 10;
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(REG_TIMER_INITIAL, u32::MAX);
    // The timer counts down: the complement counts up.
    let counted = crate::cpu::time::pit_window(MS, || u64::from(!read(REG_TIMER_CURRENT)));
    write(REG_TIMER_INITIAL, 0);
    let per_ms = (counted / MS).clamp(1, u64::from(u32::MAX)) as u32;
    TIMER_PER_MS.this().store(per_ms, Ordering::SeqCst);
}

/// This CPU's APIC timer counts per millisecond (0 before [`calibrate_timer`] ran on it).
#[must_use]
pub fn timer_per_ms() -> u32 {
    TIMER_PER_MS.this().load(Ordering::SeqCst)
}

/// Timer counts for `d` on this CPU (at least 1).
fn timer_counts(d: Duration) -> u32 {
    let per_ms = u64::from(timer_per_ms().max(1));
    (d.as_micros() as u64 * per_ms / 1000).clamp(1, u64::from(u32::MAX)) as u32
}

/// Starts this CPU's APIC timer: interrupt `vector` every `period`, until [`stop_timer`].
pub fn start_periodic_timer(vector: u8, period: Duration) {
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(REG_LVT_TIMER, LVT_TIMER_PERIODIC | u32::from(vector));
    write(REG_TIMER_INITIAL, timer_counts(period));
}

/// Arms this CPU's APIC timer for one interrupt `vector` after `delay`.
pub fn one_shot_timer(vector: u8, delay: Duration) {
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(REG_LVT_TIMER, u32::from(vector));
    write(REG_TIMER_INITIAL, timer_counts(delay));
}

/// Stops and masks this CPU's APIC timer.
pub fn stop_timer() {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INITIAL, 0);
}
