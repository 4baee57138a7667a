//! Serial console on COM1 (16550 UART): everything the kernel says goes to QEMU's stdio.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550Tty};

/// I/O port base of COM1.
const COM1: u16 = 0x3F8;

static SERIAL: Mutex<Option<Uart16550Tty<PioBackend>>> = Mutex::new(None);

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
        if let Some(serial) = SERIAL.lock().as_mut() {
            let _ = serial.write_fmt(args);
        }
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

/// Makes the console usable from a panic or fault path that may have interrupted a writer.
///
/// The interrupted writer never resumes (the kernel exits or jumps back to the test runner),
/// so releasing its lock cannot interleave two writers.
pub fn force_unlock() {
    if SERIAL.is_locked() {
        // SAFETY: see above: the holder was interrupted for good and will not touch the port again.
        unsafe { SERIAL.force_unlock() };
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
