//! The module on codespace's software MMU (host): declaring, defining, linking, publishing and
//! the errors, everything but running the code (the software machine's code window is not host
//! memory; the kernel tests, `kernel/tests/cranelift_jit.rs`, run it on every CPU).

// `ModuleError` is cranelift_module's (large, kept by value).
#![allow(clippy::result_large_err)]

use codespace::mmu::soft::SoftMmu;
use codespace::module::Registries;
use codespace::sync::grace::GraceDomain;
use codespace::trap::TrapVector;
use codespace::{AddressRange, CodeManager, ManagerConfig};
use codespace_cranelift::*;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{
    AbiParam, Function, InstBuilder, MemFlagsData, Signature, TrapCode, UserFuncName, Value,
};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

static GRACE: GraceDomain = GraceDomain::new();
static REGISTRIES: Registries = Registries::new(&GRACE);

/// The host as a kernel: compiles on the test thread's stack, never enters code.
struct Host;

/// Where the landing stubs jump (never reached on the host).
const LANDING: usize = 0x1000;

// SAFETY: nothing is ever entered (`enter` refuses), so no landing pad is reached; `quiescent`
// reports for the single CPU of these tests, which holds no code reference between calls.
unsafe impl Kernel for Host {
    fn landing_pad(&self) -> usize {
        LANDING
    }
    fn on_compile_stack(&self, f: &mut dyn FnMut()) -> Result<(), &'static str> {
        f();
        Ok(())
    }
    unsafe fn enter(&self, _entry: usize, _args: &[u64]) -> Exit {
        Exit::Other(u64::MAX)
    }
    fn quiescent(&self) {
        // SAFETY: one CPU (see the impl's comment).
        unsafe { GRACE.quiescent(0) };
        GRACE.try_advance();
    }
}

static HOST: Host = Host;

fn manager(slot: usize) -> CodeManager<SoftMmu> {
    manager_with(slot, ManagerConfig::default())
}

fn manager_with(slot: usize, config: ManagerConfig) -> CodeManager<SoftMmu> {
    // SAFETY: the tests' only "CPU" reports for itself.
    unsafe { GRACE.set_possible_cpus(1) };
    let mmu = SoftMmu::new(1 << 14).with_direct_map(0xFFFF_8000_0000_0000);
    let base = 0xFFFF_C000_0000_0000 + slot * (1 << 32);
    CodeManager::new(mmu, AddressRange::new(base, base + (1 << 30)), config).expect("manager")
}

fn module(mgr: &CodeManager<SoftMmu>, setup: impl FnOnce(&mut JITBuilder)) -> JITModule<SoftMmu> {
    let mut flags = settings::builder();
    flags.set("is_pic", "false").unwrap();
    flags.set("use_colocated_libcalls", "false").unwrap();
    let isa = native::builder()
        .unwrap()
        .finish(settings::Flags::new(flags))
        .unwrap();
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    setup(&mut builder);
    let codespace = Codespace {
        manager: mgr,
        registries: &REGISTRIES,
        kernel: &HOST,
    };
    JITModule::new(builder, &codespace).expect("module")
}

fn sig(m: &JITModule<SoftMmu>, params: usize) -> Signature {
    let mut s = m.make_signature();
    s.params.extend((0..params).map(|_| AbiParam::new(I64)));
    s.returns.push(AbiParam::new(I64));
    s
}

