//! Host tests of the code map: behaviour, reclamation, every update step, reader threads, and
//! a random model test.

use super::*;
use crate::code_object::{CodeDesc, CodeKind};
use proptest::prelude::*;
use std::string::ToString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::vec::Vec;

fn r(start: usize, end: usize) -> AddressRange {
    AddressRange::new(start, end)
}

/// A 1-CPU grace domain, leaked (maps keep a `&'static`).
fn grace() -> &'static GraceDomain {
    let d: &'static GraceDomain = std::boxed::Box::leak(std::boxed::Box::new(GraceDomain::new()));
    // SAFETY: CPU 0 is the test thread.
    unsafe { d.set_possible_cpus(1) };
    d
}

fn code(start: usize, end: usize, index: u32) -> Arc<CodeObject> {
    Arc::new(
        CodeObject::new(&CodeDesc {
            index: Some(index),
            ..CodeDesc::new(CodeKind::Function, r(start, end))
        })
        .unwrap(),
    )
}

fn index_at(map: &CodeMap, pc: usize) -> Option<u32> {
    map.lookup(pc).and_then(|c| c.index())
}

#[test]
fn found_at_start_middle_and_last_byte() {
    let map = CodeMap::new(grace());
    map.insert(code(0x1000, 0x1100, 1)).unwrap();
    map.insert(code(0x3000, 0x3040, 2)).unwrap();
    for pc in [0x1000, 0x1080, 0x10ff] {
        assert_eq!(index_at(&map, pc), Some(1), "pc {pc:#x}");
    }
    for pc in [0x3000, 0x3020, 0x303f] {
        assert_eq!(index_at(&map, pc), Some(2), "pc {pc:#x}");
    }
    assert_eq!(map.len(), 2);
}

#[test]
fn not_found_at_end_or_unrelated_address() {
    let map = CodeMap::new(grace());
    assert_eq!(map.lookup(0x1000).map(|c| c.index()), None);
    map.insert(code(0x1000, 0x1100, 1)).unwrap();
    for pc in [0x1100, 0xfff, 0, 0x2000, usize::MAX] {
        assert!(map.lookup(pc).is_none(), "pc {pc:#x}");
        assert!(map.lookup_with(pc, |_| ()).is_none());
    }
}

#[test]
fn not_found_after_removal() {
    let map = CodeMap::new(grace());
    map.insert(code(0x1000, 0x1100, 1)).unwrap();
    map.insert(code(0x1100, 0x1200, 2)).unwrap();
    assert!(map.remove(0x1080).is_none(), "remove needs the exact start");
    let removed = map.remove(0x1000).unwrap();
    assert_eq!(removed.index(), Some(1));
    assert!(map.lookup(0x1000).is_none());
    assert!(map.lookup(0x10ff).is_none());
    assert_eq!(index_at(&map, 0x1100), Some(2));
    assert!(map.remove(0x1000).is_none());
    assert_eq!(map.len(), 1);
    assert!(map.remove(0x1100).is_some());
    assert!(map.is_empty());
}

#[test]
fn remove_batch_unmaps_what_is_mapped_and_skips_the_rest() {
    let map = CodeMap::new(grace());
    let starts: Vec<usize> = (0..100).map(|i| 0x10_0000 + i * 0x100).collect();
    map.insert_batch(starts.iter().zip(0..).map(|(&s, i)| code(s, s + 0x80, i)))
        .unwrap();
    // Every other one, plus a start inside code and one where nothing is mapped.
    let gone: Vec<usize> = starts.iter().copied().step_by(2).collect();
    let mut ask = gone.clone();
    ask.extend([starts[1] + 4, 0x99_0000]);
    assert_eq!(map.remove_batch(&ask), gone.len());
    assert_eq!(map.len(), 50);
    for (i, &s) in starts.iter().enumerate() {
        let want = (i % 2 == 1).then_some(i as u32);
        assert_eq!(index_at(&map, s + 0x40), want, "code {i}");
    }
    assert_eq!(map.remove_batch(&gone), 0, "already gone");
}

