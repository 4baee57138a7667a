//! Per-CPU checks: a CPU that does not enforce CR0.WP (ring-0 writes would ignore read-only
//! pages, so W^X would be a promise on paper) is refused with `CodeError::CpuUnsupported` the
//! first time it uses a manager, even when the manager was created on a CPU that passed. WP is
//! turned off for a moment on one CPU, with interrupts off, and restored right after.

use codespace::mmu::MmuError;
use codespace::{CodeError, ManagerConfig};
use x86_64::registers::control::{Cr0, Cr0Flags};

use super::common;
use crate::code::{self, test_window};
use crate::smp;

/// Runs `f` on the calling CPU with CR0.WP off (and interrupts off); restores both.
fn without_write_protect<R>(f: impl FnOnce() -> R) -> R {
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: only this CPU's supervisor write protection changes, for the duration of `f`,
        // which writes nothing read-only (it only asks codespace, which refuses the CPU before
        // writing anything); interrupts are off, so nothing else runs on this CPU meanwhile.
        unsafe { Cr0::update(|cr0| cr0.remove(Cr0Flags::WRITE_PROTECT)) };
        let r = f();
        // SAFETY: restores the protection the kernel runs with.
        unsafe { Cr0::update(|cr0| cr0.insert(Cr0Flags::WRITE_PROTECT)) };
        r
    })
}

/// Whether `e` is the refusal of CPU `cpu` for its WP.
fn refuses_wp(e: &CodeError, cpu: usize) -> bool {
    matches!(e, CodeError::CpuUnsupported(MmuError::WriteProtectDisabled { cpu: c }) if *c == cpu)
}

/// Checks the refusal on the highest CPU (the boot CPU with one CPU) against a manager created
/// on CPU 0 over code-window slice `window`, and against creating a manager there; returns the
/// CPU checked.
///
/// # Panics
/// When a CPU without WP is accepted, or a CPU with WP is refused.
pub fn run(window: usize) -> usize {
    let n = smp::online_cpus();
    let cpu = n - 1;
    let mgr = common::manager(window);
    let check = || {
        // First use of `mgr` on this CPU.
        let first = without_write_protect(|| mgr.query(mgr.window().start()));
        match first {
            Err(e) if refuses_wp(&e, cpu) => {}
            other => panic!("cpu {cpu} without CR0.WP used the manager: {other:?}"),
        }
        let created = without_write_protect(|| {
            code::manager(test_window(window + 1), ManagerConfig::default()).map(drop)
        });
        match created {
            Err(e) if refuses_wp(&e, cpu) => {}
            other => panic!("cpu {cpu} without CR0.WP created a manager: {other:?}"),
        }
        // WP back on: the same CPU is accepted.
        assert_eq!(
            mgr.query(mgr.window().start())
                .expect("accepted with WP on"),
            None
        );
        let audit = mgr.audit().expect("audit");
        assert!(audit.is_clean(), "{audit:?}");
    };
    if cpu == 0 {
        // One CPU: every manager there is was created (and so checked) on CPU 0; what can be
        // checked is that creating one is refused.
        let created = without_write_protect(|| {
            code::manager(test_window(window + 1), ManagerConfig::default()).map(drop)
        });
        assert!(
            matches!(&created, Err(e) if refuses_wp(e, 0)),
            "cpu 0 without CR0.WP created a manager: {created:?}"
        );
    } else {
        smp::run_on(cpu, check).unwrap_or_else(|e| panic!("{e}"));
    }
    drop(mgr);
    cpu
}
