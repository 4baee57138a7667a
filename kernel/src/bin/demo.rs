//! The demo kernel that `cargo run` boots: a banner with the memory map summary.
#![no_std]
#![no_main]

use codespace_kernel::{entry_point, memory, println, BootInfo, ExitCode};

entry_point!(main);

fn main(boot: &'static BootInfo) -> ExitCode {
    println!("codespace test kernel");
    println!("command line: {:?}", boot.command_line());
    for r in boot.memory_regions() {
        println!(
            "  memory {:#012x}..{:#012x} {}",
            r.start,
            r.end,
            if r.usable { "usable" } else { "reserved" }
        );
    }
    let frames = memory::frames();
    println!(
        "usable RAM: {} KiB; frames free: {} of {}",
        boot.usable_bytes() / 1024,
        frames.free_frames(),
        frames.usable_frames()
    );
    ExitCode::Success
}
