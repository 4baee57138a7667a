//! Jump tables on real page tables: calls through slots, live patching through the writable
//! alias (near and far paths), patching from a timer interrupt while code runs, lazy slots.
#![no_std]
#![no_main]

extern crate alloc;

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use codespace::code_object::{CodeKind, RelocKind, Relocation};
use codespace::mmu::{
    CommittedPage, FlushStats, InterruptControl, Leaf, Mmu, MmuError, PageMapping, Poke,
    Protection, TlbFlush, Unflushed,
};
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{AddressRange, AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig};
use codespace_kernel::code::{self, kernel_mmu, test_window, KernelMmu, REGISTRIES};
use codespace_kernel::cpu::{interrupts, pic};
use codespace_kernel::memory::wx_audit;
use x86_64::instructions::port::Port;
use x86_64::registers::control::Cr3;

codespace_kernel::kernel_tests![
    call_through_slot_then_patch,
    target_beyond_2_gib_takes_the_far_path,
    timer_interrupt_patches_a_slot_under_a_calling_loop,
    lazy_slot_compiles_on_first_call,
    int3_protocol_patches_a_slot_every_cpu_calls,
    item_08_the_writable_poke_alias_exists_only_in_the_poking_cpus_address_space,
];

/// The backend, checking at every write through the private alias that every watched
/// (jump-table) page still mapped is R+X in its executable mapping: live code is never made writable, not
/// even for a patch. (The mapping cannot change during a session: the page-table lock is held.)
struct CheckingMmu {
    inner: KernelMmu,
}

static WATCH: spin::Mutex<AddressRange> = spin::Mutex::new(AddressRange::EMPTY);
static CHECKED_POKES: AtomicU64 = AtomicU64::new(0);
static WX_DURING_STORE: AtomicU64 = AtomicU64::new(0);