fn define(
    m: &mut JITModule<SoftMmu>,
    id: FuncId,
    params: usize,
    body: impl FnOnce(&mut FunctionBuilder<'_>, &mut JITModule<SoftMmu>, &[Value]),
) -> ModuleResult<()> {
    let mut ctx = m.make_context();
    ctx.func = Function::with_name_signature(UserFuncName::user(0, id.as_u32()), sig(m, params));
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
    let block = b.create_block();
    b.append_block_params_for_function_params(block);
    b.switch_to_block(block);
    let params: Vec<Value> = b.block_params(block).to_vec();
    body(&mut b, m, &params);
    b.seal_all_blocks();
    b.finalize(m.target_config());
    m.define_function(id, &mut ctx)
}

fn constant(v: i64) -> impl FnOnce(&mut FunctionBuilder<'_>, &mut JITModule<SoftMmu>, &[Value]) {
    move |b, _, _| {
        let c = b.ins().iconst(I64, v);
        b.ins().return_(&[c]);
    }
}

#[test]
fn calls_between_functions_go_through_slots_and_the_entry_is_a_slot() {
    let mgr = manager(0);
    let mut m = module(&mgr, |_| {});
    let s = sig(&m, 0);
    let a = m.declare_function("a", Linkage::Local, &s).unwrap();
    let b = m.declare_function("b", Linkage::Export, &s).unwrap();
    define(&mut m, a, 0, constant(37)).unwrap();
    define(&mut m, b, 0, move |bcx, m, _| {
        let f = m.declare_func_in_func(a, bcx.func);
        let call = bcx.ins().call(f, &[]);
        let v = bcx.inst_results(call)[0];
        bcx.ins().return_(&[v]);
    })
    .unwrap();
    assert!(
        m.get_finalized_function(b).is_null(),
        "not before finalizing"
    );
    m.finalize_definitions().unwrap();
    for f in [a, b] {
        let code = m.code_module().function_code(f.as_u32()).unwrap();
        assert!(code.is_some());
        assert_eq!(m.code_module().slot_target(f.as_u32()).unwrap(), code);
        assert_eq!(
            m.get_finalized_function(f) as usize,
            m.slot_address(f).unwrap()
        );
    }
    // Calls are `Kernel::enter`'s: the host's refuses, after the checks.
    // SAFETY: the host kernel enters nothing.
    assert_eq!(unsafe { m.call(b, &[]) }, Err(CallError::Aborted(u64::MAX)));
    assert_eq!(
        // SAFETY: refused before anything is entered (one argument too many).
        unsafe { m.call(b, &[1]) },
        Err(CallError::ArgumentCount {
            expected: 0,
            given: 1
        })
    );
}

#[test]
fn trap_records_become_trap_sites_for_their_exception() {
    let mgr = manager(1);
    let mut m = module(&mgr, |_| {});
    let s = sig(&m, 2);
    let f = m.declare_function("f", Linkage::Local, &s).unwrap();
    define(&mut m, f, 2, |b, _, p| {
        b.ins().trapnz(p[0], TrapCode::user(3).unwrap());
        let q = b.ins().udiv(p[0], p[1]);
        let heap = MemFlagsData::new().with_trap_code(Some(TrapCode::HEAP_OUT_OF_BOUNDS));
        let v = b.ins().load(I64, heap, q, 0);
        b.ins().return_(&[v]);
    })
    .unwrap();
    m.finalize_definitions().unwrap();
    let start = m.code_module().function_code(f.as_u32()).unwrap().unwrap();
    let object = m.code_module().lookup_code(start).unwrap();
    let pcs = || (start..start + 256).filter(|&pc| object.contains(pc));
    let traps = |v| {
        pcs()
            .filter(|&pc| REGISTRIES.traps.lookup_trap(v, pc).is_some())
            .count()
    };
    let faults = pcs()
        .filter(|&pc| REGISTRIES.traps.lookup_fault(pc, 0x10).is_some())
        .count();
    assert!(traps(TrapVector::InvalidOpcode) >= 1, "trapnz: ud2");
    assert_eq!(traps(TrapVector::DivideError), 1, "udiv");
    assert!(faults >= 1, "the load");
    // Every site lands on the stub at the end of the code, which jumps to the kernel's pad.
    let pc = pcs()
        .find(|&pc| {
            REGISTRIES
                .traps
                .lookup_trap(TrapVector::DivideError, pc)
                .is_some()
        })
        .unwrap();
    let pad = REGISTRIES
        .traps
        .lookup_trap(TrapVector::DivideError, pc)
        .unwrap()
        .landing_pad();
    assert!(object.contains(pad) && !object.contains(pad + 14));
}

#[test]
fn hotswap_patches_the_slot_and_frees_the_old_code_after_a_grace_period() {
    let mgr = manager(2);
    let mut m = module(&mgr, |b| {
        b.hotswap(true);
    });
    let s = sig(&m, 0);
    let f = m.declare_function("f", Linkage::Local, &s).unwrap();
    define(&mut m, f, 0, constant(1)).unwrap();
    m.finalize_definitions().unwrap();
    let entry = m.get_finalized_function(f);
    let first = m.code_module().function_code(f.as_u32()).unwrap();
    let err = define(&mut m, f, 0, constant(2)).unwrap_err();
    assert!(matches!(err, ModuleError::DuplicateDefinition(_)), "{err}");
    m.prepare_for_function_redefine(f).unwrap();
    define(&mut m, f, 0, constant(2)).unwrap();
    assert_eq!(
        m.code_module().slot_target(f.as_u32()).unwrap(),
        first,
        "the old code runs until the new definition is finalized"
    );
    m.finalize_definitions().unwrap();
    let second = m.code_module().function_code(f.as_u32()).unwrap();
    assert_ne!(second, first);
    assert_eq!(m.code_module().slot_target(f.as_u32()).unwrap(), second);
    assert_eq!(
        m.get_finalized_function(f),
        entry,
        "callers keep their entry"
    );
    assert_eq!(m.retired(), 1);
    m.reclaim();
    m.reclaim();
    assert_eq!(m.retired(), 0, "freed after two quiescent rounds");
}

#[test]
fn data_is_linked_read_only_data_in_the_window_writable_data_in_the_heap() {
    let mgr = manager(3);
    let mut m = module(&mgr, |_| {});
    let s = sig(&m, 0);
    let f = m.declare_function("f", Linkage::Local, &s).unwrap();
    define(&mut m, f, 0, constant(7)).unwrap();
    let ro = m.declare_data("ro", Linkage::Local, false, false).unwrap();
    let rw = m.declare_data("rw", Linkage::Local, true, false).unwrap();
    let mut d = DataDescription::new();
    d.define_zeroinit(8);
    m.define_data(ro, &d).unwrap();
    let mut d = DataDescription::new();
    d.define(vec![9u8; 24].into_boxed_slice());
    let fr = m.declare_func_in_data(f, &mut d);
    d.write_function_addr(0, fr);
    let gv = m.declare_data_in_data(ro, &mut d);
    d.write_data_addr(8, gv, 4);
    m.define_data(rw, &d).unwrap();
    assert_eq!(m.get_finalized_data(rw), (core::ptr::null(), 0));
    m.finalize_definitions().unwrap();
    let (ro_ptr, ro_size) = m.get_finalized_data(ro);
    let (rw_ptr, rw_size) = m.get_finalized_data(rw);
    assert_eq!((ro_size, rw_size), (8, 24));
    assert!(
        mgr.window().contains(ro_ptr as usize),
        "read-only data in the window"
    );
    assert!(
        !mgr.window().contains(rw_ptr as usize),
        "writable data in the heap"
    );
    // SAFETY: the module's writable object, 24 bytes, alive with the module.
    let words = unsafe { core::slice::from_raw_parts(rw_ptr.cast::<u64>(), 3) };
    assert_eq!(words[0], m.get_finalized_function(f) as u64, "f's slot");
    assert_eq!(words[1], ro_ptr as u64 + 4, "ro + 4");
    assert_eq!(words[2], u64::from_le_bytes([9; 8]), "contents kept");
}

#[test]
fn bad_input_gives_typed_errors_and_a_failed_finalize_installs_nothing() {
    let mgr = manager(4);
    let mut m = module(&mgr, |b| {
        b.max_functions(3);
    });
    let s = sig(&m, 0);
    let missing = m.declare_function("missing", Linkage::Import, &s).unwrap();
    let f = m.declare_function("f", Linkage::Local, &s).unwrap();
    define(&mut m, f, 0, move |b, m, _| {
        let g = m.declare_func_in_func(missing, b.func);
        let call = b.ins().call(g, &[]);
        let v = b.inst_results(call)[0];
        b.ins().return_(&[v]);
    })
    .unwrap();
    let before = m.code_module().code_count().unwrap();
    let err = m.finalize_definitions().unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::UnresolvedSymbol(ref n)) if n == "missing"),
        "{err}"
    );
    assert_eq!(m.code_module().code_count().unwrap(), before);
    assert!(m.get_finalized_function(f).is_null());

    let mut other = sig(&m, 0);
    other.params.push(AbiParam::new(I64));
    let err = m.declare_function("f", Linkage::Local, &other).unwrap_err();
    assert!(
        matches!(err, ModuleError::IncompatibleSignature(..)),
        "{err}"
    );
    let err = define(&mut m, missing, 0, constant(0)).unwrap_err();
    assert!(
        matches!(err, ModuleError::InvalidImportDefinition(_)),
        "{err}"
    );
    let err = define(&mut m, f, 0, constant(0)).unwrap_err();
    assert!(matches!(err, ModuleError::DuplicateDefinition(_)), "{err}");
    let err = m.prepare_for_function_redefine(f).unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::HotswapDisabled)),
        "{err}"
    );
    m.declare_function("g", Linkage::Local, &s).unwrap();
    let err = m.declare_function("h", Linkage::Local, &s).unwrap_err();
    assert!(
        matches!(
            err,
            ModuleError::Backend(BackendError::TooManyFunctions { max: 3 })
        ),
        "{err}"
    );
    let err = m
        .declare_data("t", Linkage::Local, false, true)
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::Tls(_))),
        "{err}"
    );
    let d = m.declare_data("d", Linkage::Local, false, false).unwrap();
    let err = m.define_data(d, &DataDescription::new()).unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::Uninitialized(_))),
        "{err}"
    );
    let err = m.declare_function("d", Linkage::Local, &s).unwrap_err();
    assert!(
        matches!(err, ModuleError::IncompatibleDeclaration(_)),
        "{err}"
    );
    // An identifier of another module.
    let foreign = FuncId::from_u32(99);
    let err = define(&mut m, foreign, 0, constant(0)).unwrap_err();
    assert!(matches!(err, ModuleError::Undeclared(_)), "{err}");
    // SAFETY: refused before entering.
    assert_eq!(
        unsafe { m.call(foreign, &[]) },
        Err(CallError::NotFinalized(foreign))
    );
    assert!(m.get_finalized_function(foreign).is_null());
}

