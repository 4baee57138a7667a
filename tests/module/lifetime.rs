//! When code goes: replaced and freed code stays registered and mapped until a grace period has
//! passed, then leaves the trap table and PC lookup before its memory is reused; held references,
//! jump tables and code pointers; events; dropping modules.

use codespace::code_events::{CodeEvent, CodeEventListener};
use codespace::code_object::{CodeKind, CodeObject, DecRef};
use codespace::code_pointer_table::CodePointerTable;
use codespace::module::{CodeModule, ModuleConfig, ModuleError, NewCode, Registries};
use codespace::AddressRange;

use super::default_rig;
use crate::common::*;

#[test]
fn replaced_code_lives_until_a_grace_period_passed_then_its_range_is_reused() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(8));
    let t = first_table(&module);

    let v1 = body(100, 0x90);
    let mut code = NewCode::function(5, &v1);
    code.protected = &[7];
    code.landing_pad = Some(50);
    let old = module.add_code(&code).expect("v1");
    let old_start = old.instruction_start();
    assert_eq!(regs.traps.len(), 1);

    let v2 = body(100, 0x66);
    let new = module.add_code(&NewCode::function(5, &v2)).expect("v2");
    let new_start = new.instruction_start();
    assert_ne!(new_start, old_start);
    assert_eq!(near_slot_target(&m, &t, 5), Some(new_start));
    for cpu in 0..4 {
        assert_eq!(executed_slot_target(&machine, cpu, &t, 5), Some(new_start));
    }
    assert_eq!(module.function_code(5).unwrap(), Some(new_start));
    assert_eq!(
        module.code_count().unwrap(),
        (2, 1),
        "table and v2; v1 retired"
    );

    // A CPU may still be running v1 (or return into it): it stays mapped, registered and intact
    // until every CPU passed a quiescent state.
    assert!(old.is_dying());
    assert!(finds(regs, old_start + 7, &old));
    assert_eq!(
        regs.traps.lookup(old_start + 7).unwrap().landing_pad(),
        old_start + 50
    );
    assert_eq!(read(&m, old_start, 100), v1);
    assert_eq!(module.reclaim().unwrap(), 0, "no grace period yet");
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert_eq!(module.code_count().unwrap(), (2, 0));

    // Then it is out of PC lookup and the trap table, its bytes INT3.
    for pc in [old_start, old_start + 7, old_start + 99] {
        assert!(regs.lookup_code(pc).is_none(), "pc {pc:#x}");
        assert!(regs.traps.lookup(pc).is_none(), "pc {pc:#x}");
    }
    assert_eq!(regs.traps.len(), 0);
    assert_eq!(read(&m, old_start, 128), vec![INT3; 128]);

    // First fit hands the freed range out again, to code that is found there.
    let bytes = body(64, 0x90);
    let mut wrapper = NewCode::new(CodeKind::Wrapper, &bytes);
    wrapper.protected = &[7];
    wrapper.landing_pad = Some(8);
    let reuse = module.add_code(&wrapper).expect("reuse");
    assert_eq!(reuse.instruction_start(), old_start);
    assert!(finds(regs, old_start + 7, &reuse));
    assert_eq!(
        regs.traps.lookup(old_start + 7).unwrap().landing_pad(),
        old_start + 8
    );
    // A wrapper is not installed anywhere.
    assert_eq!(near_slot_target(&m, &t, 5), Some(new_start));
    assert_sound(&machine, &m);
}

/// Folded from the smoke test of the new stack: replace, patch to a wrapper, a refused free,
/// grace periods, and a module dropped through the grace domain.
#[test]
fn a_module_round_trip_through_grace_periods() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(4));
    let f = module
        .add_code(&NewCode::function(1, &[0xB8, 1, 0, 0, 0, 0xC3]))
        .unwrap();
    let g = module
        .add_code(&NewCode::function(1, &[0xB8, 2, 0, 0, 0, 0xC3]))
        .unwrap();
    assert_eq!(module.slot_target(1).unwrap(), Some(g.instruction_start()));
    assert_eq!(
        module.code_count().unwrap(),
        (2, 1),
        "old f retired, waiting"
    );
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap();
    module.patch_slot(1, w.instruction_start()).unwrap();
    assert_eq!(
        module.free_code(w.instruction_start()),
        Err(ModuleError::StillTargeted {
            start: w.instruction_start()
        })
    );
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(regs.lookup_code(f.instruction_start()).is_none());
    assert_sound(&machine, &m);

    drop(module);
    assert!(
        m.committed() > 0,
        "other CPUs may still run the module's code"
    );
    assert!(finds(regs, g.instruction_start(), &g));
    assert_eq!(settle(regs), 1);
    assert_eq!(m.committed(), 0);
    assert_eq!(regs.code.len(), 0);
    assert_sound_no_leak(&machine, &m);
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    published: bool,
    name: String,
    kind: CodeKind,
    range: AddressRange,
    /// At the time of the event: whether PC lookup found the code at its start.
    in_code_map: bool,
    /// At the time of the event: whether any byte of the range was a protected instruction.
    in_trap_table: bool,
}

