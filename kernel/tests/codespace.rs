//! Code memory on the real page tables: commit, publish, call, W^X, free/decommit, guards,
//! commit limit, audit, flush policy, in both protection modes.
//!
//! Booted with `rox` (the launcher's ROX pass), the alias-mode allocators put their code on 2
//! MiB ROX pages (flip-mode ones cannot: they stay on 4 KiB pages). Where a test's expectation
//! is about 4 KiB pages, its ROX branch states what the ROX mode does instead: a commit maps a
//! whole 2 MiB leaf R+X at once, INT3-filled; a publish changes no page-table entry and shoots
//! nothing down, but serializes every CPU once; freed code stays mapped R+X as INT3 until its
//! whole 2 MiB page is free.
#![no_std]
#![no_main]

extern crate alloc;

const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_NO_EXECUTE: u64 = 1 << 63;
const PTE_HUGE: u64 = 1 << 7;
const HUGE: usize = 2 << 20;
use codespace::{
    AllocatorConfig, CodeAllocator, CodeError, ManagerConfig, ProtectionMode, PublishedCode,
};
use codespace_kernel::code::{self, manager, test_window, KernelMmu};
use codespace_kernel::cpu::interrupts::BREAKPOINT;
use codespace_kernel::test::{ExpectFault, PF_INSTRUCTION, PF_PRESENT, PF_WRITE};
use codespace_kernel::{memory, smp};

codespace_kernel::kernel_tests![
    commit_maps_present_rw_nx_leaves,
    publish_makes_rx_and_writes_fault,
    published_code_runs_flip_mode,
    published_code_runs_alias_mode,
    unpublished_code_does_not_execute,
    free_decommits_dead_pages_and_fills_int3_flip,
    free_decommits_dead_pages_and_fills_int3_alias,
    guard_pages_fault,
    commit_limit_changes_nothing,
    publish_flush_policy_32_vs_33_pages,
    direct_map_and_identity_aliases_of_published_code_are_read_only,
    page_tables_come_back_when_code_is_freed,
];

/// `lea eax, [rdi + rsi]; ret`
const ADD: [u8; 4] = [0x8D, 0x04, 0x37, 0xC3];
/// `mov eax, imm32; ret`
fn ret_const(v: u32) -> [u8; 6] {
    let b = v.to_le_bytes();
    [0xB8, b[0], b[1], b[2], b[3], 0xC3]
}

fn config(protection: ProtectionMode) -> ManagerConfig {
    ManagerConfig {
        protection,
        max_committed: 64 << 20,
        ..ManagerConfig::default()
    }
}

/// An allocator in a fresh manager; `None` for flip mode while several CPUs are online, which
/// the manager refuses (checked here): writing a live page would stop the other CPUs executing it.
fn allocator(window: usize, protection: ProtectionMode) -> Option<CodeAllocator<KernelMmu>> {
    let m = match manager(test_window(window), config(protection)) {
        Err(CodeError::FlipNeedsOneCpu)
            if protection == ProtectionMode::Flip && smp::online_cpus() > 1 =>
        {
            return None;
        }
        m => m.expect("manager"),
    };
    let config = code::allocator_config(&m, AllocatorConfig::default());
    Some(CodeAllocator::new(&m, config).expect("allocator"))
}

fn raw(_a: &CodeAllocator<KernelMmu>, addr: usize) -> [Option<u64>; 4] {
    memory::raw_entries(addr as u64)
}

/// Whether `a`'s code lives on 2 MiB ROX pages (the ROX mode, on an alias-mode manager).
fn rox(a: &CodeAllocator<KernelMmu>) -> bool {
    code::wants_rox(a.manager())
}

/// The leaf mapping code at `addr`: a 4 KiB leaf, or in the ROX mode a 2 MiB one (checked).
fn code_leaf(a: &CodeAllocator<KernelMmu>, addr: usize) -> u64 {
    let entries = raw(a, addr);
    if rox(a) {
        let leaf = entries[2].expect("2 MiB leaf present");
        assert_ne!(leaf & PTE_HUGE, 0, "ROX code is mapped by a 2 MiB leaf");
        leaf
    } else {
        entries[3].expect("leaf present")
    }
}

