//! Stale-TLB detector at the codespace level: CPU B calls a function and reads its page (so it
//! caches the code and data translations), CPU A frees the function; once the grace period is
//! over the page is wholly free and decommitted, its frame returns to the frame allocator, and
//! A takes the frame back and writes a marker into it (`mov eax, MARKER; ret` where the function
//! was) — the frame now belongs to someone else. B's next read and its next call must fault
//! (not present): had the decommit not shot B's translation down, B would read the marker and
//! run the new owner's bytes. TCG keeps a TLB per vCPU, so a missing shootdown shows.
//!
//! With one CPU, A is B: the same sequence checks the local invalidation.
//!
//! # In the ROX mode
//! A ROX code page stays mapped R+X while other code lives on it: freed code is refilled with
//! INT3 through the alias after its grace period, and no access to it faults. What a CPU that
//! raced the free may run at the old address is then the old code, before the refill, or INT3
//! (#BP), after it — never new code before a grace period, never a mix. [`run`] checks that
//! first, in rounds of its own (`rox_round`), with a keeper function holding the page: B runs
//! the function; A frees it; while B has not passed a quiescent state A's reclaims retire
//! nothing and B's call still returns the old value (the refill waits for B); once B reported,
//! A's reclaim refills, and B — with no flush of its own — reads INT3 and its call traps #BP
//! at the first byte; A publishes new code at the same address, and B's call returns the new
//! value (the publish's serialization round). The decommit rounds above then run as well: with
//! no keeper, a freed function's 2 MiB page is wholly free and goes back after its grace
//! period, with one shootdown that B's 2 MiB translation must not survive.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::catch::{catch, Caught};
use crate::cpu::interrupts::{FaultInfo, BREAKPOINT};

use codespace::code_object::CodeKind;
use codespace::module::{CodeModule, ModuleConfig, NewCode};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use super::common::{
    self, call0, check_fault, release, ret_const, settle, take_frame, try_access, Access, Phase,
    PF_FETCH, PF_PRESENT, PF_WRITE,
};
use crate::code::{self, REGISTRIES};
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
    /// ROX rounds (`rox_round`): a free on a page that stays mapped, the refill, a reuse.
    pub rox_rounds: u64,
    /// ROX: stale calls before the refill (B not yet quiescent) that ran the old code.
    pub old_before_refill: u64,
    /// ROX: stale calls after the refill that trapped on its INT3.
    pub int3_after_refill: u64,
    /// ROX: calls at the old address, after the new code's publish, that ran the new code.
    pub new_after_publish: u64,
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
        code::module_config(&mgr, ModuleConfig::default()),
    )
    .expect("module");
    let n = smp::online_cpus();
    let mut stats = TlbStats::default();
    if code::rox() {
        rox_rounds(&mgr, rounds, &mut stats);
    }
    for round in 0..rounds {
        let b = racer(round, n);
        let start = original_function(&m);
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

/// What a ROX round's keeper returns: it holds the 2 MiB page, so the page stays mapped.
const KEEPER: u32 = 0x4EE9_C0DE;

/// The CPU that races round `round`'s free (another one, in turn; CPU 0 alone).
fn racer(round: u32, n: usize) -> usize {
    if n == 1 {
        0
    } else {
        1 + round as usize % (n - 1)
    }
}

/// Adds a function returning `ORIGINAL` to `m` and returns its start (its handle dropped).
fn original_function(m: &CodeModule<code::KernelMmu>) -> usize {
    m.add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(ORIGINAL)))
        .expect("function")
        .instruction_start()
}