#[test]
fn a_finalize_codespace_refuses_installs_nothing_and_retires_its_data_image() {
    // Code spaces of 16 KiB: a function of ~6000 additions does not fit one, but only codespace
    // can tell, after the read-only data was loaded.
    let mgr = manager_with(
        5,
        ManagerConfig {
            max_code_space_size: 16 << 10,
            ..ManagerConfig::default()
        },
    );
    let mut m = module(&mgr, |b| {
        b.hotswap(true).max_functions(4);
    });
    let ro = m.declare_data("ro", Linkage::Local, false, false).unwrap();
    let mut d = DataDescription::new();
    d.define(vec![1u8; 32].into_boxed_slice());
    m.define_data(ro, &d).unwrap();
    let s = sig(&m, 1);
    let huge = m.declare_function("huge", Linkage::Local, &s).unwrap();
    define(&mut m, huge, 1, |b, _, p| {
        let mut x = p[0];
        for i in 0..6000 {
            let c = b.ins().iconst(I64, i);
            x = b.ins().bxor(x, c);
            x = b.ins().rotl_imm_s(x, 3);
        }
        b.ins().return_(&[x]);
    })
    .unwrap();
    let committed = mgr.committed();
    let before = m.code_module().code_count().unwrap();
    let err = m.finalize_definitions().unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::Codespace(_))),
        "{err}"
    );
    assert_eq!(m.code_module().code_count().unwrap(), before, "no code");
    assert_eq!(
        m.get_finalized_data(ro),
        (core::ptr::null(), 0),
        "data pending"
    );
    assert!(m.get_finalized_function(huge).is_null());
    assert_eq!(
        m.code_module().image_count().unwrap(),
        (0, 1),
        "the data image is retired (no address of it was handed out)"
    );
    m.reclaim();
    m.reclaim();
    assert_eq!(m.code_module().image_count().unwrap(), (0, 0));
    assert_eq!(
        mgr.committed(),
        committed,
        "its pages freed after the grace period"
    );
    // The definition stays pending; dropped (hot-swap) and defined smaller, everything
    // finalizes, the data included.
    m.prepare_for_function_redefine(huge).unwrap();
    define(&mut m, huge, 1, |b, _, p| {
        b.ins().return_(&[p[0]]);
    })
    .unwrap();
    m.finalize_definitions().unwrap();
    assert!(!m.get_finalized_function(huge).is_null());
    let (ptr, size) = m.get_finalized_data(ro);
    assert!(mgr.window().contains(ptr as usize) && size == 32);
}

