//! IDT, the assembly entry stubs and the Rust dispatcher.
//!
//! Every vector enters through a stub that pushes an error code (0 when the CPU pushes none) and
//! the vector number, then `isr_common` saves all general-purpose registers into a [`TrapFrame`].
//! The four vectors codespace's trap path serves (#DE, #BP, #UD, #PF) enter through the stubs
//! codespace ships (`codespace::mmu::x86::exception`, the same frame), whose handler is this
//! file's dispatcher.
//! The Rust dispatcher may change any field of that frame, RIP and RSP included; `iretq` resumes
//! whatever the frame says. That is how a fault resumes at a landing pad with the faulting PC in
//! r10, and how the test framework returns from an expected fault.

use core::arch::global_asm;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use spin::Once;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use crate::cpu::gdt;
use crate::cpu::percpu::PerCpu;
use crate::cpu::qemu::{exit, ExitCode};

/// Register state of the interrupted code, as saved by `isr_common` (and by codespace's stubs
/// for #DE, #BP, #UD and #PF, which share the layout); every field is written back.
pub use codespace::mmu::x86::exception::ExceptionFrame as TrapFrame;

/// Vector of the non-maskable interrupt.
pub const NMI: u8 = 2;
/// Vector of the breakpoint exception (INT3).
pub const BREAKPOINT: u8 = 3;
/// Vector of the page fault.
pub const PAGE_FAULT: u8 = 14;
/// Vector of the double fault.
pub const DOUBLE_FAULT: u8 = 8;
/// First vector used for hardware interrupts (the legacy PICs are remapped here).
pub const IRQ_BASE: u8 = 32;
/// Number of stubbed vectors: the 32 exceptions and 16 legacy IRQs.
const STUBBED_VECTORS: usize = 48;
/// Vector of the inter-processor interrupt that signals a mailbox request (`smp`).
pub const IPI_VECTOR: u8 = 0xF0;
/// The local APIC's spurious-interrupt vector (no handler, no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// What the CPU reported about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInfo {
    /// Exception vector.
    pub vector: u8,
    /// Error code (0 for vectors that push none).
    pub error_code: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CR2 for a page fault, 0 otherwise.
    pub cr2: u64,
}

impl FaultInfo {
    fn from_frame(frame: &TrapFrame) -> Self {
        let vector = frame.vector as u8;
        let cr2 = if vector == PAGE_FAULT {
            Cr2::read_raw()
        } else {
            0
        };
        FaultInfo {
            vector,
            error_code: frame.error_code,
            rip: frame.rip,
            cr2,
        }
    }
}

/// Short mnemonic of an exception vector.
#[must_use]
pub fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        v if v >= IRQ_BASE => "IRQ",
        _ => "reserved",
    }
}

impl fmt::Display for FaultInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (vector {}) at RIP={:#x}, CR2={:#x}, error code={:#x}",
            vector_name(self.vector),
            self.vector,
            self.rip,
            self.cr2,
            self.error_code
        )?;
        if self.vector == PAGE_FAULT {
            let e = self.error_code;
            let bit = |n: u32, name: &'static str| if e & (1 << n) != 0 { name } else { "" };
            write!(
                f,
                " [{}{}{}{}{}]",
                if e & 1 != 0 { "P" } else { "NP" },
                bit(1, " W"),
                bit(2, " U"),
                bit(3, " RSVD"),
                bit(4, " I/D")
            )?;
        }
        Ok(())
    }
}

/// A fault fixup: returns `true` when it handled the fault (typically by editing `frame.rip`).
pub type FaultHandler = fn(&mut TrapFrame, &FaultInfo) -> bool;
/// A hardware-interrupt handler, called with the IRQ number (0..16) before the EOI.
pub type IrqHandler = fn(&mut TrapFrame);

