//! Concurrent traps: every CPU but 0 runs a protected load past the end of a one-page memory
//! over and over — each a page fault the trap table resolves to the code's landing pad, which
//! returns the faulting PC (r10) — while CPU 0 keeps registering and releasing other protected
//! code (adding and freeing module code, single and batched), so the trap table's writers
//! republish it under the readers in the fault handlers. Every fault must land at its landing
//! pad with the right PC; an in-bounds load must still read the memory.
//!
//! With one CPU, CPU 0 alternates between the two roles.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use codespace::code_object::CodeKind;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use x86_64::structures::paging::PageTableFlags as F;

use super::common::{self, call1, quiescent, settle, Phase, Stop};
use crate::code::{self, REGISTRIES};
use crate::memory::{self, SCRATCH_BASE};
use crate::smp;

/// The memory the protected loads read: one page, then unmapped guard pages.
pub const MEMORY: u64 = SCRATCH_BASE + (5 << 30);
/// What the memory holds at offset 0.
const CONTENT: u32 = 0xC0DE_0001;
/// Offset of the protected load in [`load_function`].
const LOAD_AT: u32 = 10;
/// Offset of the landing pad in [`load_function`].
const LANDING_AT: u32 = 14;

/// `u32 load(u64 index)`: `movabs rax, MEMORY; mov eax, [rax + rdi]; ret`, then the landing pad
/// `mov rax, r10; ret` (returns the faulting PC).
#[must_use]
pub fn load_function() -> [u8; 18] {
    let mut code = [0xCC; 18];
    code[..2].copy_from_slice(&[0x48, 0xB8]);
    code[2..10].copy_from_slice(&MEMORY.to_le_bytes());
    code[10..14].copy_from_slice(&[0x8B, 0x04, 0x38, 0xC3]);
    code[14..18].copy_from_slice(&[0x4C, 0x89, 0xD0, 0xC3]);
    code
}

/// Maps the memory page (once per boot).
pub fn map_memory() {
    static MAPPED: spin::Once<()> = spin::Once::new();
    MAPPED.call_once(|| {
        memory::map_fresh_page(MEMORY, F::PRESENT | F::WRITABLE | F::NO_EXECUTE)
            .expect("the memory page");
        // SAFETY: the page was just mapped writable.
        unsafe { (MEMORY as *mut u32).write_volatile(CONTENT) };
    });
}

/// Protected code, as module code.
fn protected(bytes: &[u8]) -> NewCode<'_> {
    NewCode {
        protected: &[LOAD_AT],
        landing_pad: Some(LANDING_AT),
        ..NewCode::new(CodeKind::Wrapper, bytes)
    }
}

/// Calls `start`'s load out of bounds and in bounds and checks both; returns the faults taken.
fn fault_once(start: usize, i: u64) -> u64 {
    let pc = (start + LOAD_AT as usize) as u64;
    let r = call1(start, 4096 + (i % 512) * 8);
    assert_eq!(
        r,
        pc,
        "cpu {}: an out-of-bounds load did not land at its landing pad with its PC",
        smp::current_cpu()
    );
    assert_eq!(call1(start, 0), u64::from(CONTENT), "an in-bounds load");
    1
}

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrapStats {
    /// Faults that landed, all CPUs.
    pub faults: u64,
    /// Protected objects registered and released meanwhile.
    pub churned: u64,
}

/// `churn` rounds of registration by CPU 0 on code-window slice `window`, while the others
/// fault (each at least `min_faults` times).
///
/// # Panics
/// When a fault does not land, naming the CPU.
pub fn run(window: usize, churn: u32, min_faults: u64) -> TrapStats {
    map_memory();
    let mgr = common::manager(window);
    let m = CodeModule::new(
        &mgr,
        &REGISTRIES,
        code::module_config(&mgr, ModuleConfig::default()),
    )
    .expect("module");
    let bytes = load_function();
    let shared = m.add_code(&protected(&bytes)).expect("shared code");
    code::assert_rox_in_use(&mgr);
    let start = shared.instruction_start();
    drop(shared);
    let traps_before = REGISTRIES.traps.len();
    let taken_before = code::last_trap().map_or(0, |t| t.count);
    let n = smp::online_cpus();
    let faults: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let churned = AtomicU64::new(0);
    let ready = Phase::new();
    let stop = Stop::new();
    common::on_each_cpu(|cpu| {
        if cpu != 0 {
            let mut i = 0;
            while !stop.stopped() {
                // SAFETY: between calls: no generated code running, no lookup held.
                unsafe { quiescent() };
                faults[cpu].fetch_add(fault_once(start, i), Ordering::SeqCst);
                if i == 0 {
                    ready.arrive();
                }
                i += 1;
            }
            return;
        }
        if !common::wait_until(|| ready.get() as usize >= n - 1) {
            stop.stop();
            panic!("cpu 0: the faulting CPUs never started");
        }
        for round in 0..churn {
            let batch: Vec<NewCode<'_>> = (0..1 + round % 3).map(|_| protected(&bytes)).collect();
            let added = m.add_code_batch(&batch).expect("register protected code");
            for o in &added {
                // The new code's own faults land too (on this CPU).
                fault_once(o.instruction_start(), u64::from(round));
                churned.fetch_add(1, Ordering::SeqCst);
            }
            let starts: Vec<usize> = added.iter().map(|o| o.instruction_start()).collect();
            drop(added);
            for s in starts {
                m.free_code(s).expect("release protected code");
            }
            // SAFETY: CPU 0 runs no generated code here and holds no lookup reference.
            unsafe { quiescent() };
            m.reclaim().expect("reclaim");
            if n == 1 {
                faults[0].fetch_add(fault_once(start, u64::from(round)), Ordering::SeqCst);
            }
        }
        let enough = common::wait_until(|| {
            faults[1..]
                .iter()
                .all(|f| f.load(Ordering::SeqCst) >= min_faults)
        });
        stop.stop();
        assert!(enough, "cpu 0: the faulting CPUs stalled");
    });
    let stats = TrapStats {
        faults: faults.iter().map(|f| f.load(Ordering::SeqCst)).sum(),
        churned: churned.load(Ordering::SeqCst),
    };
    let taken = code::last_trap().map_or(0, |t| t.count) - taken_before;
    assert!(
        taken >= stats.faults + stats.churned,
        "the trap path counted {taken} traps for {} faults",
        stats.faults + stats.churned
    );
    drop(m);
    settle(&mgr);
    assert_eq!(
        REGISTRIES.traps.len(),
        traps_before - 1,
        "every registration released (the shared code's too)"
    );
    stats
}
