//! The JIT rows of `cargo run -- bench`: compile + install throughput of Cranelift-compiled
//! functions, split into time in Cranelift and time in codespace; what a compilation needs of
//! the heap and the compile stack; and the cost of calling a compiled function through its
//! jump-table slot against calling its code directly.

use alloc::vec::Vec;

use codespace::ManagerConfig;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{Function, InstBuilder};

use super::{start, stop, Report};
use crate::code::{self, test_window, REGISTRIES};
use crate::jit::ir::{define, signature};
use crate::jit::programs::{self, FIB, FUNCTIONS, MATMUL};
use crate::jit::{self, stack, Compiler, JitConfig, JitError, JitModule, OptLevel};
use crate::{memory, println};

/// Compilations timed per row (after `WARMUP` untimed): a compilation takes milliseconds.
const REPS: usize = 200;
const WARMUP: usize = 20;
/// Calls per timed repetition of the call rows.
const CALLS: u64 = 100;
/// Index of the `add_one` function of the call rows.
const ADD_ONE: u32 = FUNCTIONS;

fn add_one() -> Result<Function, JitError> {
    define(ADD_ONE, signature(&[I64], &[I64]), |b, p| {
        let v = b.ins().iadd_imm_s(p[0], 1);
        b.ins().return_(&[v]);
    })
}

/// Median and p99 of `samples` (cycles per item), in the table's columns.
fn row(r: &Report, name: &str, mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    let ns = |c: u64| c as f64 * 1000.0 / r.ticks_per_us;
    println!(
        "  {name:<58} {median:>10} {p99:>10} {:>11.0} {:>11.0}",
        ns(median),
        ns(p99)
    );
    median
}

/// Runs the JIT rows.
pub(super) fn run(r: &Report) {
    let manager = code::manager(
        test_window(101),
        ManagerConfig {
            max_committed: 64 << 20,
            ..ManagerConfig::default()
        },
    )
    .expect("manager");
    let module = JitModule::new(
        &manager,
        &REGISTRIES,
        JitConfig {
            functions: FUNCTIONS + 1,
            host: programs::host_functions(),
            lazy_entry: None,
        },
    )
    .expect("module");
    let mut compiler = Compiler::new();
    let link = module.linkage();

    println!("\n  Cranelift JIT ({REPS} compilations after {WARMUP} warm-up ones per row)");
    type Build = fn() -> Result<Function, JitError>;
    let programs: [(&str, u32, Build); 2] = [
        ("fib (small)", FIB, programs::fib),
        ("matmul (medium)", MATMUL, programs::matmul),
    ];
    for (name, index, build) in programs {
        for opt in [OptLevel::None, OptLevel::Speed] {
            let insts = build().expect("build").dfg.num_insts();
            let (mut in_cranelift, mut in_codespace) = (Vec::new(), Vec::new());
            let mut bytes = 0;
            let mut counts = [0u64; 4];
            for i in 0..WARMUP + REPS {
                let func = build().expect("build");
                let t0 = start();
                let code = compiler.compile(func, opt, &link).expect("compile");
                let t1 = stop();
                // The version this replaces is freed outside the timed part.
                module.reclaim();
                let before = manager.flush_stats().expect("stats");
                let t2 = start();
                module.install(index, &code, None).expect("install");
                let t3 = stop();
                let after = manager.flush_stats().expect("stats");
                for (c, d) in counts.iter_mut().zip([
                    after.pokes - before.pokes,
                    after.single_pages - before.single_pages,
                    after.full - before.full,
                    after.syncs - before.syncs,
                ]) {
                    *c += d;
                }
                bytes = code.bytes().len();
                if i >= WARMUP {
                    in_cranelift.push(t1 - t0);
                    in_codespace.push(t3 - t2);
                }
            }
            let totals: Vec<u64> = in_cranelift
                .iter()
                .zip(&in_codespace)
                .map(|(a, b)| a + b)
                .collect();
            let what = alloc::format!("{name}, {insts} IR insts -> {bytes} B, opt {opt:?}");
            println!("  {what}");
            let cl = row(r, "    compile (Cranelift)", in_cranelift);
            let cs = row(
                r,
                "    install (codespace: publish, traps, slot patch)",
                in_codespace,
            );
            let per = |c: u64| c as f64 / (WARMUP + REPS) as f64;
            println!(
                "      per install: {:.1} alias sessions, {:.1} invlpg, {:.1} full flushes, {:.1} sync rounds",
                per(counts[0]),
                per(counts[1]),
                per(counts[2]),
                per(counts[3])
            );
            let total = row(r, "    compile + install", totals);
            println!(
                "    => {:.0} functions/s, {total} cycles/function, {:.1}% of it in codespace",
                r.ticks_per_us * 1e6 / total as f64,
                100.0 * cs as f64 / (cl + cs) as f64
            );
        }
    }

    // What one compilation needs: a fresh compiler each time (the context's first allocations
    // included), heap peak over what was in use before, deepest use of the compile stack.
    for (name, build) in [
        ("fib", programs::fib as fn() -> _),
        ("matmul", programs::matmul),
    ] {
        for opt in [OptLevel::None, OptLevel::Speed] {
            let func = build().expect("build");
            let mut fresh = Compiler::new();
            stack::reset_peak();
            let before = memory::reset_heap_peak();
            let code = fresh.compile(func, opt, &link).expect("compile");
            let heap = memory::heap_peak() - before;
            drop((fresh, code));
            println!(
                "  memory for one compilation of {name}, opt {opt:?}: heap peak {} KiB, compile stack {} KiB",
                heap.div_ceil(1024),
                stack::peak().div_ceil(1024)
            );
        }
    }

    // Call cost: a compiled `add_one` called 100 times per repetition, three ways.
    let code = compiler
        .compile(add_one().expect("build"), OptLevel::Speed, &link)
        .expect("compile");
    module
        .install(ADD_ONE, &code, Some("add_one"))
        .expect("install");
    let direct = module.code(ADD_ONE).expect("code");
    let slot = module.entry(ADD_ONE).expect("slot");
    println!("\n  calling a compiled add_one(x) ({CALLS} calls per repetition; cycles per call)");
    for (name, target) in [
        ("    direct call of the code", direct),
        ("    call through its jump-table slot", slot),
    ] {
        // SAFETY: `target` is add_one's code or slot: System V `(i64) -> i64`, no memory access.
        let f: extern "C" fn(u64) -> u64 = unsafe { core::mem::transmute(target) };
        let samples = (0..1000)
            .map(|_| {
                let t0 = start();
                let mut x = 0;
                for _ in 0..CALLS {
                    x = f(core::hint::black_box(x));
                }
                let t1 = stop();
                assert_eq!(x, CALLS);
                (t1 - t0) / CALLS
            })
            .collect();
        row(r, name, samples);
    }
    let samples = (0..1000)
        .map(|_| {
            let t0 = start();
            let mut x = 0;
            for _ in 0..CALLS {
                // SAFETY: add_one's slot, System V `(i64) -> i64`, compiled by the glue.
                x = unsafe { jit::enter(slot, &[core::hint::black_box(x)]) }.expect("call");
            }
            let t1 = stop();
            assert_eq!(x, CALLS);
            (t1 - t0) / CALLS
        })
        .collect();
    row(
        r,
        "    jit::enter through the slot (entry record, trap-safe)",
        samples,
    );
    drop(module);
    cranelift_module_rows(r, &manager);
    assert!(manager.audit().expect("audit").is_clean());
}

