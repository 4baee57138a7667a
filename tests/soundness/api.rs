//! Issue 18 items of this area (the allocator's and manager's public API); see `main.rs`.
//!
//! - Item 12: `CodeAllocator::patch` is `unsafe` (the values redirect control flow); its
//!   addresses stay validated.
//! - Item 16: `CodeAllocator::free` is `unsafe` (only the caller knows no CPU runs the code);
//!   dropping an allocator frees no published code.
//! - Items 22, 23: `CodeManager::read` and `CodeAllocator::patch` at the top of the address space.
//! - The allocator's drop hands its spaces over even when the manager is busy or interrupts are
//!   off.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use codespace::mmu::soft::SoftMmu;
use codespace::mmu::{InterruptControl, MmuError};
use codespace::{
    AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig, PublishedCode,
};

use crate::common::*;

/// The first address of the last page of the address space.
const LAST_PAGE: usize = usize::MAX & !(PAGE - 1);

/// Addresses at both ends of the address space, as the issue lists them.
const EDGES: [usize; 7] = [
    0,
    1,
    7,
    LAST_PAGE,
    usize::MAX - 8,
    usize::MAX - 7,
    usize::MAX,
];

fn allocator(m: &CodeManager<SoftMmu>) -> CodeAllocator<SoftMmu> {
    CodeAllocator::new(m, AllocatorConfig::default()).expect("allocator")
}

/// Published code of `len` bytes of `fill`.
fn publish_filled(a: &mut CodeAllocator<SoftMmu>, len: usize, fill: u8) -> PublishedCode {
    let mut w = a.allocate(len).expect("allocate");
    w.as_mut_slice().fill(fill);
    a.publish(w).expect("publish")
}

/// A published patchable table of one page, every slot INT3.
fn publish_table(a: &mut CodeAllocator<SoftMmu>) -> PublishedCode {
    let mut t = a.allocate_table(PAGE, None).expect("table");
    t.as_mut_slice().fill(INT3);
    a.publish(t).expect("publish table")
}

/// Item 22: reading at the top of the address space answers a typed not-mapped error; with
/// overflow checks the old `page + PAGE_SIZE - at` panicked in the last page.
#[test]
fn item_22_read_in_the_last_page_of_the_address_space_is_a_not_mapped_error() {
    let (machine, m) = rig(256, ManagerConfig::default());
    let mut a = allocator(&m);
    let code = publish_filled(&mut a, 64, 0x90);
    let before = m.stats();
    for addr in EDGES {
        for len in [1, 8, PAGE + 1] {
            let mut buf = vec![0xAB; len];
            let got = m.read(addr, &mut buf);
            let expected_page = addr & !(PAGE - 1);
            assert!(
                matches!(
                    got,
                    Err(CodeError::Mmu(MmuError::NotMapped { page })) if page == expected_page
                ),
                "read({addr:#x}, {len}): {got:?}"
            );
        }
        assert_eq!(m.query(addr), Ok(None), "query({addr:#x})");
        assert_eq!(m.space_of(addr), Ok(None), "space_of({addr:#x})");
        assert_eq!(a.space_of(addr), None, "allocator space_of({addr:#x})");
    }
    // Inside the window, across its end: the byte past it is not mapped.
    let end = m.window().end();
    let mut two = [0; 2];
    assert!(matches!(
        m.read(end - 1, &mut two),
        Err(CodeError::Mmu(MmuError::NotMapped { .. }))
    ));
    assert_eq!(m.stats(), before);
    assert_eq!(read(&m, code.start(), 64), vec![0x90; 64]);
    free_published(&mut a, code).expect("free");
    assert_sound_no_leak(&machine, &m);
}