static FAULT_HANDLER: AtomicUsize = AtomicUsize::new(0);
static IRQ_HANDLERS: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
/// How many exception handlers are running on each CPU (only that CPU writes its slot).
static DEPTH: PerCpu<AtomicU32> = crate::per_cpu!(AtomicU32::new(0));
/// How many mailbox services (IPI handler, or a waiter polling its own mailbox) are running on
/// each CPU. A `catch` frame only catches a failure raised at the atomic depth it was set up at:
/// unwinding out of a half-serviced request would leave its sender waiting for ever.
static ATOMIC: PerCpu<AtomicU32> = crate::per_cpu!(AtomicU32::new(0));
/// How many interrupt handlers (legacy IRQs, NMIs, the scheduler's tick hook) are running on
/// each CPU (only that CPU writes its slot). With `DEPTH` and `ATOMIC`: [`in_interrupt`].
static IRQ_DEPTH: PerCpu<AtomicU32> = crate::per_cpu!(AtomicU32::new(0));
static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Gives the address of an entry stub (for the IDT).
pub type StubAddress = fn() -> VirtAddr;

/// What the layers above plug into the exception path (this layer imports none of them):
/// installed once by `kernel_entry`, before the first [`init`].
pub struct Hooks {
    /// Asked first for every exception, in order (codespace's trap table, the INT3 patch
    /// protocol's #BP hook): `true` when handled, the frame saying where to resume.
    pub fixups: &'static [FaultHandler],
    /// The IPI vector's handler, run as an atomic context with interrupts off; it acknowledges
    /// the interrupt.
    pub ipi: fn(),
    /// The NMI handler.
    pub nmi: fn(&mut TrapFrame),
    /// Vectors whose IDT entry is a stub of their own (a scheduler's, which switches stacks),
    /// with the function that gives the stub's address.
    pub own_entries: &'static [(u8, StubAddress)],
}

static HOOKS: Once<Hooks> = Once::new();

/// Installs the layers' hooks; once, before the first [`init`] (a second call is ignored:
/// the IDT is built once).
pub fn set_hooks(hooks: Hooks) {
    HOOKS.call_once(|| hooks);
}

fn hooks() -> &'static Hooks {
    HOOKS
        .get()
        .expect("interrupts::set_hooks runs before interrupts::init")
}

/// Installs the fixup consulted first for every exception (the trap table's hook), or removes it.
pub fn set_fault_handler(handler: Option<FaultHandler>) {
    FAULT_HANDLER.store(handler.map_or(0, |h| h as usize), Ordering::SeqCst);
}

/// Installs the handler of legacy IRQ `irq` (0..16), or removes it.
pub fn set_irq_handler(irq: u8, handler: Option<IrqHandler>) {
    if let Some(slot) = IRQ_HANDLERS.get(usize::from(irq)) {
        slot.store(handler.map_or(0, |h| h as usize), Ordering::SeqCst);
    }
}

pub(crate) fn reset_depth(depth: u32) {
    DEPTH.this().store(depth, Ordering::SeqCst);
}

pub(crate) fn depth() -> u32 {
    DEPTH.this().load(Ordering::SeqCst)
}

pub(crate) fn atomic_depth() -> u32 {
    ATOMIC.this().load(Ordering::SeqCst)
}

/// Whether the code `frame` interrupted (from an NMI) is an exception or IPI handler, a mailbox
/// service, or the entry/exit assembly around them: code that must not be abandoned. (Legacy
/// IRQs reach only the boot CPU, which never runs stoppable work.)
///
/// codespace's stubs for #DE, #BP, #UD and #PF lie outside `isr_text_start..isr_text_end`; they
/// run with RFLAGS.IF clear (interrupt gates), which callers check first.
pub(crate) fn interrupted_handler(frame: &TrapFrame) -> bool {
    // Only the addresses of the two labels are taken.
    let (start, end) = (
        &raw const isr_text_start as u64,
        &raw const isr_text_end as u64,
    );
    depth() != 0 || atomic_depth() != 0 || (start..end).contains(&frame.rip)
}

/// Whether the calling code runs inside an interrupt or exception handler on this CPU (an
/// exception, an IPI or mailbox service, a legacy IRQ, an NMI, the scheduler's tick hook):
/// code that cannot know what the context it interrupted holds, so it never reports a
/// quiescent state (the grace domain's context check, see `code::GRACE`).
#[must_use]
pub fn in_interrupt() -> bool {
    depth() != 0 || atomic_depth() != 0 || IRQ_DEPTH.this().load(Ordering::SeqCst) != 0
}

