//! Recoverable failures: run a closure and come back here if it panics or faults.
//!
//! [`catch`] records the callee-saved registers and stack pointer in a jump buffer, then calls the
//! closure. A panic (through [`unwind_panic`]) or a fault that no fixup handled (through
//! [`redirect_fault`]) restores them and returns from `catch_call` a second way, with 1. The
//! closure's frames are abandoned, not dropped: what they owned leaks and any lock they held stays
//! held (the serial console is force-unlocked). That is the price of recovery with `panic = abort`,
//! acceptable for a test kernel.
//!
//! Everything is per CPU: each CPU has its own chain of catch frames (a fault on one CPU never
//! lands in another CPU's `catch`), and a frame only catches failures raised at the interrupt
//! nesting it was set up at (an exception or panic inside an IPI handler is fatal, not unwound
//! out of the handler).

use core::arch::global_asm;
use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::cpu::interrupts::{self, FaultInfo, TrapFrame};
use crate::cpu::percpu::PerCpu;

/// Registers that survive a call, saved where `catch_call` was entered.
#[repr(C)]
#[derive(Default)]
struct JumpBuf {
    rbx: u64,
    rbp: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rsp: u64,
}

/// Panic message buffer: fixed size, so recording a panic never allocates.
pub struct Message {
    buf: [u8; 480],
    len: usize,
}

impl Message {
    pub(crate) const fn new() -> Self {
        Message {
            buf: [0; 480],
            len: 0,
        }
    }

    /// The recorded text (truncated at the buffer size).
    #[must_use]
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a caught closure did not return.
///
/// The panic message is stored inline on purpose: recording a panic must not allocate.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Caught {
    /// It panicked; the message is kept.
    Panic(Message),
    /// It raised a fault that no fixup handled.
    Fault(FaultInfo),
    /// Another CPU stopped it (a cross-CPU work item ran past its timeout; see `smp`).
    Stopped,
}

#[repr(C)]
struct CatchFrame {
    buf: JumpBuf,
    prev: *mut CatchFrame,
    depth: u32,
    atomic: u32,
    caught: Option<Caught>,
}

/// Each CPU's innermost active catch frame (only that CPU reads or writes its slot).
static TOP: PerCpu<AtomicPtr<CatchFrame>> = crate::per_cpu!(AtomicPtr::new(ptr::null_mut()));

global_asm!(
    r#"
    .section .text
    /* u64 catch_call(JumpBuf *buf, void (*f)(void *), void *data) */
    .global catch_call
catch_call:
    movq %rbx, 0(%rdi)
    movq %rbp, 8(%rdi)
    movq %r12, 16(%rdi)
    movq %r13, 24(%rdi)
    movq %r14, 32(%rdi)
    movq %r15, 40(%rdi)
    movq %rsp, 48(%rdi)
    subq $8, %rsp
    movq %rdx, %rdi
    call *%rsi
    addq $8, %rsp
    xorl %eax, %eax
    ret

    /* Reached by iretq from redirect_fault: registers and RSP restored, RAX = 1. */
    .global catch_resume
catch_resume:
    ret

    /* noreturn catch_longjmp(const JumpBuf *buf) */
    .global catch_longjmp
catch_longjmp:
    movq 0(%rdi), %rbx
    movq 8(%rdi), %rbp
    movq 16(%rdi), %r12
    movq 24(%rdi), %r13
    movq 32(%rdi), %r14
    movq 40(%rdi), %r15
    movq 48(%rdi), %rsp
    movl $1, %eax
    ret
"#,
    options(att_syntax)
);

extern "C" {
    fn catch_call(buf: *mut JumpBuf, f: extern "C" fn(*mut u8), data: *mut u8) -> u64;
    fn catch_resume();
    fn catch_longjmp(buf: *const JumpBuf) -> !;
}

extern "C" fn trampoline<F: FnOnce()>(data: *mut u8) {
    // SAFETY: `catch` passes a pointer to its `Option<F>`, alive for the whole call.
    let slot = unsafe { &mut *data.cast::<Option<F>>() };
    if let Some(f) = slot.take() {
        f();
    }
}

/// Runs `f`; returns `Err` when it panicked or raised an unhandled fault instead of returning.
#[allow(clippy::result_large_err)] // the inline message is the point: no allocation on panic
pub fn catch<F: FnOnce()>(f: F) -> Result<(), Caught> {
    let mut frame = CatchFrame {
        buf: JumpBuf::default(),
        prev: TOP.this().load(Ordering::SeqCst),
        depth: interrupts::depth(),
        atomic: interrupts::atomic_depth(),
        caught: None,
    };
    let mut f = Some(f);
    let frame_ptr: *mut CatchFrame = &mut frame;
    TOP.this().store(frame_ptr, Ordering::SeqCst);
    // SAFETY: `catch_call` saves the callee-saved registers into the frame's jump buffer and calls
    // the trampoline with a pointer to `f`; both live on this stack frame until it returns.
    let unwound = unsafe {
        catch_call(
            &raw mut (*frame_ptr).buf,
            trampoline::<F>,
            (&raw mut f).cast::<u8>(),
        )
    };
    // SAFETY: the frame is still ours; a redirect only wrote through the published pointer.
    let frame = unsafe { &mut *frame_ptr };
    TOP.this().store(frame.prev, Ordering::SeqCst);
    if unwound == 0 {
        Ok(())
    } else {
        Err(frame.caught.take().unwrap_or(Caught::Panic(Message::new())))
    }
}

