//! Real programs as Cranelift IR, built with `cranelift-frontend`, and the Rust functions they
//! are checked against. Every load and store goes to the linear memory as
//! `base + zero-extended 32-bit index` with the `HEAP_OUT_OF_BOUNDS` trap code and no bounds
//! check: the guard pages are the bounds check.
//!
//! Source locations are statement numbers of each program (`SourceLoc`), so a trap reports where
//! in the program it happened.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64, I8};
use cranelift_codegen::ir::{FuncRef, Function, InstBuilder, SourceLoc, Value};
use cranelift_frontend::FunctionBuilder;
use spin::Once;

use super::compile::{HostFunction, HOST, MODULE};
use super::ir::{accumulator, addr, callee, define, for_range, heap, signature};
use super::isa::OptLevel;
use super::lazy::FunctionSource;
use super::JitError;

/// `fib(n: i64) -> i64`, recursive through its own jump-table slot.
pub const FIB: u32 = 0;
/// `sieve(mem, n: i32) -> i32`: primes below `n`, one byte per number at `mem[0..n]`.
pub const SIEVE: u32 = 1;
/// `crc32(mem, at: i32, len: i32) -> i32`: CRC-32 (IEEE) of `mem[at..at + len]`.
pub const CRC32: u32 = 2;
/// `matmul(mem, a: i32, b: i32, c: i32, n: i32) -> i32`: `C = A × B` for n×n `i32` matrices at
/// byte offsets a, b, c (wrapping); returns the sum of C's elements.
pub const MATMUL: u32 = 3;
/// `load(mem, index: i32) -> i32`: the `u32` at byte `index`; traps past the memory.
pub const LOAD: u32 = 4;
/// `load_plus_one(mem, index: i32) -> i32`: `load(mem, index) + 1`, calling `load` through its
/// slot (a trap unwinds two generated frames).
pub const LOAD_PLUS_ONE: u32 = 5;
/// `mix(x: i64, n: i64) -> i64`: applies the kernel's `host_mix` n times (calls into the kernel).
pub const MIX: u32 = 6;
/// `counted_fib(mem, n: i64) -> i64`: fib through its own slot, counting its calls in the `u32`
/// at `mem[4 × tier]` (tier 0: `OptLevel::None`, 1: `Speed`) — a tiering JIT's call counter.
pub const COUNTED_FIB: u32 = 7;
/// Functions in the program module.
pub const FUNCTIONS: u32 = 8;

/// The programs, by index, for lazy compilation (at `OptLevel::None`).
pub static SOURCES: [FunctionSource; FUNCTIONS as usize] = [
    FunctionSource {
        name: "fib",
        params: 1,
        build: fib,
    },
    FunctionSource {
        name: "sieve",
        params: 2,
        build: sieve,
    },
    FunctionSource {
        name: "crc32",
        params: 3,
        build: crc32,
    },
    FunctionSource {
        name: "matmul",
        params: 5,
        build: matmul,
    },
    FunctionSource {
        name: "load",
        params: 2,
        build: load,
    },
    FunctionSource {
        name: "load_plus_one",
        params: 2,
        build: load_plus_one,
    },
    FunctionSource {
        name: "mix",
        params: 2,
        build: mix,
    },
    FunctionSource {
        name: "counted_fib",
        params: 2,
        build: counted_fib_baseline,
    },
];

/// The kernel functions the programs call (namespace `HOST`): index 0 is [`host_mix`].
#[must_use]
pub fn host_functions() -> &'static [HostFunction] {
    static HOST_TABLE: Once<[HostFunction; 1]> = Once::new();
    HOST_TABLE.call_once(|| {
        [HostFunction {
            name: "host_mix",
            address: host_mix as *const () as usize,
        }]
    })
}

