//! cranelift-jit's own tests, run against `codespace_cranelift::JITModule` in the kernel: the
//! tests of `cranelift/jit/tests/basic.rs` and the `jit-minimal` example of wasmtime `v48.0.8`
//! (cranelift-jit 0.135.8), each named after the original (`basic_<test>`, `jit_minimal`).
//!
//! What a kernel forced, and only that: the ISA comes from `codespace_cranelift::native::builder`
//! (cranelift-native is std-only) with the same flags; `JITModule::new` takes the codespace
//! pieces and returns a `Result`; `malloc` is a kernel symbol given to the builder (no `dlsym`);
//! `Box`/`vec!` come from `alloc`, `EntityRef` from `cranelift_codegen::entity` (the kernel does
//! not depend on `cranelift-entity` directly); `main`/`#[test]` become kernel test items; where
//! upstream returns early without an ISA (`let Some(isa) = isa() else { return; }`), a kernel
//! test panics instead — the ISA is always there, and a test that skips itself cannot fail.
//! Upstream also asserts that errors are errors (`.err().unwrap()`); these tests additionally
//! check which error. Every ported test calls its finalized code from every CPU,
//! through `JITModule::call` (and `jit_minimal` also the upstream way, the transmuted pointer
//! of `get_finalized_function`). Upstream, `switch_error` only verifies its function and
//! `libcall_function`, `empty_data_object`, `error_on_incompatible_sig_in_declare_function` and
//! `panic_on_define_after_finalize` call nothing: each here finalizes what it built (or a
//! function it adds: reading the empty object's address) and calls it. No test was left out.
//!
//! Then what codespace adds, on every CPU: traps landing with their Cranelift trap codes,
//! hot-swap as a slot patch while every CPU calls, read-only data mapped read-only, data
//! linked to functions and data, bad input refused with nothing installed, and raw bytes
//! (`define_function_bytes`) linked and called like compiled code.
#![no_std]
#![no_main]
// The ported code is upstream's, unchanged where no kernel forced a change (`&mut bcx.func`,
// `Result<FuncId, ModuleError>`).
#![allow(clippy::needless_borrow, clippy::result_large_err)]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec;
use core::sync::atomic::Ordering;

use codespace_cranelift::*;
use codespace_kernel::code::KernelMmu;
use codespace_kernel::jit::cranelift::{builder, codespace, module_isa};
use codespace_kernel::println;
use cranelift_codegen::entity::EntityRef;
use cranelift_codegen::ir::types::I16;
use cranelift_codegen::ir::*;
use cranelift_codegen::isa::{CallConv, OwnedTargetIsa};
use cranelift_codegen::Context;
use cranelift_frontend::*;

#[path = "cranelift_jit/codespace.rs"]
mod codespace_tests;
#[path = "cranelift_jit/common.rs"]
mod common;

use codespace_tests::*;
use common::*;

codespace_kernel::kernel_tests![
    basic_error_on_incompatible_sig_in_declare_function,
    basic_panic_on_define_after_finalize,
    basic_switch_error,
    basic_libcall_function,
    basic_empty_data_object,
    jit_minimal,
    codespace_traps_land_with_their_trap_codes_on_every_cpu,
    codespace_hotswap_is_a_slot_patch_while_every_cpu_calls,
    codespace_read_only_data_is_mapped_read_only_and_data_is_linked,
    codespace_bad_input_gives_typed_errors_and_installs_nothing,
    codespace_raw_bytes_run_through_their_slots_on_every_cpu,
];

/// cranelift-jit's `isa()`: `use_colocated_libcalls` and `is_pic` off (see `module_isa`).
fn isa() -> Option<OwnedTargetIsa> {
    module_isa().ok()
}

fn basic_error_on_incompatible_sig_in_declare_function() {
    let Some(isa) = isa() else {
        panic!("no ISA");
    };
    let mgr = manager(0);
    let mut module = JITModule::new(builder(isa, &mgr), &codespace(&mgr)).unwrap();
    // The launcher's ROX pass: the module's code space (its jump table) is on a ROX page.
    codespace_kernel::code::assert_rox_in_use(&mgr);

    let mut sig = Signature {
        params: vec![AbiParam::new(types::I64)],
        returns: vec![],
        call_conv: CallConv::SystemV,
    };
    let abc = module
        .declare_function("abc", Linkage::Local, &sig)
        .unwrap();
    sig.params[0] = AbiParam::new(types::I32);
    let err = module
        .declare_function("abc", Linkage::Local, &sig)
        .err()
        .unwrap(); // Make sure this is an error
    assert!(
        matches!(err, ModuleError::IncompatibleSignature(ref name, _, _) if name == "abc"),
        "{err}"
    );

    // Added: the first declaration stands; define it, finalize and call it everywhere.
    sig.params[0] = AbiParam::new(types::I64);
    let mut ctx = Context::new();
    ctx.func = Function::with_name_signature(UserFuncName::user(0, abc.as_u32()), sig);
    let mut func_ctx = FunctionBuilderContext::new();
    {
        let mut bcx = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();
        bcx.append_block_params_for_function_params(block);
        bcx.switch_to_block(block);
        bcx.ins().return_(&[]);
        bcx.seal_all_blocks();
        bcx.finalize(module.target_config());
    }
    module.define_function(abc, &mut ctx).unwrap();
    module.finalize_definitions().unwrap();
    on_every_cpu(|cpu| {
        // SAFETY: `abc` returns at once.
        assert_eq!(
            unsafe { module.call(abc, &[cpu as u64]) },
            Ok(0),
            "cpu {cpu}"
        );
    });
}

