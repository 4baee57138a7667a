//! The exception path codespace needs, for kernels on stable Rust (`extern "x86-interrupt"` is
//! nightly-only): a register frame Rust can edit ([`ExceptionFrame`]), the two hooks a handler
//! calls first ([`TrapTable::handle_protected_fault`], [`BreakpointSites::handle_breakpoint`]),
//! and — with feature `exception-stubs` — the assembly entry stubs that save the frame.
//!
//! # The landing-pad contract
//! A trap-table hit resumes the interrupted code at the landing pad with:
//! - the same RSP as at the faulting instruction (no frame pushed, nothing popped: the pad runs
//!   on the interrupted stack, in the interrupted function's frame);
//! - `r10` = the faulting instruction's address (V8's convention);
//! - `r11` = the faulting address (CR2) for a #PF, [`NO_FAULT_ADDRESS`] for #UD and #DE;
//! - every other register as the faulting instruction left it.
//!
//! # Using it
//! A kernel with its own entry stubs saves the registers in this layout (or copies them into
//! an [`ExceptionFrame`] and back) and calls the hooks first:
//!
//! ```
//! use codespace::breakpoint::BreakpointSites;
//! use codespace::mmu::x86::exception::ExceptionFrame;
//! use codespace::module::Registries;
//! use codespace::sync::grace::GraceDomain;
//!
//! static GRACE: GraceDomain = GraceDomain::new();
//! static CODE: Registries = Registries::new(&GRACE);
//! static BREAKPOINTS: BreakpointSites = BreakpointSites::new();
//!
//! /// Called by the entry stubs of #DE, #BP, #UD and #PF with the saved registers and CR2.
//! fn on_exception(frame: &mut ExceptionFrame, cr2: u64) {
//!     if CODE.traps.handle_protected_fault(frame, cr2).is_some()
//!         || BREAKPOINTS.handle_breakpoint(frame)
//!     {
//!         return; // iretq resumes at the landing pad / the slot's new target
//!     }
//!     // ... the kernel's own handling of the exception
//! }
//! ```
//!
//! With feature `exception-stubs` the crate ships those stubs too: point the IDT entries of
//! #DE (0), #BP (3), #UD (6) and #PF (14) at `entry(vector)` — interrupt gates, so
//! interrupts stay off until the handler has redirected RIP, and no IST for #PF (a nested #PF
//! on a shared IST stack would overwrite the outer frame) — and install the handler once with
//! `set_handler`.

use crate::breakpoint::BreakpointSites;
use crate::trap::{TrapTable, TrapVector};

/// The value of `r11` at a landing pad when the trap has no faulting address (#UD, #DE).
pub const NO_FAULT_ADDRESS: u64 = u64::MAX;

/// Page-fault error-code bits a trap may carry: present (a protection fault, else not-present)
/// and write. Anything else — user mode, a reserved-bit violation (corrupt page tables), an
/// instruction fetch, protection keys, shadow stacks, SGX — is never a bounds check.
pub const PLAIN_FAULT_BITS: u64 = 0b11;

/// Vectors codespace's exception path serves (and the stubs of feature `exception-stubs`
/// cover): #DE, #BP, #UD, #PF.
pub const STUBBED_VECTORS: [u8; 4] = [0, 3, 6, 14];

/// Register state of the interrupted code as the stubs save it; every field is written back
/// by the stub's `iretq` path, so a handler may change any of them (RIP and RSP included).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Vector number pushed by the stub.
    pub vector: u64,
    /// Error code pushed by the CPU, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// The instructions (AT&T syntax, one per line) that push the fifteen general-purpose
