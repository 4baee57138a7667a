//! Entering generated code, and leaving it from a landing pad: how a guard-page fault deep inside
//! generated frames becomes an error returned to the kernel code that made the call.
//!
//! # Design
//!
//! Generated code runs only through [`enter`] (the assembly `codespace_jit_enter`). It saves the
//! callee-saved registers and pushes the previous *entry record* of its CPU, then stores its
//! stack pointer in that record (`codespace_jit_entry_sp[cpu]`) and calls the function with up to six integer arguments. A normal
//! return pops the record and returns `(value, 0)`.
//!
//! Every compiled function that has protected loads or stores ends with a landing pad the glue
//! appends: `jmp [rip+0]; .quad codespace_jit_trap_landing` (an absolute jump: the kernel is far
//! out of rel32 reach of the code window). On a guard-page fault the #PF path finds the PC in
//! the trap table and resumes at that landing pad with the faulting PC in r10. The landing stub
//! then reloads the stack pointer from the entry record, which discards every generated frame
//! between the fault and the entry (they own nothing: Cranelift frames hold no resources), and
//! returns `(CR2, faulting PC)` through the same epilogue, restoring the caller's callee-saved
//! registers. So a trap is a second way back from `enter`, like a longjmp to the entry. (CR2 is
//! read by the stub, after the `iretq`: an interrupt handler that itself page-faulted in between
//! would change it. No handler here faults; a kernel whose handlers do passes CR2 in a register
//! from its #PF path, as it passes the faulting PC in r10.)
//!
//! The lazy-compile entry uses the same way back when compilation fails: the lazy compiler
//! returns the address of `codespace_jit_abort` instead of code, and the lazy entry jumps there
//! with the caller's stack, so the call returns [`Trap::LazyCompileFailed`].
//!
//! # Concurrency
//!
//! Every CPU runs generated code, so the entry record is per CPU: `codespace_jit_entry_sp` is an
//! array of [`MAX_CPUS`] cache-line-sized records, and the assembly finds its CPU's record from
//! the dense CPU index at `%gs:0` (`percpu::current_cpu`). A trap on one CPU therefore unwinds to
//! the innermost [`enter`] *of that CPU*: the #PF handler runs on the faulting CPU, resumes at the
//! landing pad on that CPU, and the landing stub reads that CPU's record. With one shared word,
//! CPU A's trap would load the stack pointer CPU B stored last and run on B's stack. The record
//! is written only by its own CPU (plain loads and stores; the `AtomicUsize` only makes the
//! static shareable), and a running context never moves to another CPU in this kernel, so the
//! CPU that pushes a record is the CPU that pops it. A kernel that migrates tasks would keep the
//! record in the task instead (and save it on a switch), since a task may then return on another
//! CPU.
//!
//! Entries nest LIFO on each CPU: an interrupt handler that enters generated code pushes the
//! interrupted entry's record and restores it on the way out, on both ways back; a landing or
//! abort always belongs to the innermost entry, because whatever interrupted it has left again.
//! The record's push (`pushq` of the old value, then the store of RSP) may be interrupted between
//! its two instructions: the handler's own entry saves and restores whichever value it finds, so
//! the interrupted sequence resumes unchanged.
//!
//! A protected fault with no entry active (generated code called directly, bypassing [`enter`])
//! has nowhere to go back to: the stub executes `ud2`, which the kernel reports as an unexpected
//! #UD instead of running on a bogus stack.
//!
//! A test item stopped by the work framework's NMI while inside generated code abandons its
//! frames without popping the record, so the record keeps the abandoned stack pointer: later
//! entries push and pop it like any other value (calls and traps keep working), and that CPU
//! looks [`active`] from then on. That is the safe direction: no quiescent state is reported for
//! an [`active`] CPU.

use core::arch::global_asm;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::cpu::percpu::{current_cpu, MAX_CPUS};

/// One CPU's entry record: the stack pointer of its innermost active [`enter`], 0 when none.
/// One cache line each, so CPUs entering generated code never write a shared line.
#[repr(C, align(64))]
struct EntryRecord(AtomicUsize);

// The assembly indexes the records with `cpu << 6`.
const _: () = assert!(core::mem::size_of::<EntryRecord>() == 64);

/// The entry records, indexed by CPU. Written only by the assembly below, each by its own CPU.
#[export_name = "codespace_jit_entry_sp"]
static ENTRY_SP: [EntryRecord; MAX_CPUS] = [const { EntryRecord(AtomicUsize::new(0)) }; MAX_CPUS];

/// `status` of a call whose lazy compilation failed (no PC is 1).
const LAZY_FAILED: u64 = 1;

/// How a call into generated code ended other than by returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trap {
    /// A protected load or store faulted (a guard page of the linear memory): the landing pad
    /// unwound to the caller.
    OutOfBounds {
        /// PC of the faulting instruction.
        pc: usize,
        /// The faulting address (CR2, read by the landing stub).
        address: u64,
    },
    /// The first call of a lazy function could not compile it; `lazy::last_error` on the same
    /// CPU says why.
    LazyCompileFailed,
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trap::OutOfBounds { pc, address } => {
                write!(f, "out-of-bounds access to {address:#x} at pc {pc:#x}")
            }
            Trap::LazyCompileFailed => f.write_str("lazy compilation failed"),
        }
    }
}

