//! Leaving an exception for wasmtime's trap handler.
//!
//! wasmtime finds the trapping wasm frame itself (`handle_trap(pc, fp, has_faulting_addr,
//! faulting_addr)`, registered through `wasmtime_init_traps`) and resumes its entry trampoline;
//! it must not run inside the exception (it takes locks and walks frames). So the kernel's
//! exception path only decides, lock-free, whether to leave: on a codespace trap-table hit for a
//! wasm image it sets, in the interrupted register state,
//!
//! - `r10` = the faulting PC (codespace's landing-pad convention),
//! - `r11` = the faulting address for a #PF, or [`NO_FAULT_ADDRESS`] for #UD and #DE,
//! - `rip` = [`trap_landing_pad`],
//!
//! and returns from the exception (`iretq`). The landing pad then runs on the interrupted stack
//! with the interrupted `rbp` (wasm's frame pointer, which wasmtime needs) and calls the handler;
//! the handler does not return for a wasm trap. Both scratch registers are caller-saved in every
//! ABI Cranelift uses, and the trapping instruction is never resumed, so overwriting them loses
//! nothing.

use core::arch::global_asm;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The value of `r11` at the landing pad when the trap has no faulting address (#UD, #DE).
pub const NO_FAULT_ADDRESS: u64 = u64::MAX;

/// wasmtime's `wasmtime_trap_handler_t`.
pub type TrapHandler =
    extern "C" fn(ip: usize, fp: usize, has_faulting_addr: bool, faulting_addr: usize);

/// The handler wasmtime registered (0 until it did).
static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Records wasmtime's handler (the `wasmtime_init_traps` hook).
pub(crate) fn set_handler(handler: TrapHandler) {
    HANDLER.store(handler as usize, Ordering::Release);
}

/// Whether wasmtime registered its trap handler (it does when the first `Engine` is built).
#[must_use]
pub fn handler_registered() -> bool {
    HANDLER.load(Ordering::Acquire) != 0
}

global_asm!(
    r#"
    .section .text
    .global codespace_wasmtime_trap_landing
codespace_wasmtime_trap_landing:
    movq %r10, %rdi
    movq %rbp, %rsi
    movq %r11, %rdx
    /* Stay clear of whatever lies just below the interrupted stack pointer, then align. */
    subq $128, %rsp
    andq $-16, %rsp
    call codespace_wasmtime_trap
    ud2
"#,
    options(att_syntax)
);

extern "C" {
    fn codespace_wasmtime_trap_landing();
}

/// The address to resume a trapped wasm instruction at (see the module documentation for the
/// register convention). Give it to codespace as the landing pad of every wasm image.
#[must_use]
pub fn trap_landing_pad() -> usize {
    codespace_wasmtime_trap_landing as *const () as usize
}

/// Called by the landing pad: hands the trap to wasmtime, which resumes its entry trampoline.
#[no_mangle]
extern "C" fn codespace_wasmtime_trap(pc: usize, fp: usize, addr: u64) -> ! {
    let handler = HANDLER.load(Ordering::Acquire);
    assert!(
        handler != 0,
        "codespace-wasmtime: wasm trap at {pc:#x} before wasmtime registered its handler"
    );
    // SAFETY: only `set_handler` stores nonzero values, and it stores `TrapHandler`s.
    let handler = unsafe { core::mem::transmute::<usize, TrapHandler>(handler) };
    let has_addr = addr != NO_FAULT_ADDRESS;
    handler(pc, fp, has_addr, if has_addr { addr as usize } else { 0 });
    // The trap table said "wasm" but wasmtime found no wasm frame for this PC: a broken
    // registration. Nothing can resume the faulting instruction.
    panic!("codespace-wasmtime: trap at {pc:#x} (fp {fp:#x}) not claimed by wasmtime");
}
