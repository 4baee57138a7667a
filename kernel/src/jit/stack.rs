//! The stacks Cranelift runs on. Compiling a function needs more stack than a kernel stack has
//! left (an unoptimised kernel build of Cranelift needs well over 64 KiB), and an overflow must
//! be a reported fault, never a silent write over whatever lies below. So compilation switches to
//! a stack of its own: [`SIZE`] bytes per CPU in the scratch PML4 slot, mapped on that CPU's first
//! compilation, with an unmapped guard below each. An overflow faults on the guard; the #PF
//! handler then runs on the same (exhausted) stack, faults again, and the #DF handler (on its own
//! IST stack) reports a double fault: a stop with a report, never corruption.
//!
//! # Concurrency
//!
//! One stack per CPU, so CPUs compile at the same time without a lock: stack `cpu` is
//! `[BASE + cpu × STRIDE + GUARD, BASE + (cpu + 1) × STRIDE)`, and only CPU `cpu` runs on it
//! (nothing in this kernel migrates a running context). Mapping happens once per CPU under that
//! CPU's `Once`; other CPUs only read the `Once` ([`peak`] of the current CPU only).
//!
//! Re-entrancy: a compilation interrupted by an interrupt handler that compiles too (a tier-up
//! from the timer) finds the stack pointer already inside this CPU's compile stack and keeps
//! running on it, below the interrupted compilation's frames.

use core::arch::global_asm;
use core::mem::MaybeUninit;

use spin::Once;
use x86_64::structures::paging::PageTableFlags as F;

use super::JitError;
use crate::cpu::percpu::{current_cpu, PerCpu};
use crate::memory::{self, SCRATCH_BASE};

/// Bytes of one compile stack.
pub const SIZE: usize = 1 << 20;
/// Unmapped bytes below each stack.
const GUARD: usize = 1 << 20;
/// Distance between two CPUs' stacks.
const STRIDE: usize = GUARD + SIZE;
/// Start of CPU 0's guard: 48 GiB into the scratch slot (the stacks of 64 CPUs end at 48.125 GiB,
/// below the linear memories at 64 GiB).
const BASE: usize = (SCRATCH_BASE + (48 << 30)) as usize;
/// Fill of unused stack, for measuring the deepest use.
const PAINT: u64 = 0x5AC4_5AC4_5AC4_5AC4;

/// `[bottom, top)` of CPU `cpu`'s stack.
fn range(cpu: usize) -> (usize, usize) {
    let bottom = BASE + cpu * STRIDE + GUARD;
    (bottom, bottom + SIZE)
}

/// Whether each CPU's stack is mapped (and painted), or why it could not be.
static MAPPED: PerCpu<Once<Result<(), &'static str>>> = crate::per_cpu!(Once::new());

extern "C" {
    fn codespace_jit_call_on_stack(data: *mut u8, run: extern "C" fn(*mut u8), top: usize);
}

// Saves RBP, switches RSP to `top` (16-byte aligned), calls `run(data)`, switches back.
global_asm!(
    r#"
    .section .text
    .global codespace_jit_call_on_stack
codespace_jit_call_on_stack:
    pushq %rbp
    movq %rsp, %rbp
    movq %rdx, %rsp
    callq *%rsi
    movq %rbp, %rsp
    popq %rbp
    retq
"#,
    options(att_syntax)
);

fn current_rsp() -> usize {
    let rsp: usize;
    // SAFETY: reads the stack pointer; no memory is touched.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack)) };
    rsp
}

/// Maps CPU `cpu`'s stack on first use. Called on CPU `cpu` only.
fn map(cpu: usize) -> Result<(usize, usize), JitError> {
    let (bottom, top) = range(cpu);
    let mapped = MAPPED.get(cpu).call_once(|| {
        for page in (bottom..top).step_by(4096) {
            memory::map_fresh_page(page as u64, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)?;
        }
        paint(bottom, top);
        Ok(())
    });
    mapped.map_err(JitError::CompileStack)?;
    Ok((bottom, top))
}

/// Repaints `[bottom, end)` of a compile stack.
fn paint(bottom: usize, end: usize) {
    for word in (bottom..end).step_by(8) {
        // SAFETY: `[bottom, end)` lies in this CPU's stack, mapped RW (see `map`), and is unused:
        // nothing runs on it below the current frame, or at all when `end` is its top.
        unsafe { (word as *mut u64).write_volatile(PAINT) };
    }
}

/// Runs `f` on this CPU's compile stack (or directly when already on it).
///
/// # Errors
/// [`JitError::CompileStack`] when the stack cannot be mapped (no frames).
pub fn on_compile_stack<F: FnOnce() -> R, R>(f: F) -> Result<R, JitError> {
    let (bottom, top) = map(current_cpu())?;
    let rsp = current_rsp();
    if (bottom..top).contains(&rsp) {
        return Ok(f());
    }
    struct Call<G, S> {
        f: Option<G>,
        result: MaybeUninit<S>,
    }
    extern "C" fn run<G: FnOnce() -> S, S>(data: *mut u8) {
        // SAFETY: `data` is the `Call` below, alive and exclusively ours during the switch.
        let call = unsafe { &mut *data.cast::<Call<G, S>>() };
        if let Some(f) = call.f.take() {
            call.result.write(f());
        }
    }
    let mut call = Call {
        f: Some(f),
        result: MaybeUninit::uninit(),
    };
    // SAFETY: this CPU's compile stack is mapped, 16-byte aligned at `top` and unused (we are
    // not on it, and no other CPU ever runs on it); the assembly restores RSP and RBP before
    // returning, so this frame is intact.
    unsafe {
        codespace_jit_call_on_stack((&raw mut call).cast::<u8>(), run::<F, R>, top);
    }
    // `run` always takes `f` and writes the result: `f` was `Some` and a panic never returns
    // here (the kernel's panic path abandons the frames).
    // SAFETY: written by `run`, as above.
    Ok(unsafe { call.result.assume_init() })
}

/// Deepest use of this CPU's compile stack since the last [`reset_peak`] on it, in bytes.
#[must_use]
pub fn peak() -> usize {
    let cpu = current_cpu();
    if !matches!(MAPPED.get(cpu).get(), Some(Ok(()))) {
        return 0;
    }
    let (bottom, top) = range(cpu);
    let lowest = (bottom..top)
        .step_by(8)
        // SAFETY: the stack is mapped (checked above); reading never disturbs a user of it.
        .find(|&w| unsafe { (w as *const u64).read_volatile() } != PAINT)
        .unwrap_or(top);
    top - lowest
}

/// Repaints the unused part of this CPU's compile stack so [`peak`] measures from now on.
pub fn reset_peak() {
    let cpu = current_cpu();
    if matches!(MAPPED.get(cpu).get(), Some(Ok(()))) {
        let (bottom, top) = range(cpu);
        let rsp = current_rsp();
        // On the compile stack, only the part below this frame is unused.
        let end = if (bottom..top).contains(&rsp) {
            rsp - 256
        } else {
            top
        };
        paint(bottom, end);
    }
}