/// Item 23: a patch at `usize::MAX - 7` (8-aligned, above every table) is `NotPatchable`;
/// the old `addr + 8` panicked with overflow checks (and answered `NotMapped` without).
#[test]
fn item_23_patch_at_the_top_of_the_address_space_is_not_patchable() {
    let (machine, m) = rig(256, ManagerConfig::default());
    let mut a = allocator(&m);
    let table = publish_table(&mut a);
    let bytes = read(&m, table.start(), PAGE);
    for addr in EDGES {
        assert_eq!(
            patch_tables(&a, &[&table], &[(addr, 0)]),
            Err(CodeError::NotPatchable { addr }),
            "patch at {addr:#x}"
        );
    }
    // The last slot of the table itself is fine; nothing above was stored.
    assert_eq!(read(&m, table.start(), PAGE), bytes);
    let last = table.range().end() - 8;
    patch_tables(&a, &[&table], &[(last, 0x1122_3344_5566_7788)]).expect("last slot");
    assert_eq!(read_u64(&m, last), 0x1122_3344_5566_7788);
    free_published(&mut a, table).expect("free");
    assert_sound_no_leak(&machine, &m);
}

/// Item 12: `patch` stores whatever value it is given into a live slot — a jump to anywhere
/// for every CPU that runs through it — so it is `unsafe` now (shown here once, through the
/// unsafe call); what it can check, the address, it still checks: a store anywhere but a whole
/// 8-byte slot of the caller's own patchable tables is refused with nothing stored.
#[test]
fn item_12_patch_values_need_unsafe_and_patch_addresses_are_validated() {
    let (machine, m) = rig(256, ManagerConfig::default());
    let mut a = allocator(&m);
    let mut other = allocator(&m);
    let table = publish_table(&mut a);
    let code = publish_filled(&mut a, 64, 0x90);
    let foreign = publish_table(&mut other);

    // The hazard: any 8 bytes land in the slot every CPU executes through.
    let slot = table.start() + 8;
    let anywhere = 0x4141_4141_4141_4141;
    // SAFETY: the software machine never executes its code; this only shows what the store
    // does.
    unsafe { a.patch(&[&table], &[(slot, anywhere)]) }.expect("stored");
    assert_eq!(read_u64(&m, slot), anywhere);

    // The validated part: addresses.
    let snapshot = |m: &CodeManager<SoftMmu>| {
        (
            read(m, table.start(), PAGE),
            read(m, code.start(), 64),
            read(m, foreign.start(), PAGE),
            m.stats(),
        )
    };
    let before = snapshot(&m);
    let stores_before = machine.leaf_stores();
    let refused = [
        (
            table.start() + 4,
            CodeError::NotPatchable {
                addr: table.start() + 4,
            },
        ),
        (
            table.range().end(),
            CodeError::NotPatchable {
                addr: table.range().end(),
            },
        ),
        (code.start(), CodeError::NotPatchable { addr: code.start() }),
        (
            foreign.start(),
            CodeError::NotPatchable {
                addr: foreign.start(),
            },
        ),
    ];
    for (addr, error) in refused.into_iter().chain(
        EDGES
            .into_iter()
            .map(|addr| (addr, CodeError::NotPatchable { addr })),
    ) {
        // All or nothing: a good slot first, then the bad one.
        assert_eq!(
            patch_tables(&a, &[&table, &code], &[(slot, 1), (addr, 2)]),
            Err(error),
            "{addr:#x}"
        );
    }
    assert_eq!(
        patch_tables(&a, &[&foreign], &[(foreign.start(), 0)]),
        Err(CodeError::ForeignCode)
    );
    assert_eq!(snapshot(&m), before, "nothing stored");
    assert_eq!(machine.leaf_stores(), stores_before);

    free_published(&mut a, table).expect("free");
    free_published(&mut a, code).expect("free");
    free_published(&mut other, foreign).expect("free");
    assert_sound_no_leak(&machine, &m);
}

