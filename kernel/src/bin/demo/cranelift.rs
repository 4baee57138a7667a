//! The tour's Cranelift step: a function compiled in the kernel, its IR and machine code, a
//! call through its jump-table slot, and an out-of-bounds access landing back in the caller.

use alloc::string::{String, ToString};

use codespace::CodeManager;
use codespace_kernel::code::{self, KernelMmu, REGISTRIES};
use codespace_kernel::jit::programs::{self, fib_ref, FIB, LOAD, LOAD_PLUS_ONE};
use codespace_kernel::jit::{Compiler, JitConfig, JitError, JitModule, LinearMemory, OptLevel};
use codespace_kernel::println;

/// Compiles fib, load and load_plus_one into a module of `manager` and runs them.
pub fn tour(manager: &CodeManager<KernelMmu>) -> Result<(), String> {
    let err = |e: JitError| e.to_string();
    let module = JitModule::new(
        manager,
        &REGISTRIES,
        JitConfig {
            functions: programs::FUNCTIONS,
            host: programs::host_functions(),
            lazy_entry: None,
        },
    )
    .map_err(err)?;
    let mut compiler = Compiler::new();
    let fib = programs::fib().map_err(err)?;
    println!("    Cranelift IR of fib (calls itself as u0:0, i.e. through slot 0):");
    for line in fib.display().to_string().lines() {
        println!("      {line}");
    }
    let code = compiler
        .compile(fib, OptLevel::Speed, &module.linkage())
        .map_err(err)?;
    let object = module.install(FIB, &code, Some("fib")).map_err(err)?;
    println!(
        "    compiled in the kernel for x86_64-unknown-none (opt speed): {} bytes, \
         relocations {:?}",
        code.code_size(),
        code.relocations()
    );
    super::print_code(manager, &object);
    let slot = module.entry(FIB).ok_or("no slot")?;
    let r = module.call(FIB, &[25]).map_err(err)?;
    println!(
        "    fib(25) through slot {slot:#x} = {r} (Rust reference: {})",
        fib_ref(25)
    );

    for (index, build, name) in [
        (LOAD, programs::load as fn() -> _, "load"),
        (LOAD_PLUS_ONE, programs::load_plus_one, "load_plus_one"),
    ] {
        let code = compiler
            .compile(build().map_err(err)?, OptLevel::None, &module.linkage())
            .map_err(err)?;
        let object = module.install(index, &code, Some(name)).map_err(err)?;
        if index == LOAD {
            println!("    load(mem, index): one protected load, then the landing pad (jmp to the kernel's trap stub):");
            super::print_code(manager, &object);
        }
    }
    let mut memory = LinearMemory::new(64 << 10).map_err(err)?;
    memory.write_u32(0x40, 41).map_err(err)?;
    let (lo, hi) = memory.reservation();
    println!(
        "    linear memory: 64 KiB mapped at {:#x} in an 8 GiB reservation {lo:#x}..{hi:#x}",
        memory.base()
    );
    let r = module
        .call_with_memory(LOAD_PLUS_ONE, &mut memory, &[0x40])
        .map_err(err)?;
    println!("    load_plus_one(0x40) = {r}");
    match module.call_with_memory(LOAD_PLUS_ONE, &mut memory, &[0x10000]) {
        Err(JitError::Trapped(trap)) => {
            let trap_record = code::last_trap().ok_or("no trap recorded")?;
            let hit = REGISTRIES
                .lookup_code(trap_record.pc as usize)
                .ok_or("faulting pc not in code map")?;
            let offset = trap_record.pc as usize - hit.instruction_start();
            println!(
                "    load_plus_one(0x10000): {trap}\n      = {}+{offset:#x} (source statement {:?}), \
                 the guard page past the memory; the landing pad unwound load and load_plus_one \
                 and jit::enter returned the trap to this caller",
                hit.debug_name(),
                hit.source_position_before(offset as u32)
            );
        }
        other => return Err(alloc::format!("expected a trap, got {other:?}")),
    }
    drop(module);
    cranelift_jit_api(manager)
}

/// cranelift-jit's `jit-minimal`, ported to `codespace_cranelift::JITModule`: `b` calls `a`
/// (`a(x) = x + 37`) through `a`'s slot, and the finalized `b` runs through `JITModule::call`.
fn cranelift_jit_api(manager: &CodeManager<KernelMmu>) -> Result<(), String> {
    use codespace_cranelift::{default_libcall_names, JITBuilder, JITModule, Linkage, Module};
    use codespace_kernel::jit::cranelift::{codespace, module_isa};
    use cranelift_codegen::ir::{types, AbiParam, InstBuilder, UserFuncName};
    use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

    let err = |e: &dyn core::fmt::Display| e.to_string();
    let isa = module_isa().map_err(|e| err(&e))?;
    let builder = JITBuilder::with_isa(isa, default_libcall_names());
    let mut module = JITModule::new(builder, &codespace(manager)).map_err(|e| err(&e))?;
    let mut sig_a = module.make_signature();
    sig_a.params.push(AbiParam::new(types::I32));
    sig_a.returns.push(AbiParam::new(types::I32));
    let mut sig_b = module.make_signature();
    sig_b.returns.push(AbiParam::new(types::I32));
    let a = module
        .declare_function("a", Linkage::Local, &sig_a)
        .map_err(|e| err(&e))?;
    let b = module
        .declare_function("b", Linkage::Local, &sig_b)
        .map_err(|e| err(&e))?;
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    for (id, sig) in [(a, sig_a), (b, sig_b)] {
        module.clear_context(&mut ctx);
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        let mut bcx = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let block = bcx.create_block();
        bcx.append_block_params_for_function_params(block);
        bcx.switch_to_block(block);
        let value = if id == a {
            let param = bcx.block_params(block)[0];
            bcx.ins().iadd_imm_s(param, 37)
        } else {
            let callee = module.declare_func_in_func(a, bcx.func);
            let five = bcx.ins().iconst(types::I32, 5);
            let call = bcx.ins().call(callee, &[five]);
            bcx.inst_results(call)[0]
        };
        bcx.ins().return_(&[value]);
        bcx.seal_all_blocks();
        bcx.finalize(module.target_config());
        module.define_function(id, &mut ctx).map_err(|e| err(&e))?;
    }
    module.finalize_definitions().map_err(|e| err(&e))?;
    // SAFETY: `b` and `a` only compute.
    let r = unsafe { module.call(b, &[]) }.map_err(|e| err(&e))?;
    println!(
        "    cranelift-jit's jit-minimal on codespace_cranelift::JITModule: b() = a(5) = {r}, \
         b entered at its slot {:#x}",
        module.get_finalized_function(b) as usize
    );
    if r != 42 {
        return Err(alloc::format!("jit-minimal gave {r}, expected 42"));
    }
    Ok(())
}
