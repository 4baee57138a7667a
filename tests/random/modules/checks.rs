//! The module run's checks: every step, and in full every few steps.

use std::sync::Arc;

use super::model::Obj;
use super::{Run, EXTERNAL, FUNCTIONS};
use crate::common::*;

impl Run<'_> {
    /// After every step: no broken promise; lookups find the model's code (and not freed
    /// code); a random slot on a random CPU runs into live code.
    pub(super) fn check_step(&mut self) {
        let label = self.label();
        let v = self.machine.violations();
        assert!(v.is_empty(), "{label}: {v:#?}");
        assert!(!self.machine.wx_ever_observed(), "{label}");
        for mi in 0..2 {
            let Some(m) = self.models[mi].as_ref() else {
                continue;
            };
            let registered: Vec<&Obj> = m
                .live
                .values()
                .chain(m.retired.iter().map(|(o, _)| o))
                .collect();
            if let Some(o) = registered.get(self.rng.below(registered.len().max(1))) {
                let pc = o.start() + self.rng.below(o.bytes.len());
                let found = self.regs.lookup_code(pc).expect("registered code is found");
                assert!(Arc::ptr_eq(&found, &o.object), "{label}: pc {pc:#x}");
                for &p in &o.protected {
                    let hit = self
                        .regs
                        .traps
                        .lookup(o.start() + p as usize)
                        .expect("protected");
                    assert_eq!(
                        hit.landing_pad(),
                        o.start() + o.landing_pad.unwrap() as usize
                    );
                }
            }
            let tables = m.module.jump_tables().unwrap();
            let t = tables[self.rng.below(tables.len())];
            let i = self.rng.below(FUNCTIONS as usize) as u32;
            let cpu = self.rng.below(4);
            let to = executed_destination(&self.machine, cpu, &t, i);
            let expected = m.slots[i as usize].or(t.lazy_slot_addr(i));
            if !m.stale {
                assert_eq!(to, expected, "{label}: module {mi} CPU {cpu} slot {i}");
            }
            let into_code = to.filter(|&d| Some(d) != t.lazy_slot_addr(i) && d != EXTERNAL);
            if let Some(d) = into_code {
                let o = self.regs.lookup_code(d);
                assert!(
                    o.is_some_and(|o| o.instruction_start() == d),
                    "{label}: CPU {cpu} slot {i} runs into freed code at {d:#x}"
                );
            }
        }
        if let Some(gone) = self.freed.get(self.rng.below(self.freed.len().max(1))) {
            let found = self.regs.lookup_code(gone.instruction_start());
            assert!(
                !found.is_some_and(|f| Arc::ptr_eq(&f, gone)),
                "{label}: freed code still found"
            );
        }
    }

    /// Everything, after the later operations that finish failed ones.
    pub(super) fn full_check(&mut self) {
        for mi in 0..2 {
            if self.models[mi].is_some() {
                self.reclaim(mi, false);
            }
        }
        let label = self.label();
        assert_sound_no_leak(&self.machine, &self.manager);
        for m in self.models.iter().flatten() {
            let module = &m.module;
            for i in 0..FUNCTIONS {
                assert_eq!(
                    module.function_code(i).unwrap(),
                    m.functions[i as usize],
                    "{label}"
                );
                assert_eq!(
                    module.slot_target(i).unwrap(),
                    m.slots[i as usize],
                    "{label}"
                );
                if let Some(p) = module.function_pointer(i).unwrap() {
                    let want = m.slots[i as usize].unwrap_or(m.pointers.trap_address());
                    assert_eq!(m.pointers.get(p), want, "{label}: pointer {i}");
                }
            }
            let tables = module.jump_tables().unwrap();
            assert_eq!(
                module.code_count().unwrap(),
                (m.live.len() + tables.len(), m.retired.len()),
                "{label}"
            );
            let table_bytes: usize = tables
                .iter()
                .map(|t| module.lookup_code(t.base()).unwrap().instructions().size())
                .sum();
            let code_bytes: usize = m
                .live
                .values()
                .chain(m.retired.iter().map(|(o, _)| o))
                .map(Obj::allocated)
                .sum();
            assert_eq!(
                module.stats().unwrap().allocated,
                table_bytes + code_bytes,
                "{label}: allocated"
            );
            for o in m.live.values() {
                assert_eq!(
                    read(&self.manager, o.start(), o.bytes.len()),
                    o.bytes,
                    "{label}"
                );
                assert_eq!(o.object.is_dying(), o.dying, "{label}");
            }
        }
    }
}
