//! A libtest-shaped test framework over serial.
//!
//! Each `kernel/tests/*.rs` is a kernel whose tests are listed with [`kernel_tests!`]; they run in
//! order, each inside [`catch`], and print `test <name> ... ok` or `... FAILED` followed by the panic
//! message or the unexpected fault. A failing test does not stop the others. The summary line is
//! libtest's, and the exit status (through `isa-debug-exit`) says pass or fail.

use crate::cpu::catch::{catch, Caught};
use crate::cpu::interrupts::{FaultInfo, PAGE_FAULT};
use crate::cpu::qemu::ExitCode;
use crate::{print, println};

/// One kernel test: its printed name and body. A test fails by panicking or faulting.
#[derive(Debug, Clone, Copy)]
pub struct Test {
    /// `binary::function`, as printed.
    pub name: &'static str,
    /// The body.
    pub run: fn(),
}

/// Runs `tests` in order and prints libtest-shaped results; `Success` when all passed.
///
/// After each test the whole page table is audited (no W+X leaf, no writable alias of an
/// executable frame, on any address): a test that leaves one behind fails. Between tests this
/// CPU is quiescent (no generated code runs, no lookup is held), so it reports that to the grace
/// domain and runs the deferred frees that are due (dropped modules).
pub fn run(tests: &[Test]) -> ExitCode {
    run_in_mode(tests, None)
}

/// [`run`], resetting the code mode to `mode` before each test when given.
fn run_in_mode(tests: &[Test], mode: Option<bool>) -> ExitCode {
    println!("\nrunning {} tests", tests.len());
    let mut failed = 0;
    for test in tests {
        if let Some(rox) = mode {
            crate::code::set_rox(rox);
        }
        print!("test {} ... ", test.name);
        let failure = match catch(test.run) {
            Ok(()) => audit_after_test(),
            Err(caught) => Some(caught),
        };
        // SAFETY: between tests: this CPU runs no generated code and holds no lookup reference.
        unsafe { crate::code::quiescent() };
        crate::code::GRACE.reclaim();
        match failure {
            None => println!("ok"),
            Some(caught) => {
                failed += 1;
                println!("FAILED");
                match caught {
                    Caught::Panic(msg) => println!("---- {} ----\n{}", test.name, msg.as_str()),
                    Caught::Fault(info) => {
                        println!("---- {} ----\nunexpected fault: {info}", test.name)
                    }
                    Caught::Stopped => {
                        println!("---- {} ----\nstopped from another CPU", test.name)
                    }
                }
            }
        }
    }
    let passed = tests.len() - failed;
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n"
    );
    if failed == 0 {
        ExitCode::Success
    } else {
        ExitCode::Failure
    }
}

/// What [`kernel_tests!`] runs: sets the kernel's code mode from the command line (the word
/// `rox`: every manager, module and allocator on 2 MiB ROX code pages, see
/// [`crate::code::set_rox`]), prints it, and runs `tests` with [`run`], each test starting in
/// that mode (a test that switched it and failed does not leak its mode into the next).
pub fn run_kernel(boot: &crate::BootInfo, tests: &[Test]) -> ExitCode {
    let rox = boot.has_arg("rox");
    crate::code::set_rox(rox);
    println!("code mode: {}", mode_name(rox));
    run_in_mode(tests, Some(rox))
}

/// The mode line's text (the launcher's ROX pass looks for the ROX one).
#[must_use]
pub const fn mode_name(rox: bool) -> &'static str {
    if rox {
        "rox (2 MiB ROX code pages)"
    } else {
        "4 KiB code pages"
    }
}

/// The whole-page-table W^X audit, as a test failure when it is not clean.
fn audit_after_test() -> Option<Caught> {
    let report = crate::memory::wx_audit::audit_active();
    if report.is_clean() {
        return None;
    }
    let mut msg = crate::cpu::catch::Message::new();
    let _ = core::fmt::Write::write_fmt(
        &mut msg,
        format_args!("the page-table audit after the test is not clean: {report}"),
    );
    Some(Caught::Panic(msg))
}

/// Page-fault error-code bit: the page was present (protection violation).
pub const PF_PRESENT: u64 = 1 << 0;
/// Page-fault error-code bit: the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// Page-fault error-code bit: the access was an instruction fetch.
pub const PF_INSTRUCTION: u64 = 1 << 4;

/// A fault a test expects: vector, and optionally CR2 and error-code bits.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct ExpectFault {
    vector: u8,
    cr2: Option<u64>,
    bits_set: u64,
    bits_clear: u64,
}

impl ExpectFault {
    /// Expects exception `vector`.
    pub const fn vector(vector: u8) -> Self {
        ExpectFault {
            vector,
            cr2: None,
            bits_set: 0,
            bits_clear: 0,
        }
    }

    /// Expects a page fault at address `cr2`.
    pub const fn page_fault(cr2: u64) -> Self {
        ExpectFault {
            vector: PAGE_FAULT,
            cr2: Some(cr2),
            bits_set: 0,
            bits_clear: 0,
        }
    }

    /// Also requires these error-code bits to be set.
    pub const fn with_bits(mut self, bits: u64) -> Self {
        self.bits_set |= bits;
        self
    }

    /// Also requires these error-code bits to be clear.
    pub const fn without_bits(mut self, bits: u64) -> Self {
        self.bits_clear |= bits;
        self
    }

    /// Whether `info` is the expected fault.
    #[must_use]
    pub fn matches(&self, info: &FaultInfo) -> bool {
        info.vector == self.vector
            && self.cr2.is_none_or(|cr2| cr2 == info.cr2)
            && info.error_code & self.bits_set == self.bits_set
            && info.error_code & self.bits_clear == 0
    }

    /// Runs `f`, which must raise exactly this fault; returns what the CPU reported.
    ///
    /// # Panics
    /// When `f` returns normally, panics, or raises a different fault: the test fails.
    pub fn run<F: FnOnce()>(self, f: F) -> FaultInfo {
        match catch(f) {
            Ok(()) => panic!("expected {self:?}, but the code ran without faulting"),
            Err(Caught::Panic(msg)) => panic!("expected {self:?}, but the code panicked: {msg:?}"),
            Err(Caught::Fault(info)) if self.matches(&info) => info,
            Err(Caught::Fault(info)) => panic!("expected {self:?}, got {info}"),
            Err(Caught::Stopped) => panic!("expected {self:?}, but another CPU stopped the code"),
        }
    }
}

/// Declares the tests of a kernel test binary, in the order they run.
///
/// ```ignore
/// codespace_kernel::kernel_tests![reads_fault, heap_works];
/// ```
#[macro_export]
macro_rules! kernel_tests {
    ($($test:path),* $(,)?) => {
        $crate::entry_point!(|boot| {
            $crate::test::run_kernel(boot, &[
                $($crate::test::Test {
                    name: concat!(module_path!(), "::", stringify!($test)),
                    run: $test,
                }),*
            ])
        });
    };
}
