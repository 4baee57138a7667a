//! Stale-TLB detector at the codespace level: CPU B calls a function and reads its page (so it
//! caches the code and data translations), CPU A frees the function; once the grace period is
//! over the page is wholly free and decommitted, its frame returns to the frame allocator, and
//! A takes the frame back and writes a marker into it (`mov eax, MARKER; ret` where the function
//! was) — the frame now belongs to someone else. B's next read and its next call must fault
//! (not present): had the decommit not shot B's translation down, B would read the marker and
//! run the new owner's bytes. TCG keeps a TLB per vCPU, so a missing shootdown shows.
//!
//! With one CPU, A is B: the same sequence checks the local invalidation.

use core::sync::atomic::{AtomicU64, Ordering};

use codespace::code_object::CodeKind;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use super::common::{
    self, call0, check_fault, release, ret_const, settle, take_frame, try_access, Access, Phase,
    PF_FETCH, PF_PRESENT, PF_WRITE,
};
use crate::code::REGISTRIES;
use crate::memory::phys_to_virt;
use crate::smp;

/// What the freed function returned.
const ORIGINAL: u32 = 0x5AFE_C0DE;
/// What the frame's next owner writes where the function was.
pub const MARKER: u32 = 0x0BAD_F00D;

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct TlbStats {
    /// Rounds: a free, a decommit, a reuse of the frame and two checked accesses.
    pub rounds: u64,
    /// Accesses through a freed translation that faulted, as they must.
    pub faults: u64,
}

/// `rounds` rounds on code-window slice `window`; B is the CPUs other than 0 in turn.
///
/// # Panics
/// When B reaches the reused frame, or anything else goes wrong, naming the CPU.
pub fn run(window: usize, rounds: u32) -> TlbStats {
    let mgr = common::manager(window);
    let m = CodeModule::new(
        &mgr,
        &REGISTRIES,
        common::module_config(ModuleConfig::default()),
    )
    .expect("module");
    let n = smp::online_cpus();
    let mut stats = TlbStats::default();
    for round in 0..rounds {
        let b = if n == 1 {
            0
        } else {
            1 + round as usize % (n - 1)
        };
        let code = m
            .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(ORIGINAL)))
            .expect("function");
        let start = code.instruction_start();
        drop(code);
        let frame = mgr.query(start).expect("query").expect("committed").frame;
        let faults = AtomicU64::new(0);
        if n == 1 {
            // One CPU: B's part around A's, on the same CPU.
            cache_translations(start, b);
            let reused = free_and_reuse(&m, &mgr, start, frame);
            check_stale_accesses(start, frame, b, &faults);
            release(reused);
        } else {
            let phase = Phase::new();
            common::on_each_cpu(|cpu| {
                if cpu == 0 {
                    // SAFETY: A runs no generated code here and holds no lookup reference.
                    unsafe { phase.wait_quiescent(1) };
                    let reused = free_and_reuse(&m, &mgr, start, frame);
                    phase.set(2);
                    phase.wait(3);
                    release(reused);
                } else if cpu == b {
                    cache_translations(start, b);
                    phase.set(1);
                    // SAFETY: B no longer runs the function and holds no lookup reference.
                    unsafe { phase.wait_quiescent(2) };
                    check_stale_accesses(start, frame, b, &faults);
                    phase.set(3);
                }
            });
        }
        stats.rounds += 1;
        stats.faults += faults.load(Ordering::SeqCst);
    }
    drop(m);
    settle(&mgr);
    stats
}

/// B: one call and one read of the function's page, so B caches both translations.
fn cache_translations(start: usize, b: usize) {
    assert_eq!(call0(start), u64::from(ORIGINAL), "cpu {b}: the function");
    let _ = common::load_u64(start);
}

/// A: frees the function, reclaims it once the grace period is over (reporting its own
/// quiescent states), checks its page was decommitted, takes the frame back and writes the
/// marker into it through the direct map; returns the frame.
fn free_and_reuse<M: codespace::mmu::Mmu + Send + 'static>(
    m: &CodeModule<M>,
    mgr: &codespace::CodeManager<M>,
    start: usize,
    frame: u64,
) -> PhysFrame {
    m.free_code(start).expect("free_code");
    // SAFETY: A runs no generated code here and holds no lookup reference.
    let reclaimed = unsafe { common::poll_grace(|| m.reclaim().expect("reclaim") > 0) };
    assert!(
        reclaimed,
        "cpu 0: the freed function was never reclaimed (waiting for cpu {:?})",
        REGISTRIES.grace().waiting_for()
    );
    assert!(
        mgr.query(start).expect("query").is_none(),
        "the wholly free page was decommitted"
    );
    let reused = take_frame(frame);
    let marker = ret_const(MARKER);
    let at = phys_to_virt(PhysAddr::new(frame + (start as u64 & 0xFFF)));
    // SAFETY: the frame is ours (just allocated) and mapped writable in the direct map (its
    // alias became writable again when its code page was unmapped); 6 bytes stay in the frame
    // (code starts 64-aligned).
    unsafe { core::ptr::copy_nonoverlapping(marker.as_ptr(), at.as_mut_ptr::<u8>(), 6) };
    reused
}

/// B: the read and the call at the freed address must both fault, not present.
fn check_stale_accesses(start: usize, frame: u64, b: usize, faults: &AtomicU64) {
    for (what, fetch) in [("read", false), ("call", true)] {
        let access = try_access(|| {
            if fetch {
                call0(start)
            } else {
                common::load_u64(start)
            }
        });
        match access {
            Access::Completed(v) => panic!(
                "cpu {b}: a {what} at {start:#x} after its page was decommitted and its frame \
                 {frame:#x} reused completed ({v:#x}; the new owner wrote {MARKER:#x} there): a \
                 stale TLB entry, the decommit did not shoot it down"
            ),
            Access::Faulted(info) => {
                let (set, clear) = if fetch {
                    (PF_FETCH, PF_PRESENT)
                } else {
                    (0, PF_PRESENT | PF_WRITE | PF_FETCH)
                };
                check_fault(&info, start as u64, set, clear, what);
                faults.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}
