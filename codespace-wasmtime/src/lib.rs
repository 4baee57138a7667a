//! wasmtime's `no_std` runtime on codespace.
//!
//! wasmtime (`=48.0.8`, features `runtime`, `custom-virtual-memory`, `custom-native-signals`,
//! `custom-sync-primitives`) reaches its platform through 19 C-ABI hooks
//! (`src/runtime/vm/sys/custom/capi.rs` in its sources). This crate defines all of them in terms
//! of one small trait, [`Platform`], that a kernel implements once and hands to [`install`]:
//!
//! - per-CPU slots ([`CpuSlots`]): wasmtime's TLS pointers and this crate's trap hand-off;
//! - virtual memory for linear memories and wasmtime's other mappings: reserve, set access,
//!   discard, release ([`Access`]); nothing here ever asks for executable memory, and
//!   `wasmtime_mprotect` refuses every executable request (only codespace makes code executable);
//! - interrupt control, so the lock hooks are interrupt-safe ([`codespace::mmu::InterruptControl`]);
//! - how a trap leaves the exception: the kernel's exception path, on a trap-table hit, resumes
//!   at [`trap_landing_pad`] with the faulting PC in `r10` and the faulting address in `r11`
//!   (see [`traps`]), and the landing pad calls wasmtime's handler on the interrupted stack.
//!
//! Precompiled modules (`.cwasm`) come from the host tool `codespace-wasm-precompile` with a
//! checked header ([`image`]); [`settings`] holds the configuration both sides must agree on;
//! [`spec`] is the spec-testsuite harness the host tool and a kernel share.

#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod code;
mod hooks;
pub mod image;
mod memory;
pub mod settings;
pub mod spec;
mod sync;
pub mod traps;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

pub use code::{LoadError, WasmCode};
pub use codespace::mmu::InterruptControl;
pub use traps::trap_landing_pad;

/// The page size codespace and this crate work in.
pub(crate) const PAGE: usize = 4096;
/// The wasmtime this crate is built for (`=48.0.8`), for kernels to use without a second pin.
pub use wasmtime;

/// What a range of a mapping may be used for. Never executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any access faults.
    None,
    /// Readable, not writable, not executable.
    Read,
    /// Readable and writable, not executable.
    ReadWrite,
}

/// Why a memory operation of the [`Platform`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryError {
    /// No virtual address range of that size is left.
    OutOfAddressSpace,
    /// No physical memory left to commit.
    OutOfMemory,
    /// The range is not (entirely) inside one reservation of the platform.
    NotReserved,
    /// An address or length is not page aligned, or the range is empty or wraps.
    Misaligned,
    /// Executable memory was asked for: only codespace makes memory executable.
    ExecutableRefused,
}

impl MemoryError {
    /// The nonzero code a C-ABI hook returns for this error.
    #[must_use]
    pub fn code(self) -> i32 {
        match self {
            MemoryError::OutOfAddressSpace => 1,
            MemoryError::OutOfMemory => 2,
            MemoryError::NotReserved => 3,
            MemoryError::Misaligned => 4,
            MemoryError::ExecutableRefused => 5,
        }
    }
}

/// Per-CPU state this crate keeps in memory the kernel provides, one per CPU.
///
/// wasmtime's "thread-local" state is per CPU here: a wasm call runs on one CPU from entry to
/// exit (the kernel must not migrate a running wasm call to another CPU; a store may move between
/// calls).
#[derive(Debug)]
pub struct CpuSlots {
    /// wasmtime's TLS pointers: slot 0 the runtime's, slot 1 the component model's async state.
    pub(crate) tls: [AtomicPtr<u8>; 2],
    /// How many wasmtime locks this CPU holds (interrupts are off while nonzero).
    pub(crate) locks_held: AtomicUsize,
    /// Whether interrupts were enabled before this CPU took its first held lock (0 or 1).
    pub(crate) irq_was_enabled: AtomicUsize,
}

impl CpuSlots {
    /// Fresh slots: every TLS pointer null.
    #[must_use]
    pub const fn new() -> Self {
        CpuSlots {
            tls: [
                AtomicPtr::new(core::ptr::null_mut()),
                AtomicPtr::new(core::ptr::null_mut()),
            ],
            locks_held: AtomicUsize::new(0),
            irq_was_enabled: AtomicUsize::new(0),
        }
    }
}