/// Item 8: what a poke session's address spaces look like while the alias exists. Off except in
/// the test that reads it (each audit walks a whole page table).
static AUDIT_POKES: AtomicBool = AtomicBool::new(false);
/// Sessions audited; of those, sessions whose *shared* page table (the one every CPU runs on)
/// held a writable translation of an executable frame, and sessions whose *private* one (loaded
/// on the poking CPU only) did.
static AUDITED_POKES: AtomicU64 = AtomicU64::new(0);
static SHARED_WRITABLE_CODE: AtomicU64 = AtomicU64::new(0);
static PRIVATE_WRITABLE_CODE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every operation is the inner backend's, unchanged; `poke` only inspects first.
unsafe impl Mmu for CheckingMmu {
    fn check_cpu(&self) -> Result<(), MmuError> {
        self.inner.check_cpu()
    }
    fn current_cpu(&self) -> usize {
        self.inner.current_cpu()
    }
    fn online_cpus(&self) -> usize {
        self.inner.online_cpus()
    }
    fn interrupt_control(&self) -> InterruptControl {
        self.inner.interrupt_control()
    }
    unsafe fn map_fresh(&mut self, page: usize) -> Result<CommittedPage, MmuError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.map_fresh(page) }
    }
    unsafe fn map_rox(
        &mut self,
        page: usize,
        tlb: &mut TlbFlush,
    ) -> Result<alloc::vec::Vec<CommittedPage>, MmuError> {
        // SAFETY: forwarded with the caller's guarantees (the ROX pass needs the inner
        // backend's 2 MiB pages: without this the default answer would fall back to 4 KiB).
        unsafe { self.inner.map_rox(page, tlb) }
    }
    unsafe fn unmap_rox(
        &mut self,
        pages: alloc::vec::Vec<CommittedPage>,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, alloc::vec::Vec<CommittedPage>)> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.unmap_rox(pages, tlb) }
    }
    unsafe fn unmap(
        &mut self,
        page: CommittedPage,
        tlb: &mut TlbFlush,
    ) -> Result<(), (MmuError, CommittedPage)> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.unmap(page, tlb) }
    }
    unsafe fn protect(
        &mut self,
        page: &CommittedPage,
        prot: Protection,
        tlb: &mut TlbFlush,
    ) -> Result<(), MmuError> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.protect(page, prot, tlb) }
    }
    fn write(&mut self, page: &CommittedPage, offset: usize, data: &[u8]) -> Result<(), MmuError> {
        self.inner.write(page, offset, data)
    }
    unsafe fn poke(
        &mut self,
        pages: &[&CommittedPage],
        f: &mut dyn FnMut(&mut dyn Poke) -> Result<(), MmuError>,
    ) -> Result<(), MmuError> {
        let watch = *WATCH.lock();
        for page in watch.pages() {
            let m = self.inner.query(page);
            // A table page that is mapped must be R+X (one freed with its module is not).
            if m.is_some_and(|m| m.writable || !m.executable) {
                WX_DURING_STORE.fetch_add(1, Ordering::SeqCst);
            }
        }
        CHECKED_POKES.fetch_add(1, Ordering::SeqCst);
        if !AUDIT_POKES.load(Ordering::SeqCst) {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { self.inner.poke(pages, f) };
        }
        // The page table every CPU runs on, read before the session switches this CPU away.
        let (shared, _) = Cr3::read();
        let mut audited = |poke: &mut dyn Poke| {
            // Inside the session: this CPU runs on the private address space with the alias.
            let private = wx_audit::audit_active();
            let common = wx_audit::audit(shared);
            AUDITED_POKES.fetch_add(1, Ordering::SeqCst);
            if !common.writable_aliases.is_empty() || !common.writable_and_executable.is_empty() {
                SHARED_WRITABLE_CODE.fetch_add(1, Ordering::SeqCst);
            }
            if !private.writable_aliases.is_empty() {
                PRIVATE_WRITABLE_CODE.fetch_add(1, Ordering::SeqCst);
            }
            f(poke)
        };
        // SAFETY: forwarded with the caller's guarantees; the closure only reads page tables
        // before doing the caller's writes.
        unsafe { self.inner.poke(pages, &mut audited) }
    }
    fn read(&self, page: &CommittedPage, offset: usize, buf: &mut [u8]) -> Result<(), MmuError> {
        self.inner.read(page, offset, buf)
    }
    fn flush(&mut self, tlb: TlbFlush) -> Result<(), Unflushed> {
        self.inner.flush(tlb)
    }
    fn sync_cores(&mut self) -> Result<(), MmuError> {
        self.inner.sync_cores()
    }
    fn query(&self, addr: usize) -> Option<PageMapping> {
        self.inner.query(addr)
    }
    fn for_each_mapping(&self, range: AddressRange, f: &mut dyn FnMut(usize, PageMapping)) {
        self.inner.for_each_mapping(range, f)
    }
    fn for_each_leaf(&self, f: &mut dyn FnMut(&Leaf)) {
        self.inner.for_each_leaf(f)
    }
    fn flush_stats(&self) -> FlushStats {
        self.inner.flush_stats()
    }
    fn free_frames(&self) -> Option<usize> {
        self.inner.free_frames()
    }
}

type Module = CodeModule<CheckingMmu>;

fn manager(window: usize, max_space: usize) -> CodeManager<CheckingMmu> {
    CodeManager::new(
        CheckingMmu {
            inner: kernel_mmu().expect("backend"),
        },
        test_window(40 + window),
        code::manager_config(ManagerConfig {
            max_code_space_size: max_space,
            ..ManagerConfig::default()
        }),
    )
    .expect("manager")
}

/// `mov eax, imm32; ret`
fn ret_const(v: u32) -> [u8; 6] {
    let b = v.to_le_bytes();
    [0xB8, b[0], b[1], b[2], b[3], 0xC3]
}

/// `sub rsp, 8; call slot; add rsp, 8; add eax, 100; ret` — calls function `slot` through its
/// own space's jump table (the rel32 at offset 5 is a CallSlot relocation).
const CALLER: [u8; 18] = [
    0x48, 0x83, 0xEC, 0x08, // sub rsp, 8
    0xE8, 0, 0, 0, 0, // call rel32
    0x48, 0x83, 0xC4, 0x08, // add rsp, 8
    0x83, 0xC0, 0x64, // add eax, 100
    0xC3, 0xCC,
];

fn add_caller(m: &Module, index: u32, slot: u32) -> usize {
    let relocs = [Relocation {
        offset: 5,
        kind: RelocKind::CallSlot { slot },
    }];
    let mut new = NewCode::function(index, &CALLER);
    new.relocations = &relocs;
    m.add_code(&new).expect("caller").instruction_start()
}

fn call0(addr: usize) -> u64 {
    // SAFETY: published code (or a jump slot leading to it) with the C ABI and no arguments.
    let f: extern "C" fn() -> u64 = unsafe { core::mem::transmute(addr) };
    f()
}