/// The ROX rounds (module docs, "In the ROX mode"), on a module of their own whose keeper
/// function holds the page.
fn rox_rounds(mgr: &codespace::CodeManager<code::KernelMmu>, rounds: u32, stats: &mut TlbStats) {
    let m = CodeModule::new(
        mgr,
        &REGISTRIES,
        code::module_config(mgr, ModuleConfig::default()),
    )
    .expect("module");
    let keeper = m
        .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(KEEPER)))
        .expect("keeper");
    code::assert_rox_in_use(mgr);
    let n = smp::online_cpus();
    for round in 0..rounds {
        let b = racer(round, n);
        let start = original_function(&m);
        let seen = RoxSeen::default();
        if n == 1 {
            b_runs_old_code(start, b);
            a_frees_but_cannot_refill(&m, start);
            b_still_runs_old_code(start, b, &seen);
            a_refills(&m, start);
            b_traps_on_int3(start, b, &seen);
            let new = a_publishes_new_code(&m, start);
            b_runs_new_code(start, b, &seen);
            a_frees_new_code(&m, new);
        } else {
            let phase = Phase::new();
            common::on_each_cpu(|cpu| {
                if cpu == 0 {
                    // SAFETY: A runs no generated code and holds no lookup reference while
                    // it waits (so at each wait below).
                    unsafe { phase.wait_quiescent(1) };
                    a_frees_but_cannot_refill(&m, start);
                    phase.set(2);
                    // B is not quiescent until phase 3: A's grace period cannot end before.
                    // SAFETY: A runs no generated code and holds no lookup reference.
                    unsafe { phase.wait_quiescent(3) };
                    a_refills(&m, start);
                    phase.set(4);
                    // SAFETY: as at phase 1.
                    unsafe { phase.wait_quiescent(5) };
                    let new = a_publishes_new_code(&m, start);
                    phase.set(6);
                    // SAFETY: as at phase 1.
                    unsafe { phase.wait_quiescent(7) };
                    a_frees_new_code(&m, new);
                } else if cpu == b {
                    b_runs_old_code(start, b);
                    phase.set(1);
                    // B waits without reporting: like a CPU still inside the function.
                    phase.wait(2);
                    b_still_runs_old_code(start, b, &seen);
                    phase.set(3);
                    // SAFETY: from here B holds nothing: it may pass quiescent states.
                    unsafe { phase.wait_quiescent(4) };
                    b_traps_on_int3(start, b, &seen);
                    phase.set(5);
                    // SAFETY: as above.
                    unsafe { phase.wait_quiescent(6) };
                    b_runs_new_code(start, b, &seen);
                    phase.set(7);
                }
            });
        }
        stats.rox_rounds += 1;
        stats.old_before_refill += seen.old.load(Ordering::SeqCst);
        stats.int3_after_refill += seen.int3.load(Ordering::SeqCst);
        stats.new_after_publish += seen.new.load(Ordering::SeqCst);
    }
    assert_eq!(
        common::call0(keeper.instruction_start()),
        u64::from(KEEPER),
        "the keeper ran untouched through every round"
    );
    drop(keeper);
    drop(m);
}

/// What B saw in one ROX round.
#[derive(Default)]
struct RoxSeen {
    old: AtomicU64,
    int3: AtomicU64,
    new: AtomicU64,
}

/// B: runs the function (and reads it), as a CPU that is about to race its free.
fn b_runs_old_code(start: usize, b: usize) {
    cache_translations(start, b);
}

/// A: frees the function. While B has not passed a quiescent state, reclaiming retires
/// nothing: the bytes stay the old code (no refill under a CPU that may run them).
fn a_frees_but_cannot_refill<M: codespace::mmu::Mmu + Send + 'static>(
    m: &CodeModule<M>,
    start: usize,
) {
    m.free_code(start).expect("free_code");
    for _ in 0..16 {
        assert_eq!(
            m.reclaim().expect("reclaim"),
            0,
            "cpu 0: freed code was reclaimed (refilled) before cpu {:?} passed a quiescent \
             state",
            REGISTRIES.grace().waiting_for()
        );
    }
}

/// B, not yet quiescent: the freed function still runs as it was.
fn b_still_runs_old_code(start: usize, b: usize, seen: &RoxSeen) {
    match stale_call(start) {
        Ok(v) if v == u64::from(ORIGINAL) => {
            seen.old.fetch_add(1, Ordering::SeqCst);
        }
        other => panic!(
            "cpu {b}: a call of freed code at {start:#x} before its grace period ended gave \
             {other:?}, not the old code ({ORIGINAL:#x}): it was refilled or replaced under a \
             CPU that may still run it"
        ),
    }
}