/// Whether any leaf maps `addr`.
fn mapped(a: &CodeAllocator<KernelMmu>, addr: usize) -> bool {
    memory::leaf_entry(addr as u64).is_some() || raw(a, addr)[3].is_some()
}

/// `len` bytes of mapped code at `addr`.
fn bytes_at(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: callers pass a range of a page mapped R+X (hence readable) that stays mapped
    // while the slice is read.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn assert_clean(a: &CodeAllocator<KernelMmu>) {
    let report = a.manager().audit().expect("audit");
    assert!(report.is_clean(), "audit: {report:?}");
}

fn call2(code: &PublishedCode, x: u64, y: u64) -> u64 {
    // SAFETY: the code was published (R+X) and follows the C ABI: two args, one result.
    let f: extern "C" fn(u64, u64) -> u64 = unsafe { core::mem::transmute(code.start()) };
    f(x, y)
}

/// Frees `code` of `a`.
///
/// These tests run code only on the boot CPU, synchronously (a call that returned or a fault
/// that landed), and never hand its address to a slot, a pointer or another CPU: when a test
/// frees code, nothing runs it or leads to it any more.
fn free(a: &mut CodeAllocator<KernelMmu>, code: PublishedCode) {
    // SAFETY: see above: every call into `code` returned, and nothing leads into it.
    unsafe { a.free(code) }.expect("free");
}

fn publish(a: &mut CodeAllocator<KernelMmu>, bytes: &[u8]) -> PublishedCode {
    let mut w = a.allocate(bytes.len()).expect("allocate");
    w.as_mut_slice().copy_from_slice(bytes);
    a.publish(w).expect("publish")
}

fn commit_maps_present_rw_nx_leaves() {
    let mut a = allocator(0, ProtectionMode::Alias).expect("alias mode");
    if rox(&a) {
        return commit_maps_one_rx_2mib_leaf_of_int3(a);
    }
    let w = a.allocate(100).expect("allocate");
    let entries = raw(&a, w.start());
    let leaf = entries[3].expect("leaf present");
    assert_eq!(
        leaf & (PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE),
        PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE
    );
    for e in &entries[..3] {
        let e = e.expect("intermediate present");
        assert_eq!(e & PTE_NO_EXECUTE, 0, "intermediate entry carries NX");
        assert_ne!(e & PTE_WRITABLE, 0);
    }
    assert_eq!(a.manager().committed(), 4096);
    assert_clean(&a);
    a.discard(w).expect("discard");
    assert_eq!(a.manager().committed(), 0);
    assert!(raw(&a, a.code_spaces()[0].start())[3].is_none());
    assert_clean(&a);
}

/// ROX: the commit maps one 2 MiB leaf, R+X from the start (never writable), every byte INT3;
/// the staged bytes are not there yet. A discard of the only allocation gives the page back.
fn commit_maps_one_rx_2mib_leaf_of_int3(mut a: CodeAllocator<KernelMmu>) {
    let mut w = a.allocate(100).expect("allocate");
    w.as_mut_slice().fill(0x90);
    code::assert_rox_in_use(a.manager());
    let leaf = code_leaf(&a, w.start());
    assert_eq!(
        leaf & (PTE_PRESENT | PTE_WRITABLE | PTE_NO_EXECUTE),
        PTE_PRESENT,
        "a ROX page is R+X from the start"
    );
    assert_eq!(a.manager().committed(), HUGE);
    let page = w.start() & !(HUGE - 1);
    assert!(
        bytes_at(page, HUGE).iter().all(|&b| b == 0xCC),
        "a fresh ROX page is all INT3 (the staged bytes are not in it before the publish)"
    );
    let audit = a.manager().audit().expect("audit");
    assert_eq!((audit.huge_leaves, audit.small_leaves), (1, 0));
    assert_clean(&a);
    a.discard(w).expect("discard");
    assert_eq!(a.manager().committed(), 0);
    assert!(!mapped(&a, page));
    assert_clean(&a);
}