#[test]
fn replaced_code_found_at_own_address() {
    // Tier-up: the same function index gets new code at another address.
    let map = CodeMap::new(grace());
    map.insert(code(0x1000, 0x1100, 7)).unwrap();
    let old = map.remove(0x1000).unwrap();
    let new = code(0x5000, 0x5080, 7);
    map.insert(Arc::clone(&new)).unwrap();
    assert!(map.lookup(0x1000).is_none());
    assert!(map.lookup(0x1040).is_none());
    let found = map.lookup(0x5040).unwrap();
    assert!(Arc::ptr_eq(&found, &new));
    assert!(!Arc::ptr_eq(&found, &old));
    assert_eq!(found.index(), Some(7));
}

#[test]
fn overlapping_insert_fails_and_map_is_unchanged() {
    let map = CodeMap::new(grace());
    map.insert(code(0x1000, 0x1100, 1)).unwrap();
    map.insert(code(0x1200, 0x1300, 2)).unwrap();
    for (s, e) in [
        (0x1000, 0x1100),
        (0xf00, 0x1001),
        (0x10ff, 0x1200),
        (0x1040, 0x1050),
        (0, usize::MAX),
    ] {
        assert_eq!(
            map.insert(code(s, e, 9)),
            Err(CodeMapError::Overlap {
                existing: r(0x1000, 0x1100)
            })
        );
    }
    assert_eq!(
        map.insert(code(0x1250, 0x1400, 9)),
        Err(CodeMapError::Overlap {
            existing: r(0x1200, 0x1300)
        })
    );
    assert_eq!(map.len(), 2);
    // Adjacent on both sides is fine.
    map.insert(code(0x1100, 0x1200, 3)).unwrap();
    map.insert(code(0xf00, 0x1000, 4)).unwrap();
    assert_eq!(index_at(&map, 0x11ff), Some(3));
    assert_eq!(index_at(&map, 0xfff), Some(4));
    assert!(CodeMapError::Overlap {
        existing: r(0x1000, 0x1100)
    }
    .to_string()
    .contains("0x1000"));
}

#[test]
fn lookup_with_has_no_refcount_traffic() {
    let map = CodeMap::new(grace());
    let c = code(0x1000, 0x1100, 1);
    map.insert(Arc::clone(&c)).unwrap();
    // Ours plus the snapshot's (the latch shares the snapshot, not the code).
    let before = Arc::strong_count(&c);
    assert_eq!(before, 2);
    let seen = map.lookup_with(0x1010, |code| {
        (code.index(), code.ref_count(), Arc::strong_count(&c))
    });
    assert_eq!(seen, Some((Some(1), 1, before)));
    let cloned = map.lookup(0x1010).unwrap();
    assert_eq!(Arc::strong_count(&c), before + 1);
    drop(cloned);
    drop(map);
    assert_eq!(
        Arc::strong_count(&c),
        1,
        "dropping the map releases its code"
    );
}

static STATIC_GRACE: GraceDomain = GraceDomain::new();
static STATIC_MAP: CodeMap = CodeMap::new(&STATIC_GRACE);

#[test]
fn usable_as_static() {
    STATIC_MAP.insert(code(0x7000, 0x7010, 1)).unwrap();
    assert_eq!(index_at(&STATIC_MAP, 0x7008), Some(1));
    assert!(STATIC_MAP.remove(0x7000).is_some());
}

#[test]
fn removed_code_keeps_the_map_reference_until_the_grace_period_ends() {
    let map = CodeMap::new(grace());
    let c = code(0x1000, 0x1100, 1);
    map.insert(Arc::clone(&c)).unwrap();
    let removed = map.remove(0x1000).unwrap();
    assert!(Arc::ptr_eq(&removed, &c));
    assert!(map.lookup(0x1010).is_none());
    assert_eq!(
        Arc::strong_count(&c),
        3,
        "ours, the returned one, the retired map's"
    );
    assert!(map.memory().retired > 0);
    for _ in 0..3 {
        // SAFETY: the test thread holds nothing from a lookup.
        unsafe { map.grace().quiescent(0) };
        map.reclaim();
    }
    assert_eq!(Arc::strong_count(&c), 2);
    let m = map.memory();
    assert_eq!((m.nodes, m.retired), (0, 0));
}

