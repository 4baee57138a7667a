use codespace::code_object::CodeKind;
use codespace::mmu::soft::SoftMmu;
use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
use codespace::sync::grace::GraceDomain;
use codespace::{AddressRange, AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig};

const WINDOW: AddressRange = AddressRange::new(0xFFFF_C000_0000_0000, 0xFFFF_C000_4000_0000);

#[test]
fn smoke_allocator() {
    let m = SoftMmu::new(4096).with_direct_map(0xFFFF_8000_0000_0000);
    let mgr = CodeManager::new(m.clone(), WINDOW, ManagerConfig::default()).unwrap();
    let mut a = CodeAllocator::new(&mgr, AllocatorConfig::default()).unwrap();
    let mut w = a.allocate(100).unwrap();
    w.as_mut_slice().fill(0x90);
    let p = a.publish(w).unwrap();
    let mut w2 = a.allocate(100).unwrap();
    w2.as_mut_slice().fill(0xC3);
    let p2 = a.publish(w2).unwrap();
    let mut buf = [0u8; 4];
    m.exec_as(2, p2.start(), &mut buf).unwrap();
    assert_eq!(buf, [0xC3; 4]);
    let audit = mgr.audit().unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    a.free(p).unwrap();
    a.free(p2).unwrap();
    assert_eq!(mgr.committed(), 0);
    assert!(mgr.audit().unwrap().is_clean());
    assert_eq!(m.violations(), vec![]);
    println!("{:?}", mgr.flush_stats().unwrap());
}

static GRACE: GraceDomain = GraceDomain::new();
static REG: Registries = Registries::new(&GRACE);

#[test]
fn smoke_module() {
    unsafe { GRACE.set_possible_cpus(1) };
    let m = SoftMmu::new(4096);
    let mgr = CodeManager::new(m.clone(), WINDOW, ManagerConfig::default()).unwrap();
    let module = CodeModule::new(
        &mgr,
        &REG,
        ModuleConfig {
            functions: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let f = module
        .add_code(&NewCode::function(1, &[0xB8, 1, 0, 0, 0, 0xC3]))
        .unwrap();
    let g = module
        .add_code(&NewCode::function(1, &[0xB8, 2, 0, 0, 0, 0xC3]))
        .unwrap();
    assert_eq!(module.slot_target(1).unwrap(), Some(g.instruction_start()));
    assert_eq!(
        module.code_count().unwrap(),
        (2, 1),
        "old f retired, waiting"
    );
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap();
    module.patch_slot(1, w.instruction_start()).unwrap();
    assert!(module.free_code(w.instruction_start()).is_err(), "targeted");
    for _ in 0..3 {
        unsafe { GRACE.quiescent(0) };
        GRACE.try_advance();
    }
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(REG.lookup_code(f.instruction_start()).is_none());
    assert!(mgr.audit().unwrap().is_clean());
    drop(module);
    for _ in 0..3 {
        unsafe { GRACE.quiescent(0) };
        GRACE.try_advance();
    }
    assert_eq!(GRACE.reclaim(), 1);
    assert_eq!(mgr.committed(), 0);
    assert_eq!(m.violations(), vec![]);
}
