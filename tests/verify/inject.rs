//! Failure injection at every backend call of every public operation.
//!
//! The driver runs an operation once on a fresh [`World`] and counts the backend calls of each
//! kind. Then, for every kind and every call index, it re-creates the same world, makes exactly
//! that call fail, runs the operation again and asserts:
//! - the failure surfaces as a typed error carrying the injected `MmuError` (operations that
//!   defer by design — reclaim, module drop — may swallow it);
//! - an error that promises nothing changed left every observable thing as it was
//!   ([`Observation`]: window leaves, sealed direct-map pages, data frames, manager and
//!   allocator counters, trap and PC lookups, code and table bytes, slot and pointer targets,
//!   and what every CPU executes through every slot);
//! - an error that says the state changed (`FlushFailed`, `SyncFailed`, `PartialDecommit`,
//!   `NotRestored`) left it safe: no broken promise in the TLB model, never W+X, no CPU's slot
//!   into freed code;
//! - in every case, once later operations ran, the audit is clean, no frame or range leaked,
//!   every CPU executes what the books say, and a follow-up add/replace/patch/publish works.

use codespace::code_object::CodeKind;
use codespace::mmu::soft::CallKind;
use codespace::mmu::MmuError;
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode};
use codespace::{CodeError, FreeError};

use super::world::{World, EXTERNAL};
use crate::common::*;

/// What an operation under test reported.
#[derive(Debug)]
enum Outcome {
    Done,
    /// A typed error that promises nothing changed.
    Unchanged(String),
    /// A typed error that says what stayed changed.
    Changed(String),
}

fn code_outcome(e: CodeError) -> Outcome {
    let label = format!("{e:?}");
    match e {
        CodeError::FlushFailed(m)
        | CodeError::SyncFailed(m)
        | CodeError::PartialDecommit(m)
        | CodeError::NotRestored(m) => {
            assert_eq!(m, MmuError::Injected, "{label}");
            Outcome::Changed(label)
        }
        CodeError::Mmu(MmuError::Injected) => Outcome::Unchanged(label),
        e => panic!("not the injected failure: {e:?}"),
    }
}

fn module_outcome(e: ModuleError) -> Outcome {
    match e {
        ModuleError::Code(e) => code_outcome(e),
        e => panic!("not the injected failure: {e:?}"),
    }
}

/// A failed add's outcome, after remembering what it installed anyway (`SyncFailed`).
fn adopted(w: &mut World, e: ModuleError) -> Outcome {
    w.adopt_installed();
    module_outcome(e)
}

type Op = fn(&mut World) -> Outcome;

/// Runs `op` once per failure point of a clean run; returns how many failure points it had.
fn exhaustive(name: &str, mode: Mode, op: Op, swallows: bool) -> usize {
    exhaustive_in(World::new, name, mode, op, swallows)
}

/// [`exhaustive`] on worlds made by `world` (e.g. under the INT3 patch protocol).
fn exhaustive_in(
    world: fn(Mode) -> World,
    name: &str,
    mode: Mode,
    op: Op,
    swallows: bool,
) -> usize {
    let mut clean = world(mode);
    let before: Vec<u64> = CallKind::ALL
        .iter()
        .map(|&k| clean.machine.calls(k))
        .collect();
    let outcome = op(&mut clean);
    assert!(
        matches!(outcome, Outcome::Done),
        "{name}: clean run: {outcome:?}"
    );
    let calls: Vec<u64> = CallKind::ALL
        .iter()
        .zip(&before)
        .map(|(&k, b)| clean.machine.calls(k) - b)
        .collect();
    clean.recover();
    clean.check(&format!("{name} (clean)"), true);
    let mut points = 0;
    for (&kind, &count) in CallKind::ALL.iter().zip(&calls) {
        for n in 0..count {
            let label = format!("{name} ({mode:?}), {kind:?} call {n} of {count} fails");
            let mut world = world(mode);
            let before = world.observe();
            world.machine.fail_nth(kind, n);
            let outcome = op(&mut world);
            world.machine.clear_failures();
            match outcome {
                Outcome::Done => assert!(swallows, "{label}: the failure vanished"),
                Outcome::Unchanged(e) => {
                    let after = world.observe();
                    assert!(
                        before.unchanged(&after),
                        "{label}: {e} changed something:{}",
                        before.diff(&after)
                    );
                }
                Outcome::Changed(e) => world.check(&format!("{label}: {e}"), false),
            }
            world.recover();
            world.check(&label, true);
            world.follow_up(&label);
            points += 1;
        }
    }
    // Discarding never-published code from a ROX page that stays in use writes nothing (the
    // range still holds INT3) and unmaps nothing: the one operation with no backend call.
    let free_of_calls = mode.rox && name == "discard";
    assert!(points > 0 || free_of_calls, "{name}: no backend calls");
    eprintln!("{name} ({mode:?}): {points} failure points {calls:?}");
    points
}