/// A module with `functions` slots whose (first) jump table the checking backend watches.
fn watched_module(mgr: &CodeManager<CheckingMmu>, functions: u32) -> Module {
    let config = code::module_config(
        mgr,
        ModuleConfig {
            functions,
            ..ModuleConfig::default()
        },
    );
    let m = Module::new(mgr, &REGISTRIES, config).expect("module");
    watch_tables(&m);
    m
}

fn watch_tables(m: &Module) {
    let t = m.jump_tables().expect("tables")[0].range();
    *WATCH.lock() = t.page_expand();
}

fn call_through_slot_then_patch() {
    let mgr = manager(0, 1 << 30);
    let m = watched_module(&mgr, 4);
    m.add_code(&NewCode::function(1, &ret_const(1))).expect("g");
    let f = add_caller(&m, 0, 1);
    // The launcher's ROX pass: the table and the code are on a ROX page.
    code::assert_rox_in_use(&mgr);
    assert_eq!(call0(f), 101, "f calls g through slot 1");
    let g2 = m
        .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(2)))
        .expect("g2");
    let stores = CHECKED_POKES.load(Ordering::SeqCst);
    m.patch_slot(1, g2.instruction_start()).expect("patch");
    assert_eq!(call0(f), 102, "patched slot reaches g2");
    assert_eq!(
        CHECKED_POKES.load(Ordering::SeqCst),
        stores + 1,
        "an in-reach patch is one store, through the checked path"
    );
    assert_eq!(
        WX_DURING_STORE.load(Ordering::SeqCst),
        0,
        "table page was R+X during every store"
    );
    // Replacing the function itself also repoints the slot.
    m.add_code(&NewCode::function(1, &ret_const(3)))
        .expect("g3");
    assert_eq!(call0(f), 103);
    assert!(mgr.audit().expect("audit").is_clean(), "{:?}", mgr.audit());
}

fn target_beyond_2_gib_takes_the_far_path() {
    let mgr = manager(1, 1 << 30);
    let m = watched_module(&mgr, 2);
    m.add_code(&NewCode::function(1, &ret_const(1))).expect("g");
    let f = add_caller(&m, 0, 1);
    // Three 1 GiB reservations (nothing committed) push the next code space > 2 GiB away.
    let fillers: alloc::vec::Vec<_> = (0..3)
        .map(|_| {
            CodeAllocator::new(
                &mgr,
                code::allocator_config(
                    &mgr,
                    AllocatorConfig {
                        initial_reservation: 1 << 30,
                        ..AllocatorConfig::default()
                    },
                ),
            )
            .expect("filler")
        })
        .collect();
    let far = Module::new(
        &mgr,
        &REGISTRIES,
        code::module_config(&mgr, ModuleConfig::default()),
    )
    .expect("far module");
    let target = far
        .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(7)))
        .expect("far code");
    let table = m.jump_tables().expect("tables")[0].range();
    assert!(
        target.instruction_start() - table.end() > i32::MAX as usize,
        "really out of rel32 reach"
    );
    // Another module's code is not this module's to target unless registered as an external
    // entry (the module cannot know when `far` frees it otherwise).
    assert!(matches!(
        m.patch_slot(1, target.instruction_start()),
        Err(codespace::module::ModuleError::UnknownTarget { .. })
    ));
    // SAFETY: `far` keeps `target` (a `ret_const` function, callable like `m`'s) and is
    // dropped with `m` below; no CPU calls slot 1 after that.
    unsafe { m.register_external(target.instruction_start()) }.expect("external");
    m.patch_slot(1, target.instruction_start()).expect("patch");
    let layout = m.jump_tables().expect("tables")[0];
    let mut near = [0u8; 8];
    mgr.read(layout.near_slot_addr(1).expect("slot"), &mut near)
        .expect("read");
    let rel = i32::from_le_bytes([near[1], near[2], near[3], near[4]]);
    let near_target = (layout.near_slot_addr(1).unwrap() + 5).wrapping_add_signed(rel as isize);
    assert_eq!(near[0], 0xE9);
    assert_eq!(
        near_target,
        layout.far_slot_addr(1).unwrap(),
        "near slot jumps to the far slot"
    );
    assert_eq!(
        call0(f),
        107,
        "call through near and far slot reaches the far code"
    );
    assert_eq!(WX_DURING_STORE.load(Ordering::SeqCst), 0);
    drop(far);
    drop(fillers);
    drop(m);
    // Dropped modules' code goes after a grace period: this CPU is quiescent here.
    // SAFETY: no generated code runs on this CPU and no lookup reference is held.
    unsafe { code::synchronize() };
    REGISTRIES.grace().reclaim();
    // Task context, interrupts off: the dropped modules' spaces were only queued.
    mgr.release_pending().expect("release");
    assert_eq!(mgr.committed(), 0);
    assert!(mgr.audit().expect("audit").is_clean());
}

