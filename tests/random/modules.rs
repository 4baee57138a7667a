//! The module run: two modules (one with lazy compilation) on one manager and one set of
//! registries, driven by random adds, replacements, batches, `install_if_absent`, slot patches,
//! references taken and dropped, frees, grace periods, module drops, and far code spaces, with
//! a backend failure injected into one operation in six. A reference model predicts every
//! result; after every step the machine must have seen no broken promise, lookups must find
//! exactly the model's code, and a CPU must never run a slot into freed code; every 64 steps the
//! books, bytes, counters and audit are compared in full.

use std::collections::BTreeMap;
use std::sync::Arc;

use codespace::code_object::{CodeObject, DecRef};
use codespace::code_pointer_table::CodePointerTable;
use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::MmuError;
use codespace::module::{CodeModule, Installed, ModuleConfig, ModuleError, NewCode, Registries};
use codespace::{AllocatorConfig, CodeAllocator, CodeError, CodeManager, ManagerConfig};

use crate::common::*;
use crate::Trial;

const FUNCTIONS: u32 = 12;
const EXTERNAL: usize = 0xFFFF_FFFF_8040_0000;
const FULL_CHECK_EVERY: u64 = 64;

mod checks;
mod model;

use model::{Draft, Model, Obj};

struct Run<'t> {
    trial: &'t Trial<'t>,
    mode: Mode,
    rng: Rng,
    machine: SoftMmu,
    manager: CodeManager<SoftMmu>,
    regs: &'static Registries,
    models: Vec<Option<Model>>,
    /// Objects of dropped modules, and whether a grace period passed since.
    orphans: Vec<(Vec<Arc<CodeObject>>, bool)>,
    /// Freed code that lookups must not find any more (its range may hold other code).
    freed: Vec<Arc<CodeObject>>,
    fillers: Vec<CodeAllocator<SoftMmu>>,
    /// The failure planned for the current step.
    injected: Option<(CallKind, u64)>,
    step: u64,
    /// The last operations, for failure messages.
    trace: std::collections::VecDeque<String>,
}

/// One run in `mode` (the 4 KiB alias mode, or the ROX mode: code spaces of 2 MiB pages, with a
/// commit limit of 16 of them instead of 400 pages).
pub fn run(trial: &Trial<'_>, mode: Mode) {
    let machine = machine(1 << 15);
    let manager = manager_on(
        &machine,
        slot(),
        mode.manager(ManagerConfig {
            max_committed: if mode.rox { 32 << 20 } else { 400 * PAGE },
            max_code_space_size: GIB,
            ..ManagerConfig::default()
        }),
    );
    let mut run = Run {
        trial,
        mode,
        rng: Rng::new(trial.seed),
        machine,
        manager,
        regs: registries(),
        models: vec![None, None],
        orphans: Vec::new(),
        freed: Vec::new(),
        fillers: Vec::new(),
        injected: None,
        step: 0,
        trace: std::collections::VecDeque::new(),
    };
    for mi in 0..2 {
        run.create(mi);
        assert!(run.models[mi].is_some(), "module {mi} created");
    }
    // The module with an initial reservation has its space now: on ROX pages in that mode.
    assert_eq!(run.manager.stats().rox_spaces > 0, mode.rox);
    while run.step < trial.steps {
        trial.at(run.step);
        run.step();
    }
    run.full_check();
    // Dropping everything gives everything back.
    for mi in 0..2 {
        run.drop_module(mi);
    }
    run.grace();
    run.fillers.clear();
    assert_eq!(run.manager.committed(), 0);
    assert_eq!(run.regs.code.len(), 0);
    mode.assert_claimed(&run.manager);
    assert_eq!(run.regs.traps.len(), 0);
    assert_sound_no_leak(&run.machine, &run.manager);
}

