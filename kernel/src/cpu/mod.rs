//! The CPU and interrupt layer: per-CPU blocks, GDT/TSS, the IDT with its entry stubs and the
//! dispatcher (into which the layers above register hooks), returning from expected faults
//! (`catch`), the legacy PIC and PIT, serial output, QEMU's exit device.

pub mod catch;
pub mod gdt;
pub mod interrupts;
pub mod percpu;
pub mod pic;
pub mod qemu;
pub mod serial;
pub mod time;