/// A kernel function generated code calls: one xorshift-multiply step.
pub extern "C" fn host_mix(x: u64) -> u64 {
    let x = x ^ (x << 13);
    let x = x ^ (x >> 7);
    (x ^ (x << 17)).wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Builds [`FIB`].
///
/// # Errors
/// When the ISA cannot be built.
pub fn fib() -> Result<Function, JitError> {
    define(FIB, signature(&[I64], &[I64]), |b, p| {
        let n = p[0];
        let f = callee(b, MODULE, FIB, signature(&[I64], &[I64]));
        fib_body(b, f, n, &[]);
    })
}

/// `if n < 2 { n } else { f(extra.., n - 1) + f(extra.., n - 2) }`
fn fib_body(b: &mut FunctionBuilder<'_>, f: FuncRef, n: Value, extra: &[Value]) {
    let (base_case, recurse) = (b.create_block(), b.create_block());
    b.set_srcloc(SourceLoc::new(1));
    let small = b.ins().icmp_imm_s(IntCC::SignedLessThan, n, 2);
    b.ins().brif(small, base_case, &[], recurse, &[]);
    b.switch_to_block(base_case);
    b.seal_block(base_case);
    b.ins().return_(&[n]);
    b.switch_to_block(recurse);
    b.seal_block(recurse);
    b.set_srcloc(SourceLoc::new(2));
    let mut sum = None;
    for k in [1, 2] {
        let arg = b.ins().iadd_imm_s(n, -k);
        let args: alloc::vec::Vec<Value> = extra.iter().copied().chain([arg]).collect();
        let call = b.ins().call(f, &args);
        let r = b.inst_results(call)[0];
        sum = Some(sum.map_or(r, |s| b.ins().iadd(s, r)));
    }
    let sum = sum.unwrap_or(n);
    b.ins().return_(&[sum]);
}

/// Builds [`SIEVE`].
///
/// # Errors
/// When the ISA cannot be built.
pub fn sieve() -> Result<Function, JitError> {
    define(SIEVE, signature(&[I64, I32], &[I32]), |b, p| {
        let (mem, n) = (p[0], b.ins().uextend(I64, p[1]));
        let zero = b.ins().iconst(I64, 0);
        b.set_srcloc(SourceLoc::new(1));
        for_range(b, zero, n, 1, |b, i| {
            let prime = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, i, 2);
            let at = addr(b, mem, i);
            b.ins().store(heap(), prime, at, 0);
        });
        let two = b.ins().iconst(I64, 2);
        b.set_srcloc(SourceLoc::new(2));
        for_range(b, two, n, 1, |b, i| {
            let square = b.ins().imul(i, i);
            let at = addr(b, mem, i);
            let flag = b.ins().uload8(I32, heap(), at, 0);
            let below = b.ins().icmp(IntCC::UnsignedLessThan, square, n);
            let marked = b.ins().icmp_imm_u(IntCC::NotEqual, flag, 0);
            let strike = b.ins().band(below, marked);
            let (cross, done) = (b.create_block(), b.create_block());
            b.ins().brif(strike, cross, &[], done, &[]);
            b.switch_to_block(cross);
            b.seal_block(cross);
            b.set_srcloc(SourceLoc::new(3));
            // Multiples of i from i²: the step is a variable, so the loop is written out.
            let j = b.declare_var(I64);
            b.def_var(j, square);
            let (header, inner) = (b.create_block(), b.create_block());
            b.ins().jump(header, &[]);
            b.switch_to_block(header);
            let jv = b.use_var(j);
            let more = b.ins().icmp(IntCC::UnsignedLessThan, jv, n);
            b.ins().brif(more, inner, &[], done, &[]);
            b.switch_to_block(inner);
            b.seal_block(inner);
            let at = addr(b, mem, jv);
            let no = b.ins().iconst(I8, 0);
            b.ins().store(heap(), no, at, 0);
            let next = b.ins().iadd(jv, i);
            b.def_var(j, next);
            b.ins().jump(header, &[]);
            b.seal_block(header);
            b.switch_to_block(done);
            b.seal_block(done);
        });
        let count = accumulator(b, I32, 0);
        b.set_srcloc(SourceLoc::new(4));
        for_range(b, zero, n, 1, |b, i| {
            let at = addr(b, mem, i);
            let flag = b.ins().uload8(I32, heap(), at, 0);
            let c = b.use_var(count);
            let c = b.ins().iadd(c, flag);
            b.def_var(count, c);
        });
        let c = b.use_var(count);
        b.ins().return_(&[c]);
    })
}

