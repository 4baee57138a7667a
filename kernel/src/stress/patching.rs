//! Jump-table patching under calls (the shape of V8's `JumpTablePatchingStress`): CPU 0 points
//! one slot at four implementations in turn with `patch_slot` while every other CPU calls
//! through the slot and reads its 8 bytes with plain aligned loads.
//!
//! What must hold, on every CPU, for every call and every read:
//! - a call returns one implementation's value and a read is one complete slot encoding (a
//!   `jmp rel32` to one implementation) — never a mix of two (a torn store);
//! - after `patch_slot` number `p` returned (CPU 0 then publishes `p`), no CPU calls or reads
//!   an older target: a CPU that read `p` before its call gets the target of a patch `>= p`.
//!
//! The implementations are chosen so that a torn 8-byte store is visible: two live in a module
//! placed *below* the patched module's jump table (negative rel32, high byte `0xFF`), two in
//! the patched module *above* it (small positive rel32, high byte `0x00`), and the patches
//! alternate between the two groups, so both 4-byte halves of the slot change with every patch
//! (checked at set-up: no half-old, half-new value is a valid encoding).
//!
//! [`run_with`] takes the manager's patch protocol. Under [`PatchProtocol::Int3`] a read may
//! also see a patch in progress: INT3 over the first byte with the old or the new slot's other
//! bytes (it counts as the implementation those bytes jump to), and a call that hits the INT3
//! goes through the #BP hook to the new target ([`PatchingStats::breakpoint_resumes`]).

use alloc::format;
use core::sync::atomic::{AtomicU64, Ordering};

use codespace::code_object::CodeKind;
use codespace::jump_table;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use codespace::{ManagerConfig, PatchProtocol};

use super::common::{self, call0, load_u64, ret_const, settle, Phase, Stop};
use crate::code::{self, REGISTRIES};
use crate::smp;

/// What the implementations return.
const VALUES: [u32; 4] = [0x1111_0000, 0x2222_0000, 0x3333_0000, 0x4444_0000];
/// Patch `i` targets implementation `ORDER[i % 4]`: upper, lower, upper, lower.
const ORDER: [usize; 4] = [0, 2, 1, 3];

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct PatchingStats {
    /// `patch_slot` calls.
    pub patches: u64,
    /// Calls through the slot (all CPUs).
    pub calls: u64,
    /// Aligned 8-byte reads of the slot by other CPUs.
    pub reads: u64,
    /// Calls and reads whose recency could not be checked (so many patches happened meanwhile
    /// that every implementation was a possible target).
    pub unchecked: u64,
    /// Calls that returned each implementation's value.
    pub per_impl: [u64; 4],
    /// Reads that saw a patch in progress (INT3 over the first byte; INT3 protocol only).
    pub int3_reads: u64,
    /// Calls that hit the INT3 of a patch in progress and were resumed by the #BP hook (all
    /// CPUs, counted by the kernel's hook; INT3 protocol only).
    pub breakpoint_resumes: u64,
}

/// Which implementation a result of patch window `[p, p2 + 1]` may be; `None` when all may.
fn possible(p: u64, p2: u64) -> Option<[bool; 4]> {
    if p2 + 1 - p >= 3 {
        return None;
    }
    let mut ok = [false; 4];
    for q in p..=p2 + 1 {
        ok[ORDER[(q % 4) as usize]] = true;
    }
    Some(ok)
}

/// Runs `patches` patches on code-window slice `window` while the other CPUs call and read,
/// with the default patch protocol.
///
/// # Panics
/// On any violation (see the module docs), naming the CPU.
pub fn run(window: usize, patches: u64) -> PatchingStats {
    run_with(window, patches, PatchProtocol::AtomicStore)
}