static LIVE: spin::Mutex<Option<(Module, usize, usize)>> = spin::Mutex::new(None);
static PATCHES: AtomicUsize = AtomicUsize::new(0);

fn timer_tick(_frame: &mut interrupts::TrapFrame) {
    if let Some(mut guard) = LIVE.try_lock() {
        if let Some((m, a, b)) = guard.as_mut() {
            let n = PATCHES.fetch_add(1, Ordering::SeqCst);
            let target = if n.is_multiple_of(2) { *b } else { *a };
            m.patch_slot(1, target).expect("patch from IRQ");
        }
    }
}

fn timer_interrupt_patches_a_slot_under_a_calling_loop() {
    let mgr = manager(2, 1 << 30);
    let m = watched_module(&mgr, 2);
    let g = m
        .add_code(&NewCode::function(1, &ret_const(1)))
        .expect("g")
        .instruction_start();
    let g2 = m
        .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(2)))
        .expect("g2")
        .instruction_start();
    let f = add_caller(&m, 0, 1);
    *LIVE.lock() = Some((m, g, g2));
    PATCHES.store(0, Ordering::SeqCst);

    // PIT channel 0, rate generator at ~2 kHz.
    let divisor: u16 = 596;
    // SAFETY: programs the PIT, which only this test uses.
    unsafe {
        Port::<u8>::new(0x43).write(0x34);
        Port::<u8>::new(0x40).write(divisor as u8);
        Port::<u8>::new(0x40).write((divisor >> 8) as u8);
    }
    interrupts::set_irq_handler(0, Some(timer_tick));
    pic::set_masked(0, false);
    x86_64::instructions::interrupts::enable();

    let (mut old, mut new, mut other) = (0u64, 0u64, 0u64);
    let mut calls = 0u64;
    while calls < 3_000_000 {
        match call0(f) {
            101 => old += 1,
            102 => new += 1,
            _ => other += 1,
        }
        calls += 1;
    }

    x86_64::instructions::interrupts::disable();
    pic::set_masked(0, true);
    interrupts::set_irq_handler(0, None);
    let patches = PATCHES.load(Ordering::SeqCst);
    let (m, _, _) = LIVE.lock().take().expect("module");
    codespace_kernel::println!(
        "    {calls} calls, {patches} patches from IRQ0: {old} old results, {new} new"
    );
    assert_eq!(other, 0, "every call returned the old or the new result");
    assert!(patches >= 2, "the timer patched the slot ({patches} times)");
    assert!(old > 0 && new > 0, "both targets were called");
    assert_eq!(
        WX_DURING_STORE.load(Ordering::SeqCst),
        0,
        "table stayed R+X during every store"
    );
    assert!(mgr.audit().expect("audit").is_clean(), "{:?}", mgr.audit());
    drop(m);
}

static LAZY_CALLS: AtomicUsize = AtomicUsize::new(0);
static LAZY: spin::Mutex<Option<Module>> = spin::Mutex::new(None);

fn compile_lazily(index: u32) -> usize {
    LAZY_CALLS.fetch_add(1, Ordering::SeqCst);
    let mut guard = LAZY.lock();
    let m = guard.as_mut().expect("module");
    // "Compiling" copies prepared code: function i returns 40 + i.
    m.add_code(&NewCode::function(index, &ret_const(40 + index)))
        .expect("compile")
        .instruction_start()
}

