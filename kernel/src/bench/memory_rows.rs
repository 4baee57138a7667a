//! Rows of a single code manager: publish, commit, trap round trip, slot patch, allocation,
//! lookups.

use alloc::vec::Vec;

use codespace::code_object::CodeKind;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig, ProtectionMode};
use x86_64::structures::paging::PageTableFlags as F;

use super::{start, stop, Report, XorShift};
use crate::code::{self, test_window, KernelMmu, REGISTRIES};

/// A manager over test window `window`, for a group of rows.
pub(super) fn manager(window: usize) -> CodeManager<KernelMmu> {
    code::manager(
        test_window(window),
        ManagerConfig {
            protection: ProtectionMode::Alias,
            max_committed: 256 << 20,
            ..ManagerConfig::default()
        },
    )
    .expect("manager")
}

pub(super) fn run(r: &Report, manager: &CodeManager<KernelMmu>) {
    // Publish: copy-in, RW+NX -> R+X for every page, one TLB batch.
    let mut a = CodeAllocator::new(
        manager,
        AllocatorConfig {
            initial_reservation: 8 << 20,
            ..AllocatorConfig::default()
        },
    )
    .expect("allocator");
    for pages in [1usize, 8, 32, 33, 64, 512] {
        r.measure(&alloc::format!("publish {pages} page(s)"), pages, || {
            let w = a.allocate(pages * 4096).expect("allocate");
            let t0 = start();
            let code = a.publish(w).expect("publish");
            let t1 = stop();
            // SAFETY: never run, and its address was never handed out.
            unsafe { a.free(code) }.expect("free");
            t1 - t0
        });
    }

    // Commit + decommit: frames from the allocator, mapped RW+NX, unmapped and returned.
    for pages in [1usize, 64] {
        r.measure(
            &alloc::format!("commit + decommit {pages} page(s)"),
            pages,
            || {
                let t0 = start();
                let w = a.allocate(pages * 4096).expect("allocate");
                a.discard(w).expect("discard");
                stop() - t0
            },
        );
    }
    drop(a);

    // Trap round trip and slot patch, through a module.
    let module = CodeModule::new(
        manager,
        &REGISTRIES,
        ModuleConfig {
            functions: 2,
            ..ModuleConfig::default()
        },
    )
    .expect("module");
    let memory = crate::memory::SCRATCH_BASE + (3 << 30);
    // One RW+NX page; the page after it stays unmapped (the guard).
    crate::memory::map_fresh_page(memory, F::PRESENT | F::WRITABLE | F::NO_EXECUTE).expect("page");
    let mut load = [0xCCu8; 20];
    load[..2].copy_from_slice(&[0x48, 0xB8]);
    load[2..10].copy_from_slice(&memory.to_le_bytes());
    load[10..14].copy_from_slice(&[0x8B, 0x04, 0x38, 0xC3]); // mov eax, [rax + rdi]; ret
    load[14..18].copy_from_slice(&[0x4C, 0x89, 0xD0, 0xC3]); // landing: mov rax, r10; ret
    let load = module
        .add_code(&NewCode {
            protected: &[10],
            landing_pad: Some(14),
            ..NewCode::function(0, &load)
        })
        .expect("load");
    // SAFETY: published code with the C ABI: one u64 argument, u64 result.
    let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(load.instruction_start()) };
    r.measure("trap round trip (#PF -> landing pad -> caller)", 1, || {
        let t0 = start();
        let v = f(4096 + 8);
        let t1 = stop();
        assert_eq!(v, load.instruction_start() as u64 + 10);
        t1 - t0
    });
    r.measure("call of the same load, in bounds (baseline)", 1, || {
        let t0 = start();
        let v = f(8);
        let t1 = stop();
        core::hint::black_box(v);
        t1 - t0
    });
    let a_target = load.instruction_start();
    let b_target = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0x31, 0xC0, 0xC3]))
        .expect("b")
        .instruction_start();
    let mut flip = false;
    r.measure(
        "jump-slot patch, near (private alias session + store + sync)",
        1,
        || {
            flip = !flip;
            let target = if flip { b_target } else { a_target };
            let t0 = start();
            module.patch_slot(0, target).expect("patch");
            stop() - t0
        },
    );
    drop(module);

    // Allocate + free with 10^4 live objects of 64 B .. 4 KiB.
    let mut a = CodeAllocator::new(manager, AllocatorConfig::default()).expect("allocator");
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let size = |rng: &mut XorShift| 64usize << (rng.next() % 7);
    let live: Vec<_> = (0..10_000)
        .map(|_| a.allocate(size(&mut rng)).expect("live"))
        .collect();
    r.measure("allocate + free, 64 B-4 KiB, 10^4 live objects", 1, || {
        let s = size(&mut rng);
        let t0 = start();
        let w = a.allocate(s).expect("allocate");
        a.discard(w).expect("discard");
        stop() - t0
    });
    for w in live {
        a.discard(w).expect("discard");
    }
    drop(a);
}