fn define_simple_function(module: &mut JITModule<KernelMmu>) -> Result<FuncId, ModuleError> {
    let sig = Signature {
        params: vec![],
        returns: vec![],
        call_conv: CallConv::SystemV,
    };

    let func_id = module.declare_function("abc", Linkage::Local, &sig)?;

    let mut ctx = Context::new();
    ctx.func = Function::with_name_signature(UserFuncName::user(0, func_id.as_u32()), sig);
    let mut func_ctx = FunctionBuilderContext::new();
    {
        let mut bcx: FunctionBuilder = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();
        bcx.switch_to_block(block);
        bcx.ins().return_(&[]);
    }

    module.define_function(func_id, &mut ctx)?;

    Ok(func_id)
}

fn basic_panic_on_define_after_finalize() {
    let Some(isa) = isa() else {
        panic!("no ISA");
    };
    let mgr = manager(1);
    let mut module = JITModule::new(builder(isa, &mgr), &codespace(&mgr)).unwrap();

    define_simple_function(&mut module).unwrap();
    let err = define_simple_function(&mut module).err().unwrap();
    assert!(
        matches!(err, ModuleError::DuplicateDefinition(ref n) if n == "abc"),
        "{err}"
    );

    // Added: finalized, it is still defined once (the test's name); and it runs everywhere.
    module.finalize_definitions().unwrap();
    let err = define_simple_function(&mut module).err().unwrap();
    assert!(matches!(err, ModuleError::DuplicateDefinition(_)), "{err}");
    let abc = match module.get_name("abc") {
        Some(FuncOrDataId::Func(f)) => f,
        other => panic!("abc is {other:?}"),
    };
    on_every_cpu(|cpu| {
        // SAFETY: `abc` returns at once.
        assert_eq!(unsafe { module.call(abc, &[]) }, Ok(0), "cpu {cpu}");
    });
}

fn basic_switch_error() {
    let sig = Signature {
        params: vec![AbiParam::new(types::I32)],
        returns: vec![AbiParam::new(types::I32)],
        call_conv: CallConv::SystemV,
    };

    let mut func = Function::with_name_signature(UserFuncName::default(), sig.clone());

    let mut func_ctx = FunctionBuilderContext::new();
    {
        let mut bcx: FunctionBuilder = FunctionBuilder::new(&mut func, &mut func_ctx);
        let start = bcx.create_block();
        let bb0 = bcx.create_block();
        let bb1 = bcx.create_block();
        let bb2 = bcx.create_block();
        let bb3 = bcx.create_block();
        println!("{start} {bb0} {bb1} {bb2} {bb3}");

        bcx.declare_var(types::I32);
        bcx.declare_var(types::I32);
        let in_val = bcx.append_block_param(start, types::I32);
        bcx.switch_to_block(start);
        bcx.def_var(Variable::new(0), in_val);
        bcx.ins().jump(bb0, &[]);

        bcx.switch_to_block(bb0);
        let discr = bcx.use_var(Variable::new(0));
        let mut switch = cranelift_frontend::Switch::new();
        for &(index, bb) in &[
            (9, bb1),
            (13, bb1),
            (10, bb1),
            (92, bb1),
            (39, bb1),
            (34, bb1),
        ] {
            switch.set_entry(index, bb);
        }
        switch.emit(&mut bcx, discr, bb2);

        bcx.switch_to_block(bb1);
        let v = bcx.use_var(Variable::new(0));
        bcx.def_var(Variable::new(1), v);
        bcx.ins().jump(bb3, &[]);

        bcx.switch_to_block(bb2);
        let v = bcx.use_var(Variable::new(0));
        bcx.def_var(Variable::new(1), v);
        bcx.ins().jump(bb3, &[]);

        bcx.switch_to_block(bb3);
        let r = bcx.use_var(Variable::new(1));
        bcx.ins().return_(&[r]);

        bcx.seal_all_blocks();
        bcx.finalize(cranelift_codegen::isa::TargetFrontendConfig {
            default_call_conv: CallConv::SystemV,
            pointer_width: target_lexicon::PointerWidth::U64,
            page_size_align_log2: 12,
        });
    }

    let flags = cranelift_codegen::settings::Flags::new(cranelift_codegen::settings::builder());
    match cranelift_codegen::verify_function(&func, &flags) {
        Ok(_) => {}
        Err(err) => {
            let pretty_error =
                cranelift_codegen::print_errors::pretty_verifier_error(&func, None, err);
            panic!("pretty_error:\n{pretty_error}");
        }
    }

    // Added: compile the switch in a module and run it on every CPU, on every case, the
    // default and the values around them.
    let mgr = manager(2);
    let mut module = JITModule::new(builder(isa().unwrap(), &mgr), &codespace(&mgr)).unwrap();
    let id = module
        .declare_function("switch", Linkage::Export, &sig)
        .unwrap();
    let mut ctx = module.make_context();
    func.name = UserFuncName::user(0, id.as_u32());
    ctx.func = func;
    module.define_function(id, &mut ctx).unwrap();
    module.finalize_definitions().unwrap();
    on_every_cpu(|cpu| {
        for x in [
            0u32,
            8,
            9,
            10,
            11,
            12,
            13,
            14,
            33,
            34,
            35,
            39,
            91,
            92,
            93,
            u32::MAX,
            cpu as u32,
        ] {
            // SAFETY: the switch only computes.
            assert_eq!(
                unsafe { module.call(id, &[u64::from(x)]) },
                Ok(u64::from(x)),
                "cpu {cpu}: switch({x})"
            );
        }
    });
}

