//! The Cranelift JIT glue on every CPU at once: each CPU calls compiled code through
//! `jit::enter` in a loop — a call through two generated frames (`load_plus_one` calling `load`
//! through its jump slot) that traps on an out-of-bounds load, then one that returns — so entry
//! records are pushed and popped, and landing pads unwind to them, on all CPUs at the same
//! time. Every trap must come back to the CPU's own caller as `Trap::OutOfBounds` with its own
//! faulting address, every return with its value, and no entry may stay active afterwards.
//!
//! [`memory_drop`]: a linear memory's pages leave every CPU's TLB before its frames are reused.
//!
//! [`compile_everywhere`]: every CPU compiles with Cranelift at once (each on its own compile
//! stack) and gets the same machine code as a compilation on one CPU.

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
    let m = JitModule::new(
        &mgr,
        &REGISTRIES,
        JitConfig {
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

/// What the frame's next owner writes over a dropped memory's first word.
const MARKER: u64 = 0x0BAD_0BAD_0BAD_0BAD;

/// `rounds` times: CPU B (the CPUs other than 0 in turn) reads a fresh linear memory's first
/// page, caching its translation; CPU 0 drops the memory, takes its first frame back from the
/// frame allocator and writes a marker into it. B's next read of the address must fault (not
/// present) instead of reading the marker. Returns the faults seen.
///
/// # Panics
/// When B reads the reused frame through a stale translation, naming the CPU.
pub fn memory_drop(rounds: u32) -> u64 {
    use super::common::{check_fault, load_u64, release, take_frame, try_access, Access};
    use super::common::{Phase, PF_FETCH, PF_PRESENT, PF_WRITE};
    let n = crate::smp::online_cpus();
    let faults = AtomicU64::new(0);
    for round in 0..rounds {
        let b = if n == 1 {
            0
        } else {
            1 + round as usize % (n - 1)
        };
        let mut mem = LinearMemory::new(4096).expect("linear memory");
        mem.write_u32(0, CONTENT).expect("write");
        let base = mem.base();
        let frame = crate::memory::leaf_entry(base).expect("mapped") & 0x000F_FFFF_FFFF_F000;
        let mem = spin::Mutex::new(Some(mem));
        let reused = spin::Mutex::new(None);
        let phase = Phase::new();
        let a_side = || {
            drop(mem.lock().take());
            let f = take_frame(frame);
            let marker = crate::memory::phys_to_virt(f.start_address()).as_mut_ptr::<u64>();
            // SAFETY: the frame is ours again (just taken from the allocator) and writable in
            // the direct map.
            unsafe { marker.write_volatile(MARKER) };
            *reused.lock() = Some(f);
        };
        let b_side = || match try_access(|| load_u64(base as usize)) {
            Access::Completed(v) => panic!(
                "cpu {b}: read {v:#x} at {base:#x} after its linear memory was dropped and the \
                 frame {frame:#x} reused (the new owner wrote {MARKER:#x}): a stale TLB entry"
            ),
            Access::Faulted(info) => {
                let clear = PF_PRESENT | PF_WRITE | PF_FETCH;
                check_fault(&info, base, 0, clear, "read of a dropped memory");
                faults.fetch_add(1, Ordering::SeqCst);
            }
        };
        if n == 1 {
            assert_eq!(
                load_u64(base as usize) as u32,
                CONTENT,
                "cpu 0 reads the memory"
            );
            a_side();
            b_side();
        } else {
            common::on_each_cpu(|cpu| {
                if cpu == b {
                    assert_eq!(load_u64(base as usize) as u32, CONTENT, "cpu {b} reads it");
                    phase.set(1);
                    phase.wait(2);
                    b_side();
                    phase.set(3);
                } else if cpu == 0 {
                    phase.wait(1);
                    a_side();
                    phase.set(2);
                    phase.wait(3);
                }
            });
        }
        let taken = reused.lock().take();
        if let Some(f) = taken {
            release(f);
        }
    }
    faults.load(Ordering::SeqCst)
}

/// Compiles matmul (at both levels) on CPU 0 alone, then `rounds` times on every CPU at once;
/// every concurrent compilation must produce the same bytes as CPU 0's. Returns the
/// compilations checked.
///
/// # Panics
/// When a compilation fails or differs, naming the CPU.
pub fn compile_everywhere(window: usize, rounds: u32) -> u64 {
    let mgr = common::manager(window);
    let m = JitModule::new(
        &mgr,
        &REGISTRIES,
        JitConfig {
            functions: programs::FUNCTIONS,
            host: programs::host_functions(),
            lazy_entry: None,
        },
    )
    .expect("JIT module");
    let linkage = m.linkage();
    let compile = |c: &mut Compiler, opt| {
        let func = programs::matmul().expect("IR");
        c.compile(func, opt, &linkage).expect("compile")
    };
    let mut alone = Compiler::new();
    let reference = [OptLevel::None, OptLevel::Speed].map(|opt| compile(&mut alone, opt));
    let checked = AtomicU64::new(0);
    for _ in 0..rounds {
        common::on_each_cpu(|cpu| {
            let mut c = Compiler::new();
            for (i, opt) in [OptLevel::None, OptLevel::Speed].into_iter().enumerate() {
                let code = compile(&mut c, opt);
                assert!(
                    code.bytes() == reference[i].bytes(),
                    "cpu {cpu}: matmul at {opt:?} compiled to other bytes while every CPU \
                     compiled ({} bytes, {} expected)",
                    code.bytes().len(),
                    reference[i].bytes().len()
                );
                checked.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    drop(m);
    settle(&mgr);
    checked.load(Ordering::SeqCst)
}
