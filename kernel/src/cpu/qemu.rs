//! Leaving QEMU with a status through the `isa-debug-exit` device.

use x86_64::instructions::port::Port;

/// I/O port of `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
const DEBUG_EXIT_PORT: u16 = 0xF4;

/// Status the kernel reports to QEMU; QEMU exits with `(code << 1) | 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Everything passed: QEMU exits with 33, which `run-qemu.sh` maps to 0.
    Success = 0x10,
    /// Something failed: QEMU exits with 35, which `run-qemu.sh` maps to 1.
    Failure = 0x11,
}

/// Stops the machine with `code`. Halts forever if the exit device is missing.
pub fn exit(code: ExitCode) -> ! {
    // SAFETY: port 0xf4 is the debug-exit device the runner always attaches; writing it ends QEMU.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(code as u32) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