#[test]
fn raw_bytes_link_like_compiled_code() {
    use cranelift_codegen::binemit::Reloc;
    let mgr = manager(6);
    let mut m = module(&mgr, |_| {});
    let s = sig(&m, 0);
    let forty_two = m.declare_function("forty_two", Linkage::Local, &s).unwrap();
    let caller = m.declare_function("caller", Linkage::Local, &s).unwrap();
    // mov eax, 42; ret
    m.define_function_bytes(forty_two, 16, &[0xB8, 42, 0, 0, 0, 0xC3], &[])
        .unwrap();
    // call forty_two (through its slot); ret
    let call = ModuleReloc {
        offset: 1,
        kind: Reloc::X86CallPCRel4,
        name: ModuleRelocTarget::user(0, forty_two.as_u32()),
        addend: -4,
    };
    let err = m
        .define_function_bytes(
            caller,
            3,
            &[0xE8, 0, 0, 0, 0, 0xC3],
            std::slice::from_ref(&call),
        )
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::BadAlignment(3))),
        "{err}"
    );
    m.define_function_bytes(caller, 1, &[0xE8, 0, 0, 0, 0, 0xC3], &[call])
        .unwrap();
    let err = m
        .define_function_bytes(caller, 1, &[0xC3], &[])
        .unwrap_err();
    assert!(matches!(err, ModuleError::DuplicateDefinition(_)), "{err}");
    m.finalize_definitions().unwrap();
    for f in [forty_two, caller] {
        let code = m.code_module().function_code(f.as_u32()).unwrap();
        assert!(code.is_some());
        assert_eq!(m.code_module().slot_target(f.as_u32()).unwrap(), code);
    }
}