/// A: reclaims once B reported (the refill with INT3 through the alias), and sees INT3.
fn a_refills<M: codespace::mmu::Mmu + Send + 'static>(m: &CodeModule<M>, start: usize) {
    // SAFETY: A runs no generated code here and holds no lookup reference.
    let reclaimed = unsafe { common::poll_grace(|| m.reclaim().expect("reclaim") > 0) };
    assert!(
        reclaimed,
        "cpu 0: the freed function was never reclaimed (waiting for cpu {:?})",
        REGISTRIES.grace().waiting_for()
    );
    assert!(
        is_int3(start),
        "cpu 0: the freed bytes are INT3 after the reclaim"
    );
}

/// B, after the refill, with no flush or serialization of its own: reads INT3, and a call
/// traps on the first byte — never the old code, never part of it.
fn b_traps_on_int3(start: usize, b: usize, seen: &RoxSeen) {
    assert!(
        is_int3(start),
        "cpu {b}: freed code at {start:#x} still reads as code after the refill"
    );
    match stale_call(start) {
        Err(info) if info.vector == BREAKPOINT && info.rip == start as u64 + 1 => {
            seen.int3.fetch_add(1, Ordering::SeqCst);
        }
        other => panic!(
            "cpu {b}: a call of freed code at {start:#x} after its refill gave {other:?}, not \
             the #BP of the INT3 at its first byte: a stale copy of the old code ran"
        ),
    }
}

/// A: publishes new code; the allocator gives it the freed address (lowest free first).
fn a_publishes_new_code<M: codespace::mmu::Mmu + Send + 'static>(
    m: &CodeModule<M>,
    start: usize,
) -> usize {
    let new = m
        .add_code(&NewCode::new(CodeKind::Wrapper, &ret_const(MARKER)))
        .expect("new code")
        .instruction_start();
    assert_eq!(new, start, "the new code reuses the freed address");
    new
}

/// B: after the publish, a call at the old address runs the whole new code.
fn b_runs_new_code(start: usize, b: usize, seen: &RoxSeen) {
    match stale_call(start) {
        Ok(v) if v == u64::from(MARKER) => {
            seen.new.fetch_add(1, Ordering::SeqCst);
        }
        other => panic!(
            "cpu {b}: a call at {start:#x} after the new code's publish gave {other:?}, not \
             the new code ({MARKER:#x})"
        ),
    }
}

/// A: frees the new code and waits for its reclaim, so the next round starts afresh.
fn a_frees_new_code<M: codespace::mmu::Mmu + Send + 'static>(m: &CodeModule<M>, new: usize) {
    m.free_code(new).expect("free_code");
    // SAFETY: A runs no generated code here and holds no lookup reference.
    let reclaimed = unsafe { common::poll_grace(|| m.reclaim().expect("reclaim") > 0) };
    assert!(reclaimed, "cpu 0: the new code was never reclaimed");
}

/// Whether the 6 bytes of a function at `start` are all INT3.
fn is_int3(start: usize) -> bool {
    // SAFETY: `start` is in a ROX page the keeper holds mapped R+X (readable).
    let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, 6) };
    bytes.iter().all(|&b| b == 0xCC)
}

/// Calls the code at `start`: what it returned, or the fault it raised (a panic or a stop
/// fails the caller).
fn stale_call(start: usize) -> Result<u64, FaultInfo> {
    let value = AtomicU64::new(0);
    match catch(|| value.store(call0(start), Ordering::SeqCst)) {
        Ok(()) => Ok(value.load(Ordering::SeqCst)),
        Err(Caught::Fault(info)) => Err(info),
        Err(Caught::Panic(msg)) => panic!("{}", msg.as_str()),
        Err(Caught::Stopped) => panic!("cpu {}: stopped", smp::current_cpu()),
    }
}