fn publish_makes_rx_and_writes_fault() {
    let mut a = allocator(1, ProtectionMode::Alias).expect("alias mode");
    let code = publish(&mut a, &ADD);
    let leaf = code_leaf(&a, code.start());
    assert_eq!(leaf & PTE_PRESENT, PTE_PRESENT);
    assert_eq!(
        leaf & (PTE_WRITABLE | PTE_NO_EXECUTE),
        0,
        "published page is R+X"
    );
    assert_clean(&a);
    let addr = code.start() as u64;
    let info = ExpectFault::page_fault(addr)
        .with_bits(PF_PRESENT | PF_WRITE)
        .run(|| {
            // SAFETY: deliberately writes published code; the fault is caught.
            unsafe { core::ptr::write_volatile(addr as *mut u8, 0x90) };
        });
    assert_eq!(info.error_code & PF_INSTRUCTION, 0);
    assert_eq!(call2(&code, 2, 3), 5, "code unchanged");
    free(&mut a, code);
    assert_clean(&a);
}

fn run_two_functions_on_one_page(window: usize, mode: ProtectionMode) {
    let Some(mut a) = allocator(window, mode) else {
        return;
    };
    let add = publish(&mut a, &ADD);
    assert_eq!(call2(&add, 40, 2), 42);
    // The second function lands on the page that already holds published code.
    let k = publish(&mut a, &ret_const(7));
    assert_eq!(k.start() / 4096, add.start() / 4096, "same page");
    assert_eq!(call2(&k, 0, 0), 7);
    assert_eq!(call2(&add, 1, 1), 2, "first function still runs");
    let leaf = code_leaf(&a, add.start());
    assert_eq!(leaf & (PTE_WRITABLE | PTE_NO_EXECUTE), 0);
    assert_clean(&a);
    free(&mut a, k);
    free(&mut a, add);
    assert_eq!(a.manager().committed(), 0);
    assert_clean(&a);
}

fn published_code_runs_flip_mode() {
    run_two_functions_on_one_page(2, ProtectionMode::Flip);
}

fn published_code_runs_alias_mode() {
    run_two_functions_on_one_page(3, ProtectionMode::Alias);
}

fn unpublished_code_does_not_execute() {
    let mut a = allocator(4, ProtectionMode::Alias).expect("alias mode");
    let mut w = a.allocate(ADD.len()).expect("allocate");
    w.as_mut_slice().copy_from_slice(&ADD);
    let addr = w.start() as u64;
    let call = || {
        // SAFETY: deliberately calls unpublished code (RW+NX, or INT3 on a ROX page); it
        // traps.
        let f: extern "C" fn() = unsafe { core::mem::transmute(addr as usize) };
        f();
    };
    if rox(&a) {
        // ROX: the page is executable from the start, but holds INT3 until the publish copies
        // the staged bytes in: the call traps on the first byte, never runs what was staged.
        let info = ExpectFault::vector(BREAKPOINT).run(call);
        assert_eq!(
            info.rip,
            addr + 1,
            "#BP of the INT3 at the code's first byte"
        );
    } else {
        ExpectFault::page_fault(addr)
            .with_bits(PF_PRESENT | PF_INSTRUCTION)
            .run(call);
    }
    a.discard(w).expect("discard");
    assert_clean(&a);
}

fn free_decommits(window: usize, mode: ProtectionMode) {
    let Some(mut a) = allocator(window, mode) else {
        return;
    };
    if rox(&a) {
        return free_fills_int3_and_decommits_whole_2mib_pages(a);
    }
    let frames_before = memory::frames().free_frames();
    // Three allocations: `big` spans pages 0..2 and part of 2; `tail` shares page 2 with it.
    let big = publish(&mut a, &[0x90; 2 * 4096 + 64]);
    let tail = publish(&mut a, &ADD);
    assert_eq!(tail.start(), big.range().end());
    let base = big.start();
    assert_eq!(a.manager().committed(), 3 * 4096);
    free(&mut a, big);
    // Pages 0 and 1 are wholly dead: unmapped, frames returned. Page 2 keeps `tail`.
    assert!(raw(&a, base)[3].is_none());
    assert!(raw(&a, base + 4096)[3].is_none());
    assert!(raw(&a, base + 2 * 4096)[3].is_some());
    assert_eq!(a.manager().committed(), 4096);
    // The freed bytes on page 2 are INT3, and `tail` still runs.
    // SAFETY: page 2 is mapped R+X, hence readable.
    let freed = unsafe { core::slice::from_raw_parts((base + 2 * 4096) as *const u8, 64) };
    assert!(
        freed.iter().all(|&b| b == 0xCC),
        "freed bytes are INT3: {freed:x?}"
    );
    assert_eq!(call2(&tail, 5, 6), 11);
    assert_clean(&a);
    free(&mut a, tail);
    assert_eq!(a.manager().committed(), 0);
    assert_clean(&a);
    drop(a);
    // Page-table pages created for the window stay; data frames all came back.
    let tables = 3;
    assert!(memory::frames().free_frames() + tables >= frames_before);
}

