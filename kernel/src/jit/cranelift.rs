//! This kernel's side of `codespace_cranelift` (cranelift-jit's `JITModule` on codespace): the
//! [`Kernel`] implementation — entering generated code and landing from traps ([`enter`]), the
//! per-CPU compile stacks ([`stack`](super::stack)), quiescent reports, module calls counted for
//! the stop NMI — and the pieces a module is built from ([`codespace`], [`isa`]).

use alloc::string::ToString;

use codespace::CodeManager;
use codespace_cranelift::{default_libcall_names, Codespace, Exit, JITBuilder, Kernel};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};

use super::enter::{self, enter, trap_landing_address, Trap};
use super::stack::on_compile_stack;
use super::JitError;
use crate::code::{KernelMmu, REGISTRIES};
use crate::smp::work::module_call;

/// This kernel, as `codespace_cranelift` sees it.
#[derive(Debug)]
pub struct TestKernel;

/// The one [`TestKernel`].
pub static KERNEL: TestKernel = TestKernel;

// SAFETY: `trap_landing_address` is `codespace_jit_trap_landing`, which the #PF/#UD/#DE paths
// (`code::trap_fixup`) enter with the faulting registers and r10 = PC, and which unwinds to the
// innermost `codespace_jit_enter` of this CPU (or executes `ud2` when there is none); `enter`
// is that entry (System V, callee-saved registers restored on both ways back); `quiescent`
// reports only from task context with no entry active on this CPU (`reclaim_may_report`); the
// kernel heap is mapped NX (`memory`, checked by the W^X audit).
unsafe impl Kernel for TestKernel {
    fn landing_pad(&self) -> usize {
        trap_landing_address()
    }

    fn on_compile_stack(&self, f: &mut dyn FnMut()) -> Result<(), &'static str> {
        on_compile_stack(f).map_err(|e| match e {
            JitError::CompileStack(why) => why,
            _ => "compile stack",
        })
    }

    unsafe fn enter(&self, entry: usize, args: &[u64]) -> Exit {
        // SAFETY: the caller's contract is `enter`'s.
        match unsafe { enter(entry, args) } {
            Ok(value) => Exit::Returned(value),
            Err(Trap::OutOfBounds { pc, address }) => Exit::Trapped {
                pc,
                fault_address: address,
            },
            Err(Trap::LazyCompileFailed) => Exit::Other(1),
        }
    }

    fn quiescent(&self) {
        if !crate::cpu::interrupts::in_interrupt() && !enter::active() {
            // SAFETY: task context with no call into generated code active on this CPU (its
            // entry record is empty), and this glue holds no lookup result here.
            unsafe { crate::code::quiescent() };
        }
    }

    fn patch_slots_twice(&self) -> bool {
        // See `code::settle_slot`: TCG may keep running a stale translation of a slot.
        crate::code::under_tcg()
    }

    fn module_call(&self, f: &mut dyn FnMut()) {
        module_call(f);
    }
}

/// The codespace pieces of a module over `manager`: this kernel's registries and [`KERNEL`].
#[must_use]
pub fn codespace(manager: &CodeManager<KernelMmu>) -> Codespace<'_, KernelMmu> {
    Codespace {
        manager,
        registries: &REGISTRIES,
        kernel: &KERNEL,
    }
}

/// A module builder compiling for `isa` with the default libcall names, its code on ROX pages
/// when the kernel runs in that mode and `manager` allows it ([`crate::code::wants_rox`]).
#[must_use]
pub fn builder(isa: OwnedTargetIsa, manager: &CodeManager<KernelMmu>) -> JITBuilder {
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    builder.rox(crate::code::wants_rox(manager));
    builder
}

/// An ISA for `codespace_cranelift` with cranelift-jit's test flags (`use_colocated_libcalls`
/// and `is_pic` off) and this kernel's (see [`isa`](super::isa)): no probestack, frame pointers.
///
/// # Errors
/// [`JitError::Codegen`] when Cranelift refuses a setting.
pub fn module_isa() -> Result<OwnedTargetIsa, JitError> {
    let codegen = |e: &dyn core::fmt::Display| JitError::Codegen(e.to_string());
    let mut flags = settings::builder();
    for (name, value) in [
        ("use_colocated_libcalls", "false"),
        ("is_pic", "false"),
        ("enable_verifier", "true"),
        ("enable_probestack", "false"),
        ("unwind_info", "false"),
        ("preserve_frame_pointers", "true"),
    ] {
        flags.set(name, value).map_err(|e| codegen(&e))?;
    }
    codespace_cranelift::native::builder()
        .map_err(|e| codegen(&e))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| codegen(&e))
}