/// Runs `f` as an interrupt handler of this CPU (see [`in_interrupt`]).
pub(crate) fn as_interrupt<R>(f: impl FnOnce() -> R) -> R {
    IRQ_DEPTH.this().fetch_add(1, Ordering::SeqCst);
    let r = f();
    IRQ_DEPTH.this().fetch_sub(1, Ordering::SeqCst);
    r
}

/// Runs `f` as an atomic context of this CPU (see `ATOMIC`).
pub(crate) fn in_atomic<R>(f: impl FnOnce() -> R) -> R {
    ATOMIC.this().fetch_add(1, Ordering::SeqCst);
    let r = f();
    ATOMIC.this().fetch_sub(1, Ordering::SeqCst);
    r
}

global_asm!(
    concat!(
        r#"
    .macro STUB_NOERR n
    isr_stub_\n:
        pushq $0
        pushq $\n
        jmp isr_common
    .endm
    .macro STUB_ERR n
    isr_stub_\n:
        pushq $\n
        jmp isr_common
    .endm

    .section .text
    .global isr_text_start
isr_text_start:
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
        STUB_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
        STUB_ERR \n
    .endr
    .irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,240,255
        STUB_NOERR \n
    .endr

isr_common:
"#,
        codespace::exception_frame_push!(),
        r#"    /* 22 quadwords since the CPU's 16-byte aligned push: RSP is 16-byte aligned here. */
    movq %rsp, %rdi
    cld
    call exception_dispatch
"#,
        codespace::exception_frame_pop!(),
        r#"    addq $16, %rsp
    iretq
    .global isr_text_end
isr_text_end:

    .section .rodata
    .balign 8
    .global isr_stub_table
isr_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
        .quad isr_stub_\n
    .endr
    .global isr_stub_ipi
isr_stub_ipi:
    .quad isr_stub_240
    .global isr_stub_spurious
isr_stub_spurious:
    .quad isr_stub_255
"#
    ),
    options(att_syntax)
);

extern "C" {
    static isr_stub_table: [u64; STUBBED_VECTORS];
    static isr_stub_ipi: u64;
    static isr_stub_spurious: u64;
    static isr_text_start: u8;
    static isr_text_end: u8;
}

/// codespace's entry stub for `vector` (one of #DE, #BP, #UD, #PF).
fn codespace_stub(vector: u8) -> VirtAddr {
    let entry = codespace::mmu::x86::exception::entry(vector).expect("a vector codespace stubs");
    VirtAddr::new(entry)
}

fn stub(vector: usize) -> VirtAddr {
    // SAFETY: the tables are immutable data emitted by the assembly above, with STUBBED_VECTORS
    // entries plus the two APIC vectors.
    VirtAddr::new(unsafe {
        match vector {
            v if v == usize::from(IPI_VECTOR) => isr_stub_ipi,
            v if v == usize::from(SPURIOUS_VECTOR) => isr_stub_spurious,
            v => isr_stub_table[v],
        }
    })
}

