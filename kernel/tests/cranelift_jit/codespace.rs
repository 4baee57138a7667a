//! What codespace adds to cranelift-jit's module, on every CPU: traps that come back with their
//! trap codes, hot-swap as a slot patch, read-only data mapped read-only, data linked to code
//! and data, and bad input refused with nothing installed.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use codespace_cranelift::*;
use codespace_kernel::code::{test_window, KernelMmu};
use codespace_kernel::jit::cranelift::{builder, codespace, module_isa};
use codespace_kernel::test::{ExpectFault, PF_PRESENT, PF_WRITE};
use codespace_kernel::{println, smp};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{
    AbiParam, AtomicRmwOp, Function, InstBuilder, MemFlagsData, Signature, TrapCode, UserFuncName,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

use super::common::{manager, on_every_cpu};

fn new_module(window: usize, hotswap: bool) -> JITModule<KernelMmu> {
    let mgr = manager(window);
    let mut builder = builder(module_isa().expect("isa"), &mgr);
    builder.hotswap(hotswap);
    JITModule::new(builder, &codespace(&mgr)).expect("module")
}

/// Declares `name` with integer `params` and one integer result, and defines it with `body`
/// (given the builder, the module and the entry block's parameters).
fn define(
    module: &mut JITModule<KernelMmu>,
    name: &str,
    params: usize,
    body: impl FnOnce(
        &mut FunctionBuilder<'_>,
        &mut JITModule<KernelMmu>,
        &[cranelift_codegen::ir::Value],
    ),
) -> FuncId {
    let mut sig = module.make_signature();
    sig.params.extend((0..params).map(|_| AbiParam::new(I64)));
    sig.returns.push(AbiParam::new(I64));
    let id = module
        .declare_function(name, Linkage::Local, &sig)
        .expect("declare");
    define_as(module, id, sig, body);
    id
}

fn define_as(
    module: &mut JITModule<KernelMmu>,
    id: FuncId,
    sig: Signature,
    body: impl FnOnce(
        &mut FunctionBuilder<'_>,
        &mut JITModule<KernelMmu>,
        &[cranelift_codegen::ir::Value],
    ),
) {
    let mut ctx = module.make_context();
    ctx.func = Function::with_name_signature(UserFuncName::user(0, id.as_u32()), sig);
    let mut func_ctx = FunctionBuilderContext::new();
    {
        let mut bcx = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();
        bcx.append_block_params_for_function_params(block);
        bcx.switch_to_block(block);
        let params: Vec<_> = bcx.block_params(block).to_vec();
        body(&mut bcx, module, &params);
        bcx.seal_all_blocks();
        bcx.finalize(module.target_config());
    }
    module.define_function(id, &mut ctx).expect("define");
}

/// A load that may trap (Cranelift's default trap code for memory: heap out of bounds).
fn heap() -> MemFlagsData {
    MemFlagsData::new().with_trap_code(Some(TrapCode::HEAP_OUT_OF_BOUNDS))
}

pub fn codespace_traps_land_with_their_trap_codes_on_every_cpu() {
    let mut module = new_module(10, false);
    let load = define(&mut module, "load", 1, |b, _, p| {
        let v = b.ins().load(I64, heap(), p[0], 0);
        b.ins().return_(&[v]);
    });
    let user = TrapCode::user(7).expect("user trap code");
    let checked = define(&mut module, "checked", 1, move |b, _, p| {
        b.ins().trapnz(p[0], user);
        let v = b.ins().iadd_imm_s(p[0], 1);
        b.ins().return_(&[v]);
    });
    let divide = define(&mut module, "divide", 2, |b, _, p| {
        let v = b.ins().udiv(p[0], p[1]);
        b.ins().return_(&[v]);
    });
    // Through a module frame: `outer` calls `load` through its slot.
    let outer = define(&mut module, "outer", 1, move |b, m, p| {
        let callee = m.declare_func_in_func(load, b.func);
        let call = b.ins().call(callee, &[p[0]]);
        let v = b.inst_results(call)[0];
        b.ins().return_(&[v]);
    });
    module.finalize_definitions().expect("finalize");
    let word = Box::new(0x1234_5678_9ABC_DEF0u64);
    let word_addr = &raw const *word as u64;
    // Unmapped: a slice of the code window no manager uses.
    let hole = test_window(63).start() as u64;
    let objects: Vec<_> = [load, checked, divide]
        .iter()
        .map(|&f| {
            let start = module
                .code_module()
                .function_code(f.as_u32())
                .unwrap()
                .unwrap();
            module.code_module().lookup_code(start).expect("registered")
        })
        .collect();
    on_every_cpu(|cpu| {
        for round in 0..100u64 {
            let address = hole + 8 * (cpu as u64) + 4096 * (round % 8);
            // SAFETY: `load` reads the word (ours) or the unmapped hole, which traps.
            unsafe {
                assert_eq!(module.call(load, &[word_addr]), Ok(0x1234_5678_9ABC_DEF0));
                let r = module.call(outer, &[address]);
                let Err(CallError::Trap(t)) = r else {
                    panic!("cpu {cpu}: load({address:#x}) gave {r:?}");
                };
                assert_eq!(t.code, Some(TrapCode::HEAP_OUT_OF_BOUNDS), "cpu {cpu}");
                assert_eq!(t.fault_address, Some(address), "cpu {cpu}: CR2");
                assert!(objects[0].contains(t.pc), "cpu {cpu}: in load");

                assert_eq!(module.call(checked, &[0]), Ok(1));
                let r = module.call(checked, &[round + 1]);
                let Err(CallError::Trap(t)) = r else {
                    panic!("cpu {cpu}: checked gave {r:?}");
                };
                assert_eq!(
                    (t.code, t.fault_address),
                    (Some(user), None),
                    "cpu {cpu}: #UD"
                );
                assert!(objects[1].contains(t.pc));

                assert_eq!(module.call(divide, &[100, 7]), Ok(14));
                let r = module.call(divide, &[round, 0]);
                let Err(CallError::Trap(t)) = r else {
                    panic!("cpu {cpu}: divide by zero gave {r:?}");
                };
                assert_eq!(
                    (t.code, t.fault_address),
                    (Some(TrapCode::INTEGER_DIVISION_BY_ZERO), None),
                    "cpu {cpu}: #DE"
                );
                assert!(objects[2].contains(t.pc));
            }
        }
        assert!(
            !codespace_kernel::jit::active(),
            "cpu {cpu}: every landing popped its entry"
        );
    });
    println!(
        "    {} CPUs: 300 traps each (#PF, #UD, #DE) came back with their trap codes",
        smp::online_cpus()
    );
}

/// Redefinitions in the hot-swap test.
const SWAPS: u64 = 8;

pub fn codespace_hotswap_is_a_slot_patch_while_every_cpu_calls() {
    let mut module = new_module(11, true);
    let version = |v: u64| {
        move |b: &mut FunctionBuilder<'_>,
              _: &mut JITModule<KernelMmu>,
              _: &[cranelift_codegen::ir::Value]| {
            let c = b.ins().iconst(I64, v as i64);
            b.ins().return_(&[c]);
        }
    };
    let f = define(&mut module, "f", 0, version(1));
    let g = define(&mut module, "g", 0, move |b, m, _| {
        let callee = m.declare_func_in_func(f, b.func);
        let call = b.ins().call(callee, &[]);
        let v = b.inst_results(call)[0];
        b.ins().return_(&[v]);
    });
    module.finalize_definitions().expect("finalize");
    let entry = module.get_finalized_function(g) as usize;
    let sig = module
        .declarations()
        .get_function_decl(f)
        .unwrap()
        .signature
        .clone();
    let module = spin::Mutex::new(module);
    let (done, seen_last) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let n = smp::online_cpus();
    // CPU 0 redefines `f` SWAPS times; every other CPU calls `g` (which calls `f` through its
    // slot) through the pointer `get_finalized_function` gave, lock-free, the whole time: the
    // values it sees never go back, and it ends on the last one.
    on_every_cpu(|cpu| {
        if cpu == 0 {
            for v in 2..=SWAPS {
                let mut m = module.lock();
                m.prepare_for_function_redefine(f).expect("prepare");
                define_as(&mut m, f, sig.clone(), version(v));
                m.finalize_definitions().expect("finalize the new f");
                assert_eq!(
                    m.get_finalized_function(g) as usize,
                    entry,
                    "the entry stays"
                );
                drop(m);
                for _ in 0..20_000 {
                    core::hint::spin_loop();
                }
            }
            done.store(1, Ordering::SeqCst);
            return;
        }
        // SAFETY: `g` is `extern "C" fn() -> i64` and only calls `f`, which returns a constant;
        // the module outlives this closure.
        let g: extern "C" fn() -> i64 = unsafe { core::mem::transmute(entry) };
        let mut last = 1;
        loop {
            let finished = done.load(Ordering::SeqCst) == 1;
            let v = g() as u64;
            assert!((last..=SWAPS).contains(&v), "cpu {cpu}: {v} after {last}");
            last = v;
            if finished {
                break;
            }
        }
        assert_eq!(last, SWAPS, "cpu {cpu}: the last definition");
        seen_last.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(seen_last.load(Ordering::SeqCst), n - 1);
    let module = module.into_inner();
    assert_eq!(
        module.retired(),
        (SWAPS - 1) as usize,
        "replaced code waits for a grace period"
    );
    // Every CPU reports a quiescent state (twice: a ticket needs two rounds), then the old
    // versions are freed.
    for _ in 0..2 {
        on_every_cpu(|_| {
            module.reclaim();
        });
    }
    module.reclaim();
    assert_eq!(
        module.retired(),
        0,
        "freed after every CPU passed a quiescent state"
    );
    on_every_cpu(|cpu| {
        // SAFETY: `g` returns a constant through `f`.
        assert_eq!(unsafe { module.call(g, &[]) }, Ok(SWAPS), "cpu {cpu}");
    });
    println!(
        "    {} redefinitions while {} CPUs called; old code freed after the grace period",
        SWAPS - 1,
        n - 1
    );
}

pub fn codespace_read_only_data_is_mapped_read_only_and_data_is_linked() {
    let mut module = new_module(12, false);
    let table = module
        .declare_data("table", Linkage::Local, false, false)
        .unwrap();
    let counter = module
        .declare_data("counter", Linkage::Export, true, false)
        .unwrap();
    let seven = define(&mut module, "seven", 0, |b, _, _| {
        let c = b.ins().iconst(I64, 7);
        b.ins().return_(&[c]);
    });
    // table: [0x1111, &seven (its slot), &counter + 8]; counter: [&table, 0].
    let mut desc = DataDescription::new();
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&0x1111u64.to_le_bytes());
    desc.define(Box::new(bytes));
    let fref = module.declare_func_in_data(seven, &mut desc);
    desc.write_function_addr(8, fref);
    let gv = module.declare_data_in_data(counter, &mut desc);
    desc.write_data_addr(16, gv, 8);
    module.define_data(table, &desc).unwrap();
    let mut desc = DataDescription::new();
    desc.define_zeroinit(16);
    let gv = module.declare_data_in_data(table, &mut desc);
    desc.write_data_addr(0, gv, 0);
    module.define_data(counter, &desc).unwrap();
    // read(i) = table[i]; bump() = atomic counter[1] += 1, the old value.
    let read = define(&mut module, "read", 1, move |b, m, p| {
        let gv = m.declare_data_in_func(table, b.func);
        let base = b.ins().symbol_value(I64, gv);
        let offset = b.ins().imul_imm_s(p[0], 8);
        let at = b.ins().iadd(base, offset);
        let v = b.ins().load(I64, MemFlagsData::trusted(), at, 0);
        b.ins().return_(&[v]);
    });
    let bump = define(&mut module, "bump", 0, move |b, m, _| {
        let gv = m.declare_data_in_func(counter, b.func);
        let base = b.ins().symbol_value(I64, gv);
        let at = b.ins().iadd_imm_s(base, 8);
        let one = b.ins().iconst(I64, 1);
        let old = b
            .ins()
            .atomic_rmw(I64, MemFlagsData::trusted(), AtomicRmwOp::Add, at, one);
        b.ins().return_(&[old]);
    });
    module.finalize_definitions().unwrap();

    let (table_ptr, table_size) = module.get_finalized_data(table);
    let (counter_ptr, counter_size) = module.get_finalized_data(counter);
    assert_eq!((table_size, counter_size), (24, 16));
    let slot = module.get_finalized_function(seven) as u64;
    let expected = [0x1111, slot, counter_ptr as u64 + 8];
    const BUMPS: usize = 1000;
    on_every_cpu(|cpu| {
        for (i, want) in expected.iter().enumerate() {
            // SAFETY: `read` loads from the table, index in bounds.
            assert_eq!(
                unsafe { module.call(read, &[i as u64]) },
                Ok(*want),
                "cpu {cpu}: table[{i}]"
            );
        }
        for _ in 0..BUMPS {
            // SAFETY: `bump` adds to the counter's second word.
            unsafe { module.call(bump, &[]) }.expect("bump");
        }
    });
    // SAFETY: the module's writable object, 16 bytes, alive with the module.
    let words = unsafe { core::slice::from_raw_parts(counter_ptr.cast::<u64>(), 2) };
    assert_eq!(
        words[0], table_ptr as u64,
        "counter holds the table's address"
    );
    assert_eq!(
        words[1],
        (BUMPS * smp::online_cpus()) as u64,
        "every bump counted"
    );
    // The table is mapped read-only: a write faults (present, write).
    // SAFETY: reading the finalized table, mapped readable.
    assert_eq!(unsafe { table_ptr.cast::<u64>().read_volatile() }, 0x1111);
    let addr = table_ptr as u64;
    let info = ExpectFault::page_fault(addr)
        .with_bits(PF_PRESENT | PF_WRITE)
        .run(|| {
            // SAFETY: deliberately writes the read-only table; the fault is caught.
            unsafe { (addr as *mut u64).write_volatile(0xBAD) };
        });
    assert_eq!(info.cr2, addr);
    // SAFETY: as above.
    assert_eq!(
        unsafe { table_ptr.cast::<u64>().read_volatile() },
        0x1111,
        "unchanged"
    );
    assert!(
        module
            .code_module()
            .manager()
            .window()
            .contains(table_ptr as usize),
        "in the code window's read-only pages"
    );
    println!("    read-only table at {addr:#x}: a write faults; {BUMPS} bumps per CPU counted");
}

pub fn codespace_bad_input_gives_typed_errors_and_installs_nothing() {
    let mut module = new_module(13, false);
    let count = |m: &JITModule<KernelMmu>| m.code_module().code_count().unwrap();
    // An import nothing resolves: finalize refuses, nothing is installed, and the caller can
    // still fix it (define the symbol as a module function instead).
    let mut sig = module.make_signature();
    sig.returns.push(AbiParam::new(I64));
    let missing = module
        .declare_function("missing", Linkage::Import, &sig)
        .unwrap();
    let caller = define(&mut module, "caller", 0, move |b, m, _| {
        let callee = m.declare_func_in_func(missing, b.func);
        let call = b.ins().call(callee, &[]);
        let v = b.inst_results(call)[0];
        b.ins().return_(&[v]);
    });
    let before = count(&module);
    let err = module.finalize_definitions().unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::UnresolvedSymbol(ref n)) if n == "missing"),
        "{err}"
    );
    assert_eq!(count(&module), before, "nothing installed");
    assert!(module.get_finalized_function(caller).is_null());
    // SAFETY: refused before anything runs.
    assert_eq!(
        unsafe { module.call(caller, &[]) },
        Err(CallError::NotFinalized(caller))
    );

    // A local function referenced but never defined.
    let mut other = new_module(14, false);
    let undefined = other
        .declare_function("undefined", Linkage::Local, &sig)
        .unwrap();
    define(&mut other, "caller", 0, move |b, m, _| {
        let callee = m.declare_func_in_func(undefined, b.func);
        let call = b.ins().call(callee, &[]);
        let v = b.inst_results(call)[0];
        b.ins().return_(&[v]);
    });
    let other_before = count(&other);
    let err = other.finalize_definitions().unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::UnresolvedSymbol(ref n)) if n == "undefined"),
        "{err}"
    );
    assert_eq!(count(&other), other_before, "nothing installed");
    assert_eq!(count(&module), before, "nothing installed");

    // Definitions that cannot be.
    let err = module
        .define_function(missing, &mut module.make_context())
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::InvalidImportDefinition(_)),
        "{err}"
    );
    let err = module.prepare_for_function_redefine(caller).unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::HotswapDisabled)),
        "{err}"
    );
    let err = module
        .declare_data("tls", Linkage::Local, true, true)
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::Tls(_))),
        "{err}"
    );
    let data = module
        .declare_data("d", Linkage::Local, true, false)
        .unwrap();
    let err = module
        .define_data(data, &DataDescription::new())
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::Uninitialized(_))),
        "{err}"
    );
    let mut desc = DataDescription::new();
    desc.define_zeroinit(8);
    desc.set_align(3);
    let err = module.define_data(data, &desc).unwrap_err();
    assert!(
        matches!(err, ModuleError::Backend(BackendError::BadAlignment(3))),
        "{err}"
    );
    let err = module
        .declare_function("d", Linkage::Local, &sig)
        .unwrap_err();
    assert!(
        matches!(err, ModuleError::IncompatibleDeclaration(_)),
        "{err}"
    );

    // With `missing` given as a kernel symbol the same function links; a module of two slots
    // refuses a third function.
    let mgr = manager(15);
    let mut builder = builder(module_isa().unwrap(), &mgr);
    builder.symbol("missing", six as *const u8).max_functions(2);
    let mut small = JITModule::new(builder, &codespace(&mgr)).unwrap();
    let a = small
        .declare_function("missing", Linkage::Import, &sig)
        .unwrap();
    let b = define(&mut small, "b", 0, move |bcx, m, _| {
        let callee = m.declare_func_in_func(a, bcx.func);
        let call = bcx.ins().call(callee, &[]);
        let v = bcx.inst_results(call)[0];
        let w = bcx.ins().icmp_imm_s(IntCC::Equal, v, 6);
        let w = bcx.ins().uextend(I64, w);
        bcx.ins().return_(&[w]);
    });
    let err = small
        .declare_function("c", Linkage::Local, &sig)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModuleError::Backend(BackendError::TooManyFunctions { max: 2 })
        ),
        "{err}"
    );
    small.finalize_definitions().unwrap();
    // SAFETY: `b` calls the kernel's `six`.
    assert_eq!(unsafe { small.call(b, &[]) }, Ok(1));
    assert_eq!(
        // SAFETY: refused before anything is entered (one argument too many).
        unsafe { small.call(b, &[1]) },
        Err(CallError::ArgumentCount {
            expected: 0,
            given: 1
        })
    );
}

