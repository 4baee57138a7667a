//! Model checks of the table's protocol: every interleaving of writers against a reader, for a
//! handle whose code moves, and for a handle freed and taken by other code while a reader holds
//! it. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.

use super::*;
use loom::cell::UnsafeCell;
use loom::sync::Arc;

const TRAP: usize = 0xDEAD;

fn checked(f: impl Fn() + Send + Sync + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(3);
    builder.check(f);
}

/// A table of `capacity` whose grace domain has CPUs 0 (the writer) and 1 (the reader).
fn table(capacity: usize) -> Arc<CodePointerTable> {
    let d: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
    // SAFETY: the models' threads are CPUs 0 and 1.
    unsafe { d.set_possible_cpus(2) };
    // SAFETY: the trap address is never called, only compared.
    Arc::new(unsafe { CodePointerTable::with_capacity_and_trap(capacity, d, TRAP) })
}

/// A reader calling through the handle while the writer moves it from code A to code B
/// sees A or B, never anything else, never B then A, and sees B's bytes once it sees B
/// (the writer publishes the code before `update`, as callers must).
#[test]
fn loom_code_pointer_readers_see_the_old_or_the_new_entry() {
    checked(|| {
        let table = table(2);
        // "Code bytes" behind the entries: 0 = not written yet.
        let code = Arc::new([UnsafeCell::new(1u8), UnsafeCell::new(0u8)]);
        // SAFETY: the model's "code" is only read through the cells.
        let h = unsafe { table.allocate(0xA000) }.unwrap();
        let reader = {
            let (table, code) = (Arc::clone(&table), Arc::clone(&code));
            loom::thread::spawn(move || {
                let mut seen_new = false;
                for _ in 0..2 {
                    let entry = table.get(h);
                    assert!(entry == 0xA000 || entry == 0xB000, "torn entry {entry:#x}");
                    if entry == 0xB000 {
                        // SAFETY: loom tracks the cell; a read racing the writer's write
                        // is reported, which is what this model checks for.
                        let byte = unsafe { code[1].with(|b| *b) };
                        assert_eq!(byte, 0xC3, "the new code was not visible");
                        seen_new = true;
                    } else {
                        assert!(!seen_new, "went back to the old entry");
                    }
                }
            })
        };
        // SAFETY: loom tracks the cell (see the reader).
        unsafe { code[1].with_mut(|b| *b = 0xC3) };
        // SAFETY: as for `allocate`.
        unsafe { table.update(h, 0xB000) }.unwrap();
        reader.join().unwrap();
        assert_eq!(table.get(h), 0xB000);
    });
}

/// An `update` racing a `free` of the same handle never lands after the free: the entry
/// ends at the trap address, whichever goes first.
#[test]
fn loom_code_pointer_update_never_revives_a_freed_entry() {
    checked(|| {
        let table = table(2);
        // SAFETY: nothing calls through the model's table.
        let h = unsafe { table.allocate(0xA000) }.unwrap();
        let updater = {
            let table = Arc::clone(&table);
            loom::thread::spawn(move || {
                // SAFETY: as above.
                let _ = unsafe { table.update(h, 0xB000) };
            })
        };
        // SAFETY: the model owns the handle.
        unsafe { table.free(h) }.unwrap();
        updater.join().unwrap();
        assert_eq!(table.get(h), TRAP);
        assert!(!table.is_allocated(h));
    });
}

/// Issue 18 item 4 under every interleaving: CPU 1 read handle `h` (from a function table)
/// and calls through it while CPU 0 frees `h`, waits until the table hands out a handle
/// again for an unrelated function B (in a table of one entry: necessarily `h`), then frees
/// A's code. The reader reaches A (whose bytes are intact: loom reports a read racing the
/// free's poisoning write) or the trap, never B.
#[test]
fn loom_code_pointer_freed_handle_is_not_reused_under_a_reader() {
    checked(|| {
        let table = table(1);
        let code_a = Arc::new(UnsafeCell::new(0xC3u8));
        // SAFETY: the model's "code" is only read through the cell.
        let h = unsafe { table.allocate(0xA000) }.unwrap();
        let reader = {
            let (table, code_a) = (Arc::clone(&table), Arc::clone(&code_a));
            loom::thread::spawn(move || {
                match table.get(h) {
                    // SAFETY: loom tracks the cell; see the doc comment.
                    0xA000 => assert_eq!(unsafe { code_a.with(|b| *b) }, 0xC3),
                    TRAP => {}
                    other => panic!("called {other:#x} through a stale handle"),
                }
                // SAFETY: the call is over; CPU 1 holds the handle no longer.
                unsafe { table.grace().quiescent(1) };
                // SAFETY: CPU 1 calls through the table no more.
                unsafe { table.grace().cpu_offline(1) };
            })
        };
        // SAFETY: the model owns the handle and is done with it.
        unsafe { table.free(h) }.unwrap();
        let again = loop {
            // SAFETY: as for the first `allocate`.
            match unsafe { table.allocate(0xB000) } {
                Ok(again) => break again,
                Err(CodePointerError::AwaitingGracePeriod { waiting: 1 }) => {
                    // SAFETY: CPU 0 holds no handle.
                    unsafe { table.grace().quiescent(0) };
                    loom::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(again, h);
        // A's code is freed only once no CPU can reach it (the grace period `allocate`
        // waited for covers it: the handle was its last way in).
        // SAFETY: loom tracks the cell; see the doc comment.
        unsafe { code_a.with_mut(|b| *b = 0) };
        reader.join().unwrap();
    });
}
