//! The Cranelift JIT glue on every CPU at once: each CPU calls compiled code through
//! `jit::enter` in a loop — a call through two generated frames (`load_plus_one` calling `load`
//! through its jump slot) that traps on an out-of-bounds load, then one that returns — so entry
//! records are pushed and popped, and landing pads unwind to them, on all CPUs at the same
//! time. Every trap must come back to the CPU's own caller as `Trap::OutOfBounds` with its own
//! faulting address, every return with its value, and no entry may stay active afterwards.

use core::sync::atomic::{AtomicU64, Ordering};

use super::common::{self, quiescent, settle};
use crate::code::REGISTRIES;
use crate::jit::programs::{self, load, load_plus_one, LOAD, LOAD_PLUS_ONE};
use crate::jit::{self, Compiler, JitConfig, JitError, JitModule, LinearMemory, OptLevel, Trap};

/// What the memory holds in its last word.
const CONTENT: u32 = 0xC0DE;

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct JitStats {
    /// Calls that trapped back to their caller (all CPUs).
    pub traps: u64,
    /// Calls that returned (all CPUs).
    pub returns: u64,
}

/// Compiles the two functions into a module over code-window slice `window` and has every CPU
/// make `calls` trapping and `calls` returning calls.
///
/// # Panics
/// When a call does not come back as it must, naming the CPU.
pub fn run(window: usize, calls: u32) -> JitStats {
    let mgr = common::manager(window);
    let mut m = JitModule::new(
        &mgr,
        &REGISTRIES,
        JitConfig {
            fault_range: None,
            functions: programs::FUNCTIONS,
            host: programs::host_functions(),
            lazy_entry: None,
        },
    )
    .expect("JIT module");
    let mut compiler = Compiler::new();
    for (index, build, opt) in [
        (LOAD, load as fn() -> _, OptLevel::Speed),
        (LOAD_PLUS_ONE, load_plus_one, OptLevel::None),
    ] {
        let code = compiler
            .compile(build().expect("IR"), opt, &m.linkage())
            .expect("compile");
        m.install(index, &code, None).expect("install");
    }
    let load_start = m.code(LOAD).expect("load installed");
    let mut mem = LinearMemory::new(64 << 10).expect("linear memory");
    let (base, len) = (mem.base(), mem.len());
    mem.write_u32(len - 4, CONTENT).expect("write");
    let traps = AtomicU64::new(0);
    let returns = AtomicU64::new(0);
    common::on_each_cpu(|cpu| {
        for i in 0..u64::from(calls) {
            // A different guard address per CPU and call.
            let index = len + 4096 * (cpu as u64) + 8 * (i % 256);
            match m.call(LOAD_PLUS_ONE, &[base, index]) {
                Err(JitError::Trapped(Trap::OutOfBounds { pc, address })) => {
                    assert_eq!(
                        address,
                        base + index,
                        "cpu {cpu}: a trap came back with another call's address"
                    );
                    let at_load = REGISTRIES
                        .lookup_code(pc)
                        .is_some_and(|o| o.instruction_start() == load_start);
                    assert!(at_load, "cpu {cpu}: trapped at {pc:#x}, not in load");
                }
                other => panic!("cpu {cpu}: load_plus_one({index:#x}) gave {other:?}"),
            }
            traps.fetch_add(1, Ordering::Relaxed);
            assert!(!jit::active(), "cpu {cpu}: the landing popped its entry");
            assert_eq!(
                m.call(LOAD_PLUS_ONE, &[base, len - 4]),
                Ok(u64::from(CONTENT + 1)),
                "cpu {cpu}: a returning call"
            );
            returns.fetch_add(1, Ordering::Relaxed);
            assert!(!jit::active(), "cpu {cpu}: the return popped its entry");
            // SAFETY: between calls: no generated code on this CPU's stack, no lookup held.
            unsafe { quiescent() };
        }
    });
    let stats = JitStats {
        traps: traps.load(Ordering::SeqCst),
        returns: returns.load(Ordering::SeqCst),
    };
    drop(mem);
    drop(m);
    settle(&mgr);
    stats
}