impl Run<'_> {
    fn label(&self) -> String {
        format!(
            "seed {:#x} step {} (failure planned: {:?}; last operations, oldest first: {:?})",
            self.trial.seed, self.step, self.injected, self.trace
        )
    }

    fn note(&mut self, what: String) {
        if self.trace.len() == 12 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{}: {what}", self.step));
    }

    fn step(&mut self) {
        self.step += 1;
        let mi = self.rng.below(2);
        if self.models[mi].is_none() {
            self.create(mi);
            self.check_step();
            return;
        }
        // A clean reclaim first, so that the operation's own reclaim finds nothing due and the
        // model knows exactly what was freed.
        self.injected = None;
        self.reclaim(mi, false);
        if self.rng.one_in(6) {
            let kind = CallKind::ALL[self.rng.below(CallKind::ALL.len())];
            let n = self.rng.below(3) as u64;
            self.machine.fail_nth(kind, n);
            self.injected = Some((kind, n));
        }
        let op = self.rng.below(100);
        self.note(format!("module {mi} op {op} {:?}", self.injected));
        match op {
            0..=24 => self.add(mi, false),
            25..=34 => self.add(mi, true),
            35..=41 => self.add_batch(mi),
            42..=46 => self.install_if_absent(mi),
            47..=59 => self.patch(mi),
            60..=66 => self.free_code(mi),
            67..=71 => self.hold(mi),
            72..=76 => self.unhold(mi),
            77..=80 => self.free_dead_code(mi),
            81..=90 => self.grace(),
            91..=94 => self.reclaim(mi, true),
            95..=97 => self.far_fillers(),
            _ => self.drop_module(mi),
        }
        self.machine.clear_failures();
        if self.injected.is_some() {
            // Later manager operations finish what a failed one left (flushes, flip backs).
            self.manager.audit().unwrap();
        }
        self.check_step();
        if self.step.is_multiple_of(FULL_CHECK_EVERY) {
            self.full_check();
        }
    }

    /// An error the step may see: one the model predicts (`natural`), or the injected failure.
    fn expect_failure(&self, e: &ModuleError, natural: bool) {
        let injected = match e {
            ModuleError::Code(
                CodeError::Mmu(m)
                | CodeError::FlushFailed(m)
                | CodeError::SyncFailed(m)
                | CodeError::PartialDecommit(m)
                | CodeError::NotRestored(m),
            ) => *m == MmuError::Injected,
            _ => false,
        };
        assert!(
            (injected && self.injected.is_some()) || natural,
            "{}: unexpected {e:?}",
            self.label()
        );
    }

    fn model(&mut self, mi: usize) -> &mut Model {
        self.models[mi].as_mut().unwrap()
    }

    fn create(&mut self, mi: usize) {
        let lazy = mi == 0;
        let config = self.mode.module(ModuleConfig {
            functions: FUNCTIONS,
            lazy_entry: lazy.then_some(LAZY_ENTRY),
            initial_reservation: if lazy { 0 } else { 8 * PAGE },
            ..ModuleConfig::default()
        });
        match CodeModule::new(&self.manager, self.regs, config) {
            Ok(module) => {
                let pointers: &'static CodePointerTable = Box::leak(Box::new(
                    CodePointerTable::with_capacity(512, self.regs.grace()),
                ));
                module.set_code_pointer_table(Some(pointers)).unwrap();
                // SAFETY: nothing executes on the software machine; EXTERNAL stands for
                // kernel text outside the window.
                unsafe { module.register_external(EXTERNAL) }.unwrap();
                self.models[mi] = Some(Model {
                    module,
                    pointers,
                    live: BTreeMap::new(),
                    functions: vec![None; FUNCTIONS as usize],
                    slots: vec![None; FUNCTIONS as usize],
                    retired: Vec::new(),
                    stale: false,
                });
            }
            Err(e) => {
                assert!(
                    matches!(e, ModuleError::Code(CodeError::CommitLimit { .. })),
                    "{}: {e:?}",
                    self.label()
                );
                // A failed constructor changes nothing: nothing waits for a grace period.
            }
        }
    }

    fn draft(&mut self, index: Option<u32>) -> Draft {
        let len = self.rng.code_size();
        let mut bytes = vec![0; len];
        self.rng.fill(&mut bytes);
        let (protected, landing_pad) = if len > 2 && self.rng.one_in(3) {
            let mut p: Vec<u32> = (0..3).map(|_| self.rng.below(len - 1) as u32).collect();
            p.sort_unstable();
            p.dedup();
            (p, Some(len as u32 - 1))
        } else {
            (Vec::new(), None)
        };
        Draft {
            index,
            bytes,
            protected,
            landing_pad,
        }
    }

    fn add(&mut self, mi: usize, anonymous: bool) {
        if anonymous && self.model(mi).live.len() > 150 {
            return;
        }
        let index = (!anonymous).then(|| self.rng.below(FUNCTIONS as usize) as u32);
        let draft = self.draft(index);
        let result = self.model(mi).module.add_code(&draft.code());
        self.added(mi, &[draft], result.map(|o| vec![o]));
    }

    fn add_batch(&mut self, mi: usize) {
        let n = 1 + self.rng.below(3);
        let mut drafts = Vec::new();
        let mut used = Vec::new();
        for _ in 0..n {
            let index = match self.rng.below(3) {
                0 => None,
                _ => {
                    let i = self.rng.below(FUNCTIONS as usize) as u32;
                    (!used.contains(&i)).then(|| {
                        used.push(i);
                        i
                    })
                }
            };
            drafts.push(self.draft(index));
        }
        let batch: Vec<NewCode<'_>> = drafts.iter().map(Draft::code).collect();
        let result = self.model(mi).module.add_code_batch(&batch);
        self.added(mi, &drafts, result);
    }

    fn install_if_absent(&mut self, mi: usize) {
        let i = self.rng.below(FUNCTIONS as usize) as u32;
        let draft = self.draft(Some(i));
        let result = self.model(mi).module.install_if_absent(&draft.code());
        match (self.model(mi).functions[i as usize], result) {
            (Some(start), Ok(Installed::Existing(s))) => assert_eq!(s, start, "{}", self.label()),
            (None, Ok(Installed::New(o))) => self.added(mi, &[draft], Ok(vec![o])),
            (None, Err(e)) => self.added(mi, &[draft], Err(e)),
            (m, r) => panic!("{}: model {m:?}, module {r:?}", self.label()),
        }
    }

    /// Applies an add's result to the model.
    fn added(
        &mut self,
        mi: usize,
        drafts: &[Draft],
        result: Result<Vec<Arc<CodeObject>>, ModuleError>,
    ) {
        self.note(format!(
            "  {:?} -> {:?}",
            drafts
                .iter()
                .map(|d| (d.index, d.bytes.len()))
                .collect::<Vec<_>>(),
            result
                .as_ref()
                .map(|v| v.iter().map(|o| o.instruction_start()).collect::<Vec<_>>())
        ));
        let label = self.label();
        match result {
            Ok(objects) => {
                assert_eq!(objects.len(), drafts.len());
                let (functions, anonymous): (Vec<_>, Vec<_>) = drafts
                    .iter()
                    .zip(objects)
                    .map(|(d, o)| (d.index, d.obj(o)))
                    .partition(|(i, _)| i.is_some());
                let functions: Vec<(u32, Obj)> = functions
                    .into_iter()
                    .map(|(i, o)| (i.unwrap(), o))
                    .collect();
                let m = self.model(mi);
                if !functions.is_empty() {
                    m.stale = false;
                }
                m.installed_batch(&functions, anonymous.into_iter().map(|(_, o)| o).collect());
            }
            Err(ModuleError::Code(CodeError::SyncFailed(e))) => {
                assert_eq!(e, MmuError::Injected, "{label}");
                // The functions are installed; anonymous code of the batch is gone.
                let m = self.models[mi].as_mut().unwrap();
                let functions: Vec<(u32, Obj)> = drafts
                    .iter()
                    .filter_map(|d| {
                        let i = d.index?;
                        let start = m.module.function_code(i).unwrap().expect("installed");
                        let o = self.regs.lookup_code(start).expect("registered");
                        Some((i, d.obj(o)))
                    })
                    .collect();
                m.stale = true;
                m.installed_batch(&functions, Vec::new());
            }
            Err(e) => {
                let natural = matches!(e, ModuleError::Code(CodeError::CommitLimit { .. }));
                self.expect_failure(&e, natural);
            }
        }
    }

    /// A target a slot may take: live code of the module or the external entry.
    fn target(&mut self, mi: usize) -> Option<usize> {
        let starts: Vec<usize> = self.model(mi).live.keys().copied().collect();
        match self.rng.below(starts.len() + 1) {
            i if i == starts.len() => Some(EXTERNAL),
            i => Some(starts[i]),
        }
    }

    fn patch(&mut self, mi: usize) {
        let n = 1 + self.rng.below(2);
        let mut patches = Vec::new();
        for _ in 0..n {
            let i = self.rng.below(FUNCTIONS as usize) as u32;
            if let Some(t) = self.target(mi) {
                if !patches.iter().any(|&(j, _)| j == i) {
                    patches.push((i, t));
                }
            }
        }
        let result = self.model(mi).module.patch_slots(&patches);
        let stale = match result {
            Ok(()) => false,
            Err(ModuleError::Code(CodeError::SyncFailed(_))) => true,
            Err(e) => return self.expect_failure(&e, false),
        };
        let m = self.model(mi);
        m.set_slots(&patches);
        m.stale = stale;
    }

    fn free_code(&mut self, mi: usize) {
        let starts: Vec<usize> = self.model(mi).live.keys().copied().collect();
        let Some(&start) = starts.get(self.rng.below(starts.len().max(1))) else {
            return;
        };
        let m = self.model(mi);
        let expected = if !m.live[&start].module_ref {
            Err(ModuleError::UnknownCode { start })
        } else if m.installed(start) {
            Err(ModuleError::StillInstalled { start })
        } else if m.targeted(start) {
            Err(ModuleError::StillTargeted { start })
        } else {
            Ok(())
        };
        let result = m.module.free_code(start);
        assert_eq!(result, expected, "{}", self.label());
        if result.is_ok() {
            self.model(mi).release_ref(start);
        }
    }

    fn hold(&mut self, mi: usize) {
        let starts: Vec<usize> = self.model(mi).live.keys().copied().collect();
        let Some(&start) = starts.get(self.rng.below(starts.len().max(1))) else {
            return;
        };
        let o = self.model(mi).live.get_mut(&start).unwrap();
        assert_eq!(o.object.inc_ref(), !o.dying);
        if !o.dying {
            o.holders += 1;
        }
    }

    fn unhold(&mut self, mi: usize) {
        let held: Vec<usize> = self
            .model(mi)
            .live
            .iter()
            .filter(|(_, o)| o.holders > 0)
            .map(|(&s, _)| s)
            .collect();
        let Some(&start) = held.get(self.rng.below(held.len().max(1))) else {
            return;
        };
        let o = self.model(mi).live.get_mut(&start).unwrap();
        o.holders -= 1;
        let last = o.holders == 0 && !o.module_ref;
        let expected = if last { DecRef::Dead } else { DecRef::Alive };
        // SAFETY: the run gives back a reference it took with `inc_ref` (`holders` counts them).
        assert_eq!(unsafe { o.object.dec_ref() }, expected);
        o.dying |= last;
    }

    fn free_dead_code(&mut self, mi: usize) {
        let m = self.model(mi);
        let dead: Vec<usize> = m
            .live
            .iter()
            .filter(|(_, o)| o.dying && !o.module_ref)
            .map(|(&s, _)| s)
            .collect();
        let expected = dead
            .into_iter()
            .filter(|&s| m.retire_if_unreachable(s))
            .count();
        let got = m.module.free_dead_code().unwrap();
        assert_eq!(got, expected, "{}", self.label());
    }

    /// Every CPU passes a quiescent state: what was retired before is due, and dropped modules
    /// go.
    fn grace(&mut self) {
        pass_grace(self.regs);
        for m in self.models.iter_mut().flatten() {
            for r in &mut m.retired {
                r.1 = true;
            }
        }
        for o in &mut self.orphans {
            o.1 = true;
        }
        let due: Vec<_> = self.orphans.iter().filter(|o| o.1).cloned().collect();
        self.orphans.retain(|o| !o.1);
        assert_eq!(self.regs.grace().reclaim(), due.len(), "{}", self.label());
        for (objects, _) in due {
            self.freed.extend(objects);
        }
    }

    fn reclaim(&mut self, mi: usize, injectable: bool) {
        let mut freed = Vec::new();
        let m = self.models[mi].as_mut().unwrap();
        let got = m.module.reclaim().unwrap();
        let due = m.free_due(&mut freed);
        if got != due {
            // Only an injected failure of the serialization round reclaim starts with stops it.
            assert!(
                injectable && got == 0 && matches!(self.injected, Some((CallKind::Sync, _))),
                "{}: reclaimed {got}, model {due}",
                self.label()
            );
            for o in freed {
                let obj = self.regs.lookup_code(o.instruction_start()).unwrap();
                assert!(Arc::ptr_eq(&obj, &o));
            }
            return;
        }
        self.freed.extend(freed);
        self.freed.truncate(256);
    }

    fn drop_module(&mut self, mi: usize) {
        let Some(m) = self.models[mi].take() else {
            return;
        };
        let objects = m
            .live
            .values()
            .chain(m.retired.iter().map(|(o, _)| o))
            .map(|o| Arc::clone(&o.object))
            .collect();
        drop(m.module);
        self.orphans.push((objects, false));
    }

    fn far_fillers(&mut self) {
        if self.fillers.len() < 30 {
            for _ in 0..3 {
                let config = AllocatorConfig {
                    initial_reservation: GIB,
                    ..AllocatorConfig::default()
                };
                match CodeAllocator::new(&self.manager, config) {
                    Ok(a) => self.fillers.push(a),
                    Err(e) => panic!("{}: {e:?}", self.label()),
                }
            }
        }
    }
}
