//! The codespace test kernel: Multiboot boot, serial console, GDT/IDT with a frame-editing fault
//! path, frame allocator, heap, W^X kernel mappings, every CPU of the machine (`smp`), a small
//! preemptive scheduler (`sched`), and a libtest-shaped test framework over serial.
//!
//! Every binary of this crate (the demo, `tests/*.rs`, examples) is a kernel: it names its main
//! function with [`entry_point!`] (or lists tests with [`kernel_tests!`]) and `cargo run` / `cargo
//! test` boot it in QEMU through `run-qemu.sh`.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

// The layers, bottom to top; each imports only from the layers below it (a layer above
// registers hooks where a lower one must call it, see `kernel_entry`).
pub mod boot;
pub mod code;
pub mod cpu;
pub mod memory;
pub mod sched;
pub mod smp;
pub mod test;
// The clients of codespace.
pub mod bench;
pub mod jit;
pub mod stress;
pub mod wasm;

use core::panic::PanicInfo;
use spin::Once;

pub use boot::info::BootInfo;
pub use cpu::qemu::{exit, ExitCode};

use cpu::{gdt, interrupts, percpu, pic, serial, time};

static BOOT_INFO: Once<BootInfo> = Once::new();

/// Boot facts (memory map, command line).
///
/// # Panics
/// Before the boot path parsed them (never, once a main function runs).
pub fn boot_info() -> &'static BootInfo {
    BOOT_INFO.get().expect("boot info is parsed before main")
}

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Physical range of the loaded kernel image including its zeroed data (identity-mapped).
#[must_use]
pub fn kernel_image() -> (u64, u64) {
    // Only the symbols' addresses are taken, which needs no `unsafe`.
    (
        &raw const __kernel_start as u64,
        &raw const __kernel_end as u64,
    )
}

extern "Rust" {
    /// Provided by the binary through [`entry_point!`].
    fn codespace_kernel_main(boot: &'static BootInfo) -> ExitCode;
}

/// 64-bit entry, called by the boot assembly with the Multiboot magic and info address.
#[no_mangle]
extern "C" fn kernel_entry(magic: u32, info: u32) -> ! {
    // First: the fault path and every per-CPU structure find this CPU through GS.
    percpu::init_cpu(0);
    serial::init();
    gdt::init(0, gdt::bsp_stacks());
    // The hooks by which the layers above reach the exception path and the scheduler's switch
    // (the lower layers never import the upper ones).
    interrupts::set_hooks(interrupts::Hooks {
        fixups: &[code::trap_fixup, code::breakpoint_fixup],
        ipi: smp::ipi_interrupt,
        nmi: smp::nmi,
        own_entries: &[
            (sched::TIMER_VECTOR, sched::timer_stub),
            (sched::YIELD_VECTOR, sched::yield_stub),
        ],
    });
    sched::set_task_word_swap(jit::swap_record);
    interrupts::init();
    pic::init();
    code::init();
    let boot = match boot::info::parse(magic, info) {
        Ok(boot) => BOOT_INFO.call_once(|| boot),
        Err(why) => {
            println!("boot failed: {why}");
            exit(ExitCode::Failure)
        }
    };
    let (image_start, image_end) = kernel_image();
    let mut reserved = [(image_start, image_end); 6];
    reserved[1..].copy_from_slice(&boot.boot_structures);
    memory::init(
        boot.memory_regions()
            .iter()
            .filter(|r| r.usable)
            .map(|r| (r.start, r.end)),
        &reserved,
    );
    if boot.has_arg("codespace.probe") {
        accelerator_probe();
    }
    time::init();
    smp::init(boot);
    code::init();
    wasm::init();
    println!("cpus online: {}", smp::online_cpus());
    // SAFETY: every kernel binary defines this symbol through `entry_point!`.
    let code = unsafe { codespace_kernel_main(boot) };
    exit(code)
}

/// run-qemu.sh's accelerator probe: boot, touch 8 MiB of fresh memory, print, exit. Under nested
/// KVM on some hosts each of these costs orders of magnitude more than under TCG.
fn accelerator_probe() -> ! {
    let mut v = alloc::vec![0u8; 8 << 20];
    for i in (0..v.len()).step_by(4096) {
        v[i] = i as u8;
    }
    println!("probe {}", v[4096 * 3]);
    exit(ExitCode::Success)
}

/// Names the main function of a kernel binary: `fn(&'static BootInfo) -> ExitCode`.
#[macro_export]
macro_rules! entry_point {
    ($main:expr) => {
        #[no_mangle]
        fn codespace_kernel_main(boot: &'static $crate::BootInfo) -> $crate::ExitCode {
            let main: fn(&'static $crate::BootInfo) -> $crate::ExitCode = $main;
            main(boot)
        }
    };
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    serial::force_unlock();
    cpu::catch::unwind_panic(info);
    println!("\n{}kernel panic: {info}", percpu::CpuPrefix);
    exit(ExitCode::Failure)
}
