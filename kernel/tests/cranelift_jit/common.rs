//! What the ported tests share: a manager per test, running on every CPU, the kernel symbols
//! generated code imports.

use alloc::alloc::{alloc, Layout};
use core::sync::atomic::AtomicUsize;

use codespace::{CodeManager, ManagerConfig};
use codespace_cranelift::{DataId, FuncId, JITModule, Linkage, Module};
use codespace_kernel::code::{self, test_window, KernelMmu};
use codespace_kernel::cpu::percpu::{current_cpu, MAX_CPUS};
use codespace_kernel::smp;
use cranelift_codegen::ir::{AbiParam, InstBuilder, UserFuncName};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};

/// A manager over code-window slice `window` of its own.
pub fn manager(window: usize) -> CodeManager<KernelMmu> {
    code::manager(test_window(window), ManagerConfig::default()).expect("manager")
}

/// Runs `f` on every online CPU at once (interrupts on: codespace waits for contended locks),
/// and fails on the first CPU whose `f` failed.
pub fn on_every_cpu(f: impl Fn(usize) + Sync) {
    let enabled = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::enable();
    let result = smp::on_each_cpu(|cpu| {
        x86_64::instructions::interrupts::enable();
        f(cpu);
    });
    if !enabled {
        x86_64::instructions::interrupts::disable();
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Bytes `test_malloc` hands out, whatever was asked for (the test asks for 10).
pub const MALLOC_SIZE: usize = 16;

/// The block each CPU's last `test_malloc` returned.
pub static MALLOCS: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

pub fn malloc_layout() -> Layout {
    Layout::from_size_align(MALLOC_SIZE, 16).expect("layout")
}

/// `malloc` for generated code: [`MALLOC_SIZE`] bytes of 0xAA, recorded per CPU.
pub extern "C" fn test_malloc(_size: usize) -> *mut u8 {
    // SAFETY: the layout has a non-zero size.
    let block = unsafe { alloc(malloc_layout()) };
    if !block.is_null() {
        // SAFETY: freshly allocated, MALLOC_SIZE bytes.
        unsafe { block.write_bytes(0xAA, MALLOC_SIZE) };
    }
    MALLOCS[current_cpu()].store(block as usize, core::sync::atomic::Ordering::SeqCst);
    block
}

/// The kernel's `memset` (compiler-builtins').
pub fn kernel_memset() -> *const u8 {
    extern "C" {
        fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8;
    }
    memset as *const u8
}

/// Declares and defines `name`: a function returning data object `data`'s address.
pub fn address_function(module: &mut JITModule<KernelMmu>, data: DataId, name: &str) -> FuncId {
    let ptr = module.target_config().pointer_type();
    let mut sig = module.make_signature();
    sig.returns.push(AbiParam::new(ptr));
    let id = module
        .declare_function(name, Linkage::Local, &sig)
        .expect("declare");
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    let mut func_ctx = FunctionBuilderContext::new();
    {
        let mut bcx = FunctionBuilder::new(&mut ctx.func, &mut func_ctx);
        let block = bcx.create_block();
        bcx.switch_to_block(block);
        let gv = module.declare_data_in_func(data, bcx.func);
        let addr = bcx.ins().symbol_value(ptr, gv);
        bcx.ins().return_(&[addr]);
        bcx.seal_all_blocks();
        bcx.finalize(module.target_config());
    }
    module.define_function(id, &mut ctx).expect("define");
    id
}