static HOOK_GRACE: GraceDomain = GraceDomain::new();
static HOOK_MAP: CodeMap = CodeMap::new(&HOOK_GRACE);
/// `(old, new, published, failures, steps)` for the hook.
#[allow(clippy::type_complexity)]
static HOOK_STATE: std::sync::Mutex<(Vec<Option<u32>>, Vec<Option<u32>>, bool, usize, usize)> =
    std::sync::Mutex::new((Vec::new(), Vec::new(), false, 0, 0));

fn hook_snapshot() -> Vec<Option<u32>> {
    (0..64)
        .map(|i| {
            HOOK_MAP
                .lookup_with(0x1000 + i * 0x40 + 8, |c| c.index())
                .flatten()
        })
        .collect()
}

fn map_hook(step: UpdateStep) {
    let mut st = HOOK_STATE.lock().unwrap();
    if step == UpdateStep::Publish {
        st.2 = true;
    }
    let seen = hook_snapshot();
    let ok = if st.2 { seen == st.1 } else { seen == st.0 };
    if !ok {
        st.3 += 1;
    }
    st.4 += 1;
}

/// At every step of inserts, removals and batches, lookups see the whole old map before the
/// publication and the whole new one after.
#[test]
fn every_step_of_map_updates_shows_old_or_new_map() {
    // SAFETY: CPU 0 is this test's thread.
    unsafe { HOOK_GRACE.set_possible_cpus(1) };
    let obj = |i: usize| code(0x1000 + i * 0x40, 0x1000 + i * 0x40 + 0x30, i as u32);
    let mut expected: Vec<Option<u32>> = std::vec![None; 64];
    let run =
        |expected: &mut Vec<Option<u32>>, change: &dyn Fn(&mut Vec<Option<u32>>), op: &dyn Fn()| {
            let old = hook_snapshot();
            assert_eq!(&old, expected);
            change(expected);
            *HOOK_STATE.lock().unwrap() = (old, expected.clone(), false, 0, 0);
            HOOK_MAP.set_step_hook(Some(map_hook));
            op();
            HOOK_MAP.set_step_hook(None);
            let st = HOOK_STATE.lock().unwrap();
            assert!(
                st.2 && st.3 == 0 && st.4 > 2,
                "published {}, {} bad of {} steps",
                st.2,
                st.3,
                st.4
            );
        };
    for i in (0..64).step_by(2) {
        run(&mut expected, &|e| e[i] = Some(i as u32), &|| {
            HOOK_MAP.insert(obj(i)).unwrap()
        });
        // SAFETY: the test thread holds nothing from a lookup.
        unsafe { HOOK_GRACE.quiescent(0) };
    }
    let odd: Vec<usize> = (1..64).step_by(2).collect();
    run(
        &mut expected,
        &|e| odd.iter().for_each(|&i| e[i] = Some(i as u32)),
        &|| HOOK_MAP.insert_batch(odd.iter().map(|&i| obj(i))).unwrap(),
    );
    for i in (0..64).step_by(3) {
        // SAFETY: as above.
        unsafe { HOOK_GRACE.quiescent(0) };
        let start = 0x1000 + i * 0x40;
        run(&mut expected, &|e| e[i] = None, &|| {
            assert!(HOOK_MAP.remove(start).is_some())
        });
    }
}