/// Item 16: freeing code a CPU may still run is a use-after-free the allocator cannot see —
/// shown once on the software machine through the (now `unsafe`) `free`: a CPU that fetched
/// the code and comes back to the same address (a return into it) runs whatever reused the
/// range. The safe way out, dropping the allocator, frees no published code: it stays mapped
/// R+X with its bytes, and no other allocator gets its range.
#[test]
fn item_16_freeing_running_code_needs_unsafe_and_dropping_frees_no_published_code() {
    let (machine, m) = rig(256, ManagerConfig::default());
    let cpu = 1;

    // The hazard, through `unsafe`.
    let mut a = allocator(&m);
    let code = publish_filled(&mut a, 64, 0x90);
    let start = code.start();
    let mut fetched = [0; 4];
    machine
        .exec_as(cpu, start, &mut fetched)
        .expect("cpu 1 runs it");
    assert_eq!(fetched, [0x90; 4]);
    free_published(&mut a, code).expect("free");
    let reused = publish_filled(&mut a, 64, 0xC3);
    assert_eq!(reused.start(), start, "the range is reused at once");
    machine
        .exec_as(cpu, start, &mut fetched)
        .expect("still executable");
    assert_eq!(
        fetched, [0xC3; 4],
        "a return into the freed code runs other code"
    );
    free_published(&mut a, reused).expect("free");
    drop(a);
    assert_eq!(m.committed(), 0);

    // Dropping with published code left: nothing of it is freed or reused.
    let mut b = allocator(&m);
    let live = publish_filled(&mut b, 64, 0x90);
    let w = b.allocate(64).expect("never published");
    let (live_start, live_range) = (live.start(), live.range());
    let space = b.space_of(live_start).expect("space");
    machine
        .exec_as(cpu, live_start, &mut fetched)
        .expect("runs");
    drop(b);
    drop(w);
    let mapping = m
        .query(live_start)
        .expect("query")
        .expect("still committed");
    assert!(mapping.executable && !mapping.writable);
    assert_eq!(read(&m, live_start, 64), vec![0x90; 64]);
    machine
        .exec_as(cpu, live_start, &mut fetched)
        .expect("still runs");
    assert_eq!(fetched, [0x90; 4]);
    assert!(m.code_spaces().expect("spaces").contains(&space));
    let mut c = allocator(&m);
    let next = publish_filled(&mut c, 64, 0xCC);
    assert!(next.range().overlap(&live_range).is_empty());
    assert_ne!(c.space_of(next.start()), Some(space));
    free_published(&mut c, next).expect("free");
    assert_sound(&machine, &m);
    // The handle is foreign to every other allocator: it frees nothing.
    assert!(matches!(
        free_published(&mut c, live),
        Err(FreeError::Foreign(_))
    ));
    assert_eq!(read(&m, live_start, 64), vec![0x90; 64]);
}

/// `release_all` gives every space back, published code included, and turns the handles it
/// leaves behind foreign.
#[test]
fn release_all_frees_published_code_and_disowns_its_handles() {
    let (machine, m) = rig(256, ManagerConfig::default());
    let mut a = allocator(&m);
    let live = publish_filled(&mut a, 3 * PAGE, 0x90);
    let table = publish_table(&mut a);
    assert!(m.committed() > 0);
    // SAFETY: the software machine never runs its code.
    unsafe { a.release_all() };
    assert_eq!(m.committed(), 0);
    assert_eq!(m.stats().code_spaces, 0);
    assert!(matches!(
        free_published(&mut a, live),
        Err(FreeError::Foreign(_))
    ));
    assert_eq!(
        patch_tables(&a, &[&table], &[(table.start(), 0)]),
        Err(CodeError::ForeignCode)
    );
    // Usable again.
    let again = publish_filled(&mut a, 64, 0x90);
    free_published(&mut a, again).expect("free");
    drop(a);
    assert_eq!(m.stats().code_spaces, 0);
    assert_sound_no_leak(&machine, &m);
}

