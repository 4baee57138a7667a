//! codespace wired into this kernel: the code window and a manager over the live page tables.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use codespace::breakpoint::BreakpointSites;
use codespace::mmu::x86::{LinearMap, PhysOffset, Smp, X86Mmu, X86_INTERRUPTS};
use codespace::mmu::MmuError;
use codespace::module::Registries;
use codespace::sync::grace::GraceDomain;
use codespace::{AddressRange, CodeError, CodeManager, ManagerConfig, PatchProtocol};

mod mode;
pub use mode::{
    allocator_config, assert_rox_in_use, manager_config, module_config, rox, set_rox, wants_rox,
};
use x86_64::structures::paging::OffsetPageTable;

use crate::cpu::interrupts::{FaultInfo, TrapFrame, BREAKPOINT};
use crate::memory::{self, FrameBitmap, PHYS_MAPPED_LIMIT, PHYS_OFFSET};
use codespace::mmu::x86::IrqSpin;

/// The grace domain of all generated code: CPUs report quiescent states here (the test
/// framework between tests, idle CPUs in their idle loop, the scheduler at every switch, with
/// a hold for a task it preempted inside generated code). Reports from interrupt handlers are
/// refused ([`task_context`]).
pub static GRACE: GraceDomain = GraceDomain::new()
    .with_interrupt_control(X86_INTERRUPTS)
    .with_context_check(task_context);

/// The grace domain's context check: quiescent states are reported from task context only,
/// never from an interrupt or exception handler, which cannot know what the code it
/// interrupted holds (a lookup result, an address from `function_code`, a return into
/// generated code).
fn task_context() -> bool {
    !crate::cpu::interrupts::in_interrupt()
}

/// Trap table and PC lookup of all generated code; the page-fault path looks faults up here.
pub static REGISTRIES: Registries = Registries::new(&GRACE).with_interrupt_control(X86_INTERRUPTS);

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

/// The trap table's part of the exception path (called first for every exception), the crate's
/// own hook (`TrapTable::handle_protected_fault`): a plain not-present or protection #PF at a
/// protected PC, on an address its registration accepts, or a #UD / #DE at a PC registered for
/// that vector, resumes at the landing pad under codespace's landing-pad contract (r10 = the
/// faulting PC; r11 = CR2 for a #PF, `NO_FAULT_ADDRESS` otherwise: what wasm's landing pad,
/// `codespace_wasmtime::traps`, reads). Anything else goes to the kernel's usual handling.
/// Lock-free and allocation-free, like the lookups it relies on; here it also counts hits.
pub(crate) fn trap_fixup(frame: &mut TrapFrame, info: &FaultInfo) -> bool {
    let pc = frame.rip;
    if REGISTRIES
        .traps
        .handle_protected_fault(frame, info.cr2)
        .is_none()
    {
        return false;
    }
    if let Some(count) = TRAPS_BY_VECTOR.get(usize::from(info.vector)) {
        count.fetch_add(1, Ordering::SeqCst);
    }
    LAST_TRAP_PC.store(pc, Ordering::SeqCst);
    LAST_TRAP_CR2.store(info.cr2, Ordering::SeqCst);
    TRAPS_TAKEN.fetch_add(1, Ordering::SeqCst);
    true
}

/// Jump slots being patched under the INT3 protocol: the #BP path resumes CPUs that hit one.
pub static BREAKPOINTS: BreakpointSites = BreakpointSites::new();

static BREAKPOINT_RESUMES: AtomicU64 = AtomicU64::new(0);

/// The INT3 patch protocol on this kernel's #BP hook ([`BREAKPOINTS`]), for a
/// [`ManagerConfig::patch_protocol`].
#[must_use]
pub fn int3_protocol() -> PatchProtocol {
    PatchProtocol::Int3(&BREAKPOINTS)
}