// ---- allocator operations ----

fn publish(w: &mut World) -> Outcome {
    let code = w.writable.remove(0);
    match w.alloc.publish(code) {
        Ok(p) => {
            w.published.push(p);
            Outcome::Done
        }
        Err(r) => {
            w.writable.insert(0, r.code);
            code_outcome(r.error)
        }
    }
}

fn publish_batch(w: &mut World) -> Outcome {
    let codes = std::mem::take(&mut w.writable);
    match w.alloc.publish_batch(codes) {
        Ok(p) => {
            w.published.extend(p);
            Outcome::Done
        }
        Err(r) => {
            w.writable = r.code;
            code_outcome(r.error)
        }
    }
}

fn free_published(w: &mut World) -> Outcome {
    // Two pages and a bit: INT3 on two live pages, one page decommitted.
    let code = w.published.remove(1);
    match crate::common::free_published(&mut w.alloc, code) {
        Ok(()) => Outcome::Done,
        Err(FreeError::NotFreed(e, code)) => {
            w.published.insert(1, code);
            code_outcome(e)
        }
        Err(FreeError::Decommit(e)) => code_outcome(e),
        Err(e) => panic!("{e:?}"),
    }
}

fn discard(w: &mut World) -> Outcome {
    let code = w.writable.remove(0);
    match w.alloc.discard(code) {
        Ok(()) => Outcome::Done,
        Err(FreeError::NotFreed(e, code)) => {
            w.writable.insert(0, code);
            code_outcome(e)
        }
        Err(FreeError::Decommit(e)) => code_outcome(e),
        Err(e) => panic!("{e:?}"),
    }
}

fn allocate(w: &mut World) -> Outcome {
    // In the ROX mode, a size the committed 2 MiB page cannot hold: a new space and page.
    let size = if w.mode.rox {
        codespace::mmu::HUGE_PAGE_SIZE
    } else {
        3 * PAGE
    };
    match w.alloc.allocate(size) {
        Ok(code) => {
            w.writable.push(code);
            Outcome::Done
        }
        Err(e) => code_outcome(e),
    }
}

// ---- module operations ----

fn add(w: &mut World) -> Outcome {
    let bytes = body(2 * PAGE + PAGE / 2, 0x55);
    let mut code = NewCode::function(5, &bytes);
    code.protected = &[4];
    code.landing_pad = Some(8);
    match w.module().add_code(&code) {
        Ok(o) => {
            w.add(&o);
            Outcome::Done
        }
        Err(e) => adopted(w, e),
    }
}

fn replace(w: &mut World) -> Outcome {
    match w.module().add_code(&NewCode::function(0, &body(100, 0x56))) {
        Ok(o) => {
            w.add(&o);
            Outcome::Done
        }
        Err(e) => adopted(w, e),
    }
}

fn add_into_a_new_space(w: &mut World) -> Outcome {
    // Too large for the free room of both spaces, and out of reach of both tables.
    let bytes = body(20 * PAGE, 0x57);
    match w.module().add_code(&NewCode::function(6, &bytes)) {
        Ok(o) => {
            w.add(&o);
            Outcome::Done
        }
        Err(e) => adopted(w, e),
    }
}

fn add_batch(w: &mut World) -> Outcome {
    let small = body(64, 0x58);
    let big = body(PAGE + 10, 0x59);
    let batch = [
        NewCode::function(5, &small),
        NewCode::function(0, &big),
        NewCode::new(CodeKind::Wrapper, &small),
    ];
    match w.module().add_code_batch(&batch) {
        Ok(objects) => {
            for o in &objects {
                w.add(o);
            }
            Outcome::Done
        }
        Err(e) => adopted(w, e),
    }
}

fn patch_slots(w: &mut World) -> Outcome {
    let f1 = w.module().function_code(1).unwrap().unwrap();
    let patches = [(0, w.wrapper), (1, EXTERNAL), (6, f1), (3, f1)];
    match w.module().patch_slots(&patches) {
        Ok(()) => Outcome::Done,
        Err(e) => module_outcome(e),
    }
}