/// Records events, and probes the registries when each event arrives.
struct Recorder {
    registries: &'static Registries,
    events: spin::Mutex<Vec<Event>>,
}

impl Recorder {
    fn leak(registries: &'static Registries) -> &'static Recorder {
        Box::leak(Box::new(Recorder {
            registries,
            events: spin::Mutex::new(Vec::new()),
        }))
    }

    fn record(&self, published: bool, e: &CodeEvent<'_>) {
        let in_code_map = self.registries.lookup_code(e.range.start()).is_some();
        let in_trap_table =
            (e.range.start()..e.range.end()).any(|pc| self.registries.traps.lookup(pc).is_some());
        self.events.lock().push(Event {
            published,
            name: e.name.to_string(),
            kind: e.kind,
            range: e.range,
            in_code_map,
            in_trap_table,
        });
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock())
    }
}

impl CodeEventListener for Recorder {
    fn code_published(&self, e: &CodeEvent<'_>) {
        self.record(true, e);
    }

    fn code_freed(&self, e: &CodeEvent<'_>) {
        self.record(false, e);
    }
}

fn event(published: bool, name: &str, kind: CodeKind, range: AddressRange) -> Event {
    Event {
        published,
        name: name.into(),
        kind,
        range,
        // Published code is reported once registered; freed code once unregistered.
        in_code_map: published,
        in_trap_table: false,
    }
}

