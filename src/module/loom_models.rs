//! Model checks of the module-drop protocol (and the per-object retire path, which shares it):
//! a CPU loading a code pointer and calling through it, against a writer that drops the module —
//! unpublishes its pointers, takes the grace ticket, waits for the grace period, frees the code.
//! The models run the real [`GraceDomain`], the real [`CodePointerTable`] and the module's own
//! [`unlink_then_defer`]; the code's bytes are a loom `UnsafeCell`, so a call that can still
//! execute the code when it is freed is reported. A whole `CodeModule` does not run under loom
//! (its allocator drives a page-table backend); what orders the free after every call is this
//! step, which is all `CodeModule::drop` does before handing the books to the grace domain.
//! Run with `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_`.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use std::boxed::Box;

use super::lifetime::unlink_then_defer;
use crate::code_pointer_table::{CodePointer, CodePointerTable};
use crate::sync::grace::GraceDomain;

/// What free entries hold: calls through them trap.
const TRAP: usize = 0xDEAD;
/// Where the dropped module's code lies.
const CODE: usize = 0xC0DE;
/// The code's first byte while it is live (`ret`), and once freed (INT3 fill).
const RET: u8 = 0xC3;
const FREED: u8 = 0xCC;

/// How the writer tears the module down.
#[derive(Clone, Copy)]
enum Teardown {
    /// `CodeModule::drop`: unpublish, ticket, grace period, free.
    UnlinkThenTicket,
    /// The order before issue 18: ticket, grace period, then the pointer reset and the free in
    /// one step.
    TicketFirst,
}

/// The reader (CPU 1) calls through the handle `rounds` times, reporting a quiescent state after
/// each call (it then holds nothing: the call returned), then goes offline; the writer (CPU 0)
/// drops the module as `teardown` says.
fn model(teardown: Teardown, rounds: usize) {
    let mut builder = loom::model::Builder::new();
    // As the grace-period models: bugs of this kind show within two or three preemptions, and
    // the broken order below does.
    builder.preemption_bound.get_or_insert(3);
    builder.check(move || {
        // Leaked: the table keeps a `&'static` to its domain (a few bytes per explored run).
        let grace: &'static GraceDomain = Box::leak(Box::new(GraceDomain::new()));
        // SAFETY: CPUs 0 and 1 are the model's threads; no other index reads anything.
        unsafe { grace.set_possible_cpus(2) };
        // SAFETY: `TRAP` is never executed: the model only compares the entries it reads.
        let table = Arc::new(unsafe { CodePointerTable::with_capacity_and_trap(2, grace, TRAP) });
        let code = Arc::new(UnsafeCell::new(RET));
        // SAFETY: `CODE` stands for the code in `code`, which stays (the model checks when it
        // is "freed") until the handle is freed and a grace period of `grace` passed.
        let h: CodePointer = unsafe { table.allocate(CODE) }.unwrap();
        let reader = {
            let (table, code) = (Arc::clone(&table), Arc::clone(&code));
            loom::thread::spawn(move || {
                for _ in 0..rounds {
                    match table.get(h) {
                        // SAFETY: loom tracks the cell: executing code the writer frees
                        // concurrently is reported, which is what the model checks.
                        CODE => assert_eq!(unsafe { code.with(|b| *b) }, RET, "ran freed code"),
                        entry => assert_eq!(entry, TRAP, "a pointer that was never stored"),
                    }
                    // SAFETY: the call above returned; this CPU holds nothing.
                    unsafe { grace.quiescent(1) };
                }
                // SAFETY: this CPU calls nothing more.
                unsafe { grace.cpu_offline(1) };
            })
        };
        let ticket = match teardown {
            Teardown::UnlinkThenTicket => unlink_then_defer(grace, Some(&table), [h]),
            Teardown::TicketFirst => grace.defer(),
        };
        while !grace.is_over(ticket) {
            // SAFETY: the writer runs no generated code and holds no lookup result.
            unsafe { grace.quiescent(0) };
            loom::thread::yield_now();
        }
        if let Teardown::TicketFirst = teardown {
            // SAFETY: the model owns `h` and frees it once (the broken order under test frees
            // it late, which the handle contract allows).
            unsafe { table.free(h) }.unwrap();
        }
        // SAFETY: loom tracks the cell (see the reader): the free is a write to the code.
        unsafe { code.with_mut(|b| *b = FREED) };
        reader.join().unwrap();
        assert_eq!(table.get(h), TRAP);
    });
}

/// The drop order: whatever the interleaving, the reader either ran the code before its
/// quiescent state that the grace period waited for, or found the trap address.
#[test]
fn loom_module_drop_unpublishes_before_the_ticket() {
    model(Teardown::UnlinkThenTicket, 3);
}

/// The model has teeth: with the ticket taken first, a reader that reports a quiescent state
/// after it and then calls through the pointer runs code that is being freed.
#[test]
#[should_panic]
fn loom_module_drop_with_the_ticket_first_runs_freed_code() {
    model(Teardown::TicketFirst, 2);
}