/// How often a CPU hit the INT3 of a slot being patched and was resumed at its new target.
#[must_use]
pub fn breakpoint_resumes() -> u64 {
    BREAKPOINT_RESUMES.load(Ordering::SeqCst)
}

/// The #BP path into the INT3 patch protocol (called first for every breakpoint): an INT3 that
/// a patch placed over a jump slot resumes at the slot's new target, which is what the `jmp`
/// being written does (RIP only: a `jmp` pushes nothing). The IDT's #BP entry is an interrupt
/// gate, so this CPU cannot acknowledge a serialization IPI between the #BP and the new RIP:
/// the patch cannot finish and unregister the site meanwhile (the hook's contract).
pub(crate) fn breakpoint_fixup(frame: &mut TrapFrame, info: &FaultInfo) -> bool {
    if info.vector != BREAKPOINT {
        return false;
    }
    if !BREAKPOINTS.handle_breakpoint(frame) {
        return int3_gone(frame);
    }
    BREAKPOINT_RESUMES.fetch_add(1, Ordering::SeqCst);
    true
}

static INT3_RETRIES: AtomicU64 = AtomicU64::new(0);

/// How often the #BP path found the INT3 it hit in the code window gone and ran the slot again.
#[must_use]
pub fn int3_retries() -> u64 {
    INT3_RETRIES.load(Ordering::SeqCst)
}

/// Linux kprobes' rule for an INT3 that is no longer there when its handler looks (no site
/// answers, and the byte at RIP - 1 is not INT3 any more): back up over it and run what is
/// there now — `iretq` serializes, so the CPU fetches the new bytes. Under QEMU's TCG only: a
/// vCPU may keep a stale translation of a slot's INT3 stage after the patch finished (see
/// [`settle_slot`]) and retries until the settling store drops it. On hardware and KVM the
/// hook always answers first (the patch cannot finish while this CPU has interrupts off), so
/// there a missing site stays a fatal stray breakpoint, as a protocol bug should.
fn int3_gone(frame: &mut TrapFrame) -> bool {
    let Some(at) = (frame.rip as usize).checked_sub(1) else {
        return false;
    };
    // Only where stale translations exist: elsewhere a missing site is a bug to report.
    if !CODE_WINDOW.contains(at) || !under_tcg() {
        return false;
    }
    // SAFETY: this CPU just executed the byte at `at`, in the code window: its page holds
    // published code that is not freed while a CPU runs it (grace periods; this CPU is inside an
    // exception handler, not quiescent), so it is mapped and readable.
    let byte = unsafe { core::ptr::read_volatile(at as *const u8) };
    if byte == 0xCC {
        return false; // a real INT3: the kernel's usual handling
    }
    INT3_RETRIES.fetch_add(1, Ordering::SeqCst);
    frame.rip = at as u64;
    true
}

/// Trap-table hits per exception vector (0..32) since boot.
static TRAPS_BY_VECTOR: [AtomicU64; 32] = [const { AtomicU64::new(0) }; 32];

/// How many faults of exception `vector` the trap table resolved since boot.
#[must_use]
pub fn trap_hits(vector: u8) -> u64 {
    TRAPS_BY_VECTOR
        .get(usize::from(vector))
        .map_or(0, |c| c.load(Ordering::SeqCst))
}

/// The code window: PML4 slot 384, 512 GiB that nothing else maps.
pub const CODE_WINDOW: AddressRange =
    AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_0000_0000 + (512 << 30));

/// The page-table backend over the kernel's page table and frame allocator.
pub type KernelMmu = X86Mmu<'static, IrqSpin, OffsetPageTable<'static>, FrameBitmap, PhysOffset>;

/// PML4 slot of the private address space the backend writes live code through: a lower-half
/// slot nothing in this kernel maps.
pub const POKE_SLOT: usize = 255;

