//! Cost of retargeting a jump-table slot on the software machine (4 CPUs, TLB model).
//!
//! A module with 64 functions and one jump table (R+X). Every change is one private-alias
//! session (the stores) and one serialization round of every CPU. `patch/near_slot` retargets a
//! slot to code in reach (two stores: far target, near slot), `patch/far_slot` to a registered
//! stub out of rel32 reach (kernel text), which sends the near slot through its far slot (also
//! two stores), and `patch/table_store` is one `CodeAllocator::patch` of one slot of a
//! patchable table alone (the narrow replacement of the old `CodeManager::patch_u64`).
//! `patch/near_slot_int3` is `patch/near_slot` under `PatchProtocol::Int3`: three alias
//! sessions and three serialization rounds per patch.

use std::hint::black_box;
use std::time::Duration;

use codespace::breakpoint::BreakpointSites;
use codespace::jump_table::JumpTableLayout;
use codespace::mmu::soft::SoftMmu;
use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig, PatchProtocol,
};
use criterion::{criterion_group, criterion_main, Criterion};

/// Start of a 512 GiB PML4 slot in the higher half.
const BASE: usize = 0xFFFF_C000_0000_0000;
/// Out of rel32 reach from the window: the far path.
const KERNEL_TEXT: usize = 0xFFFF_FFFF_8010_0000;
const FUNCTIONS: u32 = 64;
const SLOT: u32 = 17;

fn setup(
    patch_protocol: PatchProtocol,
) -> (
    SoftMmu,
    CodeManager<SoftMmu>,
    CodeModule<SoftMmu>,
    [usize; 2],
) {
    let window = AddressRange::new(BASE, BASE + (512 << 30));
    let machine = SoftMmu::new(1 << 12);
    let config = ManagerConfig {
        patch_protocol,
        ..ManagerConfig::default()
    };
    let manager = CodeManager::new(machine.clone(), window, config).expect("manager");
    let grace: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
    let registries: &'static Registries = Box::leak(Box::new(Registries::new(grace)));
    let config = ModuleConfig {
        functions: FUNCTIONS,
        ..ModuleConfig::default()
    };
    let module = CodeModule::new(&manager, registries, config).expect("module");
    for stub in [KERNEL_TEXT, KERNEL_TEXT + 0x40] {
        // SAFETY: the stubs are never called (the bench only patches and reads slots), and the
        // module is dropped with the bench.
        unsafe { module.register_external(stub) }.expect("stub");
    }
    let code = [0x8D, 0x04, 0x37, 0xC3]; // lea eax, [rdi+rsi]; ret
    let targets = [0, 1].map(|i| {
        module
            .add_code(&NewCode::function(i, &code))
            .expect("add")
            .instruction_start()
    });
    (machine, manager, module, targets)
}

fn table(module: &CodeModule<SoftMmu>) -> JumpTableLayout {
    module.jump_tables().expect("tables")[0]
}

fn patch(c: &mut Criterion) {
    let (machine, manager, module, targets) = setup(PatchProtocol::AtomicStore);
    let sites: &'static BreakpointSites = Box::leak(Box::new(BreakpointSites::new()));
    let (int3_machine, _int3_manager, int3_module, int3_targets) =
        setup(PatchProtocol::Int3(sites));
    let layout = table(&module);
    assert!(layout.patch(SLOT, targets[0]).unwrap().direct);
    assert!(!layout.patch(SLOT, KERNEL_TEXT).unwrap().direct);

    let mut group = c.benchmark_group("patch");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    let mut i = 0;
    group.bench_function("near_slot", |b| {
        b.iter(|| {
            i ^= 1;
            module
                .patch_slot(black_box(SLOT), black_box(targets[i]))
                .expect("patch");
        });
    });

    group.bench_function("near_slot_int3", |b| {
        b.iter(|| {
            i ^= 1;
            int3_module
                .patch_slot(black_box(SLOT), black_box(int3_targets[i]))
                .expect("patch");
        });
    });

    let far = [KERNEL_TEXT, KERNEL_TEXT + 0x40];
    group.bench_function("far_slot", |b| {
        b.iter(|| {
            i ^= 1;
            module
                .patch_slot(black_box(SLOT), black_box(far[i]))
                .expect("patch");
        });
    });

    // One slot of a patchable table of a plain allocator.
    let mut allocator = CodeAllocator::new(&manager, AllocatorConfig::default()).expect("alloc");
    let mut t = allocator.allocate_table(64, None).expect("table");
    t.as_mut_slice().fill(0xCC);
    let t = allocator.publish(t).expect("publish");
    let slot = t.start() + 8;
    group.bench_function("table_store", |b| {
        b.iter(|| {
            i ^= 1;
            // SAFETY: the software machine never executes its code: no CPU jumps through the
            // slot, whatever it holds.
            unsafe { allocator.patch(&[&t], &[(black_box(slot), black_box(far[i] as u64))]) }
                .expect("patch");
        });
    });
    group.finish();

    assert!(manager.audit().expect("audit").is_clean());
    for m in [&machine, &int3_machine] {
        assert!(m.violations().is_empty());
        assert!(!m.wx_ever_observed());
    }
}

criterion_group!(benches, patch);
criterion_main!(benches);
