//! Wall-clock deadlines from the TSC, calibrated once at boot against PIT channel 2.
//!
//! Used for timeouts (AP start-up, cross-CPU work), never to judge speed. Under QEMU TCG the TSC
//! follows the host's clock, as the PIT does, so the calibration holds there too.

use core::arch::x86_64::_rdtsc;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use x86_64::instructions::port::Port;

/// TSC ticks per millisecond; 0 until [`init`] ran.
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Fallback rate (1 GHz) should the PIT never count down; only deadlines depend on it.
const FALLBACK_TICKS_PER_MS: u64 = 1_000_000;

/// Reads the time-stamp counter.
#[inline]
#[must_use]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions in ring 0.
    unsafe { _rdtsc() }
}

/// TSC ticks during `ms` (at most 54) milliseconds of PIT channel 2, or about 2^31 if its
/// output never rises. Only on the boot CPU with nothing running beside it (boot, the
/// benchmarks), so nothing else touches the PIT ports.
pub(crate) fn pit_ticks(ms: u64) -> u64 {
    pit_window(ms, rdtsc)
}

/// How much `counter` (an increasing count: the TSC, a local APIC timer's complement) grows
/// during `ms` (at most 54) milliseconds of PIT channel 2, sampled right after the PIT starts
/// and when its output rises; bounded by ~2^31 TSC ticks should it never rise. Only where no
/// other CPU uses the PIT ports: the boot CPU with nothing running beside it, or a CPU coming
/// up while the boot CPU waits for it.
pub(crate) fn pit_window(ms: u64, counter: impl Fn() -> u64) -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    let latch = (PIT_HZ * ms / 1000) as u16;
    // SAFETY: ports 0x61 and 0x42/0x43 drive PIT channel 2 and its gate; only this function
    // uses them, never on two CPUs at once (its contract above).
    unsafe {
        let mut gate = Port::<u8>::new(0x61);
        let mut cmd = Port::<u8>::new(0x43);
        let mut ch2 = Port::<u8>::new(0x42);
        let saved = gate.read();
        gate.write((saved & !0x02) | 0x01);
        cmd.write(0xB0); // channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count)
        ch2.write(latch as u8);
        ch2.write((latch >> 8) as u8);
        let t0 = rdtsc();
        let c0 = counter();
        // Bounded: should OUT2 never rise, give up after ~2^31 TSC ticks.
        while gate.read() & 0x20 == 0 && rdtsc() - t0 < 1 << 31 {}
        let c1 = counter();
        gate.write(saved);
        c1.wrapping_sub(c0)
    }
}

/// Measures the TSC rate over 10 ms of PIT channel 2 (boot CPU, interrupts off, before any
/// other CPU runs).
pub(crate) fn init() {
    const MS: u64 = 10;
    let ticks = pit_ticks(MS) / MS;
    let rate = if ticks == 0 || ticks >= (1 << 31) / MS {
        FALLBACK_TICKS_PER_MS
    } else {
        ticks
    };
    TICKS_PER_MS.store(rate, Ordering::Relaxed);
}

fn ticks_per_ms() -> u64 {
    match TICKS_PER_MS.load(Ordering::Relaxed) {
        0 => FALLBACK_TICKS_PER_MS,
        t => t,
    }
}

/// Converts a duration to TSC ticks.
#[must_use]
pub fn ticks(d: Duration) -> u64 {
    (d.as_micros() as u64).saturating_mul(ticks_per_ms()) / 1000
}

/// Converts TSC ticks to a duration.
#[must_use]
pub fn duration(ticks: u64) -> Duration {
    Duration::from_micros(ticks.saturating_mul(1000) / ticks_per_ms())
}

/// A point in time after which something has taken too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(u64);

impl Deadline {
    /// `d` from now.
    #[must_use]
    pub fn after(d: Duration) -> Self {
        Deadline(rdtsc().saturating_add(ticks(d)))
    }

    /// Whether the deadline has passed.
    #[must_use]
    pub fn expired(self) -> bool {
        rdtsc() >= self.0
    }
}

/// Busy-waits for `d` (AP start-up delays).
pub fn spin_for(d: Duration) {
    let deadline = Deadline::after(d);
    while !deadline.expired() {
        core::hint::spin_loop();
    }
}
