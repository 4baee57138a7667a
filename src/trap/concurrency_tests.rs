//! Trap-table lookups against concurrent updates: at every step of an update (the step hook,
//! as a page fault on the writer's CPU would see it) and from reader threads on other CPUs.

use super::test_register::TestRegister;
use super::tests::grace;
use super::*;
use std::format;
use std::string::String;
use std::sync::Mutex;
use std::vec::Vec;

/// Code range `i`: 0x80 bytes at `i * 0x100`, protected at 0x10 and 0x20, landing pad at 0x70.
fn code(i: usize) -> AddressRange {
    AddressRange::new(0x10_0000 + i * 0x100, 0x10_0000 + i * 0x100 + 0x80)
}

const OFFSETS: [u32; 2] = [0x10, 0x20];
const ACCEPTED: [AddressRange; 1] = [AddressRange::new(0x1000, 0x2000)];

/// Registration `i`; every third one accepts faults only in `[0x1000, 0x2000)`.
fn registration(i: usize) -> TrapRegistration<'static> {
    TrapRegistration {
        code: code(i),
        protected: &OFFSETS,
        sites: &[],
        landing_pad: code(i).start() + 0x70,
        fault_ranges: if i.is_multiple_of(3) { &ACCEPTED } else { &[] },
    }
}

const RANGES: usize = 400;

/// What the hook checks: lookups of `probes` must equal `old` until the publication and `new`
/// from then on.
struct Probe {
    probes: Vec<(usize, usize)>,
    old: Vec<Option<TrapHit>>,
    new: Vec<Option<TrapHit>>,
    published: bool,
    steps: Vec<UpdateStep>,
    failures: Vec<String>,
}

static HOOK_GRACE: GraceDomain = GraceDomain::new();
static HOOK_TABLE: TrapTable = TrapTable::new(&HOOK_GRACE);
static PROBE: Mutex<Option<Probe>> = Mutex::new(None);

fn probes() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for i in 0..RANGES {
        let s = code(i).start();
        v.push((s + 0x10, 0x1800));
        if i % 5 == 0 {
            v.push((s + 0x20, 0x9000)); // outside the accepted range of every third
            v.push((s + 0x11, 0x1800)); // never protected
        }
    }
    v
}

fn snapshot(t: &TrapTable, probes: &[(usize, usize)]) -> Vec<Option<TrapHit>> {
    probes
        .iter()
        .map(|&(pc, addr)| t.lookup_fault(pc, addr))
        .collect()
}

fn hook(step: UpdateStep) {
    let mut guard = PROBE.lock().unwrap();
    let p = guard.as_mut().expect("probe set");
    if step == UpdateStep::Publish {
        if p.published {
            p.failures
                .push(String::from("published twice in one update"));
        }
        p.published = true;
    }
    let seen = snapshot(&HOOK_TABLE, &p.probes);
    let (want, which) = if p.published {
        (&p.new, "new")
    } else {
        (&p.old, "old")
    };
    if seen != *want {
        let diff = p
            .probes
            .iter()
            .zip(seen.iter().zip(want))
            .find(|(_, (s, w))| s != w)
            .map(|(pc, (s, w))| {
                format!(
                    "pc {:#x} fault {:#x}: saw {s:?}, {which} table has {w:?}",
                    pc.0, pc.1
                )
            });
        let n = p.steps.len();
        p.failures.push(format!(
            "after step {n} ({step:?}): {}",
            diff.unwrap_or_default()
        ));
    }
    p.steps.push(step);
}

/// Runs `op` on the hooked table and `mirror_op` on a plain one holding the same ranges, and
/// checks every step of `op`; returns both results and the steps seen.
fn checked<R, M>(
    mirror: &TrapTable,
    op: impl FnOnce(&TrapTable) -> R,
    mirror_op: impl FnOnce(&TrapTable) -> M,
    seen: &mut Vec<UpdateStep>,
) -> (R, M) {
    let probes = probes();
    let old = snapshot(&HOOK_TABLE, &probes);
    assert_eq!(old, snapshot(mirror, &probes), "tables agree before");
    let m = mirror_op(mirror);
    let new = snapshot(mirror, &probes);
    *PROBE.lock().unwrap() = Some(Probe {
        probes,
        old,
        new,
        published: false,
        steps: Vec::new(),
        failures: Vec::new(),
    });
    HOOK_TABLE.set_step_hook(Some(hook));
    let r = op(&HOOK_TABLE);
    HOOK_TABLE.set_step_hook(None);
    let p = PROBE.lock().unwrap().take().unwrap();
    assert!(p.failures.is_empty(), "{:#?}", p.failures);
    assert!(p.published, "the update published");
    assert_eq!(snapshot(&HOOK_TABLE, &p.probes), p.new);
    seen.extend(p.steps);
    (r, m)
}