/// ROX: freed code is refilled with INT3 through the alias and its 2 MiB page stays mapped R+X
/// while other code lives on it; the page goes back only when wholly free.
fn free_fills_int3_and_decommits_whole_2mib_pages(mut a: CodeAllocator<KernelMmu>) {
    let frames_before = memory::frames().free_frames();
    let big = publish(&mut a, &[0x90; 2 * 4096 + 64]);
    let tail = publish(&mut a, &ADD);
    assert_eq!(tail.start(), big.range().end());
    let base = big.start();
    assert_eq!(a.manager().committed(), HUGE, "one whole 2 MiB page");
    let leaf = code_leaf(&a, base);
    free(&mut a, big);
    assert_eq!(
        code_leaf(&a, base),
        leaf,
        "the page is untouched: still mapped R+X"
    );
    assert_eq!(a.manager().committed(), HUGE);
    assert!(
        bytes_at(base, 2 * 4096 + 64).iter().all(|&b| b == 0xCC),
        "freed bytes are INT3"
    );
    assert_eq!(call2(&tail, 5, 6), 11);
    assert_clean(&a);
    free(&mut a, tail);
    assert_eq!(a.manager().committed(), 0, "wholly free: decommitted");
    assert!(!mapped(&a, base));
    assert_clean(&a);
    drop(a);
    let tables = 3;
    assert!(memory::frames().free_frames() + tables >= frames_before);
}

fn free_decommits_dead_pages_and_fills_int3_flip() {
    free_decommits(5, ProtectionMode::Flip);
}

fn free_decommits_dead_pages_and_fills_int3_alias() {
    free_decommits(6, ProtectionMode::Alias);
}

fn guard_pages_fault() {
    let mut a = allocator(7, ProtectionMode::Alias).expect("alias mode");
    let code = publish(&mut a, &ADD);
    let space = a.code_spaces()[0];
    for addr in [space.start() - 1, space.end()] {
        ExpectFault::page_fault(addr as u64)
            .without_bits(PF_PRESENT)
            .run(|| {
                // SAFETY: deliberately reads a guard page; the fault is caught.
                let _ = unsafe { core::ptr::read_volatile(addr as *const u8) };
            });
    }
    free(&mut a, code);
}

fn commit_limit_changes_nothing() {
    if code::rox() {
        return commit_limit_counts_whole_2mib_pages();
    }
    let m = manager(
        test_window(8),
        ManagerConfig {
            max_committed: 8 * 4096,
            ..config(ProtectionMode::Alias)
        },
    )
    .expect("manager");
    let config = code::allocator_config(&m, AllocatorConfig::default());
    let mut a = CodeAllocator::new(&m, config).expect("allocator");
    let first = a.allocate(6 * 4096).expect("six pages fit");
    let committed = m.committed();
    let frames = memory::frames().free_frames();
    let stats = a.stats();
    let err = a.allocate(4 * 4096).expect_err("over the limit");
    assert!(
        matches!(
            err,
            CodeError::CommitLimit {
                requested: 16384,
                remaining: 8192
            }
        ),
        "{err:?}"
    );
    assert_eq!(m.committed(), committed);
    assert_eq!(memory::frames().free_frames(), frames);
    assert_eq!(a.stats(), stats);
    assert_eq!(m.remaining_uncommitted(), 2 * 4096);
    assert_eq!(m.audit().expect("audit").mapped_pages, 6);
    assert!(m.audit().expect("audit").is_clean());
    // What fits still works afterwards.
    let second = a.allocate(2 * 4096).expect("two pages fit");
    a.discard(first).expect("discard");
    a.discard(second).expect("discard");
    assert!(m.audit().expect("audit").is_clean());
}