/// The same through `codespace_cranelift::JITModule` (cranelift-jit's API): redefining
/// `add_one` (hot-swap: compile in `define_function`, publish and slot patch in
/// `finalize_definitions`) and calling it with `JITModule::call` (signature check, slot, entry).
fn cranelift_module_rows(r: &Report, manager: &codespace::CodeManager<code::KernelMmu>) {
    use codespace_cranelift::{default_libcall_names, JITBuilder, JITModule, Linkage, Module};
    use cranelift_codegen::ir::{AbiParam, UserFuncName};
    use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

    let isa = jit::cranelift::module_isa().expect("isa");
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    builder.hotswap(true);
    let mut module =
        JITModule::new(builder, &jit::cranelift::codespace(manager)).expect("JITModule");
    let mut sig = module.make_signature();
    sig.params.push(AbiParam::new(I64));
    sig.returns.push(AbiParam::new(I64));
    let id = module
        .declare_function("add_one", Linkage::Export, &sig)
        .expect("declare");
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let (mut in_define, mut in_finalize) = (Vec::new(), Vec::new());
    for i in 0..WARMUP + REPS {
        module.clear_context(&mut ctx);
        ctx.func.signature = sig.clone();
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let block = b.create_block();
            b.append_block_params_for_function_params(block);
            b.switch_to_block(block);
            let p = b.block_params(block)[0];
            let v = b.ins().iadd_imm_s(p, 1);
            b.ins().return_(&[v]);
            b.seal_all_blocks();
            b.finalize(module.target_config());
        }
        if i > 0 {
            module.prepare_for_function_redefine(id).expect("prepare");
        }
        // The version this replaces is freed outside the timed part.
        module.reclaim();
        let t0 = start();
        module.define_function(id, &mut ctx).expect("define");
        let t1 = stop();
        let t2 = start();
        module.finalize_definitions().expect("finalize");
        let t3 = stop();
        if i >= WARMUP {
            in_define.push(t1 - t0);
            in_finalize.push(t3 - t2);
        }
    }
    println!(
        "
  codespace_cranelift::JITModule (cranelift-jit's API), add_one redefined {REPS} times"
    );
    row(r, "    define_function (Cranelift, opt none)", in_define);
    row(
        r,
        "    finalize_definitions (publish, traps, slot patch)",
        in_finalize,
    );
    let samples = (0..1000)
        .map(|_| {
            let t0 = start();
            let mut x = 0;
            for _ in 0..CALLS {
                // SAFETY: add_one only computes.
                x = unsafe { module.call(id, &[core::hint::black_box(x)]) }.expect("call");
            }
            let t1 = stop();
            assert_eq!(x, CALLS);
            (t1 - t0) / CALLS
        })
        .collect();
    row(
        r,
        "    JITModule::call (signature check, slot, kernel entry)",
        samples,
    );
}