fn basic_libcall_function() {
    let Some(isa) = isa() else {
        panic!("no ISA");
    };
    let mgr = manager(3);
    let mut builder = builder(isa, &mgr);
    // A kernel has no dlsym: the symbols the function imports are given to the builder.
    builder.symbol("malloc", test_malloc as *const u8);
    builder.symbol("memset", kernel_memset());
    let mut module = JITModule::new(builder, &codespace(&mgr)).unwrap();

    let sig = Signature {
        params: vec![],
        returns: vec![],
        call_conv: CallConv::SystemV,
    };

    let func_id = module
        .declare_function("function", Linkage::Local, &sig)
        .unwrap();

    let mut ctx = Context::new();
    ctx.func = Function::with_name_signature(UserFuncName::user(0, func_id.as_u32()), sig);

    let mut func_ctx = FunctionBuilderContext::new();
    {
        let mut bcx: FunctionBuilder = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();
        bcx.switch_to_block(block);

        let int = module.target_config().pointer_type();
        let zero = bcx.ins().iconst(I16, 0);
        let size = bcx.ins().iconst(int, 10);

        let mut signature = module.make_signature();
        signature.params.push(AbiParam::new(int));
        signature.returns.push(AbiParam::new(int));
        let callee = module
            .declare_function("malloc", Linkage::Import, &signature)
            .expect("declare malloc function");
        let local_callee = module.declare_func_in_func(callee, &mut bcx.func);
        let argument_exprs = vec![size];
        let call = bcx.ins().call(local_callee, &argument_exprs);
        let buffer = bcx.inst_results(call)[0];

        bcx.call_memset(module.target_config(), buffer, zero, size);

        bcx.ins().return_(&[]);
    }

    module
        .define_function_with_control_plane(func_id, &mut ctx, &mut Default::default())
        .unwrap();

    module.finalize_definitions().unwrap();

    // Added: call it on every CPU; `malloc` hands out 16 bytes of 0xAA, `memset` must have
    // cleared exactly the first 10.
    on_every_cpu(|cpu| {
        for round in 0..50 {
            MALLOCS[cpu].store(0, Ordering::SeqCst);
            // SAFETY: the function calls `test_malloc` and the kernel's `memset` on the block.
            assert_eq!(unsafe { module.call(func_id, &[]) }, Ok(0));
            let block = MALLOCS[cpu].load(Ordering::SeqCst);
            assert_ne!(block, 0, "cpu {cpu}, round {round}: malloc was called");
            // SAFETY: the block `test_malloc` allocated on this CPU, ours now.
            let bytes = unsafe { core::slice::from_raw_parts(block as *const u8, MALLOC_SIZE) };
            assert_eq!(
                &bytes[..10],
                &[0; 10],
                "cpu {cpu}: memset cleared the 10 bytes"
            );
            assert!(
                bytes[10..].iter().all(|&b| b == 0xAA),
                "cpu {cpu}: and no more"
            );
            // SAFETY: allocated by `test_malloc` with this layout.
            unsafe { alloc::alloc::dealloc(block as *mut u8, malloc_layout()) };
        }
    });
}

