//! Serial console on COM1 (16550 UART): everything the kernel says goes to QEMU's stdio.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550Tty};

/// I/O port base of COM1.
const COM1: u16 = 0x3F8;

static SERIAL: Mutex<Option<Uart16550Tty<PioBackend>>> = Mutex::new(None);
/// 1 + index of the CPU holding `SERIAL`, 0 when free. Written only by the holder, with
/// interrupts off, so a CPU that finds its own index here was interrupted mid-print.
static OWNER: AtomicUsize = AtomicUsize::new(0);

/// Initializes COM1; called once by the boot path before anything prints.
pub fn init() {
    // SAFETY: COM1 is the standard PC serial port; the kernel owns it exclusively from here on.
    let port = unsafe { Uart16550Tty::new_port(COM1, Config::default()) };
    *SERIAL.lock() = port.ok();
}

/// Writes formatted text to the serial console (used by [`print!`](crate::print)).
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut serial = SERIAL.lock();
        OWNER.store(crate::cpu::percpu::current_cpu() + 1, Ordering::SeqCst);
        if let Some(serial) = serial.as_mut() {
            let _ = serial.write_fmt(args);
        }
        OWNER.store(0, Ordering::SeqCst);
    });
}

/// The serial console as a [`fmt::Write`] (e.g. for a perf-map code-event listener).
#[derive(Debug, Clone, Copy, Default)]
pub struct SerialWriter;

impl Write for SerialWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        _print(format_args!("{s}"));
        Ok(())
    }
}

/// Makes the console usable from a panic or fault path that may have interrupted a writer on
/// this CPU. Another CPU's print is left alone: it finishes and releases the lock itself.
///
/// The interrupted writer never resumes (the kernel exits or jumps back to the test runner),
/// so releasing its lock cannot interleave two writers.
pub fn force_unlock() {
    if holds_lock() {
        OWNER.store(0, Ordering::SeqCst);
        // SAFETY: see above: the holder is this CPU, interrupted for good; it will not touch the
        // port again.
        unsafe { SERIAL.force_unlock() };
    }
}

/// Whether this CPU is in the middle of printing (the NMI that stops a timed-out work item
/// waits until it is not).
pub(crate) fn holds_lock() -> bool {
    OWNER.load(Ordering::SeqCst) == crate::cpu::percpu::current_cpu() + 1
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::cpu::serial::_print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::cpu::serial::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
