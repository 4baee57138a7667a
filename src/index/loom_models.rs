//! Model checks of the index's publish/retire protocol under every interleaving loom explores:
//! readers on other CPUs look up while the writer path-copies, publishes, retires and reclaims.
//! Loom sees each node's and value's contents as an `UnsafeCell` (written when built, poisoned
//! when freed, read by every lookup), so a lookup that can see a node without the publication
//! ordering it after the node's construction, or that can still see memory when it is freed,
//! is reported. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.

use super::*;
use loom::cell::UnsafeCell;
use std::boxed::Box;
use std::vec::Vec;

/// A stored range whose contents loom tracks.
struct Obj {
    end: usize,
    id: u64,
    cell: UnsafeCell<u64>,
}

/// Owning pointer to an [`Obj`]; dropping it poisons the object (a tracked write) and leaks the
/// memory, so a reader the protocol failed to wait for is reported instead of reading freed
/// memory.
struct Leaky(NonNull<Obj>);

// SAFETY: the object is only read after construction (and poisoned once, on drop).
unsafe impl Send for Leaky {}
// SAFETY: as above.
unsafe impl Sync for Leaky {}

impl Leaky {
    fn new(end: usize, id: u64) -> Leaky {
        let obj = Box::new(Obj {
            end,
            id,
            cell: UnsafeCell::new(id),
        });
        Leaky(NonNull::from(Box::leak(obj)))
    }
}

impl Drop for Leaky {
    fn drop(&mut self) {
        // SAFETY: the object is leaked, so the pointer stays valid; this is the only writer.
        unsafe { self.0.as_ref() }
            .cell
            .with_mut(|v| unsafe { *v = 0 });
    }
}

// SAFETY: the pointer round-trips unchanged and the object never moves (it is leaked).
unsafe impl IndexValue for Leaky {
    type View<'a> = &'a Obj;

    fn into_raw(self) -> NonNull<()> {
        let p = self.0.cast();
        core::mem::forget(self);
        p
    }

    unsafe fn from_raw(p: NonNull<()>) -> Self {
        Leaky(p.cast())
    }

    unsafe fn view<'a>(p: NonNull<()>) -> &'a Obj {
        // SAFETY: leaked, never freed.
        unsafe { p.cast::<Obj>().as_ref() }
    }

    fn end(view: &Obj, _start: usize) -> usize {
        view.end
    }

    fn heap_bytes(_: &Obj) -> usize {
        0
    }
}

/// The id found at `key`, reading the object's tracked contents.
fn lookup(index: &RangeIndex<Leaky>, key: usize) -> Option<u64> {
    index
        .find(key, |_, o| {
            // SAFETY: reads only; loom checks it against the writes.
            let v = o.cell.with(|v| unsafe { *v });
            assert_eq!(v, o.id, "read a poisoned (freed) object");
            (key < o.end).then_some(v)
        })
        .flatten()
}

/// `readers` CPUs each do `rounds` lookups separated by quiescent states, then go offline. CPU
/// 0 starts from `initial` entries `(start, end, id)`, applies `change` in one update, then
/// waits for the grace period by reporting and reclaiming until nothing is retired. `stable`
/// keys must resolve to the same id throughout; `changing` keys to their old or new id.
fn model(
    readers: usize,
    rounds: usize,
    initial: &'static [(usize, usize, u64)],
    change: fn(&mut Update<'_, Leaky>),
    stable: &'static [(usize, u64)],
    changing: &'static [(usize, Option<u64>, Option<u64>)],
    advance: bool,
) {
    let mut builder = loom::model::Builder::new();
    // As in the grace-period models: bugs of this kind show within two or three preemptions,
    // and the broken variants did; the bound keeps each model to seconds.
    builder.preemption_bound.get_or_insert(3);
    builder.check(move || {
        let d: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
        // SAFETY: CPUs 0..=readers are the model's threads.
        unsafe { d.set_possible_cpus(readers + 1) };
        let index: &'static RangeIndex<Leaky> = Box::leak(Box::new(RangeIndex::new(d)));
        {
            let mut update = index.update();
            for &(s, e, id) in initial {
                update.insert(s, Leaky::new(e, id));
            }
        }
        let threads: Vec<_> = (1..=readers)
            .map(|cpu| {
                loom::thread::spawn(move || {
                    for _ in 0..rounds {
                        for &(key, id) in stable {
                            assert_eq!(lookup(index, key), Some(id), "key {key}");
                        }
                        for &(key, old, new) in changing {
                            let got = lookup(index, key);
                            assert!(got == old || got == new, "key {key}: {got:?}");
                        }
                        // SAFETY: the lookups above are over.
                        unsafe { d.quiescent(cpu) };
                        if advance {
                            // As a writer of another structure on this CPU would.
                            d.try_advance();
                        }
                    }
                    // SAFETY: this CPU looks nothing up any more.
                    unsafe { d.cpu_offline(cpu) };
                })
            })
            .collect();
        change(&mut index.update());
        while index.retired_count() > 0 {
            // SAFETY: the writer holds nothing from a lookup.
            unsafe { d.quiescent(0) };
            index.reclaim();
            loom::thread::yield_now();
        }
        for t in threads {
            t.join().unwrap();
        }
    });
}

/// One leaf: inserting copies it, removing copies it and retires the removed value.
#[test]
fn loom_index_insert_and_remove_in_one_leaf() {
    model(
        1,
        3,
        &[(10, 20, 1), (30, 40, 2)],
        |u| {
            u.insert(50, Leaky::new(60, 3));
            assert!(u.remove(30));
        },
        &[(15, 1)],
        &[(35, Some(2), None), (55, None, Some(3))],
        true,
    );
}

/// Two readers against an update that removes an entry and then inserts a batch large enough
/// to rebuild the tree from scratch (every old node retired at once).
#[test]
fn loom_index_batch_split_two_readers() {
    const FULL: [(usize, usize, u64); 15] = {
        let mut a = [(0, 0, 0); 15];
        let mut i = 0;
        while i < 15 {
            a[i] = (i * 10, i * 10 + 5, i as u64 + 1);
            i += 1;
        }
        a
    };
    model(
        2,
        1,
        &FULL,
        |u| {
            assert!(u.remove(70));
            // Two entries into fifteen: the batch path rebuilds the whole tree.
            let batch = std::vec![(36, Leaky::new(37, 101)), (152, Leaky::new(153, 100))];
            assert_eq!(u.insert_batch(batch), Ok(()));
        },
        &[(0, 1), (141, 15)],
        &[
            (72, Some(8), None),
            (152, None, Some(100)),
            (36, None, Some(101)),
        ],
        false,
    );
}
