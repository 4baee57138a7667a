//! What the kernel provides: the pieces no crate can write for it.

/// How a call into generated code ended, as the kernel's entry reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// The code returned this value (`rax`).
    Returned(u64),
    /// A trap landed: the landing pad unwound to the entry. `pc` is the faulting instruction
    /// (r10 at the landing pad); `fault_address` what the kernel read as the faulting address
    /// (CR2; meaningful for page faults only).
    Trapped {
        /// The faulting instruction.
        pc: usize,
        /// CR2 as the kernel read it.
        fault_address: u64,
    },
    /// Another way out the kernel's entry has (a status word of its own).
    Other(u64),
}

/// The kernel's side of a [`JITModule`](crate::JITModule): entering generated code and leaving
/// it from a trap, the stack Cranelift compiles on, and quiescent states.
///
/// # Safety
/// - [`landing_pad`](Self::landing_pad) is code that, entered with the registers of a
///   faulting instruction of generated code (same RSP) and r10 = its PC — which is how the
///   kernel's #PF, #UD and #DE handlers resume a trap codespace's trap table finds — unwinds to
///   the innermost [`enter`](Self::enter) of the current CPU and makes it return
///   [`Exit::Trapped`] with that PC, or stops the kernel (never returns into the faulting code);
/// - [`enter`](Self::enter) calls `entry` per System V with `args` in the integer argument
///   registers and keeps the caller intact on both ways back;
/// - [`quiescent`](Self::quiescent) reports a quiescent state of the registries' grace domain
///   only when the calling CPU holds no reference into code of any module (no generated frame
///   on its stack, no code address it will still call);
/// - the memory the global allocator hands out is not executable (writable data objects live
///   there).
pub unsafe trait Kernel: Sync {
    /// Where every landing pad of generated code jumps (an absolute address; the module writes
    /// `jmp [rip+0]` and it behind each function that has trap sites).
    fn landing_pad(&self) -> usize;

    /// Runs `f` on a stack deep enough for Cranelift (well over 64 KiB in an unoptimised
    /// build), or on the current one when it is.
    ///
    /// # Errors
    /// When no such stack can be had (then `f` is not run).
    fn on_compile_stack(&self, f: &mut dyn FnMut()) -> Result<(), &'static str>;

    /// Calls `entry` with `args` (at most six) and reports how it ended.
    ///
    /// # Safety
    /// `entry` is code (or a jump-table slot leading to code) compiled for System V that takes
    /// `args.len()` integer arguments and returns at most one integer, whose trap sites land at
    /// [`landing_pad`](Self::landing_pad).
    unsafe fn enter(&self, entry: usize, args: &[u64]) -> Exit;

    /// Reports the calling CPU quiescent when the kernel knows it holds nothing (see the trait's
    /// safety section), so replaced code can be freed; may do nothing.
    fn quiescent(&self);

    /// Whether `finalize_definitions` stores every slot it patched a second time. On hardware
    /// (and under KVM) one patch and its serialization round are enough (the default: `false`).
    /// QEMU's multi-threaded TCG may link a translation of a slot's old bytes while another
    /// vCPU stores the new ones, and run the old target past the grace period that frees it; a
    /// second store once every vCPU acknowledged the first removes such a translation. A kernel
    /// that runs under TCG answers `true` there.
    fn patch_slots_twice(&self) -> bool {
        false
    }

    /// Runs `f`, a call into codespace's module that may take its lock, as the kernel wants
    /// such calls run (e.g. counted, so a stop IPI does not abandon a CPU holding the lock).
    fn module_call(&self, f: &mut dyn FnMut()) {
        f();
    }
}