extern "C" fn six() -> i64 {
    6
}

pub fn codespace_raw_bytes_run_through_their_slots_on_every_cpu() {
    use cranelift_codegen::binemit::Reloc;
    let mut module = new_module(16, false);
    let mut sig = module.make_signature();
    sig.returns.push(AbiParam::new(I64));
    let forty_two = module
        .declare_function("forty_two", Linkage::Local, &sig)
        .unwrap();
    let caller = module
        .declare_function("caller", Linkage::Local, &sig)
        .unwrap();
    // mov eax, 42; ret — and: call forty_two (its slot); inc rax; ret
    module
        .define_function_bytes(forty_two, 16, &[0xB8, 42, 0, 0, 0, 0xC3], &[])
        .unwrap();
    let call = ModuleReloc {
        offset: 1,
        kind: Reloc::X86CallPCRel4,
        name: ModuleRelocTarget::user(0, forty_two.as_u32()),
        addend: -4,
    };
    module
        .define_function_bytes(
            caller,
            16,
            &[0xE8, 0, 0, 0, 0, 0x48, 0xFF, 0xC0, 0xC3],
            &[call],
        )
        .unwrap();
    module.finalize_definitions().unwrap();
    on_every_cpu(|cpu| {
        // SAFETY: the bytes above only compute.
        unsafe {
            assert_eq!(module.call(forty_two, &[]), Ok(42), "cpu {cpu}");
            assert_eq!(module.call(caller, &[]), Ok(43), "cpu {cpu}");
        }
    });
}
