//! The allocator run: three allocators (growable, with jump-table overhead, fixed) on one
//! manager, driven by random allocations, publishes, frees, discards, requests over the limits,
//! foreign and stale handles, leaked handles and dropped allocators, with a backend failure
//! injected into one operation in eight. A shadow model knows every live range, which pages
//! are committed (V8's rule: a page lives while live code touches it), their protection and
//! the bytes written; every step checks the audit, the counters and the touched pages against
//! it, and every 500 steps every page and byte.
//!
//! In the ROX mode (issue 20) the allocators ask for code spaces on 2 MiB pages: the model maps
//! a 2 MiB page R+X and INT3 when it is first touched, checks that a publish changes no
//! page-table entry and costs no shootdown, that freed bytes are INT3 before reuse and that a
//! 2 MiB page goes when no live code touches it. Now and then a few steps run with no 2 MiB
//! frame left ([`HOG_ONE_IN`], `rox.rs`): spaces fall back to 4 KiB pages and the model
//! follows them.

use std::collections::{BTreeMap, BTreeSet};

use codespace::manager::CODE_ALIGNMENT;
use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::MmuError;
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, ManagerConfig,
    PublishedCode, WritableCode,
};

use crate::common::*;
use crate::Trial;

mod checks;
mod lifecycle;
mod model;
mod publish;
mod rox;

use model::{ShadowPage, ShadowSpace, HUGE};
use rox::{Hog, Tally};

/// The sizes of a run: the window, the commit limit, the largest code space, the machine.
struct Limits {
    window: usize,
    max_committed: usize,
    max_space: usize,
    /// The fixed allocator's one space.
    fixed_space: usize,
    frames: usize,
}

/// In 4 KiB pages: a tight commit limit the run hits often.
const SMALL: Limits = Limits {
    window: 16 << 20,
    max_committed: 128 * PAGE,
    max_space: 128 * PAGE,
    fixed_space: 48 * PAGE,
    frames: 1 << 15,
};

/// In 2 MiB pages: four of them may be committed; a window so large that a ROX space always
/// finds 2 MiB aligned room (every fallback is then one of frames); a machine with 2 MiB runs
/// to spare beyond the limit, and frames past its last run for 4 KiB pages while they are
/// hogged.
const ROX: Limits = Limits {
    window: 256 << 20,
    max_committed: 4 * HUGE,
    max_space: 4 * HUGE,
    // Three 2 MiB pages: code straddles them, and one may need mapping when none is free.
    fixed_space: 3 * HUGE,
    frames: 10 * rox::HUGE_FRAMES + 480,
};

/// One step in this many (ROX mode) begins a period of up to [`HOG_STEPS`] steps with every
/// 2 MiB frame of the machine taken, with a fresh allocator, whose first space then finds no
/// 2 MiB frame.
const HOG_ONE_IN: usize = 120;
const HOG_STEPS: usize = 16;
/// One step in this many (ROX mode) frees all of one allocator's code, handle by handle (a JIT
/// flushing its code cache), so that 2 MiB pages become wholly free and go back.
const DRAIN_ONE_IN: usize = 150;
/// One allocation in this many (ROX mode) is large (up to a 2 MiB page), so that code
/// spans 2 MiB pages, fills spaces and frees whole 2 MiB pages.
const LARGE_ONE_IN: usize = 16;

/// One allocator of the run and the handles it gave out.
struct Module {
    config: AllocatorConfig,
    alloc: CodeAllocator<SoftMmu>,
    writable: Vec<WritableCode>,
    /// Published code and its bytes (`None` after a free failed part way through its INT3 fill).
    published: Vec<(PublishedCode, Option<Vec<u8>>)>,
    /// Ranges whose handle was dropped: live until the allocator goes.
    leaked: Vec<AddressRange>,
}

/// Handles of dropped allocators, to try on the live ones.
enum Stale {
    Writable(WritableCode),
    Published(PublishedCode),
}

/// What a failed operation reported.
enum Failure {
    /// Nothing changed.
    Unchanged,
    /// The operation says what stayed changed.
    Changed,
}

struct Run<'t> {
    trial: &'t Trial<'t>,
    mode: Mode,
    limits: &'static Limits,
    machine: SoftMmu,
    manager: CodeManager<SoftMmu>,
    modules: Vec<Module>,
    rng: Rng,
    /// Live ranges (allocated, published or leaked): start -> (end, module).
    live: BTreeMap<usize, (usize, usize)>,
    allocated: Vec<usize>,
    pages: BTreeMap<usize, ShadowPage>,
    /// ROX mode: every code space by start (4 KiB modes: none, every space is 4 KiB).
    spaces: BTreeMap<usize, ShadowSpace>,
    /// Mapped 2 MiB pages of ROX spaces.
    huge: BTreeSet<usize>,
    /// Spaces that fell back to 4 KiB pages.
    fallbacks: u64,
    hog: Hog,
    /// What the run went through, for its summary.
    tally: Tally,
    stale: Vec<Stale>,
    /// Counters after the last check, which a failed operation must leave untouched.
    last: Option<Counters>,
    touched: Vec<usize>,
    injected: Option<(CallKind, u64)>,
    step: u64,
}