/// The kernel's linear maps of physical memory, kept free of writable aliases of code frames:
/// the identity map (PML4 slot 0) and the direct map at [`PHYS_OFFSET`].
pub static LINEAR_MAPS: [LinearMap; 2] = [
    LinearMap {
        virt: 0,
        phys: 0,
        size: PHYS_MAPPED_LIMIT,
    },
    LinearMap {
        virt: PHYS_OFFSET as usize,
        phys: 0,
        size: PHYS_MAPPED_LIMIT,
    },
];

/// The kernel's CPUs, as codespace's x86 backend sees them: [`crate::smp`]'s IPI layer.
struct KernelSmp;

// SAFETY: `current_cpu` is the dense per-CPU index read from GS (set before a CPU runs anything
// else, never changed); `online_cpus` counts every CPU that entered the kernel. `smp::shootdown`
// returns after every other online CPU executed `invlpg` for each page, or reloaded CR3 — which
// flushes every translation here: this kernel uses neither global pages nor PCIDs.
// `smp::sync_cores` returns after every other online CPU executed `cpuid`. Both may be called
// with interrupts off and serve the caller's own mailbox while waiting (see `smp::ipi`).
unsafe impl Smp for KernelSmp {
    fn current_cpu(&self) -> usize {
        crate::smp::current_cpu()
    }

    fn online_cpus(&self) -> usize {
        crate::smp::online_cpus()
    }

    fn shootdown(&self, pages: &[usize], full: bool) -> Result<(), MmuError> {
        crate::smp::shootdown(pages, full);
        Ok(())
    }

    fn sync_cores(&self) -> Result<(), MmuError> {
        crate::smp::sync_cores();
        Ok(())
    }
}

/// The kernel's CPUs as the backend sees them.
pub fn smp() -> &'static dyn Smp {
    &KernelSmp
}

/// Takes part in grace periods: called once at boot when every CPU is online, before anything
/// uses codespace. Idle CPUs report quiescent states from then on.
pub(crate) fn init() {
    // SAFETY: this kernel runs generated code and lookups on the CPUs `smp` started only, whose
    // indices are `0..max_cpus()`.
    unsafe { GRACE.set_possible_cpus(crate::smp::max_cpus()) };
    crate::smp::set_idle_hook(Some(idle_quiescent));
}

/// The idle hook: an AP in its idle loop, or a CPU waiting in `smp::run_on`/`on_each_cpu` for
/// work it handed out, runs no generated code and holds no lookup reference (the test framework
/// never calls them from generated code or from inside a lookup).
fn idle_quiescent(cpu: usize) {
    // SAFETY: see above: the hook runs only at those quiescent points.
    unsafe { GRACE.quiescent(cpu) };
}

/// Reports that the calling CPU passed a quiescent state (see [`GraceDomain::quiescent`]), and
/// helps grace periods along: the report, an attempt to advance the epoch, a second report. On
/// a CPU that is alone (or whose peers reported meanwhile) this ends every grace period that
/// began before the call.
///
/// # Safety
/// The calling CPU holds no reference from a trap-table or PC lookup and is not executing, or
/// about to return into, generated code (no call into generated code is on its stack).
pub unsafe fn quiescent() {
    // Interrupts off: a report preempted between its epoch load and its store would store an
    // old epoch after the scheduler's newer one (a task's report must not be split by a switch).
    x86_64::instructions::interrupts::without_interrupts(|| {
        let cpu = smp().current_cpu();
        // SAFETY: the caller's contract (twice: nothing changes for the caller in between).
        unsafe { GRACE.quiescent(cpu) };
        GRACE.try_advance();
        // SAFETY: as above.
        unsafe { GRACE.quiescent(cpu) };
        GRACE.try_advance();
    });
}

/// Waits until everything retired before the call can be freed: reports the calling CPU
/// quiescent and polls until every other CPU reported too (from their idle loops).
///
/// # Safety
/// As [`quiescent`].
pub unsafe fn synchronize() {
    let ticket = GRACE.defer();
    let mut polls = 0u32;
    while !GRACE.is_over(ticket) {
        // SAFETY: the caller's contract.
        unsafe { quiescent() };
        polls += 1;
        if polls.is_multiple_of(64) {
            // Idle CPUs sleep in `hlt` and report only when woken: an IPI wakes them.
            crate::smp::sync_cores();
        }
        core::hint::spin_loop();
    }
}