fn lazy_slot_compiles_on_first_call() {
    let mgr = manager(3, 1 << 30);
    let m = Module::new(
        &mgr,
        &REGISTRIES,
        code::module_config(
            &mgr,
            ModuleConfig {
                functions: 3,
                lazy_entry: Some(code::lazy_compile_entry()),
                ..ModuleConfig::default()
            },
        ),
    )
    .expect("module");
    let slot2 = m.jump_tables().expect("tables")[0]
        .near_slot_addr(2)
        .expect("slot");
    *LAZY.lock() = Some(m);
    code::set_lazy_compiler(Some(compile_lazily));
    LAZY_CALLS.store(0, Ordering::SeqCst);
    assert_eq!(
        call0(slot2),
        42,
        "first call compiles function 2 and runs it"
    );
    assert_eq!(LAZY_CALLS.load(Ordering::SeqCst), 1);
    assert_eq!(call0(slot2), 42, "second call goes straight to the code");
    assert_eq!(
        LAZY_CALLS.load(Ordering::SeqCst),
        1,
        "no second compilation"
    );
    let m = LAZY.lock().take().expect("module");
    let code = m.function_code(2).expect("module").expect("installed");
    let mut near = [0u8; 8];
    mgr.read(slot2, &mut near).expect("read");
    let rel = i32::from_le_bytes([near[1], near[2], near[3], near[4]]);
    assert_eq!(
        (slot2 + 5).wrapping_add_signed(rel as isize),
        code,
        "slot jumps to the code"
    );
    code::set_lazy_compiler(None);
    drop(m);
    assert!(mgr.audit().expect("audit").is_clean());
}

/// The INT3 patch protocol (`PatchProtocol::Int3`) under calls: CPU 0 patches one slot 150
/// times while every other CPU calls through it and reads its bytes (the stress scenario
/// `stress::patching` with the protocol). Every call reaches an implementation no older than the
/// last finished patch, every read is a whole slot or an INT3 stage of one, and callers that hit
/// the INT3 are resumed at the new target by this kernel's #BP hook — which must happen.
fn int3_protocol_patches_a_slot_every_cpu_calls() {
    use codespace_kernel::stress::patching;
    let retries = code::int3_retries();
    let s = patching::run_with(90, 150, code::int3_protocol());
    codespace_kernel::println!(
        "    {} patches, {} calls, {} slot reads ({} saw an INT3 stage), #BP resumes {}, \
         calls per implementation {:?}, INT3-gone retries {}",
        s.patches,
        s.calls,
        s.reads,
        s.int3_reads,
        s.breakpoint_resumes,
        s.per_impl,
        code::int3_retries() - retries
    );
    assert!(s.calls >= s.patches, "a call after every patch at least");
    if codespace_kernel::smp::online_cpus() > 1 {
        assert!(
            s.breakpoint_resumes > 0,
            "no call hit the INT3 of a patch in progress"
        );
        assert!(
            s.per_impl.iter().filter(|&&c| c > 0).count() >= 2,
            "calls reached several implementations: {:?}",
            s.per_impl
        );
    }
}

/// Item 8: the one place a writable translation of live code exists is the private poke alias
/// (Linux `text_poke`), and it exists only in the address space the poking CPU loads for the
/// session: at that moment the page table every CPU runs on has no writable translation of any
/// executable frame, while the private one has exactly the alias (if the session's address
/// space were the shared one, or the alias leaked into it, the shared audit would count it).
/// After the session nothing writable of the code is left anywhere.
fn item_08_the_writable_poke_alias_exists_only_in_the_poking_cpus_address_space() {
    let mgr = manager(5, 1 << 30);
    let m = watched_module(&mgr, 4);
    m.add_code(&NewCode::function(1, &ret_const(1))).expect("g");
    let f = add_caller(&m, 0, 1);
    let g2 = m
        .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(2)))
        .expect("g2");
    let before = AUDITED_POKES.load(Ordering::SeqCst);
    AUDIT_POKES.store(true, Ordering::SeqCst);
    let patched = m.patch_slot(1, g2.instruction_start());
    AUDIT_POKES.store(false, Ordering::SeqCst);
    patched.expect("patch");
    assert_eq!(call0(f), 102, "patched slot reaches g2");
    let sessions = AUDITED_POKES.load(Ordering::SeqCst) - before;
    assert!(sessions >= 1, "the patch wrote through the alias");
    assert_eq!(
        SHARED_WRITABLE_CODE.load(Ordering::SeqCst),
        0,
        "the shared page table never held a writable translation of executable code"
    );
    assert_eq!(
        PRIVATE_WRITABLE_CODE.load(Ordering::SeqCst),
        sessions,
        "each session's private address space held the writable alias of the live table"
    );
    let after = wx_audit::audit_active();
    assert!(after.is_clean(), "after the session: {after:?}");
    assert!(mgr.audit().expect("audit").is_clean(), "{:?}", mgr.audit());
}
