//! The configuration the host tool and the kernel must agree on, in one file that both compile
//! (the host tool includes it with `#[path]`): wasmtime checks at load that a precompiled
//! module's target, ISA flags, tunables and wasm features match the loading `Engine`, and the
//! `.cwasm` header carries [`fingerprint`] so a mismatch is caught before wasmtime sees the bytes.
//!
//! The ISA flags must also match the CPU: the kernel answers wasmtime's `detect_host_feature`
//! from CPUID, and QEMU must offer them (`-cpu qemu64,+nx` plus [`QEMU_CPU_FLAGS`]).

/// The target precompiled modules are compiled for.
pub const TARGET: &str = "x86_64-unknown-none";

/// Cranelift ISA flags enabled when precompiling: with SSE4.1 no float operation becomes a
/// libcall across the kernel's soft-float ABI (`Config::x86_float_abi_ok`). Relaxed SIMD, whose
/// fused multiply-add would need `has_fma` or a libcall, is disabled.
pub const ISA_FLAGS: &[&str] = &[
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
];

/// The CPU features QEMU must add to `qemu64` for [`ISA_FLAGS`] (`qemu64` has SSE3 already).
pub const QEMU_CPU_FLAGS: &str = "+ssse3,+sse4.1,+sse4.2,+popcnt";

/// Address space reserved per linear memory: wasmtime's 4 GiB, so 32-bit memories need no
/// explicit bounds checks (an out-of-bounds access hits unmapped space: a #PF).
pub const MEMORY_RESERVATION: u64 = 4 << 30;

/// Guard region after each linear memory (wasmtime's default for 64-bit hosts).
pub const MEMORY_GUARD: u64 = 32 << 20;

/// Extra reservation for growth of memories that do not fit [`MEMORY_RESERVATION`].
pub const MEMORY_RESERVATION_FOR_GROWTH: u64 = 2 << 30;

/// The most wasm may use of the stack it runs on; deeper recursion is wasmtime's explicit stack
/// check (a `ud2`, #UD), well before the kernel stack's guard page. Runtime-only (not in the
/// fingerprint): the kernel's stacks are 64 KiB (application processors) and 256 KiB (boot).
pub const MAX_WASM_STACK: usize = 32 << 10;

/// The wasmtime version both sides pin.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Applies every setting shared by both sides to `config`: wasm features, tunables, traps.
pub fn apply_shared(config: &mut wasmtime::Config) {
    // Threads, GC and the component model are not compiled in (wasmtime features `threads`,
    // `gc`, `component-model` off on both sides), so they are off.
    config
        .wasm_relaxed_simd(false)
        .signals_based_traps(true)
        .memory_init_cow(false)
        .memory_reservation(MEMORY_RESERVATION)
        .memory_guard_size(MEMORY_GUARD)
        .memory_reservation_for_growth(MEMORY_RESERVATION_FOR_GROWTH)
        .max_wasm_stack(MAX_WASM_STACK);
    // SAFETY: modules are compiled with ISA_FLAGS, which include SSE4.1: no float libcall
    // crosses between compiled code and the soft-float kernel; host calls pass values in memory.
    unsafe {
        config.x86_float_abi_ok(true);
    }
}

/// FNV-1a, 64 bits: the header's checksums (corruption detection, not authentication).
#[must_use]
pub fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// FNV-1a's offset basis.
pub const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// A digest of everything above that the compiled code depends on.
#[must_use]
pub fn fingerprint() -> u64 {
    let mut h = fnv1a(FNV_BASIS, WASMTIME_VERSION.as_bytes());
    h = fnv1a(h, TARGET.as_bytes());
    for flag in ISA_FLAGS {
        h = fnv1a(h, flag.as_bytes());
        h = fnv1a(h, b",");
    }
    for v in [
        MEMORY_RESERVATION,
        MEMORY_GUARD,
        MEMORY_RESERVATION_FOR_GROWTH,
    ] {
        h = fnv1a(h, &v.to_le_bytes());
    }
    h
}
