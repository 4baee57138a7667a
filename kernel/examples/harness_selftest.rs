//! A kernel that checks the host-side harness (`tests/kernel.rs`) itself: it misbehaves on
//! request so the harness can show that it notices.
//!
//! - command line `fail`: runs one passing and one failing test; the run reports failure.
//! - command line `hang`: never finishes; the runner must time it out.
//! - command line `nested`: a page-fault handler that itself faults; the kernel must report the
//!   nested fault and stop with failure instead of looping.
//! - otherwise: runs only the passing test.
#![no_std]
#![no_main]

use codespace_kernel::cpu::interrupts::{self, FaultInfo, TrapFrame};
use codespace_kernel::memory::SCRATCH_BASE;
use codespace_kernel::test::{self, Test};
use codespace_kernel::{entry_point, println, BootInfo, ExitCode};

entry_point!(main);

/// A test that passes.
const PASSING: Test = Test {
    name: "harness_selftest::passing_test",
    run: passing_test,
};

/// A test that fails with an `assert_eq!` message.
const FAILING: Test = Test {
    name: "harness_selftest::failing_test",
    run: failing_test,
};

fn main(boot: &'static BootInfo) -> ExitCode {
    if boot.has_arg("hang") {
        loop {
            core::hint::spin_loop();
        }
    }
    if boot.has_arg("nested") {
        interrupts::set_fault_handler(Some(faulting_handler));
        // SAFETY: deliberately reads an unmapped scratch address; the handler faults in turn.
        let _ = unsafe { core::ptr::read_volatile((SCRATCH_BASE + 0x1000) as *const u8) };
        println!("nested fault was not caught");
        return ExitCode::Success;
    }
    if boot.has_arg("fail") {
        test::run(&[PASSING, FAILING])
    } else {
        test::run(&[PASSING])
    }
}

fn passing_test() {
    let two = core::hint::black_box(2);
    assert_eq!(two + two, 4);
}

fn failing_test() {
    let answer = core::hint::black_box(41);
    assert_eq!(answer, 42, "the harness self-test fails on purpose");
}

/// A broken fault handler: it reads unmapped memory itself.
fn faulting_handler(_frame: &mut TrapFrame, _info: &FaultInfo) -> bool {
    // SAFETY: deliberately faults inside the page-fault handler.
    let v = unsafe { core::ptr::read_volatile((SCRATCH_BASE + 0x2000) as *const u8) };
    v == 0xAA
}