#[derive(Debug, PartialEq, Eq)]
struct Counters {
    manager: codespace::manager::ManagerStats,
    allocators: Vec<codespace::manager::AllocatorStats>,
    audit: codespace::AuditReport,
    data_frames: usize,
}

pub fn run(trial: &Trial<'_>, mode: Mode) {
    let limits = if mode.rox { &ROX } else { &SMALL };
    let machine = machine_for(limits.frames, mode.protection);
    let manager = manager_on(
        &machine,
        window(limits.window / PAGE),
        mode.manager(ManagerConfig {
            max_committed: limits.max_committed,
            max_code_space_size: limits.max_space,
            ..ManagerConfig::default()
        }),
    );
    let configs = [
        AllocatorConfig::default(),
        AllocatorConfig {
            overhead: 2 * PAGE,
            ..AllocatorConfig::default()
        },
        AllocatorConfig {
            growable: false,
            initial_reservation: limits.fixed_space,
            ..AllocatorConfig::default()
        },
    ]
    .map(|c| mode.allocator(c));
    let modules = configs
        .into_iter()
        .map(|config| Module {
            config,
            alloc: CodeAllocator::new(&manager, config).unwrap(),
            writable: Vec::new(),
            published: Vec::new(),
            leaked: Vec::new(),
        })
        .collect();
    let mut run = Run {
        trial,
        mode,
        limits,
        machine,
        manager,
        modules,
        rng: Rng::new(trial.seed),
        live: BTreeMap::new(),
        allocated: vec![0; 3],
        pages: BTreeMap::new(),
        spaces: BTreeMap::new(),
        huge: BTreeSet::new(),
        fallbacks: 0,
        hog: Hog::default(),
        tally: Tally::default(),
        stale: Vec::new(),
        last: None,
        touched: Vec::new(),
        injected: None,
        step: 0,
    };
    for mi in 0..run.modules.len() {
        run.learn_spaces(mi);
    }
    run.check();
    while run.step < trial.steps {
        trial.at(run.step);
        run.step();
    }
    run.release_hog();
    run.check_bytes();
    if mode.rox {
        // The run did what it claims: code on 2 MiB pages, and spaces that fell back.
        let t = &run.tally;
        eprintln!(
            "  ROX: {t:?}, {} fallbacks, {} steps without 2 MiB frames",
            run.fallbacks, run.hog.steps
        );
        // With the default steps (a shorter replay may cover less).
        let covered = t.most_huge >= 2 && t.freed_huge > 0 && t.limit > 0;
        if trial.steps >= 3_000 {
            assert!(covered && run.fallbacks > 0, "{}", run.label());
        }
    }
    let Run {
        manager,
        modules,
        machine,
        ..
    } = run;
    for mut module in modules {
        // SAFETY: the software machine never runs its code.
        unsafe { module.alloc.release_all() };
    }
    assert_eq!(manager.committed(), 0);
    assert_eq!(manager.stats().window_free, limits.window);
    assert_sound_no_leak(&machine, &manager);
}