fn new_module(w: &mut World) -> Outcome {
    let config = ModuleConfig {
        functions: 4,
        lazy_entry: Some(LAZY_ENTRY),
        ..ModuleConfig::default()
    };
    let deferred = w.regs.grace().deferred();
    match CodeModule::new(&w.manager, w.regs, config) {
        Ok(m) => {
            w.other = Some(m);
            Outcome::Done
        }
        Err(e) => {
            // A failed constructor changes nothing: no half-built module waits for a grace
            // period (its code space went back at once).
            assert_eq!(w.regs.grace().deferred(), deferred);
            module_outcome(e)
        }
    }
}

fn reclaim(w: &mut World) -> Outcome {
    pass_grace(w.regs);
    // Frees retired code: unregisters, fills INT3, decommits; failures are retried later.
    w.module().reclaim().unwrap();
    Outcome::Done
}

// ---- the tests ----

#[test]
fn inject_every_failure_of_publish_and_free() {
    for mode in MODES {
        exhaustive("allocate", mode, allocate, false);
        exhaustive("publish", mode, publish, false);
        exhaustive("publish_batch", mode, publish_batch, false);
        exhaustive("free", mode, free_published, false);
        exhaustive("discard", mode, discard, false);
    }
}

#[test]
fn inject_every_failure_of_module_add_and_replace() {
    for mode in MODES {
        exhaustive("add", mode, add, false);
        exhaustive("replace", mode, replace, false);
        exhaustive("add into a new space", mode, add_into_a_new_space, false);
        exhaustive("new module", mode, new_module, false);
    }
}

#[test]
fn inject_every_failure_of_batch_add() {
    for mode in MODES {
        exhaustive("add_code_batch", mode, add_batch, false);
    }
}

#[test]
fn inject_every_failure_of_slot_patching() {
    for mode in MODES {
        exhaustive("patch_slots", mode, patch_slots, false);
    }
}

/// The same under the INT3 protocol: a failure in any of its three store sessions or three
/// sync rounds leaves every CPU going to the old or the new target (through the #BP hook while
/// an INT3 is in place), and the next operations finish the patch.
#[test]
fn inject_every_failure_of_slot_patching_under_int3() {
    for mode in MODES {
        let points = exhaustive_in(World::int3, "patch_slots (INT3)", mode, patch_slots, false);
        assert!(points >= 6, "three sessions and three rounds at least");
    }
}

#[test]
fn inject_every_failure_of_reclaim() {
    for mode in MODES {
        exhaustive("reclaim", mode, reclaim, true);
    }
}

/// Dropping a module frees everything after a grace period; a failure anywhere in that
/// teardown leaks nothing once later operations ran.
#[test]
fn inject_every_failure_of_a_module_drop() {
    let teardown = |world: &mut World| {
        drop(world.module.take());
        pass_grace(world.regs);
        assert_eq!(world.regs.grace().reclaim(), 1);
    };
    let mut clean = World::new(Mode::ALIAS);
    let before: Vec<u64> = CallKind::ALL
        .iter()
        .map(|&k| clean.machine.calls(k))
        .collect();
    teardown(&mut clean);
    for (i, &kind) in CallKind::ALL.iter().enumerate() {
        let count = clean.machine.calls(kind) - before[i];
        for n in 0..count {
            let label = format!("module drop, {kind:?} call {n} of {count} fails");
            let mut world = World::new(Mode::ALIAS);
            let committed = world.alloc.stats().allocated;
            world.machine.fail_nth(kind, n);
            teardown(&mut world);
            world.machine.clear_failures();
            // Any later operation finishes what the teardown left.
            let mut w = world.alloc.allocate(64).unwrap();
            w.as_mut_slice().fill(0xC3);
            let p = world.alloc.publish(w).unwrap();
            crate::common::free_published(&mut world.alloc, p).unwrap();
            assert_eq!(world.alloc.stats().allocated, committed);
            assert_eq!(world.regs.code.len(), 0, "{label}");
            assert_eq!(world.regs.traps.len(), 0, "{label}");
            assert_eq!(world.pointers.len(), 0, "{label}");
            let spaces = world.manager.code_spaces().unwrap();
            assert_eq!(
                spaces.len(),
                world.alloc.code_spaces().len() + 6,
                "{label}: {spaces:?}"
            );
            assert_sound_no_leak(&world.machine, &world.manager);
        }
    }
}