impl Default for CpuSlots {
    fn default() -> Self {
        Self::new()
    }
}

/// The kernel services wasmtime needs, implemented once by the kernel.
///
/// # Safety
/// Implementing this promises:
/// - [`cpu`](Self::cpu) returns the slots of the calling CPU, distinct per CPU and alive for
///   ever; it may be called with interrupts on or off and from any context except NMI;
/// - [`interrupts`](Self::interrupts) really disables and restores interrupts on the calling CPU;
/// - the memory methods behave as documented: a reservation is address space nothing else uses,
///   pages are never executable, committed pages read as zero when first committed or discarded,
///   [`set_access`](Self::set_access) keeps contents, and a released range is never accessed again
///   by anything but a later reservation.
pub unsafe trait Platform: Sync {
    /// The calling CPU's slots.
    fn cpu(&self) -> &CpuSlots;

    /// How to disable and restore interrupts on the calling CPU.
    fn interrupts(&self) -> InterruptControl;

    /// The page size (4096 on x86-64).
    fn page_size(&self) -> usize {
        4096
    }

    /// Reserves `len` bytes (page aligned) of fresh address space, every page with `access`
    /// (committed lazily or eagerly: either way, reads give zero).
    ///
    /// # Errors
    /// No address space or memory left.
    fn reserve(&self, len: usize, access: Access) -> Result<NonNull<u8>, MemoryError>;

    /// Changes the access of `[start, start + len)` keeping its contents; pages never committed
    /// read as zero when they become accessible.
    ///
    /// # Errors
    /// A range outside one reservation, no memory to commit.
    ///
    /// # Safety
    /// Nothing relies on the range staying accessible (wasmtime owns it).
    unsafe fn set_access(
        &self,
        start: usize,
        len: usize,
        access: Access,
    ) -> Result<(), MemoryError>;

    /// Replaces `[start, start + len)` with fresh zero pages with `access` (with
    /// [`Access::None`] the frames are freed).
    ///
    /// # Errors
    /// As [`set_access`](Self::set_access).
    ///
    /// # Safety
    /// As [`set_access`](Self::set_access); the old contents are lost.
    unsafe fn discard(&self, start: usize, len: usize, access: Access) -> Result<(), MemoryError>;

    /// Unmaps `[start, start + len)`, frees its frames and, once a whole reservation is released,
    /// its address space.
    ///
    /// # Errors
    /// A range outside one reservation.
    ///
    /// # Safety
    /// Nothing accesses the range any more.
    unsafe fn release(&self, start: usize, len: usize) -> Result<(), MemoryError>;
}

/// The installed platform (a `&'static dyn Platform`, boxed in a static cell).
static PLATFORM: AtomicPtr<&'static dyn Platform> = AtomicPtr::new(core::ptr::null_mut());
/// Guards the one-time installation.
static INSTALLED: AtomicUsize = AtomicUsize::new(0);

/// Why [`install`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InstallError {
    /// A platform is installed already (the first one stays).
    AlreadyInstalled,
}

/// Installs the platform every hook uses, once, before the first wasmtime `Engine` is built.
///
/// # Errors
/// [`InstallError::AlreadyInstalled`] on a second call.
pub fn install(platform: &'static dyn Platform) -> Result<(), InstallError> {
    if INSTALLED
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(InstallError::AlreadyInstalled);
    }
    // One small leak for the lifetime of the kernel: the fat reference needs a thin home.
    let cell: &'static mut &'static dyn Platform =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(platform));
    PLATFORM.store(cell, Ordering::Release);
    Ok(())
}

/// How many wasmtime locks the calling CPU holds (0 outside wasmtime's own critical sections:
/// a trap that unwinds wasm code must never leave one held).
///
/// # Panics
/// Before [`install`].
#[must_use]
pub fn locks_held_here() -> usize {
    platform().cpu().locks_held.load(Ordering::Relaxed)
}

/// The installed platform.
///
/// # Panics
/// When wasmtime runs before [`install`]: a kernel bug, not an input error (wasmtime cannot be
/// used at all without its platform).
pub(crate) fn platform() -> &'static dyn Platform {
    let cell = PLATFORM.load(Ordering::Acquire);
    assert!(
        !cell.is_null(),
        "codespace-wasmtime: wasmtime used before codespace_wasmtime::install"
    );
    // SAFETY: a non-null pointer was stored once by `install` from a leaked box, never freed.
    unsafe { *cell }
}
