//! Cost of retargeting a jump-table slot on the software MMU.
//!
//! A module with 64 functions and one jump table (R+X). Every store goes through the writable
//! alias: map the alias onto the table's frame, one aligned 8-byte store, unmap, one TLB
//! invalidation. `patch/near_slot` retargets a slot to code in reach (two stores: far target,
//! near slot), `patch/far_slot` to an address out of rel32 reach (kernel text), which sends the
//! near slot through its far slot (also two stores), and `patch/patch_u64` is one
//! `CodeManager::patch_u64` alone.

use std::hint::black_box;
use std::time::Duration;

use codespace::jump_table::JumpTableLayout;
use codespace::mmu::soft::SoftMmu;
use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{AddressRange, CodeManager, ManagerConfig};
use criterion::{criterion_group, criterion_main, Criterion};

/// Start of a 512 GiB PML4 slot in the higher half.
const BASE: usize = 0xFFFF_C000_0000_0000;
/// Out of rel32 reach from the window: the far path.
const KERNEL_TEXT: usize = 0xFFFF_FFFF_8010_0000;
const FUNCTIONS: u32 = 64;
const SLOT: u32 = 17;

fn setup() -> (CodeManager<SoftMmu>, CodeModule<SoftMmu>, [usize; 2]) {
    let window = AddressRange::new(BASE, BASE + (512 << 30));
    let manager =
        CodeManager::new(SoftMmu::new(1 << 12), window, ManagerConfig::default()).expect("manager");
    let grace: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
    let registries: &'static Registries = Box::leak(Box::new(Registries::new(grace)));
    let config = ModuleConfig {
        functions: FUNCTIONS,
        ..ModuleConfig::default()
    };
    let mut module = CodeModule::new(&manager, registries, config).expect("module");
    let code = [0x8D, 0x04, 0x37, 0xC3]; // lea eax, [rdi+rsi]; ret
    let targets = [0, 1].map(|i| {
        module
            .add_code(&NewCode::function(i, &code))
            .expect("add")
            .instruction_start()
    });
    (manager, module, targets)
}

fn table(module: &CodeModule<SoftMmu>) -> JumpTableLayout {
    *module.jump_tables().next().expect("table")
}

fn patch(c: &mut Criterion) {
    let (manager, mut module, targets) = setup();
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

    let far = [KERNEL_TEXT, KERNEL_TEXT + 0x40];
    group.bench_function("far_slot", |b| {
        b.iter(|| {
            i ^= 1;
            module
                .patch_slot(black_box(SLOT), black_box(far[i]))
                .expect("patch");
        });
    });

    let addr = layout.far_target_addr(SLOT).unwrap();
    group.bench_function("patch_u64", |b| {
        b.iter(|| {
            i ^= 1;
            manager
                .patch_u64(black_box(addr), black_box(far[i] as u64))
                .expect("patch_u64");
        });
    });
    group.finish();

    assert!(manager.audit().is_clean());
    assert!(!manager.with_mmu(|mmu| mmu.wx_ever_observed()));
}

criterion_group!(benches, patch);
criterion_main!(benches);