/// ROX: commits are whole 2 MiB pages. With a limit of one page, the first allocation takes it
/// whole; one that needs a second page is refused and changes nothing; what fits in the
/// committed page still works, with no commit.
fn commit_limit_counts_whole_2mib_pages() {
    let m = manager(
        test_window(8),
        ManagerConfig {
            max_committed: HUGE,
            ..config(ProtectionMode::Alias)
        },
    )
    .expect("manager");
    let config = code::allocator_config(&m, AllocatorConfig::default());
    let mut a = CodeAllocator::new(&m, config).expect("allocator");
    let first = a.allocate(6 * 4096).expect("six pages fit");
    code::assert_rox_in_use(&m);
    assert_eq!(m.committed(), HUGE, "a whole 2 MiB page");
    let committed = m.committed();
    let frames = memory::frames().free_frames();
    let stats = a.stats();
    let manager_stats = m.stats();
    let err = a.allocate(HUGE).expect_err("over the limit");
    assert!(
        matches!(
            err,
            CodeError::CommitLimit {
                requested: HUGE,
                remaining: 0
            }
        ),
        "{err:?}"
    );
    assert_eq!(m.committed(), committed);
    assert_eq!(memory::frames().free_frames(), frames);
    assert_eq!(a.stats(), stats);
    assert_eq!(m.stats(), manager_stats);
    assert_eq!(m.remaining_uncommitted(), 0);
    let audit = m.audit().expect("audit");
    assert_eq!((audit.huge_leaves, audit.small_leaves), (1, 0));
    assert!(audit.is_clean());
    // What fits in the committed page still works, and commits nothing.
    let second = a.allocate(2 * 4096).expect("two pages fit");
    assert_eq!(m.committed(), committed);
    a.discard(first).expect("discard");
    a.discard(second).expect("discard");
    assert!(m.audit().expect("audit").is_clean());
}

fn publish_flush_policy_32_vs_33_pages() {
    // Publishing stages each fresh page and its two linear-map aliases (identity and direct
    // map) in one batch: 10 pages are 30 invalidations, page by page; 11 pages are 33, one full
    // flush. The ceiling holds per batch and per CPU: with other CPUs online, one shootdown round
    // carries the same batch to each of them.
    let others = smp::online_cpus() - 1;
    if code::rox() {
        return publish_on_rox_pages_flushes_nothing(others);
    }
    for (window, pages, expect) in [(9, 10, (30, 0)), (10, 11, (0, 1))] {
        let mut a = allocator(window, ProtectionMode::Alias).expect("alias mode");
        let w = a.allocate(pages * 4096).expect("allocate");
        let before = a.manager().flush_stats().expect("stats");
        let ipis = smp::ipi_stats();
        let code = a.publish(w).expect("publish");
        let remote = smp::ipi_stats() - ipis;
        let after = a.manager().flush_stats().expect("stats");
        let local = (
            after.single_pages - before.single_pages,
            after.full - before.full,
        );
        assert_eq!(local, expect, "{pages} pages on this CPU");
        assert_eq!(
            after.shootdowns - before.shootdowns,
            u64::from(others > 0),
            "one shootdown round per publish"
        );
        for cpu in 1..=others {
            let r = remote.cpu(cpu);
            assert_eq!(
                (r.pages, r.full_flushes),
                expect,
                "cpu {cpu}, {pages} pages"
            );
        }
        free(&mut a, code);
        assert_clean(&a);
    }
}

/// ROX: a publish of 10 or 11 pages changes no page-table entry, so it invalidates nothing on
/// any CPU and takes no shootdown round; it makes every other CPU serialize once (the bytes it
/// wrote may have been executed before, as INT3 or freed code).
fn publish_on_rox_pages_flushes_nothing(others: usize) {
    for (window, pages) in [(9, 10), (10, 11)] {
        let mut a = allocator(window, ProtectionMode::Alias).expect("alias mode");
        let w = a.allocate(pages * 4096).expect("allocate");
        let leaf = code_leaf(&a, w.start());
        let before = a.manager().flush_stats().expect("stats");
        let ipis = smp::ipi_stats();
        let code = a.publish(w).expect("publish");
        let remote = smp::ipi_stats() - ipis;
        let after = a.manager().flush_stats().expect("stats");
        assert_eq!(code_leaf(&a, code.start()), leaf, "no entry changed");
        assert_eq!(
            (
                after.single_pages - before.single_pages,
                after.full - before.full,
                after.shootdowns - before.shootdowns,
            ),
            (0, 0, 0),
            "{pages} pages: no invalidation, no shootdown"
        );
        assert_eq!(
            after.syncs - before.syncs,
            u64::from(others > 0),
            "one serialization round per publish"
        );
        for cpu in 1..=others {
            let r = remote.cpu(cpu);
            assert_eq!(
                (r.pages, r.full_flushes, r.serializations),
                (0, 0, 1),
                "cpu {cpu}, {pages} pages"
            );
        }
        free(&mut a, code);
        assert_clean(&a);
    }
}