thread_local! {
    /// This simulated CPU's interrupt flag (true: enabled).
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

fn disable() -> bool {
    ENABLED.with(|e| e.replace(false))
}

fn restore(enabled: bool) {
    if enabled {
        ENABLED.with(|e| e.set(true));
    }
}

/// Runs `f` as an interrupt handler would: interrupts off on this simulated CPU.
fn with_interrupts_off<R>(f: impl FnOnce() -> R) -> R {
    let was = disable();
    let r = f();
    restore(was);
    r
}

/// Dropping an allocator with interrupts off (an interrupt handler) while the manager's lock is
/// free only queues its spaces (releasing unmaps and frees frames: the kernel's allocator locks,
/// not for interrupt context); the manager's next operation with interrupts on releases them,
/// unpublished code included.
#[test]
fn an_allocator_dropped_in_interrupt_context_releases_its_spaces_at_the_next_operation() {
    let machine = machine(256);
    machine.set_interrupt_control(InterruptControl { disable, restore });
    let m = manager_on(&machine, slot(), ManagerConfig::default());
    let mut a = allocator(&m);
    let code = publish_filled(&mut a, 2 * PAGE, 0x90);
    free_published(&mut a, code).expect("free");
    let w = a
        .allocate(PAGE)
        .expect("unpublished code goes with the space");
    assert!(m.committed() > 0);
    let committed = m.committed();
    with_interrupts_off(|| drop(a));
    assert_eq!(m.committed(), committed, "released in interrupt context");
    assert_eq!(m.code_spaces().expect("spaces").len(), 0);
    assert_eq!(m.committed(), 0);
    drop(w);
    assert_sound_no_leak(&machine, &m);
}

static HOLD: Mutex<Option<Arc<(Barrier, Barrier)>>> = Mutex::new(None);
static HOLDING: AtomicBool = AtomicBool::new(false);

/// `on_critical` hook: runs under the manager lock; parks there until the test releases it.
fn park_under_the_manager_lock(_: usize) {
    let hold = HOLD.lock().unwrap().clone();
    if let Some(hold) = hold {
        HOLDING.store(true, Ordering::SeqCst);
        hold.0.wait();
        hold.1.wait();
    }
}

/// Dropping an allocator while another CPU holds the manager lock, with interrupts off (so the
/// lock answers `Busy`), used to return early and keep the spaces reserved and committed for
/// good; now they are queued and released by the next operation.
#[test]
fn an_allocator_dropped_while_the_manager_is_busy_still_releases_its_spaces() {
    let machine = machine(256);
    machine.set_interrupt_control(InterruptControl { disable, restore });
    let m = manager_on(
        &machine,
        slot(),
        ManagerConfig {
            max_committed: 16 * PAGE,
            on_critical: Some(park_under_the_manager_lock),
            ..ManagerConfig::default()
        },
    );
    let mut a = allocator(&m);
    let code = publish_filled(&mut a, PAGE, 0x90);
    free_published(&mut a, code).expect("free");
    let w = a.allocate(PAGE).expect("keeps a page committed");
    let committed_by_a = m.committed();
    assert_eq!(committed_by_a, PAGE);

    let hold = Arc::new((Barrier::new(2), Barrier::new(2)));
    *HOLD.lock().unwrap() = Some(Arc::clone(&hold));
    let holder = {
        let m = m.clone();
        std::thread::spawn(move || {
            // Crosses the critical threshold (8 pages): the hook parks under the lock.
            let mut b = allocator(&m);
            let big = b.allocate(8 * PAGE).expect("allocate");
            b.discard(big).expect("discard");
        })
    };
    hold.0.wait();
    assert!(HOLDING.load(Ordering::SeqCst));
    *HOLD.lock().unwrap() = None;
    with_interrupts_off(|| {
        assert_eq!(m.code_spaces(), Err(CodeError::Busy), "the lock is held");
        drop(a);
    });
    hold.1.wait();
    holder.join().unwrap();
    drop(w);
    // The next operation with interrupts on releases what the drop queued (here the holder's
    // own allocator drop may have done it already).
    assert_eq!(m.code_spaces().expect("spaces"), vec![]);
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

/// The last 64 pages below the last page of the address space (which no window can hold: its
/// end would be 2^64): any `start + u32 offset` a caller can make from code there overflows if
/// unchecked.
fn top_window() -> codespace::AddressRange {
    codespace::AddressRange::new(LAST_PAGE - 64 * PAGE, LAST_PAGE)
}

/// Every public manager and allocator function taking an address answers at both ends of the
/// address space (0, 1, `usize::MAX - 7`, the last page, `usize::MAX`) with `None` or a typed
/// error, and changes nothing; code at the very top of a window works as anywhere.
#[test]
fn manager_and_allocator_addresses_are_checked_at_both_ends_of_the_address_space() {
    use codespace::AddressRange;
    let machine = machine(256);
    let m = manager_on(&machine, top_window(), ManagerConfig::default());
    let mut a = allocator(&m);
    let table = publish_table(&mut a);
    // The last usable page of the window: the guard page above it is the window's last.
    let mut high = Vec::new();
    while high
        .last()
        .is_none_or(|c: &PublishedCode| c.range().end() < LAST_PAGE - PAGE)
    {
        high.push(publish_filled(&mut a, PAGE, 0x90));
    }
    let top = high.last().unwrap().range();
    assert_eq!(
        top.end(),
        LAST_PAGE - PAGE,
        "code right below the top guard page"
    );
    assert_eq!(read(&m, top.end() - 8, 8), vec![0x90; 8]);
    let before = (m.stats(), a.stats());

    for addr in EDGES.into_iter().chain([top.end(), LAST_PAGE - 1]) {
        let mut buf = [0; 16];
        assert!(
            matches!(
                m.read(addr, &mut buf),
                Err(CodeError::Mmu(MmuError::NotMapped { .. }))
            ),
            "read {addr:#x}"
        );
        assert_eq!(m.query(addr), Ok(None), "query {addr:#x}");
        assert_eq!(m.space_of(addr), Ok(None), "space_of {addr:#x}");
        assert_eq!(a.space_of(addr), None);
        assert_eq!(
            patch_tables(&a, &[&table], &[(addr & !7, 0)]),
            Err(CodeError::NotPatchable { addr: addr & !7 })
        );
    }
    // Reading across the end of the last committed page.
    let mut buf = [0; 16];
    assert!(m.read(top.end() - 8, &mut buf).is_err());
    for region in [
        AddressRange::new(0, PAGE),
        AddressRange::new(LAST_PAGE, usize::MAX),
        AddressRange::new(usize::MAX - 7, usize::MAX),
        AddressRange::new(usize::MAX, usize::MAX),
        AddressRange::new(0, usize::MAX),
    ] {
        if region.start() > 0 || region.end() < usize::MAX {
            assert!(
                matches!(
                    a.allocate_in_region(64, region),
                    Err(CodeError::WindowExhausted { .. })
                ),
                "{region:?}"
            );
            assert!(a.allocate_table(64, Some(region)).is_err(), "{region:?}");
        }
        assert!(!a.release_if_empty(region));
    }
    assert!(matches!(
        a.allocate(usize::MAX),
        Err(CodeError::InvalidSize { .. })
    ));
    assert!(matches!(
        a.allocate(usize::MAX - 7),
        Err(CodeError::InvalidSize { .. })
    ));
    assert_eq!((m.stats(), a.stats()), before, "nothing changed");

    for code in high {
        free_published(&mut a, code).expect("free");
    }
    free_published(&mut a, table).expect("free");
    drop(a);
    assert_sound_no_leak(&machine, &m);
}

/// The module's public functions taking addresses or offsets, at both ends of the address space
/// and with code in the top 4 GiB (where an unchecked `start + u32 offset` overflows).
#[test]
fn module_addresses_are_checked_at_both_ends_of_the_address_space() {
    use codespace::code_object::{CodeKind, RelocKind, Relocation};
    use codespace::module::{ModuleError, NewCode};
    let machine = machine(256);
    let m = manager_on(&machine, top_window(), ManagerConfig::default());
    let regs = registries();
    let module = module(&m, regs, functions(2));
    // Code with a trap entry, in the top window.
    let body = body(64, 0x90);
    let protected = [0u32, 8];
    let mut new = NewCode::function(0, &body);
    new.protected = &protected;
    new.landing_pad = Some(63);
    let f = module.add_code(&new).expect("function");
    let start = f.instruction_start();
    assert!(start > LAST_PAGE - 64 * PAGE);

    // Internal references whose target offset leaves the object, up to u32::MAX (past the end
    // of the address space from here).
    let mut refs = vec![0x90; 64];
    refs[..2].copy_from_slice(&[0x48, 0xB8]); // mov rax, imm64: the field is at 2
    for target_offset in [64, u32::MAX - 1, u32::MAX] {
        let relocations = [Relocation {
            offset: 2,
            kind: RelocKind::InternalReference { target_offset },
        }];
        let mut bad = NewCode::new(CodeKind::Wrapper, &refs);
        bad.relocations = &relocations;
        // Refused by the object's metadata check or the relocation's, never a panic.
        let got = module.add_code(&bad).map(drop);
        assert!(
            matches!(
                got,
                Err(ModuleError::BadRelocation { offset: 2 } | ModuleError::Metadata(_))
            ),
            "target offset {target_offset:#x}: {got:?}"
        );
    }
    // Call-slot relocations whose field lies past the bytes, at the largest offsets.
    for offset in [63, u32::MAX - 4, u32::MAX] {
        let relocations = [Relocation {
            offset,
            kind: RelocKind::CallSlot { slot: 0 },
        }];
        let mut call = vec![0xE8; 64];
        call[0] = 0xE8;
        let mut bad = NewCode::new(CodeKind::Wrapper, &call);
        bad.relocations = &relocations;
        let got = module.add_code(&bad).map(drop);
        assert!(
            matches!(
                got,
                Err(ModuleError::BadRelocation { .. } | ModuleError::Metadata(_))
            ),
            "offset {offset:#x}: {got:?}"
        );
    }

    let counts = module.code_count().expect("counts");
    for addr in EDGES {
        assert!(module.lookup_code(addr).is_none(), "{addr:#x}");
        assert!(regs.lookup_code(addr).is_none());
        assert!(regs.traps.lookup(addr).is_none());
        assert!(regs.traps.lookup_fault(addr, addr).is_none());
        assert!(!regs.traps.is_protected(addr));
        assert_eq!(module.code_pointer(addr), Ok(None));
        assert!(matches!(
            module.free_code(addr),
            Err(ModuleError::UnknownCode { .. })
        ));
        assert!(matches!(
            module.patch_slot(1, addr),
            Err(ModuleError::UnknownTarget { .. })
        ));
        // Any answer is fine (the top of the address space is within rel32 reach of the
        // table); it must not panic.
        let _ = module.slot_address_for(0, addr).expect("not busy");
    }
    assert_eq!(module.code_count().expect("counts"), counts);
    assert!(regs.traps.lookup(start).is_some());
    assert!(regs.traps.lookup(start + 1).is_none());
    assert!(regs.traps.lookup(start + 8).is_some());
    assert_eq!(
        module
            .lookup_code(start + 63)
            .map(|c| c.instruction_start()),
        Some(start)
    );
    drop(module);
    settle(regs);
    assert_sound(&machine, &m);
}

/// Ranges, the free pool and jump-table layouts at both ends of the address space.
#[test]
fn ranges_pools_and_jump_tables_are_checked_at_both_ends_of_the_address_space() {
    use codespace::jump_table::{self, JumpTableLayout};
    use codespace::pool::DisjointAllocationPool;
    use codespace::AddressRange;

    // Ranges.
    assert_eq!(AddressRange::from_start_size(usize::MAX, 1), None);
    assert_eq!(
        AddressRange::from_start_size(usize::MAX - 8, 8).map(|r| r.size()),
        Some(8)
    );
    let top = AddressRange::new(LAST_PAGE, usize::MAX);
    assert_eq!(
        top.pages().collect::<Vec<_>>(),
        [LAST_PAGE],
        "the last page is touched"
    );
    assert_eq!(top.pages().len(), 1);
    assert_eq!(
        AddressRange::new(LAST_PAGE - 1, LAST_PAGE + 1)
            .pages()
            .collect::<Vec<_>>(),
        [LAST_PAGE - PAGE, LAST_PAGE]
    );
    assert_eq!(AddressRange::new(0, 1).pages().collect::<Vec<_>>(), [0]);
    assert_eq!(AddressRange::new(usize::MAX, usize::MAX).pages().len(), 0);
    assert!(top.page_shrink().is_empty());
    assert!(!top.contains(usize::MAX));
    assert!(top.contains(usize::MAX - 1));
    assert_eq!(codespace::range::page_round_up(usize::MAX - 7), None);
    assert_eq!(codespace::range::page_round_up(LAST_PAGE), Some(LAST_PAGE));

    // The pool.
    let mut pool = DisjointAllocationPool::from_range(AddressRange::new(LAST_PAGE, usize::MAX));
    assert!(!pool.contains(usize::MAX));
    assert!(pool.contains(usize::MAX - 1));
    assert_eq!(pool.allocate(PAGE), None, "the top page is one byte short");
    assert_eq!(
        pool.allocate_aligned_in_region(8, 1 << 63, AddressRange::new(0, usize::MAX)),
        None
    );
    let last8 = pool
        .allocate_aligned_in_region(8, 8, AddressRange::new(usize::MAX - 15, usize::MAX))
        .expect("the last aligned 8 bytes");
    assert_eq!(last8, AddressRange::new(usize::MAX - 15, usize::MAX - 7));
    assert!(pool.merged_extent(last8).is_ok());
    pool.merge(last8).expect("merge back");
    assert_eq!(pool.total_size(), usize::MAX - LAST_PAGE);
    let mut low = DisjointAllocationPool::from_range(AddressRange::new(0, PAGE));
    assert_eq!(
        low.allocate_in_region(1, AddressRange::new(0, 1)),
        Some(AddressRange::new(0, 1))
    );
    assert!(low.contains(1) && !low.contains(0));

    // Jump-table layouts and slot encodings.
    assert!(JumpTableLayout::new(usize::MAX - 15, 1, false).is_none());
    assert!(JumpTableLayout::new(LAST_PAGE, u32::MAX, true).is_none());
    let layout = JumpTableLayout::new(LAST_PAGE, 8, true).expect("fits in the last page");
    for addr in EDGES {
        let near = (addr == LAST_PAGE).then_some(0);
        assert_eq!(layout.slot_for_near_addr(addr), near, "{addr:#x}");
        assert_eq!(layout.slot_for_far_addr(addr), None);
        assert_eq!(layout.slot_for_lazy_addr(addr), None);
        assert_eq!(
            jump_table::rel32(addr, 0).is_some(),
            addr <= i32::MIN.unsigned_abs() as usize
        );
        let _ = layout.near_slot_value(0, addr);
        let _ = layout.patch(7, addr);
    }
    assert_eq!(jump_table::near_slot(usize::MAX - 4, usize::MAX), None);
    assert_eq!(
        jump_table::near_slot(usize::MAX - 5, usize::MAX).map(|_| ()),
        Some(())
    );
    assert_eq!(jump_table::lazy_slot(usize::MAX - 9, 0, usize::MAX), None);
    assert!(jump_table::lazy_slot(usize::MAX - 10, 0, usize::MAX).is_some());
    assert_eq!(layout.near_slot_addr(8), None);
    assert_eq!(
        layout.far_target_addr(7).map(|a| a <= usize::MAX - 8),
        Some(true)
    );
}
