//! The stack Cranelift runs on. Compiling a function needs more stack than the kernel's 64 KiB
//! boot stack has left (an unoptimised kernel build of Cranelift needs well over that), and the
//! boot stack has no guard: an overflow would silently overwrite the boot page tables below it.
//! So compilation switches to a stack of its own: [`SIZE`] bytes in the scratch PML4 slot, mapped
//! on first use, with an unmapped guard page below it, so an overflow is a reported page fault
//! (the #PF handler runs on its own IST stack), never corruption.
//!
//! Re-entrancy: a compilation interrupted by an interrupt handler that compiles too (a tier-up
//! from the timer) finds the stack pointer already inside the compile stack and keeps running on
//! it. One CPU compiles at a time today; with SMP each CPU gets its own stack (slot index = CPU).

use core::arch::global_asm;
use core::mem::MaybeUninit;

use spin::Once;
use x86_64::structures::paging::PageTableFlags as F;

use super::JitError;
use crate::memory::{self, SCRATCH_BASE};

/// Bytes of the compile stack.
pub const SIZE: usize = 1 << 20;
/// Lowest address of the stack; the page below it is the unmapped guard.
const BOTTOM: usize = (SCRATCH_BASE + (48 << 30)) as usize;
const TOP: usize = BOTTOM + SIZE;
/// Fill of unused stack, for measuring the deepest use.
const PAINT: u64 = 0x5AC4_5AC4_5AC4_5AC4;

static MAPPED: Once<Result<(), &'static str>> = Once::new();

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

fn map() -> Result<(), JitError> {
    let mapped = MAPPED.call_once(|| {
        for page in (BOTTOM..TOP).step_by(4096) {
            memory::map_fresh_page(page as u64, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)?;
        }
        paint_below(TOP);
        Ok(())
    });
    mapped.map_err(JitError::CompileStack)
}

/// Repaints the compile stack from its bottom up to `end`.
fn paint_below(end: usize) {
    for word in (BOTTOM..end).step_by(8) {
        // SAFETY: `[BOTTOM, end)` is mapped RW (see `map`) and unused: nothing runs on the
        // compile stack below the current frame or at all when `end` is `TOP`.
        unsafe { (word as *mut u64).write_volatile(PAINT) };
    }
}

/// Runs `f` on the compile stack (or directly when already on it).
///
/// # Errors
/// [`JitError::CompileStack`] when the stack cannot be mapped (no frames).
pub fn on_compile_stack<F: FnOnce() -> R, R>(f: F) -> Result<R, JitError> {
    map()?;
    let rsp = current_rsp();
    if (BOTTOM..TOP).contains(&rsp) {
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
    // SAFETY: the compile stack is mapped, 16-byte aligned at `TOP` and unused (we are not on
    // it); the assembly restores RSP and RBP before returning, so this frame is intact.
    unsafe {
        codespace_jit_call_on_stack((&raw mut call).cast::<u8>(), run::<F, R>, TOP);
    }
    // `run` always takes `f` and writes the result: `f` was `Some` and a panic never returns
    // here (the kernel's panic path abandons the frames).
    // SAFETY: written by `run`, as above.
    Ok(unsafe { call.result.assume_init() })
}

/// Deepest use of the compile stack since the last [`reset_peak`], in bytes.
#[must_use]
pub fn peak() -> usize {
    if !matches!(MAPPED.get(), Some(Ok(()))) {
        return 0;
    }
    let lowest = (BOTTOM..TOP)
        .step_by(8)
        // SAFETY: the stack is mapped (checked above); reading never disturbs a user of it.
        .find(|&w| unsafe { (w as *const u64).read_volatile() } != PAINT)
        .unwrap_or(TOP);
    TOP - lowest
}

/// Repaints the unused compile stack so [`peak`] measures from now on.
pub fn reset_peak() {
    if matches!(MAPPED.get(), Some(Ok(()))) {
        let rsp = current_rsp();
        // On the compile stack, only the part below this frame is unused.
        let end = if (BOTTOM..TOP).contains(&rsp) {
            rsp - 256
        } else {
            TOP
        };
        paint_below(end);
    }
}
