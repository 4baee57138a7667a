//! Model checks of the protocol: every interleaving of a reader using an object against a
//! writer that unlinks it, waits for the grace period and frees it. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.

use super::*;
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicPtr;
use loom::sync::Arc;
use std::boxed::Box;
use std::vec::Vec;

/// A heap object whose accesses loom tracks: a free racing with a read is reported.
struct Obj(UnsafeCell<u64>);

/// `readers` CPUs each run `rounds` read sections (load root, read the object) separated by
/// quiescent states, then go offline; CPU 0 swaps the root, waits for the grace period with
/// `wait_epochs`, and frees the old object.
fn model(readers: usize, rounds: usize) {
    let mut builder = loom::model::Builder::new();
    // Bounded preemptions keep the search to seconds; bugs in protocols like this one show up
    // within two or three preemptions (loom's documentation), and the broken variants did.
    builder.preemption_bound.get_or_insert(3);
    builder.check(move || {
        let d = Arc::new(GraceDomain::new());
        // SAFETY: CPUs 0..=readers are the model's threads; the rest never read.
        unsafe { d.set_possible_cpus(readers + 1) };
        let old = Box::into_raw(Box::new(Obj(UnsafeCell::new(1))));
        let root = Arc::new(AtomicPtr::new(old));
        let threads: Vec<_> = (1..=readers)
            .map(|cpu| {
                let (d, root) = (Arc::clone(&d), Arc::clone(&root));
                loom::thread::spawn(move || {
                    for _ in 0..rounds {
                        let p = root.load(Ordering::Acquire);
                        // SAFETY: `p` is the root or a retired root still in its grace
                        // period: the protocol under test keeps it allocated.
                        let v = unsafe { (*p).0.with(|v| *v) };
                        assert!(v == 1 || v == 2, "read a freed object");
                        // SAFETY: the read section above is over.
                        unsafe { d.quiescent(cpu) };
                    }
                    // SAFETY: this CPU reads nothing more.
                    unsafe { d.cpu_offline(cpu) };
                })
            })
            .collect();
        let new = Box::into_raw(Box::new(Obj(UnsafeCell::new(2))));
        let unlinked = root.swap(new, Ordering::SeqCst);
        let ticket = d.defer();
        while !d.is_over(ticket) {
            // SAFETY: the writer holds no reference from a read section.
            unsafe { d.quiescent(0) };
            loom::thread::yield_now();
        }
        // "Free" it: poison the value with a write loom tracks. Were a reader still inside,
        // loom would report the racing read, or the reader would see the poison.
        // SAFETY: the grace period is over, so no reader holds `unlinked`; the memory itself
        // is released after the joins so a protocol bug shows as a report, not a crash.
        unsafe { (*unlinked).0.with_mut(|v| *v = 0) };
        for t in threads {
            t.join().unwrap();
        }
        // SAFETY: all readers are done; both objects came from `Box::into_raw`.
        unsafe { drop(Box::from_raw(unlinked)) };
        // SAFETY: all readers are done.
        drop(unsafe { Box::from_raw(root.load(Ordering::SeqCst)) });
    });
}

#[test]
fn loom_grace_one_reader_two_sections() {
    model(1, 2);
}

#[test]
fn loom_grace_two_readers() {
    model(2, 1);
}