#[test]
fn events_report_names_and_frees_happen_after_unregistering() {
    let (machine, m) = default_rig();
    let regs = registries();
    let rec = Recorder::leak(regs);
    let module = module(&m, regs, functions(8));
    module.set_listener(Some(rec)).unwrap();
    let t = first_table(&module);

    let bytes = body(40, 0x90);
    let mut code = NewCode::function(3, &bytes);
    code.protected = &[4];
    code.landing_pad = Some(30);
    let v1 = module.add_code(&code).unwrap();
    let mut named = NewCode::function(4, &bytes);
    named.name = Some("fib");
    let fib = module.add_code(&named).unwrap();
    let wrapper = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &bytes))
        .unwrap();
    let range = |o: &CodeObject| o.instructions();
    let mut expected_v1 = event(true, "func[3]", CodeKind::Function, range(&v1));
    expected_v1.in_trap_table = true;
    assert_eq!(
        rec.take(),
        [
            expected_v1,
            event(true, "fib", CodeKind::Function, range(&fib)),
            event(true, "wrapper", CodeKind::Wrapper, range(&wrapper)),
        ]
    );

    // Replacing function 3 retires v1; once the grace period passed, it is reported freed after
    // it left PC lookup and the trap table (its memory is returned right after).
    let v2 = module.add_code(&NewCode::function(3, &bytes)).unwrap();
    assert_eq!(
        rec.take(),
        [event(true, "func[3]", CodeKind::Function, range(&v2))]
    );
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert_eq!(
        rec.take(),
        [event(false, "func[3]", CodeKind::Function, range(&v1))]
    );
    assert!(regs.traps.lookup(v1.instruction_start() + 4).is_none());
    assert!(regs.lookup_code(v1.instruction_start()).is_none());

    // free_code frees a wrapper, but neither installed code nor a non-start.
    let v2_start = v2.instruction_start();
    assert_eq!(
        module.free_code(v2_start),
        Err(ModuleError::StillInstalled { start: v2_start })
    );
    let inside = wrapper.instruction_start() + 1;
    assert_eq!(
        module.free_code(inside),
        Err(ModuleError::UnknownCode { start: inside })
    );
    module.free_code(wrapper.instruction_start()).unwrap();
    assert!(rec.take().is_empty(), "retired, not yet freed");
    pass_grace(regs);
    // Any writing operation reclaims first.
    // SAFETY: nothing executes on the software machine; LAZY_ENTRY stands for kernel text.
    unsafe { module.register_external(LAZY_ENTRY) }.unwrap();
    assert!(rec.take().is_empty(), "register_external does not reclaim");
    assert_eq!(module.free_dead_code().unwrap(), 0);
    assert_eq!(
        rec.take(),
        [event(false, "wrapper", CodeKind::Wrapper, range(&wrapper))]
    );
    assert!(regs.lookup_code(wrapper.instruction_start()).is_none());

    // Dropping the module frees the rest after a grace period, each one unregistered before it
    // is reported.
    drop(module);
    assert!(rec.take().is_empty());
    assert_eq!(settle(regs), 1);
    let mut events = rec.take();
    events.sort_by_key(|e| e.range.start());
    let table = events
        .iter()
        .find(|e| e.kind == CodeKind::JumpTable)
        .cloned()
        .expect("table freed");
    assert_eq!(table.range.start(), t.base());
    let mut expected = vec![
        event(false, "func[3]", CodeKind::Function, range(&v2)),
        event(false, "fib", CodeKind::Function, range(&fib)),
        event(false, "jump-table", CodeKind::JumpTable, table.range),
    ];
    expected.sort_by_key(|e| e.range.start());
    assert_eq!(events, expected);
    assert_eq!(regs.code.len(), 0);
    assert_eq!(regs.traps.len(), 0);
    assert_eq!(m.committed(), 0);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn a_held_reference_keeps_replaced_code_until_free_dead_code() {
    let (machine, m) = default_rig();
    let regs = registries();
    let rec = Recorder::leak(regs);
    let module = module(&m, regs, functions(4));
    module.set_listener(Some(rec)).unwrap();

    // Old code spanning three pages, the middle one its own, so "still committed" is visible.
    let bytes = body(3 * PAGE, 0x90);
    let mut code = NewCode::function(2, &bytes);
    code.protected = &[100];
    code.landing_pad = Some(200);
    let old = module.add_code(&code).unwrap();
    let start = old.instruction_start();
    assert_eq!(old.ref_count(), 1);
    assert!(
        old.inc_ref(),
        "the test holds a reference (e.g. code on a stack)"
    );

    let new = module
        .add_code(&NewCode::function(2, &body(64, 0x90)))
        .unwrap();
    let t = first_table(&module);
    assert_eq!(near_slot_target(&m, &t, 2), Some(new.instruction_start()));
    // Still alive: found, protected, committed, bytes intact; nothing retired.
    assert_eq!(old.ref_count(), 1);
    assert!(!old.is_dying());
    assert!(finds(regs, start + 10, &old));
    assert_eq!(
        regs.traps.lookup(start + 100).unwrap().landing_pad(),
        start + 200
    );
    assert_eq!(read(&m, start, 3 * PAGE), bytes);
    assert_eq!(module.code_count().unwrap(), (3, 0));
    assert_eq!(module.free_dead_code().unwrap(), 0, "nothing is dying yet");
    // The module gave up its reference on replacement: nothing left for it to drop.
    assert_eq!(
        module.free_code(start),
        Err(ModuleError::UnknownCode { start })
    );
    settle(regs);
    assert_eq!(module.reclaim().unwrap(), 0);
    assert!(rec.take().iter().all(|e| e.published));

    // The test drops its reference: the object is dying, the next scan retires it, and a grace
    // period later it is freed.
    // SAFETY: the test gives back the reference it took with `inc_ref` above.
    assert_eq!(unsafe { old.dec_ref() }, DecRef::Dead);
    assert!(old.is_dying());
    assert!(
        regs.lookup_code(start).is_some(),
        "retired by free_dead_code, not by dec_ref"
    );
    assert_eq!(module.free_dead_code().unwrap(), 1);
    assert_eq!(module.code_count().unwrap(), (2, 1));
    assert!(regs.lookup_code(start).is_some(), "a grace period first");
    let committed = m.committed();
    pass_grace(regs);
    assert_eq!(module.reclaim().unwrap(), 1);
    assert!(regs.lookup_code(start).is_none());
    assert!(regs.lookup_code(start + 3 * PAGE - 1).is_none());
    // Every page wholly inside the old code is decommitted (pages shared with live code stay).
    let own = AddressRange::new(
        start.next_multiple_of(PAGE),
        (start + 3 * PAGE) & !(PAGE - 1),
    );
    assert!(own.pages().count() >= 2);
    for page in own.pages() {
        assert_eq!(
            leaf(&machine, page).unwrap_or(0),
            0,
            "page {page:#x} decommitted"
        );
    }
    assert!(regs.traps.lookup(start + 100).is_none());
    assert_eq!(module.code_count().unwrap(), (2, 0));
    assert!(m.committed() <= committed - own.pages().count() * PAGE);
    let events = rec.take();
    assert_eq!(events.len(), 1);
    assert!(!events[0].published && !events[0].in_code_map && !events[0].in_trap_table);
    assert_eq!(events[0].range, old.instructions());
    assert_eq!(events[0].name, "func[2]");
    assert_eq!(module.free_dead_code().unwrap(), 0);
    assert_sound(&machine, &m);
}