#[test]
fn stress_readers_against_writer() {
    const READERS: usize = 2;
    let d: &'static GraceDomain = std::boxed::Box::leak(std::boxed::Box::new(GraceDomain::new()));
    // SAFETY: CPUs 0..=READERS are this test's threads.
    unsafe { d.set_possible_cpus(READERS + 1) };
    let map = Arc::new(CodeMap::new(d));
    map.insert(code(0x10_0000, 0x10_1000, 0)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (1..=READERS)
        .map(|cpu| {
            let map = Arc::clone(&map);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !done.load(Ordering::Relaxed) || n < 1000 {
                    let pc = 0x10_0000 + (n * 61 + cpu) % 0x1000;
                    assert_eq!(map.lookup_with(pc, |c| c.index()), Some(Some(0)));
                    assert_eq!(index_at(&map, pc), Some(0));
                    let churn = 0x1000 + (n * 37) % (32 * 0x100);
                    if let Some(c) = map.lookup(churn) {
                        assert!(c.contains(churn) && c.index() == Some(1));
                    }
                    // SAFETY: this reader holds nothing from a lookup (the `Arc` is its own).
                    unsafe { d.quiescent(cpu) };
                    n += 1;
                }
                // SAFETY: this reader looks nothing up any more.
                unsafe { d.cpu_offline(cpu) };
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    for i in 0..20_000usize {
        if std::time::Instant::now() > deadline {
            break;
        }
        let base = 0x1000 + (i % 32) * 0x100;
        if map.insert(code(base, base + 0x100, 1)).is_err() {
            assert!(map.remove(base).is_some());
        }
        // SAFETY: the writer holds nothing from a lookup.
        unsafe { d.quiescent(0) };
    }
    done.store(true, Ordering::Relaxed);
    for h in readers {
        h.join().unwrap();
    }
    for _ in 0..2 {
        // SAFETY: the writer holds nothing from a lookup; the readers are offline.
        unsafe { d.quiescent(0) };
        map.reclaim();
    }
    assert_eq!(map.memory().retired, 0);
}

// Model test: random insert/remove/lookup against a brute-force scan of a Vec.

#[derive(Clone, Debug)]
enum Op {
    Insert {
        start: usize,
        size: usize,
    },
    /// Remove at the start of the n-th model entry (if any), else at `addr`.
    Remove {
        nth: usize,
        addr: usize,
    },
    Lookup(usize),
}

const SPACE: usize = 512;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SPACE, 1..48usize).prop_map(|(start, size)| Op::Insert { start, size }),
        2 => (0..8usize, 0..SPACE).prop_map(|(nth, addr)| Op::Remove { nth, addr }),
        3 => (0..SPACE + 64).prop_map(Op::Lookup),
    ]
}

fn model_find(model: &[Arc<CodeObject>], pc: usize) -> Option<&Arc<CodeObject>> {
    model.iter().find(|c| c.contains(pc))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn model_insert_remove_lookup(ops in prop::collection::vec(op(), 1..80)) {
        let map = CodeMap::new(grace());
        let mut model: Vec<Arc<CodeObject>> = Vec::new();
        let mut next_index = 0;
        for op in ops {
            match op {
                Op::Insert { start, size } => {
                    let c = code(start, start + size, next_index);
                    next_index += 1;
                    let range = c.instructions();
                    let expected = model
                        .iter()
                        .map(|m| m.instructions())
                        .filter(|m| !m.overlap(&range).is_empty())
                        .min()
                        .map_or(Ok(()), |existing| Err(CodeMapError::Overlap { existing }));
                    prop_assert_eq!(map.insert(Arc::clone(&c)), expected);
                    if expected.is_ok() {
                        model.push(c);
                    }
                }
                Op::Remove { nth, addr } => {
                    let start = model.get(nth).map_or(addr, |c| c.instruction_start());
                    let pos = model.iter().position(|c| c.instruction_start() == start);
                    let got = map.remove(start);
                    match pos {
                        Some(p) => {
                            let expected = model.remove(p);
                            prop_assert!(got.is_some_and(|g| Arc::ptr_eq(&g, &expected)));
                        }
                        None => prop_assert!(got.is_none()),
                    }
                }
                Op::Lookup(pc) => {
                    let got = map.lookup(pc);
                    let expected = model_find(&model, pc);
                    prop_assert_eq!(got.is_some(), expected.is_some(), "pc {}", pc);
                    if let (Some(g), Some(e)) = (got, expected) {
                        prop_assert!(Arc::ptr_eq(&g, e));
                    }
                }
            }
            prop_assert_eq!(map.len(), model.len());
        }
        for pc in 0..SPACE + 64 {
            let expected = model_find(&model, pc).and_then(|c| c.index());
            prop_assert_eq!(map.lookup_with(pc, |c| c.index()).flatten(), expected, "pc {}", pc);
        }
    }
}