fn direct_map_and_identity_aliases_of_published_code_are_read_only() {
    let mut a = allocator(11, ProtectionMode::Alias).expect("alias mode");
    let code = publish(&mut a, &ADD);
    let granule = if rox(&a) { HUGE } else { 4096 };
    let leaf = code_leaf(&a, code.start());
    // A 2 MiB leaf's frame address: bit 12 is its PAT bit.
    let frame = leaf & 0x000F_FFFF_FFFF_F000 & !(granule as u64 - 1);
    let offset = (code.start() % granule) as u64;
    // The direct map and the identity map each map the frame too: neither may write it.
    for alias in [memory::PHYS_OFFSET + frame + offset, frame + offset] {
        let info = ExpectFault::page_fault(alias)
            .with_bits(PF_PRESENT | PF_WRITE)
            .run(|| {
                // SAFETY: deliberately writes published code through a linear-map alias; the
                // write faults.
                unsafe { core::ptr::write_volatile(alias as *mut u8, 0x90) };
            });
        assert_eq!(info.cr2, alias);
        let entry = memory::leaf_entry(alias).expect("alias mapped");
        assert_eq!(entry & PTE_WRITABLE, 0, "alias {alias:#x} is read-only");
    }
    assert_eq!(call2(&code, 2, 3), 5, "code unchanged");
    assert_clean(&a);
    // Freed (the page is wholly free, so decommitted): the aliases are writable again.
    free(&mut a, code);
    for alias in [memory::PHYS_OFFSET + frame, frame] {
        let entry = memory::leaf_entry(alias).expect("alias mapped");
        assert_ne!(entry & PTE_WRITABLE, 0, "alias {alias:#x} restored");
    }
    assert_clean(&a);
}

/// Issue 18 (leaks): the page tables built for code in a fresh slice of the window (a page
/// directory, two page tables) and the linear-map tables split to seal the code's aliases come
/// back when the code is freed: the window's with the decommit's own flush, the split ones
/// merged back into their huge pages and freed by the next flush.
fn page_tables_come_back_when_code_is_freed() {
    let mut a = allocator(12, ProtectionMode::Alias).expect("alias mode");
    let before = memory::frames().free_frames();
    let pages = 512 + 8;
    let code = publish(&mut a, &alloc::vec![0xC3; pages * 4096]);
    let used = before - memory::frames().free_frames();
    assert!(
        used >= pages + 3,
        "{used} frames for {pages} pages and their tables"
    );
    assert_clean(&a);
    free(&mut a, code);
    // One more flush with work: a page committed and decommitted, never published.
    let w = a.allocate(64).expect("allocate");
    a.discard(w).expect("discard");
    assert_clean(&a);
    if rox(&a) {
        // ROX: that commit maps a 2 MiB page, which seals its aliases again (splitting one
        // table per linear map) and its discard merges them back — so the flush that frees the
        // earlier merged tables leaves these two waiting for the next round. Each cycle frees
        // the previous one's: the count stays at one table per linear map, it never grows.
        let outstanding = before - memory::frames().free_frames();
        assert_eq!(
            outstanding,
            code::LINEAR_MAPS.len(),
            "merged tables waiting"
        );
        let w = a.allocate(64).expect("allocate");
        a.discard(w).expect("discard");
        assert_clean(&a);
        assert_eq!(
            before - memory::frames().free_frames(),
            outstanding,
            "every other frame is back, and a second cycle freed the first one's tables"
        );
        return;
    }
    assert_eq!(
        memory::frames().free_frames(),
        before,
        "every frame is back"
    );
}