#[test]
fn dropping_a_module_frees_everything_it_owns_after_a_grace_period() {
    let (machine, m) = default_rig();
    let regs = registries();
    let b = module(&m, regs, functions(3));
    let ob = b.add_code(&NewCode::function(1, &body(64, 0x90))).unwrap();
    let mut pb = NewCode::new(CodeKind::Wrapper, &CALL);
    pb.protected = &[0];
    pb.landing_pad = Some(5);
    b.add_code(&pb).unwrap();
    let committed_b = m.committed();
    let traps_b = regs.traps.len();
    let code_b = regs.code.len();
    assert_eq!(code_b, 3);

    let a = module(
        &m,
        regs,
        ModuleConfig {
            functions: 6,
            lazy_entry: Some(LAZY_ENTRY),
            ..ModuleConfig::default()
        },
    );
    let mut ranges = Vec::new();
    for i in 0..6 {
        let bytes = body(100 + 300 * i as usize, 0x90);
        let mut code = NewCode::function(i, &bytes);
        code.protected = &[1, 2];
        code.landing_pad = Some(3);
        ranges.push(a.add_code(&code).unwrap().instructions());
    }
    // A replaced one (retired, still waiting) and a wrapper too.
    ranges.push(
        a.add_code(&NewCode::function(0, &body(50, 0x90)))
            .unwrap()
            .instructions(),
    );
    ranges.push(
        a.add_code(&NewCode::new(CodeKind::Wrapper, &body(10, 0x90)))
            .unwrap()
            .instructions(),
    );
    ranges.push(first_table(&a).range());
    assert_eq!(
        a.code_count().unwrap(),
        (8, 1),
        "table, functions 0-5, wrapper; old 0"
    );
    assert_eq!(
        regs.traps.len(),
        traps_b + 6,
        "the replaced function waits, registered"
    );
    assert!(m.committed() > committed_b);
    let spaces_a = a.code_spaces().unwrap();

    drop(a);
    // Until the grace period passed, everything stays: a CPU may be running any of it.
    assert!(regs.lookup_code(ranges[0].start()).is_some());
    assert_eq!(settle(regs), 1);
    for r in &ranges {
        for pc in [r.start(), r.end() - 1] {
            assert!(regs.lookup_code(pc).is_none(), "pc {pc:#x}");
            assert!(regs.traps.lookup(pc).is_none());
        }
    }
    assert_eq!(regs.traps.len(), traps_b);
    assert_eq!(regs.code.len(), code_b);
    assert_eq!(m.committed(), committed_b);
    for s in spaces_a {
        assert!(!m.code_spaces().unwrap().contains(&s));
    }
    // b is untouched.
    assert!(finds(regs, ob.instruction_start(), &ob));
    assert_eq!(b.code_count().unwrap(), (3, 0));
    assert_sound(&machine, &m);

    drop(b);
    assert_eq!(settle(regs), 1);
    assert_eq!(regs.code.len(), 0);
    assert_eq!(regs.traps.len(), 0);
    assert_eq!(m.committed(), 0);
    assert_eq!(m.stats().code_spaces, 0);
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn code_pointers_follow_functions_and_wrappers() {
    let (machine, m) = default_rig();
    let regs = registries();
    let table: &'static CodePointerTable =
        Box::leak(Box::new(CodePointerTable::with_capacity(16, regs.grace())));
    let module = module(&m, regs, functions(2));
    module.set_code_pointer_table(Some(table)).unwrap();
    let v1 = module
        .add_code(&NewCode::function(1, &[0xB8, 1, 0, 0, 0, 0xC3]))
        .unwrap()
        .instruction_start();
    let handle = module
        .function_pointer(1)
        .unwrap()
        .expect("function 1 has a code pointer");
    assert_eq!(table.get(handle), v1);
    // A new version of the function keeps the handle; the entry moves with one store.
    let v2 = module
        .add_code(&NewCode::function(1, &[0xB8, 2, 0, 0, 0, 0xC3]))
        .unwrap()
        .instruction_start();
    assert_eq!(module.function_pointer(1).unwrap(), Some(handle));
    assert_eq!(table.get(handle), v2);
    // Anonymous code gets a handle of its own, reset to the trap address when retired.
    let w = module
        .add_code(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
        .unwrap()
        .instruction_start();
    let wh = module
        .code_pointer(w)
        .unwrap()
        .expect("wrapper has its own pointer");
    assert_ne!(wh, handle);
    assert_eq!(table.get(wh), w);
    assert_eq!(table.len(), 2);
    // The function's pointer follows its slot, to the wrapper and back.
    module.patch_slot(1, w).unwrap();
    assert_eq!(table.get(handle), w);
    module.patch_slot(1, v2).unwrap();
    assert_eq!(table.get(handle), v2);
    module.free_code(w).unwrap();
    assert_eq!(table.get(wh), table.trap_address());
    assert_eq!(table.len(), 1);
    drop(module);
    // A CPU already running the function finishes in its code (kept for a grace period), but a
    // call through the handle from now on traps instead of entering the dropped module.
    assert_eq!(table.get(handle), table.trap_address());
    assert!(is_mapped(&m, v2));
    settle(regs);
    assert_eq!(
        table.len(),
        0,
        "dropping the module frees its functions' handles"
    );
    assert!(!is_mapped(&m, v2));
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn jump_tables_are_never_freed_before_the_module() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(2));
    let base = first_table(&module).base();
    assert_eq!(
        module.free_code(base),
        Err(ModuleError::UnknownCode { start: base })
    );
    let table = module.lookup_code(base).expect("table is registered");
    assert_eq!(table.kind(), CodeKind::JumpTable);
    assert_eq!(
        // SAFETY: deliberately unbalanced: the module must keep its tables all the same
        // (nothing runs the simulated code).
        unsafe { table.dec_ref() },
        DecRef::Dead,
        "an unbalanced dec_ref by some holder"
    );
    assert_eq!(
        module.free_dead_code().unwrap(),
        0,
        "tables stay until the module goes"
    );
    settle(regs);
    assert_eq!(module.reclaim().unwrap(), 0);
    assert!(module.lookup_code(base).is_some());
    // A slot may not target a jump table either.
    assert_eq!(
        module.patch_slot(0, base),
        Err(ModuleError::UnknownTarget { target: base })
    );
    let code = module.add_code(&NewCode::function(1, &[0xC3])).unwrap();
    assert_ne!(code.instruction_start(), base);
    assert_sound(&machine, &m);
}

#[test]
fn install_if_absent_installs_once() {
    let (machine, m) = default_rig();
    let regs = registries();
    let module: CodeModule<_> = module(&m, regs, functions(4));
    let first = module
        .install_if_absent(&NewCode::function(2, &[0x90, 0xC3]))
        .unwrap();
    let start = first.start();
    assert!(
        matches!(first, codespace::module::Installed::New(ref o) if o.instruction_start() == start)
    );
    let committed = m.committed();
    let stats = module.stats().unwrap();
    // The loser of a compile race: nothing allocated, the winner's start reported.
    let second = module
        .install_if_absent(&NewCode::function(2, &[0xCC; 300]))
        .unwrap();
    assert!(matches!(second, codespace::module::Installed::Existing(s) if s == start));
    assert_eq!(m.committed(), committed);
    assert_eq!(module.stats().unwrap(), stats);
    assert_eq!(
        module
            .install_if_absent(&NewCode::new(CodeKind::Wrapper, &[0xC3]))
            .map(|i| i.start()),
        Err(ModuleError::BadIndex { index: u32::MAX })
    );
    assert_eq!(module.function_code(2).unwrap(), Some(start));
    assert_sound(&machine, &m);
}

/// A module's teardown unregisters its code in one trap-table update and one code-map update,
/// then releases its code spaces whole. Every index node is copied at most once, so what waits
/// for the grace period is about one tree, not a root-to-leaf path per function (which, for a
/// large module, would hold tens of times the table's size until CPUs pass a quiescent state);
/// and the pages go in one shootdown round per space, not one INT3 fill per function.
#[test]
fn dropping_a_large_module_takes_one_index_update_and_one_flush_per_space() {
    const N: u32 = 2000;
    let (machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(N));
    let bytes = body(64, 0x90);
    let protected = [1, 5, 9];
    let batch: Vec<NewCode<'_>> = (0..N)
        .map(|i| NewCode {
            protected: &protected,
            landing_pad: Some(60),
            ..NewCode::function(i, &bytes)
        })
        .collect();
    module.add_code_batch(&batch).expect("load");
    settle(regs);
    regs.traps.reclaim();
    regs.code.reclaim();
    let traps = regs.traps.memory();
    let code = regs.code.memory();
    assert_eq!(
        (traps.ranges, traps.retired, code.retired),
        (N as usize, 0, 0)
    );

    let spaces = module.code_spaces().unwrap().len();
    let before = m.flush_stats().unwrap();
    drop(module);
    assert_eq!(settle(regs), 1);
    assert_eq!((regs.traps.len(), regs.code.len()), (0, 0));
    assert_eq!((m.committed(), m.stats().code_spaces), (0, 0));
    // The code goes with its code spaces, not object by object: no INT3 fill through the alias
    // and one shootdown round per code space, however many functions there were.
    let after = m.flush_stats().unwrap();
    assert_eq!(after.pokes - before.pokes, 0, "alias sessions");
    assert_eq!(after.shootdowns - before.shootdowns, spaces as u64);
    // What the teardown retired: the nodes it replaced, and the removed entries.
    let (trap_retired, code_retired) = (regs.traps.memory().retired, regs.code.memory().retired);
    let trap_table = traps.index + traps.headers + traps.offsets;
    assert!(
        trap_retired <= trap_table + trap_table / 4,
        "trap table of {trap_table} B retired {trap_retired} B"
    );
    assert!(
        code_retired <= code.nodes + code.values + code.nodes / 4,
        "code map of {} B retired {code_retired} B",
        code.nodes + code.values
    );
    // And it all goes after the next grace period.
    pass_grace(regs);
    regs.traps.reclaim();
    regs.code.reclaim();
    assert_eq!(
        (regs.traps.memory().retired, regs.code.memory().retired),
        (0, 0)
    );
    assert_sound_no_leak(&machine, &m);
}

#[test]
fn registries_reclaim_frees_a_dropped_module_after_two_rounds_and_not_before() {
    let (_machine, m) = default_rig();
    let regs = registries();
    let module = module(&m, regs, functions(2));
    module
        .add_code(&NewCode {
            protected: &[0],
            landing_pad: Some(1),
            ..NewCode::function(0, &[0x90, 0xC3])
        })
        .unwrap();
    drop(module);
    let g = regs.grace();
    // One round is not a grace period: the drop's ticket waits for the period after it.
    // SAFETY: the test thread (CPU 0) holds nothing from a lookup and runs no generated code.
    unsafe { g.quiescent(0) };
    g.try_advance();
    assert_eq!(regs.reclaim(), 0);
    assert!(
        !regs.traps.is_empty(),
        "the dropped module's trap entries wait"
    );
    // SAFETY: as above.
    unsafe { g.quiescent(0) };
    g.try_advance();
    assert_eq!(regs.reclaim(), 1, "the module's teardown ran");
    assert!(regs.traps.is_empty());
    // Its index nodes were replaced by the teardown: one more period frees them too.
    pass_grace(regs);
    regs.reclaim();
    assert_eq!(regs.traps.retired_count(), 0);
    assert_eq!(regs.code.memory().retired, 0);
    m.release_pending().unwrap();
    assert_eq!(m.committed(), 0);
}