/// Builds the IDT (once) and loads it on this CPU: exceptions 0..32 (except reserved ones), IRQ
/// vectors 32..48, the IPI vector and the APIC's spurious vector. One IDT serves every CPU: the
/// IST indices name slots of each CPU's own TSS.
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        codespace::mmu::x86::exception::set_handler(|frame, _cr2| exception_dispatch(frame))
            .expect("the IDT is built once");
        // SAFETY (for every set_handler_addr below): each address is the stub of that very vector,
        // which saves all state and returns with iretq, as the entry's kind requires.
        unsafe {
            idt.divide_error.set_handler_addr(codespace_stub(0));
            idt.debug.set_handler_addr(stub(1));
            idt.non_maskable_interrupt
                .set_handler_addr(stub(2))
                .set_stack_index(gdt::NMI_IST_INDEX);
            // An interrupt gate, as every entry here: the INT3 patch protocol's #BP hook relies
            // on interrupts staying off until it has redirected RIP (`code::breakpoint_fixup`).
            idt.breakpoint.set_handler_addr(codespace_stub(3));
            idt.overflow.set_handler_addr(stub(4));
            idt.bound_range_exceeded.set_handler_addr(stub(5));
            idt.invalid_opcode.set_handler_addr(codespace_stub(6));
            idt.device_not_available.set_handler_addr(stub(7));
            idt.double_fault
                .set_handler_addr(stub(8))
                .set_stack_index(gdt::DOUBLE_FAULT_IST_INDEX);
            idt.invalid_tss.set_handler_addr(stub(10));
            idt.segment_not_present.set_handler_addr(stub(11));
            idt.stack_segment_fault.set_handler_addr(stub(12));
            idt.general_protection_fault.set_handler_addr(stub(13));
            // No IST: a nested #PF must push below the outer frame, not overwrite it.
            idt.page_fault.set_handler_addr(codespace_stub(14));
            idt.x87_floating_point.set_handler_addr(stub(16));
            idt.alignment_check.set_handler_addr(stub(17));
            idt.machine_check.set_handler_addr(stub(18));
            idt.simd_floating_point.set_handler_addr(stub(19));
            for irq in 0..16u8 {
                idt[IRQ_BASE + irq].set_handler_addr(stub(usize::from(IRQ_BASE + irq)));
            }
            for v in [IPI_VECTOR, SPURIOUS_VECTOR] {
                idt[v].set_handler_addr(stub(usize::from(v)));
            }
            // Entries of their own (the scheduler's timer tick and voluntary switch, which
            // switch stacks).
            for &(v, entry) in hooks().own_entries {
                idt[v].set_handler_addr(entry());
            }
        }
        idt
    });
    idt.load();
}

/// Rust side of every vector, called by `isr_common` with the saved frame.
#[no_mangle]
extern "C" fn exception_dispatch(frame: &mut TrapFrame) {
    let vector = frame.vector as u8;
    if vector == IPI_VECTOR {
        // Atomic as a whole: no catch frame unwinds out of it, no NMI stops it.
        in_atomic(hooks().ipi);
        return;
    }
    if vector == SPURIOUS_VECTOR {
        return; // no EOI for a spurious APIC interrupt
    }
    if vector == NMI {
        as_interrupt(|| (hooks().nmi)(frame));
        return;
    }
    if vector >= IRQ_BASE {
        let irq = vector - IRQ_BASE;
        let handler = IRQ_HANDLERS[usize::from(irq)].load(Ordering::SeqCst);
        if handler != 0 {
            // SAFETY: only `set_irq_handler` stores here, and it stores `IrqHandler` values.
            let handler: IrqHandler = unsafe { core::mem::transmute::<usize, IrqHandler>(handler) };
            as_interrupt(|| handler(frame));
        }
        crate::cpu::pic::end_of_interrupt(irq);
        return;
    }

    let info = FaultInfo::from_frame(frame);
    let outer = DEPTH.this().fetch_add(1, Ordering::SeqCst);
    if vector == DOUBLE_FAULT || outer > 0 {
        // A fault inside a fault handler: report once and stop, never loop.
        fatal(
            if vector == DOUBLE_FAULT {
                "double fault"
            } else {
                "nested fault in exception handler"
            },
            &info,
        );
    }

    let handler = FAULT_HANDLER.load(Ordering::SeqCst);
    // SAFETY: only `set_fault_handler` stores here, and it stores `FaultHandler` values.
    let handled = hooks().fixups.iter().any(|fixup| fixup(frame, &info))
        || (handler != 0
            && unsafe { core::mem::transmute::<usize, FaultHandler>(handler) }(frame, &info));
    if !handled && !crate::cpu::catch::redirect_fault(frame, info) {
        fatal("unhandled exception", &info);
    }
    DEPTH.this().fetch_sub(1, Ordering::SeqCst);
}

fn fatal(what: &str, info: &FaultInfo) -> ! {
    crate::cpu::serial::force_unlock();
    crate::println!("\n{}{what}: {info}", crate::cpu::percpu::CpuPrefix);
    exit(ExitCode::Failure)
}
