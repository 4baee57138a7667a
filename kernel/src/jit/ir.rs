//! Helpers for building IR that runs on codespace: signatures, callees in the two namespaces,
//! linear-memory addresses and counted loops, on top of `cranelift-frontend`.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{
    AbiParam, ExtFuncData, ExternalName, FuncRef, Function, InstBuilder, MemFlagsData, Signature,
    TrapCode, Type, UserExternalName, UserFuncName, Value,
};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

use super::compile::MODULE;
use super::isa::frontend_config;
use super::JitError;

/// Flags of a linear-memory access: may fault, and then it is a `HEAP_OUT_OF_BOUNDS` trap.
#[must_use]
pub fn heap() -> MemFlagsData {
    MemFlagsData::new().with_trap_code(Some(TrapCode::HEAP_OUT_OF_BOUNDS))
}

/// A System V signature.
#[must_use]
pub fn signature(params: &[Type], returns: &[Type]) -> Signature {
    let mut sig = Signature::new(CallConv::SystemV);
    sig.params.extend(params.iter().map(|&t| AbiParam::new(t)));
    sig.returns
        .extend(returns.iter().map(|&t| AbiParam::new(t)));
    sig
}

/// Builds function `index` with `sig`: `body` gets the builder and the parameters.
///
/// # Errors
/// When the ISA (its frontend configuration) cannot be built.
pub fn define(
    index: u32,
    sig: Signature,
    body: impl FnOnce(&mut FunctionBuilder<'_>, &[Value]),
) -> Result<Function, JitError> {
    let config = frontend_config()?;
    let mut func = Function::with_name_signature(UserFuncName::user(MODULE, index), sig);
    let mut ctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut ctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let params = b.block_params(entry).to_vec();
    body(&mut b, &params);
    b.finalize(config);
    Ok(func)
}

/// Declares a callee: a module function (near, through its slot) or a kernel function (far).
pub fn callee(b: &mut FunctionBuilder<'_>, namespace: u32, index: u32, sig: Signature) -> FuncRef {
    let signature = b.import_signature(sig);
    let name = b
        .func
        .declare_imported_user_function(UserExternalName::new(namespace, index));
    b.import_function(ExtFuncData {
        name: ExternalName::user(name),
        signature,
        colocated: namespace == MODULE,
        patchable: false,
    })
}

/// Address of byte `index` (any integer type, truncated to 32 bits) of the memory at `base`.
pub fn addr(b: &mut FunctionBuilder<'_>, base: Value, index: Value) -> Value {
    let ty = b.func.dfg.value_type(index);
    let index = if ty == I64 {
        b.ins().ireduce(I32, index)
    } else {
        index
    };
    let offset = b.ins().uextend(I64, index);
    b.ins().iadd(base, offset)
}

/// `for i in start..end (step) { body(i) }`, unsigned, in the type of `start`.
pub fn for_range(
    b: &mut FunctionBuilder<'_>,
    start: Value,
    end: Value,
    step: i64,
    body: impl FnOnce(&mut FunctionBuilder<'_>, Value),
) {
    let ty = b.func.dfg.value_type(start);
    let var = b.declare_var(ty);
    b.def_var(var, start);
    let (header, inner, exit) = (b.create_block(), b.create_block(), b.create_block());
    b.ins().jump(header, &[]);
    b.switch_to_block(header);
    let i = b.use_var(var);
    let more = b.ins().icmp(IntCC::UnsignedLessThan, i, end);
    b.ins().brif(more, inner, &[], exit, &[]);
    b.switch_to_block(inner);
    b.seal_block(inner);
    body(b, i);
    let next = b.ins().iadd_imm_s(i, step);
    b.def_var(var, next);
    b.ins().jump(header, &[]);
    b.seal_block(header);
    b.switch_to_block(exit);
    b.seal_block(exit);
}

/// An accumulator variable of `ty` starting at `init`.
pub fn accumulator(b: &mut FunctionBuilder<'_>, ty: Type, init: i64) -> Variable {
    let var = b.declare_var(ty);
    let zero = b.ins().iconst(ty, init);
    b.def_var(var, zero);
    var
}