/// [`run`] with the manager patching slots per `protocol`.
///
/// # Panics
/// As [`run`].
pub fn run_with(window: usize, patches: u64, protocol: PatchProtocol) -> PatchingStats {
    let config = ManagerConfig {
        patch_protocol: protocol,
        ..ManagerConfig::default()
    };
    let mgr = code::manager(code::test_window(window), config).expect("a code manager");
    let resumes_before = code::breakpoint_resumes();
    // The lower module first: its code space takes the start of the window slice.
    let lower = CodeModule::new(
        &mgr,
        &REGISTRIES,
        code::module_config(&mgr, ModuleConfig::default()),
    )
    .expect("module");
    let low: [usize; 2] = [2, 3].map(|i| {
        lower
            .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(VALUES[i])))
            .expect("lower implementation")
            .instruction_start()
    });
    let m = common::one_function_module(&mgr);
    let high: [usize; 2] = [0, 1].map(|i| {
        m.add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(VALUES[i])))
            .expect("upper implementation")
            .instruction_start()
    });
    let targets = [high[0], high[1], low[0], low[1]];
    for &t in &low {
        // SAFETY: `lower` frees none of its code and is dropped after `m` (at the end, once
        // the other CPUs stopped calling); its stubs are `ret_const` functions, callable like
        // `m`'s own.
        unsafe { m.register_external(t) }.expect("external target");
    }
    let slot = m.jump_tables().expect("tables")[0]
        .near_slot_addr(0)
        .expect("slot 0");
    let encodings = targets.map(|t| jump_table::near_slot(slot, t).expect("in rel32 reach"));
    check_tears_are_visible(&encodings);
    m.patch_slot(0, targets[ORDER[0]]).expect("first patch");

    // Patches that returned (memory) and that returned and settled under TCG (execution).
    let memory_published = AtomicU64::new(0);
    let published = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    let int3_reads = AtomicU64::new(0);
    let unchecked = AtomicU64::new(0);
    let per_impl: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
    let ready = Phase::new();
    let stop = Stop::new();
    let n = smp::online_cpus();
    let impl_of_value = |v: u64| VALUES.iter().position(|&x| u64::from(x) == v);
    let impl_of_bytes = |b: u64| encodings.iter().position(|&e| e == b);
    let int3 = matches!(protocol, PatchProtocol::Int3(_));

    // Whether implementation `k`, seen by a CPU between publications `p` and `p2`, is recent.
    let check =
        |k: usize, p: u64, p2: u64, what: &dyn Fn() -> alloc::string::String| match possible(p, p2)
        {
            None => {
                unchecked.fetch_add(1, Ordering::Relaxed);
            }
            Some(ok) => assert!(
                ok[k],
                "cpu {}: {} — implementation {k}, but patch {p} (to implementation {}) had \
                 returned before and at most patch {} was under way: a stale target",
                smp::current_cpu(),
                what(),
                ORDER[(p % 4) as usize],
                p2 + 1
            ),
        };

    common::on_each_cpu(|cpu| {
        if cpu == 0 {
            if n > 1 && !common::wait_until(|| ready.get() >= n as u32 - 1) {
                stop.stop();
                panic!(
                    "cpu 0: the callers never started ({} of {})",
                    ready.get(),
                    n - 1
                );
            }
            for i in 1..=patches {
                let before = calls.load(Ordering::SeqCst);
                let target = ORDER[(i % 4) as usize];
                m.patch_slot(0, targets[target]).expect("patch_slot");
                memory_published.store(i, Ordering::SeqCst);
                common::settle_slot(&m, 0);
                published.store(i, Ordering::SeqCst);
                if n == 1 {
                    // One CPU: the patcher checks right after each patch.
                    let v = call0(slot);
                    assert_eq!(impl_of_value(v), Some(target), "call after patch {i}");
                    assert_eq!(load_u64(slot), encodings[target], "slot after patch {i}");
                    calls.fetch_add(1, Ordering::Relaxed);
                    reads.fetch_add(1, Ordering::Relaxed);
                    per_impl[target].fetch_add(1, Ordering::Relaxed);
                } else {
                    // Let the callers run between patches, whatever the host's scheduling.
                    if !common::wait_until(|| calls.load(Ordering::SeqCst) != before) {
                        stop.stop();
                        panic!("cpu 0: no call through the slot after patch {i}");
                    }
                }
            }
            stop.stop();
            return;
        }
        let mut first = true;
        while !stop.stopped() {
            for _ in 0..4 {
                let p = memory_published.load(Ordering::SeqCst);
                let bytes = load_u64(slot);
                let p2 = memory_published.load(Ordering::SeqCst);
                // INT3 protocol: INT3 over the first byte, the rest of the old or new slot.
                let in_progress = int3 && bytes & 0xFF == 0xCC;
                let whole = if in_progress {
                    int3_reads.fetch_add(1, Ordering::Relaxed);
                    (bytes & !0xFF) | 0xE9
                } else {
                    bytes
                };
                let Some(k) = impl_of_bytes(whole) else {
                    panic!(
                        "cpu {cpu}: read slot bytes {bytes:#018x}, which jump to no \
                         implementation (valid: {encodings:#018x?}): a torn or stray store"
                    );
                };
                check(k, p, p2, &|| format!("read slot bytes {bytes:#018x}"));
                reads.fetch_add(1, Ordering::Relaxed);
            }
            let p = published.load(Ordering::SeqCst);
            let v = call0(slot);
            let p2 = published.load(Ordering::SeqCst);
            let Some(k) = impl_of_value(v) else {
                panic!(
                    "cpu {cpu}: a call through the slot returned {v:#x}, no implementation's value"
                );
            };
            check(k, p, p2, &|| {
                let now = load_u64(slot);
                format!(
                    "a call returned {v:#x} (the slot's bytes now: {now:#018x}, implementation \
                     {:?})",
                    impl_of_bytes(now)
                )
            });
            per_impl[k].fetch_add(1, Ordering::Relaxed);
            calls.fetch_add(1, Ordering::SeqCst);
            if first {
                first = false;
                ready.arrive();
            }
        }
    });

    let stats = PatchingStats {
        patches,
        calls: calls.load(Ordering::SeqCst),
        reads: reads.load(Ordering::SeqCst),
        unchecked: unchecked.load(Ordering::SeqCst),
        per_impl: per_impl.each_ref().map(|c| c.load(Ordering::SeqCst)),
        int3_reads: int3_reads.load(Ordering::SeqCst),
        breakpoint_resumes: code::breakpoint_resumes() - resumes_before,
    };
    drop(m);
    drop(lower);
    settle(&mgr);
    stats
}

/// Checks that half of one encoding with half of the next in the patch order is no valid
/// encoding, so a torn store could not pass for a patch.
fn check_tears_are_visible(encodings: &[u64; 4]) {
    for i in 0..4 {
        let (a, b) = (encodings[ORDER[i]], encodings[ORDER[(i + 1) % 4]]);
        let low_mask = 0xFFFF_FFFFu64;
        for mix in [
            (a & low_mask) | (b & !low_mask),
            (b & low_mask) | (a & !low_mask),
        ] {
            assert!(
                !encodings.contains(&mix),
                "a torn store of {a:#018x} -> {b:#018x} ({mix:#018x}) would look valid"
            );
        }
    }
}