#[repr(C)]
struct Exit {
    /// Return value, or CR2 after a trap.
    value: u64,
    /// 0 for a return, [`LAZY_FAILED`], or the faulting PC.
    status: u64,
}

extern "C" {
    fn codespace_jit_enter(args: *const [u64; 6], target: usize) -> Exit;
    fn codespace_jit_trap_landing();
    fn codespace_jit_abort();
}

/// Calls the generated code at `target` with `args` in the System V argument registers (the
/// first six; there are no stack arguments), and returns its result, or how it trapped.
///
/// # Safety
/// `target` must be published code (or a jump-table slot leading to code) compiled for the
/// System V ABI that takes at most `args.len()` integer arguments (at most six) and returns at
/// most one integer; its protected instructions' landing pads must lead to
/// [`trap_landing_address`]. Code it reaches through slots must satisfy the same.
pub unsafe fn enter(target: usize, args: &[u64]) -> Result<u64, Trap> {
    let mut regs = [0u64; 6];
    let n = args.len().min(6);
    regs[..n].copy_from_slice(&args[..n]);
    // SAFETY: the caller guarantees `target` is System V code; the assembly saves and restores
    // the callee-saved registers on both ways back and keeps the stack 16-byte aligned at the
    // call, so the Rust frame around it is intact however the code ends.
    let exit = unsafe { codespace_jit_enter(&regs, target) };
    match exit.status {
        0 => Ok(exit.value),
        LAZY_FAILED => Err(Trap::LazyCompileFailed),
        pc => Err(Trap::OutOfBounds {
            pc: pc as usize,
            address: exit.value,
        }),
    }
}

/// Whether generated code is running (or interrupted) on this CPU: an [`enter`] on this CPU has
/// not returned yet. When false, this CPU is inside no generated code (other CPUs may be), so it
/// may report a quiescent state (see `JitModule::reclaim`).
#[must_use]
pub fn active() -> bool {
    active_on(current_cpu())
}

/// Whether CPU `cpu` is inside an [`enter`] (a snapshot: it may enter or leave right after).
///
/// # Panics
/// When `cpu >= MAX_CPUS`.
#[must_use]
pub fn active_on(cpu: usize) -> bool {
    ENTRY_SP[cpu].0.load(Ordering::SeqCst) != 0
}

/// This CPU's entry record, replaced by `record`: the scheduler's switch saves the outgoing
/// task's record and installs the incoming one's, so each task unwinds to its own [`enter`]
/// (a task switched out inside generated code keeps its record, not the CPU). Interrupts off,
/// on the CPU that owns the record.
pub(crate) fn swap_record(record: usize) -> usize {
    ENTRY_SP[current_cpu()].0.swap(record, Ordering::SeqCst)
}

/// Where every landing pad jumps: the stub that unwinds to the innermost [`enter`].
#[must_use]
pub fn trap_landing_address() -> usize {
    codespace_jit_trap_landing as *const () as usize
}

/// What the lazy compiler returns when compilation failed: the stub that makes the pending call
/// return [`Trap::LazyCompileFailed`].
#[must_use]
pub fn abort_address() -> usize {
    codespace_jit_abort as *const () as usize
}

// Stack at the call: return address (8) + six saved registers (48) + the previous record (8)
// leaves RSP 16-byte aligned, as System V requires before `call`.
//
// `%gs:0` is this CPU's dense index (`percpu`); `index << 6` is its record's offset. The record
// address is recomputed wherever it is needed rather than kept in a register: on the trap path
// no register survives the generated frames. Scratch registers: r10 and r11 before the call
// (caller-saved, not arguments), rcx and r10 in `leave` (rax and rdx hold the result), rax and
// rdx in the stubs before they load the result (r10 holds the faulting PC there).
global_asm!(
    r#"
    .section .text
    .global codespace_jit_enter
codespace_jit_enter:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %gs:0, %r10
    shlq $6, %r10
    leaq codespace_jit_entry_sp(%rip), %r11
    addq %r11, %r10
    pushq (%r10)
    movq %rsp, (%r10)
    movq %rsi, %r11
    movq %rdi, %rax
    movq 0(%rax), %rdi
    movq 8(%rax), %rsi
    movq 16(%rax), %rdx
    movq 24(%rax), %rcx
    movq 32(%rax), %r8
    movq 40(%rax), %r9
    callq *%r11
    xorl %edx, %edx
codespace_jit_leave:
    movq %gs:0, %rcx
    shlq $6, %rcx
    leaq codespace_jit_entry_sp(%rip), %r10
    popq (%r10,%rcx)
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    retq

    .global codespace_jit_trap_landing
codespace_jit_trap_landing:
    movq %gs:0, %rax
    shlq $6, %rax
    leaq codespace_jit_entry_sp(%rip), %rdx
    movq (%rdx,%rax), %rax
    testq %rax, %rax
    jz 1f
    movq %rax, %rsp
    movq %cr2, %rax
    movq %r10, %rdx
    jmp codespace_jit_leave
1:  ud2

    .global codespace_jit_abort
codespace_jit_abort:
    movq %gs:0, %rax
    shlq $6, %rax
    leaq codespace_jit_entry_sp(%rip), %rdx
    movq (%rdx,%rax), %rax
    testq %rax, %rax
    jz 1f
    movq %rax, %rsp
    xorl %eax, %eax
    movl $1, %edx
    jmp codespace_jit_leave
1:  ud2
"#,
    options(att_syntax)
);
