//! W^X across CPUs.
//!
//! [`publish`]: every CPU writes a page of fresh (RW+NX) code through its three addresses — the
//! code window, the identity map and the direct map — so each caches writable translations.
//! CPU 0 then publishes the code. From then on a write from any CPU through any of the three
//! addresses must fault (present, write), and the code must run on every CPU: publishing and
//! sealing the linear-map aliases read-only shot the writable translations down everywhere.
//!
//! [`alias`]: while CPU 0 patches a jump slot many times (each patch writes through the
//! private alias of `Mmu::poke`), every other CPU probes the alias addresses (PML4 slot
//! [`POKE_SLOT`](crate::code::POKE_SLOT)) and the slot's own page: a read of the alias must
//! fault not present, a write of the slot must fault present — the alias is never usable by
//! another CPU, and the live table is never writable.

use core::sync::atomic::{AtomicU64, Ordering};

use codespace::code_object::CodeKind;
use codespace::module::NewCode;
use codespace::{AllocatorConfig, CodeAllocator, ManagerConfig, PublishedCode};

use super::common::{
    self, call0, check_fault, load_u64, ret_const, settle, try_access, Access, Phase, Stop,
    PF_PRESENT, PF_WRITE,
};
use crate::code::{self, POKE_SLOT};
use crate::memory::PHYS_OFFSET;
use crate::smp;

const VALUE: u32 = 0x7E57_0C0D;

/// Counts of one [`publish`] run.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublishStats {
    /// Pages published.
    pub pages: u64,
    /// Writes through a published page's addresses that faulted, as they must (all CPUs).
    pub refused_writes: u64,
}