/// The hypervisor's signature from CPUID leaf 0x4000_0000; `None` without a hypervisor.
#[must_use]
pub fn hypervisor_signature() -> Option<[u8; 12]> {
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    let leaf = core::arch::x86_64::__cpuid(0x4000_0000);
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    id[8..].copy_from_slice(&leaf.edx.to_le_bytes());
    Some(id)
}

/// Whether this runs under QEMU's TCG (CPUID leaf 0x4000_0000 says `TCGTCGTCGTCG`).
#[must_use]
pub fn under_tcg() -> bool {
    hypervisor_signature().is_some_and(|id| &id == b"TCGTCGTCGTCG")
}

/// Under QEMU's TCG, stores slot `index`'s current target again (one more `patch_slot`) after
/// a patch other CPUs may be executing through. Does nothing elsewhere.
///
/// `patch_slot` stores the slot with one aligned 8-byte store and makes every other CPU
/// serialize; on hardware (and under KVM) a CPU's next fetch then sees the new bytes (Intel SDM
/// vol. 3, "cross-modifying code"). QEMU's multi-threaded TCG caches translations of guest code
/// shared by all vCPUs and drops those of a page when it notices a store to it, but a vCPU
/// translating the slot *while* another stores to it can link a translation of the old bytes
/// after the store, and that translation then runs the old target until the page is written
/// again — past the grace period that frees the old code. Once every vCPU acknowledged the first
/// patch's serialization IPI, every such translation is linked, and a second store removes it;
/// a translation racing with the second store reads bytes that are already the new ones.
///
/// # Panics
/// Never for a slot the module knows; a refused patch is ignored (the first one stands).
pub fn settle_slot<M: codespace::mmu::Mmu + Send + 'static>(
    m: &codespace::module::CodeModule<M>,
    index: u32,
) {
    if !under_tcg() {
        return;
    }
    if let Ok(Some(target)) = m.slot_target(index) {
        let _ = m.patch_slot(index, target);
    }
}

/// A backend over the kernel's live page tables, reporting the frame allocator's free count.
///
/// # Errors
/// No frames for its private alias tables.
pub fn kernel_mmu() -> Result<KernelMmu, MmuError> {
    // SAFETY: the page table is the one every CPU runs on; PHYS_OFFSET maps all memory the frame
    // allocator hands out (the first 4 GiB) and every page-table frame; the frame allocator
    // hands out frames nothing else uses; slot 255 is unused by this kernel; the identity and
    // direct maps map the first 4 GiB linearly and nothing reads code frames through them. The
    // same bitmap hands out 2 MiB frames (ROX code): 2 MiB aligned, used by nothing else, in
    // the first 4 GiB, so mapped writable at PHYS_OFFSET and elsewhere only in LINEAR_MAPS.
    unsafe {
        Ok(X86Mmu::new(
            memory::page_table_lock(),
            memory::frames_lock(),
            PhysOffset::new(PHYS_OFFSET),
            smp(),
            POKE_SLOT,
        )?
        .with_linear_maps(&LINEAR_MAPS)
        .with_huge_frames(memory::huge_frames_lock())
        .with_free_count(FrameBitmap::free_frames))
    }
}

/// A manager over `window` (by default use [`CODE_WINDOW`]; tests take disjoint slices of it),
/// in the kernel's code mode: `config` goes through [`manager_config`] first.
///
/// # Errors
/// What [`CodeManager::new`] reports (NX or WP off, bad window).
pub fn manager(
    window: AddressRange,
    config: ManagerConfig,
) -> Result<CodeManager<KernelMmu>, CodeError> {
    CodeManager::new(kernel_mmu()?, window, manager_config(config))
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
