//! The scheduler's interrupt entry: like `interrupts`' `isr_common` (same [`TrapFrame`]), except
//! that the Rust side returns the frame to resume, which may lie on another task's stack.
//!
//! Two vectors enter here: the APIC timer ([`TIMER_VECTOR`], preemption) and `int`
//! [`YIELD_VECTOR`] (a voluntary switch). Both are interrupt gates: the handler runs with
//! interrupts off, and a switched-out task's whole register state is the frame on its own
//! stack. A new task starts from a frame built by [`initial_frame`], which `iretq` pops as if
//! the task had been interrupted at its first instruction.

use core::arch::global_asm;
use x86_64::instructions::segmentation::{Segment, CS, SS};
use x86_64::VirtAddr;

use crate::cpu::interrupts::TrapFrame;

/// Vector of the scheduler's timer tick (the local APIC timer).
pub const TIMER_VECTOR: u8 = 0xE0;
/// Vector of a voluntary switch (`int 0xE1`, see [`super::yield_now`]).
pub const YIELD_VECTOR: u8 = 0xE1;

global_asm!(
    concat!(
        r#"
    .section .text
    .global sched_stub_timer
sched_stub_timer:
    pushq $0
    pushq $0xE0
    jmp sched_common
    .global sched_stub_yield
sched_stub_yield:
    pushq $0
    pushq $0xE1
    jmp sched_common
sched_common:
"#,
        codespace::exception_frame_push!(),
        r#"    /* 22 quadwords since the CPU's 16-byte aligned push: RSP is 16-byte aligned here. */
    movq %rsp, %rdi
    cld
    call sched_switch
    /* The frame to resume: this one, or a switched-in task's (on its own stack). */
    movq %rax, %rsp
"#,
        codespace::exception_frame_pop!(),
        r#"    addq $16, %rsp
    iretq
"#
    ),
    options(att_syntax)
);

extern "C" {
    fn sched_stub_timer();
    fn sched_stub_yield();
}

/// IDT entry of [`TIMER_VECTOR`].
pub fn timer_stub() -> VirtAddr {
    VirtAddr::new(sched_stub_timer as *const () as u64)
}

/// IDT entry of [`YIELD_VECTOR`].
pub fn yield_stub() -> VirtAddr {
    VirtAddr::new(sched_stub_yield as *const () as u64)
}

/// Builds, at the top of `stack`, the frame a new task starts from: `entry` runs with
/// interrupts on, on `stack`, as if called (RSP ≡ 8 mod 16, a zero return address above it).
/// Returns the frame's address, what `sched_switch` hands the entry stub to resume.
pub(super) fn initial_frame(stack: &mut [u64], entry: extern "C" fn() -> !) -> *mut TrapFrame {
    let words = core::mem::size_of::<TrapFrame>() / 8;
    // Top, 16-aligned (the stack is a `u64` slice: 8-aligned; drop one word if needed).
    let mut top = stack.len();
    if !(stack.as_ptr() as usize + top * 8).is_multiple_of(16) {
        top -= 1;
    }
    // [top - 1]: the zero return address; the frame lies below it, 16-aligned like a CPU's.
    let frame_at = top - 2 - words;
    stack[top - 1] = 0;
    let rsp = stack.as_ptr() as u64 + (top as u64 - 1) * 8;
    let cs: u64 = CS::get_reg().0.into();
    let ss: u64 = SS::get_reg().0.into();
    let frame = TrapFrame {
        rip: entry as *const () as u64,
        cs,
        rflags: 0x202, // IF, and the always-one bit
        rsp,
        ss,
        ..TrapFrame::default()
    };
    let ptr = stack[frame_at..].as_mut_ptr().cast::<TrapFrame>();
    debug_assert!((ptr as usize).is_multiple_of(16));
    // SAFETY: `frame_at + words` ≤ `top - 2`: the frame lies inside `stack`, 8-aligned (a
    // `TrapFrame` is all `u64`s), and nothing else refers to those words.
    unsafe { ptr.write(frame) };
    ptr
}