/// Whether a [`catch`] is active, i.e. a panic can be recovered.
#[must_use]
pub fn active() -> bool {
    !usable_top().is_null()
}

/// This CPU's innermost catch frame if it catches failures raised here (same atomic depth).
fn usable_top() -> *mut CatchFrame {
    let top = TOP.this().load(Ordering::SeqCst);
    // SAFETY: a non-null TOP points at the CatchFrame of a `catch` still running on this CPU's
    // stack; only its `atomic` field is read.
    if !top.is_null() && unsafe { (*top).atomic } == interrupts::atomic_depth() {
        top
    } else {
        ptr::null_mut()
    }
}

/// An active [`catch`] of this CPU, so that another context can later return there
/// ([`stop_at`]). Only an address: it is dereferenced only by `stop_at`, on the CPU that created
/// it, while that catch still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CatchPoint(*mut CatchFrame);

impl CatchPoint {
    /// The frame's address (never 0), to keep in an atomic.
    pub(crate) fn addr(self) -> usize {
        self.0 as usize
    }

    /// The point whose [`addr`](Self::addr) was `addr`.
    pub(crate) fn from_addr(addr: usize) -> Self {
        CatchPoint(addr as *mut CatchFrame)
    }
}

/// This CPU's chain of catch frames, replaced by `top` (an address from an earlier swap, or 0
/// for none): the scheduler's switch saves the outgoing task's chain and installs the incoming
/// one's, so a failure unwinds within the task that raised it. Interrupts off, on this CPU.
pub(crate) fn swap_top(top: usize) -> usize {
    TOP.this().swap(top as *mut CatchFrame, Ordering::SeqCst) as usize
}

/// The catch frame that is innermost now (call from inside the closure given to [`catch`]).
pub(crate) fn innermost() -> Option<CatchPoint> {
    let top = usable_top();
    (!top.is_null()).then_some(CatchPoint(top))
}

/// Called by the NMI handler on the CPU that created `point`, while that catch is still running
/// at exception depth 0 and atomic depth 0: drops every inner catch frame and edits `frame` so
/// that `iretq` returns from `point`'s `catch_call` with [`Caught::Stopped`].
pub(crate) fn stop_at(frame: &mut TrapFrame, point: CatchPoint) {
    TOP.this().store(point.0, Ordering::SeqCst);
    // SAFETY: the caller guarantees the frame is live on this CPU's stack.
    let c = unsafe { &mut *point.0 };
    resume_at(frame, c, Caught::Stopped);
}

/// Called by the exception dispatcher for a fault nobody fixed up: when a [`catch`] is active,
/// edits `frame` so that `iretq` returns from that `catch_call` with 1 and records the fault.
pub(crate) fn redirect_fault(frame: &mut TrapFrame, info: FaultInfo) -> bool {
    let top = usable_top();
    if top.is_null() {
        return false;
    }
    // SAFETY: a non-null TOP points at the CatchFrame of a `catch` still running on this stack.
    let c = unsafe { &mut *top };
    resume_at(frame, c, Caught::Fault(info));
    true
}

/// Edits `frame` so that `iretq` returns from `c`'s `catch_call` with 1, recording `caught`.
fn resume_at(frame: &mut TrapFrame, c: &mut CatchFrame, caught: Caught) {
    c.caught = Some(caught);
    frame.rbx = c.buf.rbx;
    frame.rbp = c.buf.rbp;
    frame.r12 = c.buf.r12;
    frame.r13 = c.buf.r13;
    frame.r14 = c.buf.r14;
    frame.r15 = c.buf.r15;
    frame.rsp = c.buf.rsp;
    frame.rax = 1;
    frame.rip = catch_resume as *const () as u64;
}

/// Called by the panic handler: records the message in the innermost [`catch`] and returns there.
/// Returns only when no catch is active.
pub(crate) fn unwind_panic(info: &PanicInfo<'_>) {
    let top = usable_top();
    if top.is_null() {
        return;
    }
    // SAFETY: a non-null TOP points at the CatchFrame of a `catch` still running on this stack.
    let c = unsafe { &mut *top };
    let mut msg = Message::new();
    let _ = write!(msg, "{info}");
    c.caught = Some(Caught::Panic(msg));
    interrupts::reset_depth(c.depth);
    // SAFETY: the jump buffer was filled by `catch_call`, whose frame is still live below us.
    unsafe { catch_longjmp(&c.buf) }
}
