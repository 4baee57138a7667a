//! codespace wired into this kernel: the code window and a manager over the live page tables.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use codespace::mmu::x86::X86Mmu;
use codespace::module::Registries;
use codespace::sync::grace::GraceDomain;
use codespace::{AddressRange, CodeError, CodeManager, ManagerConfig};

use crate::interrupts::{FaultInfo, TrapFrame, PAGE_FAULT};
use crate::memory::{self, FrameBitmap};

/// Grace periods of the registries: memory they replace is freed once every CPU passed a
/// quiescent state. This kernel runs on CPU 0 alone ([`init`]) and the test framework reports
/// a quiescent state between tests ([`quiescent`]).
pub static GRACE: GraceDomain = GraceDomain::new();

/// Trap table and PC lookup of all generated code; the page-fault path looks faults up here.
pub static REGISTRIES: Registries = Registries::new(&GRACE);

/// Tells the grace domain that CPU 0 is the only CPU. Called once at boot.
pub(crate) fn init() {
    // SAFETY: this kernel never starts another CPU, so no CPU other than 0 looks up the
    // registries or runs generated code.
    unsafe { GRACE.set_possible_cpus(1) };
}

/// Reports that CPU 0 passed a quiescent state.
///
/// # Safety
/// The caller runs where CPU 0 holds nothing obtained from a lookup of the registries and is
/// neither executing generated code nor going to return into it (e.g. the test framework between
/// two tests, an idle loop).
pub unsafe fn quiescent() {
    // SAFETY: the caller's contract is `GraceDomain::quiescent`'s, for CPU 0, the only CPU.
    unsafe { GRACE.quiescent(0) };
}

static TRAPS_TAKEN: AtomicU64 = AtomicU64::new(0);
static LAST_TRAP_PC: AtomicU64 = AtomicU64::new(0);
static LAST_TRAP_CR2: AtomicU64 = AtomicU64::new(0);

/// The last trap the page-fault path resolved: faulting PC, CR2, and how many so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapRecord {
    /// PC of the protected instruction that faulted.
    pub pc: u64,
    /// The faulting address.
    pub cr2: u64,
    /// Traps resolved since boot.
    pub count: u64,
}

/// The last resolved trap, if any.
#[must_use]
pub fn last_trap() -> Option<TrapRecord> {
    let count = TRAPS_TAKEN.load(Ordering::SeqCst);
    (count > 0).then(|| TrapRecord {
        pc: LAST_TRAP_PC.load(Ordering::SeqCst),
        cr2: LAST_TRAP_CR2.load(Ordering::SeqCst),
        count,
    })
}

/// Page-fault error-code bits a trap may carry: present (a protection fault, else not-present)
/// and write. Anything else — user mode, a reserved-bit violation (corrupt page tables), an
/// instruction fetch, protection keys, shadow stacks, SGX — is never a bounds check.
const PLAIN_FAULT_BITS: u64 = 0b11;

/// The #PF path into the trap table (called first for every page fault): a plain not-present or
/// protection fault at a protected PC, on an address its registration accepts, resumes at the
/// landing pad with the faulting PC in r10 (V8's convention). Anything else goes to the
/// kernel's usual handling. Lock-free and allocation-free, like the lookup it relies on.
pub(crate) fn trap_fixup(frame: &mut TrapFrame, info: &FaultInfo) -> bool {
    if info.vector != PAGE_FAULT || info.error_code & !PLAIN_FAULT_BITS != 0 {
        return false;
    }
    let Some(hit) = REGISTRIES
        .traps
        .lookup_fault(frame.rip as usize, info.cr2 as usize)
    else {
        return false;
    };
    LAST_TRAP_PC.store(frame.rip, Ordering::SeqCst);
    LAST_TRAP_CR2.store(info.cr2, Ordering::SeqCst);
    TRAPS_TAKEN.fetch_add(1, Ordering::SeqCst);
    frame.r10 = frame.rip;
    frame.rip = hit.landing_pad() as u64;
    true
}

/// The code window: PML4 slot 384, 512 GiB that nothing else maps.
pub const CODE_WINDOW: AddressRange =
    AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_0000_0000 + (512 << 30));

/// The page-table backend over the kernel's page table and frame allocator.
pub type KernelMmu = X86Mmu<'static, FrameBitmap>;

/// A backend over the kernel's live page tables, reporting the frame allocator's free count.
#[must_use]
pub fn kernel_mmu() -> KernelMmu {
    X86Mmu::new(memory::page_table_lock(), memory::frames_lock())
        .with_free_count(FrameBitmap::free_frames)
}

/// A manager over `window` (by default use [`CODE_WINDOW`]; tests take disjoint slices of it).
///
/// # Errors
/// What [`CodeManager::new`] reports (NX or WP off, bad window).
pub fn manager(
    window: AddressRange,
    config: ManagerConfig,
) -> Result<CodeManager<KernelMmu>, CodeError> {
    CodeManager::new(kernel_mmu(), window, config)
}

/// Slice `n` (4 GiB) of the code window, so tests never share page-table state.
#[must_use]
pub fn test_window(n: usize) -> AddressRange {
    let size = 4usize << 30;
    AddressRange::new(
        CODE_WINDOW.start() + n * size,
        CODE_WINDOW.start() + (n + 1) * size,
    )
}

static LAZY_COMPILER: AtomicUsize = AtomicUsize::new(0);

/// A lazy compiler: compiles function `index`, installs it, and returns its entry address.
pub type LazyCompiler = fn(index: u32) -> usize;

/// Installs the function [`lazy_compile_entry`] calls, or removes it.
pub fn set_lazy_compiler(compiler: Option<LazyCompiler>) {
    LAZY_COMPILER.store(compiler.map_or(0, |c| c as usize), Ordering::SeqCst);
}

/// Address of the lazy-compile entry to give `ModuleConfig::lazy_entry`.
#[must_use]
pub fn lazy_compile_entry() -> usize {
    codespace_lazy_compile_entry as *const () as usize
}

#[no_mangle]
extern "C" fn codespace_lazy_compile(index: u32) -> usize {
    let compiler = LAZY_COMPILER.load(Ordering::SeqCst);
    if compiler == 0 {
        panic!("function {index} called before it was compiled, and no lazy compiler is installed");
    }
    // SAFETY: only `set_lazy_compiler` stores here, and it stores `LazyCompiler` values.
    let compiler = unsafe { core::mem::transmute::<usize, LazyCompiler>(compiler) };
    compiler(index)
}

// The lazy-compile entry, reached from a lazy slot (`push index; jmp`) through the code space's
// far-jump trampoline: saves the argument registers, asks the lazy compiler for the function's
// code, drops the pushed index and tail-jumps to the code with the original arguments.
global_asm!(
    r#"
    .section .text
    .global codespace_lazy_compile_entry
codespace_lazy_compile_entry:
    pushq %rdi
    pushq %rsi
    pushq %rdx
    pushq %rcx
    pushq %r8
    pushq %r9
    pushq %rax
    movl 56(%rsp), %edi
    subq $8, %rsp
    call codespace_lazy_compile
    addq $8, %rsp
    movq %rax, %r11
    popq %rax
    popq %r9
    popq %r8
    popq %rcx
    popq %rdx
    popq %rsi
    popq %rdi
    addq $8, %rsp
    jmpq *%r11
"#,
    options(att_syntax)
);

extern "C" {
    fn codespace_lazy_compile_entry();
}
