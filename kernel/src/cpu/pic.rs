//! Legacy 8259 PICs: remapped to vectors 32..48 so IRQs never alias exceptions, all masked
//! until a test unmasks the line it needs.

use x86_64::instructions::port::Port;

use crate::cpu::interrupts::IRQ_BASE;

const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_CMD: u16 = 0xA0;
const PIC2_DATA: u16 = 0xA1;
const EOI: u8 = 0x20;

fn outb(port: u16, value: u8) {
    // SAFETY: the PIC ports are owned by this module; writes only reprogram the PICs.
    unsafe { Port::<u8>::new(port).write(value) }
}

fn inb(port: u16) -> u8 {
    // SAFETY: reading a PIC data port returns its mask without side effects.
    unsafe { Port::<u8>::new(port).read() }
}

/// Remaps both PICs to `IRQ_BASE..IRQ_BASE + 16` and masks every line.
pub fn init() {
    outb(PIC1_CMD, 0x11); // ICW1: init, expect ICW4
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, IRQ_BASE); // ICW2: vector offsets
    outb(PIC2_DATA, IRQ_BASE + 8);
    outb(PIC1_DATA, 4); // ICW3: slave on IRQ2
    outb(PIC2_DATA, 2);
    outb(PIC1_DATA, 0x01); // ICW4: 8086 mode
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, 0xFF);
    outb(PIC2_DATA, 0xFF);
}

/// Unmasks (`enabled`) or masks legacy IRQ line `irq` (0..16).
pub fn set_masked(irq: u8, masked: bool) {
    let (port, bit) = if irq < 8 {
        (PIC1_DATA, irq)
    } else {
        (PIC2_DATA, irq - 8)
    };
    let mask = inb(port);
    outb(
        port,
        if masked {
            mask | (1 << bit)
        } else {
            mask & !(1 << bit)
        },
    );
    if irq >= 8 && !masked {
        set_masked(2, false);
    }
}

/// Acknowledges IRQ `irq` so the PIC delivers the next one.
pub fn end_of_interrupt(irq: u8) {
    if irq >= 8 {
        outb(PIC2_CMD, EOI);
    }
    outb(PIC1_CMD, EOI);
}