/// registers so that, on top of the vector and error code, the stack holds an
/// [`ExceptionFrame`]: for entry stubs of a kernel's own (`concat!` it into `global_asm!`), such
/// as a scheduler's, which saves the same frame and switches stacks. The only copy of the
/// frame's register order besides the struct itself; [`exception_frame_pop!`] undoes it.
///
/// [`exception_frame_pop!`]: crate::exception_frame_pop
#[macro_export]
macro_rules! exception_frame_push {
    () => {
        "    pushq %rax\n    pushq %rbx\n    pushq %rcx\n    pushq %rdx\n    pushq %rsi\n    pushq %rdi\n    pushq %rbp\n    pushq %r8\n    pushq %r9\n    pushq %r10\n    pushq %r11\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    };
}

/// The instructions (AT&T syntax) that restore the fifteen general-purpose registers from an
/// [`ExceptionFrame`] at RSP, leaving RSP at its vector field: the reverse of
/// [`exception_frame_push!`].
///
/// [`exception_frame_push!`]: crate::exception_frame_push
#[macro_export]
macro_rules! exception_frame_pop {
    () => {
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %r11\n    popq %r10\n    popq %r9\n    popq %r8\n    popq %rbp\n    popq %rdi\n    popq %rsi\n    popq %rdx\n    popq %rcx\n    popq %rbx\n    popq %rax\n"
    };
}

const PAGE_FAULT: u64 = 14;
const DIVIDE_ERROR: u64 = 0;
const INVALID_OPCODE: u64 = 6;

impl TrapTable {
    /// The trap table's part of an exception handler: a plain not-present or protection #PF
    /// (see [`PLAIN_FAULT_BITS`]) at a protected PC on an address its registration accepts, or
    /// a #UD / #DE at a PC registered for that vector, resumes at the landing pad under the
    /// [landing-pad contract](self#the-landing-pad-contract); the vector is returned. `None`
    /// leaves the frame untouched: the exception is the kernel's. Lock-free and
    /// allocation-free, safe to call first for every exception.
    pub fn handle_protected_fault(
        &self,
        frame: &mut ExceptionFrame,
        cr2: u64,
    ) -> Option<TrapVector> {
        let pc = usize::try_from(frame.rip).ok()?;
        let (vector, hit) = match frame.vector {
            PAGE_FAULT if frame.error_code & !PLAIN_FAULT_BITS == 0 => (
                TrapVector::PageFault,
                self.lookup_fault(pc, usize::try_from(cr2).ok()?),
            ),
            DIVIDE_ERROR => (
                TrapVector::DivideError,
                self.lookup_trap(TrapVector::DivideError, pc),
            ),
            INVALID_OPCODE => (
                TrapVector::InvalidOpcode,
                self.lookup_trap(TrapVector::InvalidOpcode, pc),
            ),
            _ => return None,
        };
        let hit = hit?;
        frame.r10 = frame.rip;
        frame.r11 = if vector == TrapVector::PageFault {
            cr2
        } else {
            NO_FAULT_ADDRESS
        };
        frame.rip = hit.landing_pad() as u64;
        Some(vector)
    }
}

impl BreakpointSites {
    /// The #BP hook of the INT3 patch protocol: an INT3 that a patch placed over a jump slot
    /// resumes at the slot's new target (RIP only: the slot is a `jmp`, it pushed nothing).
    /// `false` leaves the frame untouched. Must run with interrupts off until it returns (an
    /// interrupt gate), see [`BreakpointSites`].
    pub fn handle_breakpoint(&self, frame: &mut ExceptionFrame) -> bool {
        const BREAKPOINT: u64 = 3;
        if frame.vector != BREAKPOINT {
            return false;
        }
        let Some(target) = usize::try_from(frame.rip)
            .ok()
            .and_then(|rip| self.resume_at(rip))
        else {
            return false;
        };
        frame.rip = target as u64;
        true
    }
}

#[cfg(feature = "exception-stubs")]
mod stubs;
#[cfg(feature = "exception-stubs")]
pub use stubs::{entry, set_handler, ExceptionHandler, HandlerAlreadySet};

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mmu::soft::SoftMmu;
    use crate::module::{CodeModule, ModuleConfig, NewCode, Registries};
    use crate::sync::grace::GraceDomain;
    use crate::{AddressRange, CodeManager, ManagerConfig};

    static GRACE: GraceDomain = GraceDomain::new();
    static CODE: Registries = Registries::new(&GRACE);

    fn frame(vector: u64, error_code: u64, rip: usize) -> ExceptionFrame {
        ExceptionFrame {
            vector,
            error_code,
            rip: rip as u64,
            r10: 0xAAAA,
            r11: 0xBBBB,
            ..ExceptionFrame::default()
        }
    }

    /// Register names in the order they appear in `text` (`%rax` -> `rax`).
    fn registers(text: &str) -> alloc::vec::Vec<&str> {
        text.lines()
            .filter_map(|l| l.trim().split('%').nth(1))
            .collect()
    }

    #[test]
    fn the_push_and_pop_sequences_follow_the_frame_layout() {
        // Fields from the lowest address: what was pushed last comes first.
        let fields = [
            "r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi", "rsi", "rdx",
            "rcx", "rbx", "rax",
        ];
        let mut pushed = registers(crate::exception_frame_push!());
        pushed.reverse();
        assert_eq!(pushed, fields);
        assert_eq!(registers(crate::exception_frame_pop!()), fields);
        let frame = ExceptionFrame::default();
        let base = core::ptr::addr_of!(frame) as usize;
        assert_eq!(core::ptr::addr_of!(frame.r15) as usize - base, 0);
        assert_eq!(core::ptr::addr_of!(frame.rax) as usize - base, 14 * 8);
        assert_eq!(core::ptr::addr_of!(frame.vector) as usize - base, 15 * 8);
    }

    #[test]
    fn hits_resume_at_the_pad_under_the_contract_and_misses_leave_the_frame_alone() {
        // SAFETY: this test's thread is the only reader of the domain.
        unsafe { GRACE.set_possible_cpus(1) };
        let window = AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_4000_0000);
        let memory = AddressRange::new(0x10_0000_0000, 0x11_0000_0000);
        let manager = CodeManager::new(SoftMmu::new(1 << 12), window, ManagerConfig::default())
            .expect("manager");
        let module = CodeModule::new(&manager, &CODE, ModuleConfig::default()).expect("module");
        // A load at 4 (#PF into `memory` only), a ud2 at 8, a division at 12; the pad at 16.
        let body = [0x90u8; 32];
        let code = module
            .add_code(&NewCode {
                protected: &[4],
                sites: &[
                    (8, TrapVector::InvalidOpcode),
                    (12, TrapVector::DivideError),
                ],
                landing_pad: Some(16),
                fault_ranges: &[memory],
                ..NewCode::new(crate::code_object::CodeKind::Function, &body)
            })
            .expect("code");
        let start = code.instruction_start();
        let pad = (start + 16) as u64;

        let mut f = frame(PAGE_FAULT, 0b10, start + 4); // a not-present write
        assert_eq!(
            CODE.traps.handle_protected_fault(&mut f, 0x10_0000_1000),
            Some(TrapVector::PageFault)
        );
        assert_eq!(
            (f.rip, f.r10, f.r11),
            (pad, (start + 4) as u64, 0x10_0000_1000)
        );

        for (vector, offset, kind) in [
            (INVALID_OPCODE, 8, TrapVector::InvalidOpcode),
            (DIVIDE_ERROR, 12, TrapVector::DivideError),
        ] {
            let mut f = frame(vector, 0, start + offset);
            assert_eq!(CODE.traps.handle_protected_fault(&mut f, 0), Some(kind));
            assert_eq!(
                (f.rip, f.r10, f.r11),
                (pad, (start + offset) as u64, NO_FAULT_ADDRESS)
            );
        }

        // Misses: an address outside the accepted range, an instruction fetch, a site of
        // another vector, an unprotected PC, a vector the table does not serve.
        for (mut f, cr2) in [
            (frame(PAGE_FAULT, 0b10, start + 4), 0x2000),
            (frame(PAGE_FAULT, 0b1_0000, start + 4), 0x10_0000_1000),
            (frame(PAGE_FAULT, 0, start + 8), 0x10_0000_1000),
            (frame(INVALID_OPCODE, 0, start + 12), 0),
            (frame(PAGE_FAULT, 0, start + 5), 0x10_0000_1000),
            (frame(13, 0, start + 4), 0),
        ] {
            let before = f;
            assert_eq!(CODE.traps.handle_protected_fault(&mut f, cr2), None);
            assert_eq!(f, before);
        }
    }

    #[cfg(feature = "exception-stubs")]
    #[test]
    fn the_handler_is_installed_once_and_every_stubbed_vector_has_an_entry() {
        fn first(_: &mut ExceptionFrame, _: u64) {}
        fn second(_: &mut ExceptionFrame, _: u64) {}
        assert_eq!(set_handler(first), Ok(()));
        assert_eq!(set_handler(second), Err(HandlerAlreadySet));
        let first: ExceptionHandler = first;
        assert_eq!(*stubs::HANDLER.get().unwrap() as usize, first as usize);
        let entries: alloc::vec::Vec<u64> =
            STUBBED_VECTORS.iter().filter_map(|&v| entry(v)).collect();
        assert_eq!(entries.len(), 4);
        assert!(entries.windows(2).all(|w| w[0] < w[1]), "{entries:x?}");
        assert_eq!(entry(13), None);
    }
}