/// Builds [`CRC32`] (bitwise, reflected polynomial 0xEDB88320).
///
/// # Errors
/// When the ISA cannot be built.
pub fn crc32() -> Result<Function, JitError> {
    define(CRC32, signature(&[I64, I32, I32], &[I32]), |b, p| {
        let (mem, at, len) = (p[0], p[1], p[2]);
        let crc = accumulator(b, I32, 0xFFFF_FFFF);
        let zero = b.ins().iconst(I32, 0);
        b.set_srcloc(SourceLoc::new(1));
        for_range(b, zero, len, 1, |b, i| {
            let index = b.ins().iadd(at, i);
            let a = addr(b, mem, index);
            let byte = b.ins().uload8(I32, heap(), a, 0);
            let c = b.use_var(crc);
            let c = b.ins().bxor(c, byte);
            b.def_var(crc, c);
            let zero = b.ins().iconst(I32, 0);
            let eight = b.ins().iconst(I32, 8);
            b.set_srcloc(SourceLoc::new(2));
            for_range(b, zero, eight, 1, |b, _| {
                let c = b.use_var(crc);
                let low = b.ins().band_imm_u(c, 1);
                let mask = b.ins().ineg(low);
                let poly = b.ins().band_imm_u(mask, 0xEDB8_8320);
                let shifted = b.ins().ushr_imm_u(c, 1);
                let c = b.ins().bxor(shifted, poly);
                b.def_var(crc, c);
            });
        });
        let c = b.use_var(crc);
        let c = b.ins().bnot(c);
        b.ins().return_(&[c]);
    })
}

/// Builds [`MATMUL`].
///
/// # Errors
/// When the ISA cannot be built.
pub fn matmul() -> Result<Function, JitError> {
    define(
        MATMUL,
        signature(&[I64, I32, I32, I32, I32], &[I32]),
        |b, p| {
            let (mem, ma, mb, mc, n) = (p[0], p[1], p[2], p[3], p[4]);
            let sum = accumulator(b, I32, 0);
            let zero = b.ins().iconst(I32, 0);
            // Byte address of element (row, col) of the matrix at `m`.
            let element = |b: &mut FunctionBuilder<'_>, m: Value, row: Value, col: Value| {
                let k = b.ins().imul(row, n);
                let k = b.ins().iadd(k, col);
                let bytes = b.ins().ishl_imm_u(k, 2);
                let index = b.ins().iadd(m, bytes);
                addr(b, mem, index)
            };
            for_range(b, zero, n, 1, |b, i| {
                for_range(b, zero, n, 1, |b, j| {
                    let acc = accumulator(b, I32, 0);
                    b.set_srcloc(SourceLoc::new(1));
                    for_range(b, zero, n, 1, |b, k| {
                        let x = element(b, ma, i, k);
                        let x = b.ins().load(I32, heap(), x, 0);
                        let y = element(b, mb, k, j);
                        let y = b.ins().load(I32, heap(), y, 0);
                        let xy = b.ins().imul(x, y);
                        let a = b.use_var(acc);
                        let a = b.ins().iadd(a, xy);
                        b.def_var(acc, a);
                    });
                    b.set_srcloc(SourceLoc::new(2));
                    let a = b.use_var(acc);
                    let at = element(b, mc, i, j);
                    b.ins().store(heap(), a, at, 0);
                    let s = b.use_var(sum);
                    let s = b.ins().iadd(s, a);
                    b.def_var(sum, s);
                });
            });
            let s = b.use_var(sum);
            b.ins().return_(&[s]);
        },
    )
}

/// Builds [`LOAD`].
///
/// # Errors
/// When the ISA cannot be built.
pub fn load() -> Result<Function, JitError> {
    define(LOAD, signature(&[I64, I32], &[I32]), |b, p| {
        b.set_srcloc(SourceLoc::new(1));
        let at = addr(b, p[0], p[1]);
        let v = b.ins().load(I32, heap(), at, 0);
        b.ins().return_(&[v]);
    })
}

