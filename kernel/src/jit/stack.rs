//! The stack Cranelift runs on. Compiling a function needs more stack than the kernel's 64 KiB
//! boot stack has left (an unoptimised kernel build of Cranelift needs well over that), and the
//! boot stack has no guard: an overflow would silently overwrite the boot page tables below it.
//! So compilation switches to a stack of its own: [`SIZE`] bytes in the scratch PML4 slot, mapped
//! on first use, with an unmapped guard page below it, so an overflow is a reported page fault
//! (the #PF handler runs on its own IST stack), never corruption.
//!
//! Every CPU has a compile stack of its own (mapped on its first compilation), so CPUs compile at
//! the same time: CPU `i`'s stack is the `i`-th 2 MiB slot from [`STACKS`] (guard page, then
//! [`SIZE`] bytes). Nothing migrates a running context between CPUs, so a compilation ends on
//! the CPU (and the stack) it began on.
//!
//! Re-entrancy: a compilation interrupted by an interrupt handler that compiles too (a tier-up
//! from the timer) finds the stack pointer already inside its CPU's compile stack and keeps
//! running on it.

use core::arch::global_asm;
use core::mem::MaybeUninit;

use spin::Once;
use x86_64::structures::paging::PageTableFlags as F;

use super::JitError;
use crate::memory::{self, SCRATCH_BASE};
use crate::percpu::{current_cpu, MAX_CPUS};

/// Bytes of a compile stack.
pub const SIZE: usize = 1 << 20;
/// Where the per-CPU stack slots start (2 MiB each: an unmapped guard page, then the stack).
pub const STACKS: usize = (SCRATCH_BASE + (48 << 30)) as usize;
const SLOT: usize = 2 << 20;
/// Fill of unused stack, for measuring the deepest use.
const PAINT: u64 = 0x5AC4_5AC4_5AC4_5AC4;

/// Whether each CPU's stack is mapped (or why it could not be).
static MAPPED: [Once<Result<(), &'static str>>; MAX_CPUS] = [const { Once::new() }; MAX_CPUS];

/// The calling CPU's compile stack: `[bottom, top)`, its slot's guard page below `bottom`.
fn bounds() -> (usize, usize) {
    let bottom = STACKS + current_cpu() * SLOT + 4096;
    (bottom, bottom + SIZE)
}

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

/// Maps the calling CPU's stack on first use.
fn map() -> Result<(), JitError> {
    let (bottom, top) = bounds();
    let mapped = MAPPED[current_cpu()].call_once(|| {
        for page in (bottom..top).step_by(4096) {
            memory::map_fresh_page(page as u64, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)?;
        }
        paint_below(top);
        Ok(())
    });
    mapped.map_err(JitError::CompileStack)
}

fn mapped() -> bool {
    matches!(MAPPED[current_cpu()].get(), Some(Ok(())))
}

/// Repaints the calling CPU's compile stack from its bottom up to `end`.
fn paint_below(end: usize) {
    let (bottom, _) = bounds();
    for word in (bottom..end).step_by(8) {
        // SAFETY: `[bottom, end)` is mapped RW (see `map`) and unused: nothing runs on this
        // CPU's compile stack below the current frame, or at all when `end` is its top (no
        // other CPU uses it).
        unsafe { (word as *mut u64).write_volatile(PAINT) };
    }
}

/// Runs `f` on the calling CPU's compile stack (or directly when already on it).
///
/// # Errors
/// [`JitError::CompileStack`] when the stack cannot be mapped (no frames).
pub fn on_compile_stack<F: FnOnce() -> R, R>(f: F) -> Result<R, JitError> {
    map()?;
    let (bottom, top) = bounds();
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
    // not on it, and no other CPU uses it); the assembly restores RSP and RBP before returning,
    // so this frame is intact.
    unsafe {
        codespace_jit_call_on_stack((&raw mut call).cast::<u8>(), run::<F, R>, top);
    }
    // `run` always takes `f` and writes the result: `f` was `Some` and a panic never returns
    // here (the kernel's panic path abandons the frames).
    // SAFETY: written by `run`, as above.
    Ok(unsafe { call.result.assume_init() })
}

/// Deepest use of the calling CPU's compile stack since the last [`reset_peak`], in bytes.
#[must_use]
pub fn peak() -> usize {
    if !mapped() {
        return 0;
    }
    let (bottom, top) = bounds();
    let lowest = (bottom..top)
        .step_by(8)
        // SAFETY: the stack is mapped (checked above); reading never disturbs a user of it.
        .find(|&w| unsafe { (w as *const u64).read_volatile() } != PAINT)
        .unwrap_or(top);
    top - lowest
}

/// Repaints the unused part of the calling CPU's compile stack so [`peak`] measures from now on.
pub fn reset_peak() {
    if mapped() {
        let (bottom, top) = bounds();
        let rsp = current_rsp();
        // On the compile stack, only the part below this frame is unused.
        let end = if (bottom..top).contains(&rsp) {
            rsp - 256
        } else {
            top
        };
        paint_below(end);
    }
}
