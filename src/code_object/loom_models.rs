//! Model checks of the liveness count: every interleaving of holders releasing and a lookup
//! taking a reference. Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom_`.

/// `dec_ref` of a reference the test holds (the tests count references to made-up code
/// nothing runs).
fn release(c: &CodeObject) -> DecRef {
    // SAFETY: no code runs behind the tests' objects: an unbalanced release only shows in
    // the count, which is what the tests check.
    unsafe { c.dec_ref() }
}
use super::*;
use loom::cell::UnsafeCell;
use loom::sync::Arc;

fn object() -> CodeObject {
    CodeObject::new(&CodeDesc::new(
        CodeKind::Function,
        AddressRange::new(0x1000, 0x1040),
    ))
    .unwrap()
}

fn checked(f: impl Fn() + Send + Sync + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(3);
    builder.check(f);
}

/// Two holders release while a third thread tries to take a reference: exactly one
/// release sees `Dead`; a reference taken is one more release to wait for; a reference is
/// never taken once the count reached zero; and the thread seeing `Dead` sees everything
/// the other holders wrote before releasing (it frees the code after them).
#[test]
fn loom_code_object_dies_exactly_once_and_is_never_resurrected() {
    checked(|| {
        let o = Arc::new(object());
        assert!(o.inc_ref(), "a second holder");
        // What each holder last wrote while it held the code (e.g. its use of the code).
        let notes = Arc::new([UnsafeCell::new(0u32), UnsafeCell::new(0u32)]);
        let holder = |i: usize| {
            let (o, notes) = (Arc::clone(&o), Arc::clone(&notes));
            loom::thread::spawn(move || {
                // SAFETY: loom tracks the cell; only this holder writes it before its
                // release, only the thread seeing `Dead` reads it after.
                unsafe { notes[i].with_mut(|n| *n = 1) };
                let r = release(&o);
                if r == DecRef::Dead {
                    for n in notes.iter() {
                        // SAFETY: as above; a missing happens-before is a reported race.
                        assert_eq!(unsafe { n.with(|n| *n) }, 1);
                    }
                }
                r
            })
        };
        let a = holder(0);
        let b = holder(1);
        // A lookup racing the releases.
        let taken = o.inc_ref();
        let dead_before_release = o.is_dying();
        assert!(
            !(taken && dead_before_release),
            "resurrected a dying object"
        );
        let mine = taken.then(|| release(&o));
        let results = [a.join().unwrap(), b.join().unwrap()];
        let deads = results
            .iter()
            .chain(mine.iter())
            .filter(|&&r| r == DecRef::Dead)
            .count();
        assert_eq!(deads, 1, "{results:?} {mine:?}");
        assert!(results
            .iter()
            .chain(mine.iter())
            .all(|&r| r != DecRef::AlreadyDying));
        assert!(o.is_dying());
        assert_eq!(o.ref_count(), 0);
        assert!(!o.inc_ref(), "dead code stays dead");
        assert_eq!(release(&o), DecRef::AlreadyDying);
    });
}