impl Run<'_> {
    fn label(&self) -> String {
        format!(
            "seed {:#x} step {} ({:?}, failure planned: {:?}{})",
            self.trial.seed,
            self.step,
            self.mode,
            self.injected,
            if self.hog.active() {
                ", no 2 MiB frame"
            } else {
                ""
            }
        )
    }

    fn step(&mut self) {
        self.step += 1;
        let mi = self.rng.below(self.modules.len());
        self.injected = None;
        // Before failures are planned: the hog's own calls must not take them.
        if self.mode.rox && !self.hog.active() && self.rng.one_in(HOG_ONE_IN) {
            // The fresh allocator first (releasing the old one frees 2 MiB frames), checked as
            // a step of its own.
            self.recreate(mi);
            self.settle();
            self.check();
            let steps = 1 + self.rng.below(HOG_STEPS) as u64;
            self.hog_huge_frames(self.step + steps);
        }
        if self.rng.one_in(8) {
            let kind = CallKind::ALL[self.rng.below(CallKind::ALL.len())];
            let n = self.rng.below(4) as u64;
            self.machine.fail_nth(kind, n);
            self.injected = Some((kind, n));
        }
        let op = if self.mode.rox && self.rng.one_in(DRAIN_ONE_IN) {
            1000
        } else {
            self.rng.below(1000)
        };
        match op {
            0..=399 => self.allocate(mi),
            400..=649 => self.publish(mi),
            650..=869 => self.free(mi),
            870..=949 => self.discard(mi),
            950..=969 => self.over_limit(mi),
            970..=989 => self.foreign(mi),
            990..=998 => self.leak(mi),
            999 => self.recreate(mi),
            _ => self.drain(mi),
        }
        self.machine.clear_failures();
        self.hog_step();
        self.settle();
        self.check();
    }

    /// Classifies an error: the model's own (`natural`), or the injected failure.
    fn failure(&self, e: CodeError, natural: bool) -> Failure {
        let label = self.label();
        match e {
            _ if natural => Failure::Unchanged,
            CodeError::Mmu(MmuError::Injected) if self.injected.is_some() => Failure::Unchanged,
            CodeError::FlushFailed(MmuError::Injected)
            | CodeError::SyncFailed(MmuError::Injected)
            | CodeError::PartialDecommit(MmuError::Injected)
            | CodeError::NotRestored(MmuError::Injected)
                if self.injected.is_some() =>
            {
                Failure::Changed
            }
            e => panic!("{label}: unexpected {e:?}"),
        }
    }

    fn allocate(&mut self, mi: usize) {
        let mut size = self.rng.code_size();
        // Without 2 MiB frames more often: a space with 2 MiB pages then needs one more.
        let large = if self.hog.active() { 4 } else { LARGE_ONE_IN };
        if self.mode.rox && self.rng.one_in(large) {
            size = 1 + self.rng.below(HUGE);
        }
        let fallbacks = self.manager.stats().rox_fallbacks;
        match self.modules[mi].alloc.allocate(size) {
            Ok(mut w) => {
                let range = w.range();
                assert_eq!(range.size(), size.next_multiple_of(CODE_ALIGNMENT));
                assert_eq!(range.start() % CODE_ALIGNMENT, 0);
                assert!(self.modules[mi]
                    .alloc
                    .code_spaces()
                    .iter()
                    .any(|s| s.contains_range(&range)));
                self.allocated_range(mi, range, fallbacks);
                self.rng.fill(w.as_mut_slice());
                self.modules[mi].writable.push(w);
            }
            Err(e) => {
                let natural = self.natural(e);
                match self.failure(e, natural) {
                    Failure::Unchanged => self.assert_unchanged(),
                    // The commit failed and could not take back a page it mapped.
                    Failure::Changed => self.left_behind(mi, fallbacks),
                }
            }
        }
    }

    /// Whether the model expected `e` from an allocation: over the commit limit, a fixed
    /// allocator full, or (ROX mode) out of frames when no 2 MiB frame is left.
    fn natural(&mut self, e: CodeError) -> bool {
        match e {
            CodeError::CommitLimit { requested, .. } => {
                // ROX spaces commit whole 2 MiB pages.
                let units = self.mode.rox && self.spaces.values().all(|s| s.rox);
                assert!(
                    !units || requested.is_multiple_of(HUGE),
                    "{}: {e:?}",
                    self.label()
                );
                self.tally.limit += 1;
                requested > self.manager.remaining_uncommitted()
            }
            CodeError::NotGrowable => true,
            CodeError::Mmu(MmuError::OutOfFrames) => {
                self.tally.no_frame += 1;
                self.mode.rox && self.no_huge_frame()
            }
            _ => false,
        }
    }

    /// A successful allocation of `range` by module `mi`: the space it lies in (ROX mode:
    /// learnt, followed if it fell back), then the model. In a ROX space the range reads as
    /// INT3: fresh 2 MiB pages are INT3, freed bytes became INT3 before this reuse.
    fn allocated_range(&mut self, mi: usize, range: AddressRange, fallbacks: u64) {
        self.note_space(mi, range, fallbacks);
        self.add_live(range, mi);
        if self.in_rox_space(range.start()) {
            let bytes = read(&self.manager, range.start(), range.size());
            if let Some(i) = bytes.iter().position(|&b| b != INT3) {
                panic!("{}: {:#x} not INT3", self.label(), range.start() + i);
            }
        }
        self.tally.most_huge = self.tally.most_huge.max(self.huge.len());
    }

    /// Asks for more than can be committed, or more than a code space may hold.
    fn over_limit(&mut self, mi: usize) {
        let remaining = self.manager.remaining_uncommitted();
        let size = match self.rng.below(3) {
            0 => remaining + 1 + self.rng.below(2 * PAGE),
            1 => self.limits.max_space + 1,
            _ => self.limits.max_committed,
        };
        let fallbacks = self.manager.stats().rox_fallbacks;
        match self.modules[mi].alloc.allocate(size) {
            Ok(w) => {
                // Possible only when it fits in free, already committed room (rare; less so
                // on 2 MiB pages).
                self.allocated_range(mi, w.range(), fallbacks);
                self.modules[mi].writable.push(w);
            }
            Err(e) => {
                let natural = match e {
                    CodeError::CommitLimit { .. } => {
                        self.tally.limit += 1;
                        true
                    }
                    CodeError::NotGrowable | CodeError::CodeSpaceTooLarge { .. } => true,
                    // Room the size fits in may need a 2 MiB page when none is left.
                    e => self.natural(e),
                };
                self.failure(e, natural);
                self.assert_unchanged();
            }
        }
    }
}