// This used to cause UB. See https://github.com/bytecodealliance/wasmtime/issues/7918.
fn basic_empty_data_object() {
    let Some(isa) = isa() else {
        panic!("no ISA");
    };
    let mgr = manager(4);
    let mut module = JITModule::new(builder(isa, &mgr), &codespace(&mgr)).unwrap();

    let data_id = module
        .declare_data("empty", Linkage::Export, false, false)
        .unwrap();

    let mut data = DataDescription::new();
    data.define(Box::new([]));
    module.define_data(data_id, &data).unwrap();

    // Added: a function returning the object's address, finalized and called on every CPU:
    // the empty object has an address of its own, the one `get_finalized_data` gives.
    let address_of = address_function(&mut module, data_id, "address_of_empty");
    module.finalize_definitions().unwrap();
    let (ptr, size) = module.get_finalized_data(data_id);
    assert!(!ptr.is_null());
    assert_eq!(size, 0);
    let address = ptr as u64;
    on_every_cpu(|cpu| {
        // SAFETY: the function only loads an address.
        assert_eq!(
            unsafe { module.call(address_of, &[]) },
            Ok(address),
            "cpu {cpu}"
        );
    });
}

fn jit_minimal() {
    let isa = isa().unwrap();
    let mgr = manager(5);
    let mut module = JITModule::new(builder(isa, &mgr), &codespace(&mgr)).unwrap();

    let mut ctx = module.make_context();
    let mut func_ctx = FunctionBuilderContext::new();

    let mut sig_a = module.make_signature();
    sig_a.params.push(AbiParam::new(types::I32));
    sig_a.returns.push(AbiParam::new(types::I32));

    let mut sig_b = module.make_signature();
    sig_b.returns.push(AbiParam::new(types::I32));

    let func_a = module
        .declare_function("a", Linkage::Local, &sig_a)
        .unwrap();
    let func_b = module
        .declare_function("b", Linkage::Local, &sig_b)
        .unwrap();

    ctx.func.signature = sig_a;
    ctx.func.name = UserFuncName::user(0, func_a.as_u32());

    {
        let mut bcx: FunctionBuilder = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();

        bcx.switch_to_block(block);
        bcx.append_block_params_for_function_params(block);
        let param = bcx.block_params(block)[0];
        let cst = bcx.ins().iconst(types::I32, 37);
        let add = bcx.ins().iadd(cst, param);
        bcx.ins().return_(&[add]);
        bcx.seal_all_blocks();
        bcx.finalize(module.target_config());
    }
    module.define_function(func_a, &mut ctx).unwrap();
    module.clear_context(&mut ctx);

    ctx.func.signature = sig_b;
    ctx.func.name = UserFuncName::user(0, func_b.as_u32());

    {
        let mut bcx: FunctionBuilder = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();

        bcx.switch_to_block(block);
        let local_func = module.declare_func_in_func(func_a, &mut bcx.func);
        let arg = bcx.ins().iconst(types::I32, 5);
        let call = bcx.ins().call(local_func, &[arg]);
        let value = {
            let results = bcx.inst_results(call);
            assert_eq!(results.len(), 1);
            results[0]
        };
        bcx.ins().return_(&[value]);
        bcx.seal_all_blocks();
        bcx.finalize(module.target_config());
    }
    module.define_function(func_b, &mut ctx).unwrap();
    module.clear_context(&mut ctx);

    // Perform linking.
    module.finalize_definitions().unwrap();

    // Get a raw pointer to the generated code.
    let code_b = module.get_finalized_function(func_b);

    // Cast it to a rust function pointer type.
    // SAFETY: `b` is `extern "C" fn() -> u32` (System V, no arguments, an i32 result).
    let ptr_b = unsafe { core::mem::transmute::<*const u8, extern "C" fn() -> u32>(code_b) };

    // Call it! On every CPU, the upstream way and through `call`.
    on_every_cpu(|cpu| {
        let res = ptr_b();
        assert_eq!(res, 42, "cpu {cpu}");
        // SAFETY: `b` and `a` only compute.
        assert_eq!(unsafe { module.call(func_b, &[]) }, Ok(42), "cpu {cpu}");
        assert_eq!(
            // SAFETY: `a` only computes.
            unsafe { module.call(func_a, &[cpu as u64]) },
            Ok(37 + cpu as u64),
            "cpu {cpu}"
        );
    });
    // `b` calls `a` through the jump-table slot: the pointer is `b`'s slot, and `a`'s slot
    // jumps to `a`'s code.
    let code = module.code_module();
    let code_a = code.function_code(func_a.as_u32()).unwrap();
    assert!(code_a.is_some());
    assert_eq!(code.slot_target(func_a.as_u32()).unwrap(), code_a);
    assert_ne!(
        module.slot_address(func_a),
        code_a,
        "callers enter a slot, not the code"
    );
}