#[test]
fn rox_builder_puts_the_code_on_rox_pages_and_needs_a_rox_manager() {
    let mgr = manager_with(
        9,
        ManagerConfig {
            rox_code: true,
            ..ManagerConfig::default()
        },
    );
    let mut m = module(&mgr, |b| {
        b.rox(true).max_functions(2);
    });
    let s = sig(&m, 0);
    let f = m.declare_function("f", Linkage::Export, &s).unwrap();
    define(&mut m, f, 0, constant(5)).unwrap();
    m.finalize_definitions().unwrap();
    let code = m.code_module().function_code(f.as_u32()).unwrap();
    assert!(code.is_some());
    let stats = mgr.stats();
    assert!(
        stats.rox_spaces > 0 && stats.huge_pages > 0 && stats.rox_fallbacks == 0,
        "the module's code is on ROX pages: {stats:?}"
    );
    // The same builder on a manager without the mode is refused, and nothing is reserved.
    let plain = manager(10);
    let mut flags = settings::builder();
    flags.set("is_pic", "false").unwrap();
    let isa = native::builder()
        .unwrap()
        .finish(settings::Flags::new(flags))
        .unwrap();
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    builder.rox(true);
    let codespace = Codespace {
        manager: &plain,
        registries: &REGISTRIES,
        kernel: &HOST,
    };
    let err = JITModule::new(builder, &codespace).unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::Codespace(_))),
        "{err}"
    );
    assert_eq!(plain.stats().code_spaces, 0, "nothing reserved");
}