/// The window, identity-map and direct-map addresses of the byte at `addr` of code in `frame`.
fn addresses(addr: usize, frame: u64) -> [(&'static str, u64); 3] {
    let phys = frame + (addr as u64 & 0xFFF);
    [
        ("code window", addr as u64),
        ("identity map", phys),
        ("direct map", PHYS_OFFSET + phys),
    ]
}

/// Writes the byte at `addr` back unchanged (so a write that wrongly succeeds corrupts nothing).
fn rewrite(addr: u64) -> u64 {
    let p = addr as *mut u8;
    // SAFETY: `addr` is a byte of a code page this scenario owns, through one of its mappings;
    // the caller either knows the mapping is writable or expects the write to fault.
    unsafe { p.write_volatile(p.read_volatile()) };
    0
}

/// Checks that a write through each address of the published byte faults.
fn expect_refused(addrs: &[(&'static str, u64); 3], refused: &AtomicU64) {
    let cpu = smp::current_cpu();
    for &(what, addr) in addrs {
        match try_access(|| rewrite(addr)) {
            Access::Completed(_) => panic!(
                "cpu {cpu}: wrote published code through its {what} address {addr:#x}: a \
                 writable translation of an executable frame survived the publish"
            ),
            Access::Faulted(info) => {
                check_fault(&info, addr, PF_PRESENT | PF_WRITE, 0, what);
                refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Every CPU tries the writes to `addrs` (each must be refused) and then runs the published
/// `code`, which returns [`VALUE`]; then the code is freed.
fn run_everywhere_then_free(
    alloc: &mut CodeAllocator<code::KernelMmu>,
    code: PublishedCode,
    addrs: &[(&'static str, u64); 3],
    refused: &AtomicU64,
) {
    let start = code.start();
    common::on_each_cpu(|cpu| {
        // Writes first: a fetch would refill the window page's translation.
        expect_refused(addrs, refused);
        assert_eq!(call0(start), u64::from(VALUE), "cpu {cpu} runs the code");
    });
    // SAFETY: every CPU ran the code to its `ret` inside `on_each_cpu`, which returned; no
    // slot or pointer leads to it and nobody else has its address.
    unsafe { alloc.free(code) }
        .map_err(|e| e.error())
        .expect("free");
}

/// Publishes `pages` pages one after another on code-window slice `window`, each with the
/// cached-writable-translation setup of the module docs.
///
/// # Panics
/// On a write that succeeds, code that does not run, or anything unexpected, naming the CPU.
pub fn publish(window: usize, pages: u32) -> PublishStats {
    // ROX code is never writable through any address, fresh or published: the scenario's
    // "cached writable translation" setup cannot exist there; its ROX analogue proves the
    // mode's stronger claim instead.
    if code::rox() {
        return publish_rox(window, pages);
    }
    let mgr = common::manager(window);
    let config = code::allocator_config(&mgr, AllocatorConfig::default());
    let mut alloc = CodeAllocator::new(&mgr, config).expect("allocator");
    let refused = AtomicU64::new(0);
    for _ in 0..pages {
        let mut w = alloc.allocate(6).expect("allocate");
        let start = w.start();
        let frame = mgr.query(start).expect("query").expect("committed").frame;
        let addrs = addresses(start, frame);
        // Every CPU writes through all three addresses: each caches writable translations
        // (TCG keeps them across the idle loop's `hlt`; only an invalidation removes them).
        common::on_each_cpu(|_| {
            for &(_, addr) in &addrs {
                rewrite(addr);
            }
        });
        w.as_mut_slice().copy_from_slice(&ret_const(VALUE));
        let code = alloc.publish(w).map_err(|r| r.error).expect("publish");
        run_everywhere_then_free(&mut alloc, code, &addrs, &refused);
    }
    let stats = PublishStats {
        pages: u64::from(pages),
        refused_writes: refused.load(Ordering::SeqCst),
    };
    drop(alloc);
    settle(&mgr);
    stats
}

/// [`publish`] in the ROX mode: code spaces on 2 MiB pages that are R+X from the start, so no
/// CPU can write a page of the code through any of its three addresses at any time — before
/// the publish (fresh, INT3) as after it — and the publish shoots nothing down.
///
/// # Panics
/// On a write that succeeds, code that does not run, a space that fell back to 4 KiB pages, a
/// publish that took a shootdown round, or anything unexpected, naming the CPU.
pub fn publish_rox(window: usize, pages: u32) -> PublishStats {
    let mgr = code::manager(
        code::test_window(window),
        ManagerConfig {
            rox_code: true,
            ..ManagerConfig::default()
        },
    )
    .expect("a code manager");
    let config = AllocatorConfig {
        rox: true,
        ..AllocatorConfig::default()
    };
    let mut alloc = CodeAllocator::new(&mgr, config).expect("allocator");
    let refused = AtomicU64::new(0);
    let mut first = None;
    for _ in 0..pages {
        let mut w = alloc.allocate(6).expect("allocate");
        let start = w.start();
        first.get_or_insert(start);
        let stats = mgr.stats();
        assert!(
            stats.rox_spaces > 0 && stats.rox_fallbacks == 0,
            "{stats:?}"
        );
        let mapping = mgr.query(start).expect("query").expect("committed");
        assert!(
            mapping.executable && !mapping.writable,
            "R+X from the start"
        );
        let addrs = addresses(start, mapping.frame);
        common::on_each_cpu(|_| expect_refused(&addrs, &refused));
        w.as_mut_slice().copy_from_slice(&ret_const(VALUE));
        let before = mgr.flush_stats().expect("stats");
        let code = alloc.publish(w).map_err(|r| r.error).expect("publish");
        let after = mgr.flush_stats().expect("stats");
        assert_eq!(after.shootdowns, before.shootdowns, "a publish shot down");
        assert_eq!(
            (after.single_pages, after.full),
            (before.single_pages, before.full)
        );
        run_everywhere_then_free(&mut alloc, code, &addrs, &refused);
    }
    let stats = PublishStats {
        pages: u64::from(pages),
        refused_writes: refused.load(Ordering::SeqCst),
    };
    drop(alloc);
    settle(&mgr);
    // The 2 MiB page went back, and the page directory built for it with it (only this
    // scenario's space lies in that GiB of the window).
    if let Some(va) = first {
        let walk = crate::memory::raw_entries(va as u64);
        assert!(
            walk[0].is_some() && walk[1].is_none(),
            "the page directory of {va:#x} stayed linked: {walk:x?}"
        );
    }
    stats
}

/// Counts of one [`alias`] run.
#[derive(Debug, Default, Clone, Copy)]
pub struct AliasStats {
    /// Patches (alias sessions) by CPU 0.
    pub patches: u64,
    /// Alias-session count the backend reported for them.
    pub pokes: u64,
    /// Probes of the alias range and the slot's page that faulted as they must (all CPUs).
    pub probes: u64,
}

/// First address of the private alias range (PML4 slot [`POKE_SLOT`], in the lower half).
#[must_use]
pub fn alias_base() -> u64 {
    (POKE_SLOT as u64) << 39
}

/// Alias pages probed (a patch session maps its pages from the first alias page on).
const PROBED_PAGES: u64 = 4;

/// Probes once: reading each probed alias page faults not present, writing `slot` faults
/// present. Returns the number of checked accesses.
fn probe(slot: usize) -> u64 {
    let cpu = smp::current_cpu();
    for i in 0..PROBED_PAGES {
        let addr = alias_base() + i * 4096;
        match try_access(|| load_u64(addr as usize)) {
            Access::Completed(v) => panic!(
                "cpu {cpu}: read {v:#x} through the private patching alias {addr:#x}: another \
                 CPU's alias is usable here"
            ),
            Access::Faulted(info) => check_fault(&info, addr, 0, PF_PRESENT, "alias read"),
        }
    }
    let addr = slot as u64 & !7;
    match try_access(|| rewrite(addr)) {
        Access::Completed(_) => {
            panic!("cpu {cpu}: wrote the live jump slot {addr:#x} through its own mapping")
        }
        Access::Faulted(info) => check_fault(&info, addr, PF_PRESENT | PF_WRITE, 0, "slot write"),
    }
    PROBED_PAGES + 1
}

/// CPU 0 patches a slot `patches` times on code-window slice `window` while every other CPU
/// probes (see the module docs); with one CPU, CPU 0 probes after each patch.
///
/// # Panics
/// When a probe does not fault as it must, naming the CPU.
pub fn alias(window: usize, patches: u64) -> AliasStats {
    assert!(patches > 0, "at least one patch");
    let mgr = common::manager(window);
    let m = common::one_function_module(&mgr);
    let targets: [usize; 2] = [1, 2].map(|v| {
        m.add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(v)))
            .expect("target")
            .instruction_start()
    });
    let slot = m.jump_tables().expect("tables")[0]
        .near_slot_addr(0)
        .expect("slot 0");
    let pokes_before = mgr.flush_stats().expect("stats").pokes;
    let probes = AtomicU64::new(0);
    let ready = Phase::new();
    let stop = Stop::new();
    let n = smp::online_cpus();
    common::on_each_cpu(|cpu| {
        if cpu != 0 {
            probes.fetch_add(probe(slot), Ordering::SeqCst);
            ready.arrive();
            while !stop.stopped() {
                probes.fetch_add(probe(slot), Ordering::SeqCst);
            }
            return;
        }
        if !common::wait_until(|| ready.get() as usize >= n - 1) {
            stop.stop();
            panic!("cpu 0: the probing CPUs never started");
        }
        for i in 0..patches {
            m.patch_slot(0, targets[(i % 2) as usize])
                .expect("patch_slot");
            if n == 1 {
                probes.fetch_add(probe(slot), Ordering::SeqCst);
            }
        }
        stop.stop();
    });
    assert_eq!(
        call0(slot),
        1 + (patches + 1) % 2,
        "the slot's last target runs"
    );
    let stats = AliasStats {
        patches,
        pokes: mgr.flush_stats().expect("stats").pokes - pokes_before,
        probes: probes.load(Ordering::SeqCst),
    };
    assert!(
        stats.pokes >= patches,
        "every patch wrote through the alias ({} sessions for {patches} patches)",
        stats.pokes
    );
    drop(m);
    settle(&mgr);
    stats
}