/// Builds [`LOAD_PLUS_ONE`].
///
/// # Errors
/// When the ISA cannot be built.
pub fn load_plus_one() -> Result<Function, JitError> {
    define(LOAD_PLUS_ONE, signature(&[I64, I32], &[I32]), |b, p| {
        let f = callee(b, MODULE, LOAD, signature(&[I64, I32], &[I32]));
        b.set_srcloc(SourceLoc::new(1));
        let call = b.ins().call(f, &[p[0], p[1]]);
        let v = b.inst_results(call)[0];
        let v = b.ins().iadd_imm_s(v, 1);
        b.ins().return_(&[v]);
    })
}

/// Builds [`MIX`].
///
/// # Errors
/// When the ISA cannot be built.
pub fn mix() -> Result<Function, JitError> {
    define(MIX, signature(&[I64, I64], &[I64]), |b, p| {
        let f = callee(b, HOST, 0, signature(&[I64], &[I64]));
        let x = accumulator(b, I64, 0);
        b.def_var(x, p[0]);
        let zero = b.ins().iconst(I64, 0);
        for_range(b, zero, p[1], 1, |b, _| {
            let v = b.use_var(x);
            let call = b.ins().call(f, &[v]);
            let v = b.inst_results(call)[0];
            b.def_var(x, v);
        });
        let v = b.use_var(x);
        b.ins().return_(&[v]);
    })
}

/// Builds [`COUNTED_FIB`] for the tier compiled at `opt`.
///
/// # Errors
/// When the ISA cannot be built.
pub fn counted_fib(opt: OptLevel) -> Result<Function, JitError> {
    let counter = match opt {
        OptLevel::None => 0,
        OptLevel::Speed => 4,
    };
    define(COUNTED_FIB, signature(&[I64, I64], &[I64]), |b, p| {
        let (mem, n) = (p[0], p[1]);
        let f = callee(b, MODULE, COUNTED_FIB, signature(&[I64, I64], &[I64]));
        let at = b.ins().iconst(I32, counter);
        let at = addr(b, mem, at);
        let count = b.ins().load(I32, heap(), at, 0);
        let count = b.ins().iadd_imm_s(count, 1);
        b.ins().store(heap(), count, at, 0);
        fib_body(b, f, n, &[mem]);
    })
}

fn counted_fib_baseline() -> Result<Function, JitError> {
    counted_fib(OptLevel::None)
}

/// Rust reference of [`FIB`].
#[must_use]
pub fn fib_ref(n: i64) -> i64 {
    if n < 2 {
        n
    } else {
        fib_ref(n - 1) + fib_ref(n - 2)
    }
}

/// Rust reference of [`SIEVE`]: primes below `n`.
#[must_use]
pub fn sieve_ref(n: u32) -> u32 {
    let n = n as usize;
    let mut prime = alloc::vec![true; n];
    let mut count = 0;
    for i in 2..n {
        if prime[i] {
            count += 1;
            for j in (i * i..n).step_by(i) {
                prime[j] = false;
            }
        }
    }
    count
}

/// Rust reference of [`CRC32`].
#[must_use]
pub fn crc32_ref(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Rust reference of [`MATMUL`]: `C = A × B` (wrapping), row-major n×n.
#[must_use]
pub fn matmul_ref(a: &[i32], b: &[i32], n: usize) -> alloc::vec::Vec<i32> {
    let mut c = alloc::vec![0i32; n * n];
    for i in 0..n {
        for j in 0..n {
            c[i * n + j] = (0..n).fold(0i32, |acc, k| {
                acc.wrapping_add(a[i * n + k].wrapping_mul(b[k * n + j]))
            });
        }
    }
    c
}

/// Rust reference of [`MIX`].
#[must_use]
pub fn mix_ref(x: u64, n: u64) -> u64 {
    (0..n).fold(x, |x, _| host_mix(x))
}