/// Every step of single registrations and releases (with node splits and merges), batches of
/// both, and reclamation inside updates: lookups see the complete old table before the
/// publication and the complete new one after.
#[test]
fn every_step_of_updates_and_batches_shows_old_or_new_table() {
    // SAFETY: CPU 0 is this test's thread; nothing else uses the domain.
    unsafe { HOOK_GRACE.set_possible_cpus(1) };
    let mirror = TrapTable::new(grace());
    let even: Vec<_> = (0..RANGES).step_by(2).map(registration).collect();
    let mut seen = Vec::new();
    let mut handles: Vec<(usize, TrapHandle, TrapHandle)> = HOOK_TABLE
        .test_register_batch(&even)
        .unwrap()
        .into_iter()
        .zip(mirror.test_register_batch(&even).unwrap())
        .enumerate()
        .map(|(k, (h, m))| (2 * k, h, m))
        .collect();
    let quiesce = || {
        // SAFETY: the test thread holds nothing from a lookup.
        unsafe { HOOK_GRACE.quiescent(0) };
    };
    // Single registrations into the gaps: leaves split, the root grows.
    for i in (1..RANGES / 2).step_by(2) {
        quiesce();
        let reg = registration(i);
        let (h, m) = checked(
            &mirror,
            |t| t.test_register_with(&reg).unwrap(),
            |m| m.test_register_with(&reg).unwrap(),
            &mut seen,
        );
        handles.push((i, h, m));
    }
    // Single releases: leaves merge and borrow.
    for k in 0..60 {
        quiesce();
        let (_, h, m) = handles.swap_remove((k * 7) % handles.len());
        checked(
            &mirror,
            |t| t.release(h).unwrap(),
            |mt| mt.release(m).unwrap(),
            &mut seen,
        );
    }
    // A batch into the upper half, and a batch release of a spread of ranges.
    quiesce();
    let upper: Vec<_> = (RANGES / 2..RANGES)
        .filter(|i| i % 2 == 1)
        .map(registration)
        .collect();
    checked(
        &mirror,
        |t| t.test_register_batch(&upper).unwrap(),
        |m| m.test_register_batch(&upper).unwrap(),
        &mut seen,
    );
    quiesce();
    let spread: Vec<_> = (0..handles.len()).step_by(3).map(|k| handles[k]).collect();
    let ours: Vec<_> = spread.iter().map(|h| h.1).collect();
    let theirs: Vec<_> = spread.iter().map(|h| h.2).collect();
    checked(
        &mirror,
        |t| t.release_batch(&ours).unwrap(),
        |m| m.release_batch(&theirs).unwrap(),
        &mut seen,
    );
    for step in [
        UpdateStep::Allocate,
        UpdateStep::Modify,
        UpdateStep::Publish,
        UpdateStep::Retire,
        UpdateStep::Free,
    ] {
        assert!(seen.contains(&step), "{step:?} never probed");
    }
}

/// Reader threads (CPUs 1 and 2) look up permanent and churned ranges, reporting quiescent
/// states between lookups, while the writer (CPU 0) registers, releases and batches. Every
/// permanent PC always resolves exactly; a churned PC resolves to a whole entry or not at all;
/// and every grace period ends once the readers stop.
#[test]
fn stress_readers_against_writer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const READERS: usize = 2;
    let d: &'static GraceDomain = std::boxed::Box::leak(std::boxed::Box::new(GraceDomain::new()));
    // SAFETY: CPUs 0..=READERS are this test's threads.
    unsafe { d.set_possible_cpus(READERS + 1) };
    let t = Arc::new(TrapTable::new(d));
    // Permanent: every 8th range.
    let permanent: Vec<_> = (0..RANGES).step_by(8).map(registration).collect();
    t.test_register_batch(&permanent).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (1..=READERS)
        .map(|cpu| {
            let (t, done) = (Arc::clone(&t), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = cpu;
                while !done.load(Ordering::Relaxed) || n < 5_000 {
                    i = (i * 7 + 3) % RANGES;
                    let c = code(i);
                    let hit = t.lookup_fault(c.start() + 0x20, 0x1800);
                    if i % 8 == 0 {
                        let hit = hit.expect("permanent PC resolves");
                        assert_eq!((hit.code(), hit.offset()), (c, 0x20));
                        assert_eq!(hit.landing_pad(), c.start() + 0x70);
                    } else if let Some(hit) = hit {
                        assert_eq!((hit.code(), hit.landing_pad()), (c, c.start() + 0x70));
                    }
                    assert_eq!(t.lookup(c.start() + 0x11), None);
                    // SAFETY: this reader holds nothing from a lookup here.
                    unsafe { d.quiescent(cpu) };
                    n += 1;
                }
                // SAFETY: this reader looks nothing up any more.
                unsafe { d.cpu_offline(cpu) };
                n
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(600);
    let mut live: Vec<TrapHandle> = Vec::new();
    let mut k = 0usize;
    while std::time::Instant::now() < deadline {
        k += 1;
        if k.is_multiple_of(5) {
            let batch: Vec<_> = (0..RANGES)
                .filter(|i| !i.is_multiple_of(8) && (i + k).is_multiple_of(11))
                .map(registration)
                .collect();
            match t.test_register_batch(&batch) {
                Ok(hs) => live.extend(hs),
                Err(TrapError::Overlap { .. }) => {
                    t.release_batch(&live).unwrap();
                    live.clear();
                }
                Err(e) => panic!("{e}"),
            }
        } else {
            let i = (k * 13) % RANGES;
            if !i.is_multiple_of(8) {
                match t.test_register_with(&registration(i)) {
                    Ok(h) => live.push(h),
                    Err(TrapError::Overlap { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            if live.len() > 100 {
                t.release(live.swap_remove(k % live.len())).unwrap();
            }
        }
        // SAFETY: the writer holds nothing from a lookup.
        unsafe { d.quiescent(0) };
    }
    done.store(true, Ordering::Relaxed);
    let total: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total >= 10_000);
    t.release_batch(&live).unwrap();
    for _ in 0..3 {
        // SAFETY: as above.
        unsafe { d.quiescent(0) };
        t.reclaim();
    }
    assert_eq!(t.retired_count(), 0);
    assert_eq!(t.len(), permanent.len());
}
