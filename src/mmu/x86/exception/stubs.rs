//! The entry stubs (feature `exception-stubs`): assembly that saves every general-purpose
//! register into an [`ExceptionFrame`], calls the kernel's handler with it and CR2, restores
//! every register from the (possibly edited) frame and returns with `iretq`.

use core::arch::global_asm;

use spin::Once;

#[cfg(doc)]
use super::STUBBED_VECTORS;
use super::{ExceptionFrame, PAGE_FAULT};

/// The kernel's Rust handler for the stubbed vectors: the saved frame and CR2 (read before
/// anything could fault again; 0 for vectors other than #PF).
pub type ExceptionHandler = fn(&mut ExceptionFrame, u64);

pub(super) static HANDLER: Once<ExceptionHandler> = Once::new();

/// [`set_handler`] was called before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerAlreadySet;

/// Installs the handler every stub calls:
///
/// ```no_run
/// use codespace::mmu::x86::exception::{self, ExceptionFrame};
///
/// fn on_exception(frame: &mut ExceptionFrame, cr2: u64) {
///     // the trap-table and #BP hooks first, as in the module docs, then the kernel's own
/// }
///
/// exception::set_handler(on_exception).expect("installed once");
/// let page_fault = exception::entry(14).expect("a stubbed vector");
/// // unsafe { idt.page_fault.set_handler_addr(x86_64::VirtAddr::new(page_fault)) };
/// ```
///
/// Installed Once: the stubs may run on any CPU at any time after
/// the IDT points at them, so the handler cannot change under them.
///
/// # Errors
/// [`HandlerAlreadySet`] on a second call (the first handler stays).
pub fn set_handler(handler: ExceptionHandler) -> Result<(), HandlerAlreadySet> {
    let mut installed = false;
    HANDLER.call_once(|| {
        installed = true;
        handler
    });
    if installed {
        Ok(())
    } else {
        Err(HandlerAlreadySet)
    }
}

/// Address of the entry stub for `vector` (one of [`STUBBED_VECTORS`]), for the IDT.
#[must_use]
pub fn entry(vector: u8) -> Option<u64> {
    // The stubs are entered by the CPU only, never called from Rust: declared as functions to
    // take their addresses.
    extern "C" {
        fn codespace_exception_stub_0();
        fn codespace_exception_stub_3();
        fn codespace_exception_stub_6();
        fn codespace_exception_stub_14();
    }
    let stub: unsafe extern "C" fn() = match vector {
        0 => codespace_exception_stub_0,
        3 => codespace_exception_stub_3,
        6 => codespace_exception_stub_6,
        14 => codespace_exception_stub_14,
        _ => return None,
    };
    Some(stub as usize as u64)
}

/// Rust side of every stub: reads CR2 first (a fault in the handler would overwrite it).
extern "C" fn dispatch(frame: &mut ExceptionFrame) {
    let cr2 = if frame.vector == PAGE_FAULT {
        x86_64::registers::control::Cr2::read_raw()
    } else {
        0
    };
    match HANDLER.get() {
        Some(handler) => handler(frame, cr2),
        // An exception before the kernel installed its handler: nothing can resume it.
        None => panic!(
            "codespace exception stub: vector {} at {:#x} with no handler installed",
            frame.vector, frame.rip
        ),
    }
}

// The stubs push an error code (0 where the CPU pushes none, #DE, #BP, #UD) and the vector, then
// the common path saves the 15 general-purpose registers (an `ExceptionFrame`, RSP 16-byte
// aligned: 22 quadwords since the CPU's aligned push), calls `dispatch` with the frame, restores
// every register from it and returns with `iretq`.
global_asm!(
    concat!(
        r#"
    .section .text.codespace_exception, "ax"
    .global codespace_exception_stub_0
    .global codespace_exception_stub_3
    .global codespace_exception_stub_6
    .global codespace_exception_stub_14
codespace_exception_stub_0:
    pushq $0
    pushq $0
    jmp codespace_exception_common
codespace_exception_stub_3:
    pushq $0
    pushq $3
    jmp codespace_exception_common
codespace_exception_stub_6:
    pushq $0
    pushq $6
    jmp codespace_exception_common
codespace_exception_stub_14:
    pushq $14
    jmp codespace_exception_common
codespace_exception_common:
"#,
        crate::exception_frame_push!(),
        r#"    movq %rsp, %rdi
    cld
    call {dispatch}
"#,
        crate::exception_frame_pop!(),
        r#"    addq $16, %rsp
    iretq
    .text
"#
    ),
    dispatch = sym dispatch,
    options(att_syntax)
);
