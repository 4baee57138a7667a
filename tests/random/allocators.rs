//! The allocator run: three allocators (growable, with jump-table overhead, fixed) on one
//! manager, driven by random allocations, publishes, frees, discards, requests over the limits,
//! foreign and stale handles, leaked handles and dropped allocators, with a backend failure
//! injected into one operation in eight. A shadow model knows every live range, which pages
//! are committed (V8's rule: a page lives while live code touches it), their protection and
//! the bytes written; every step checks the audit, the counters and the touched pages against
//! it, and every 500 steps every page and byte.

use std::collections::BTreeMap;

use codespace::manager::CODE_ALIGNMENT;
use codespace::mmu::soft::{CallKind, SoftMmu};
use codespace::mmu::MmuError;
use codespace::{
    AddressRange, AllocatorConfig, CodeAllocator, CodeError, CodeManager, FreeError, ManagerConfig,
    ProtectionMode, PublishedCode, WritableCode,
};

use crate::common::*;
use crate::Trial;

mod checks;

const WINDOW: usize = 16 << 20;
const MAX_COMMITTED: usize = 128 * PAGE;
const MAX_SPACE: usize = 128 * PAGE;

/// What one committed page holds: its protection and the bytes known so far (`None`: unknown,
/// never written since commit or left half written by a failed operation).
struct ShadowPage {
    executable: bool,
    bytes: Vec<Option<u8>>,
}

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
    mode: ProtectionMode,
    machine: SoftMmu,
    manager: CodeManager<SoftMmu>,
    modules: Vec<Module>,
    rng: Rng,
    /// Live ranges (allocated, published or leaked): start -> (end, module).
    live: BTreeMap<usize, (usize, usize)>,
    allocated: Vec<usize>,
    pages: BTreeMap<usize, ShadowPage>,
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

pub fn run(trial: &Trial<'_>, mode: ProtectionMode) {
    let machine = machine_for(1 << 15, mode);
    let manager = manager_on(
        &machine,
        window(WINDOW / PAGE),
        ManagerConfig {
            max_committed: MAX_COMMITTED,
            max_code_space_size: MAX_SPACE,
            protection: mode,
            ..ManagerConfig::default()
        },
    );
    let configs = [
        AllocatorConfig::default(),
        AllocatorConfig {
            overhead: 2 * PAGE,
            ..AllocatorConfig::default()
        },
        AllocatorConfig {
            growable: false,
            initial_reservation: 48 * PAGE,
            ..AllocatorConfig::default()
        },
    ];
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
        machine,
        manager,
        modules,
        rng: Rng::new(trial.seed),
        live: BTreeMap::new(),
        allocated: vec![0; 3],
        pages: BTreeMap::new(),
        stale: Vec::new(),
        last: None,
        touched: Vec::new(),
        injected: None,
        step: 0,
    };
    run.check();
    while run.step < trial.steps {
        trial.at(run.step);
        run.step();
    }
    run.check_bytes();
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
    assert_eq!(manager.stats().window_free, WINDOW);
    assert_sound_no_leak(&machine, &manager);
}

impl Run<'_> {
    fn label(&self) -> String {
        format!(
            "seed {:#x} step {} ({:?}, failure planned: {:?})",
            self.trial.seed, self.step, self.mode, self.injected
        )
    }

    fn step(&mut self) {
        self.step += 1;
        let mi = self.rng.below(self.modules.len());
        self.injected = None;
        if self.rng.one_in(8) {
            let kind = CallKind::ALL[self.rng.below(CallKind::ALL.len())];
            let n = self.rng.below(4) as u64;
            self.machine.fail_nth(kind, n);
            self.injected = Some((kind, n));
        }
        match self.rng.below(1000) {
            0..=399 => self.allocate(mi),
            400..=649 => self.publish(mi),
            650..=869 => self.free(mi),
            870..=949 => self.discard(mi),
            950..=969 => self.over_limit(mi),
            970..=989 => self.foreign(mi),
            990..=998 => self.leak(mi),
            _ => self.recreate(mi),
        }
        self.machine.clear_failures();
        // Later operations finish what a failed one left pending (flushes, flip backs).
        self.manager.audit().unwrap();
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
        let size = self.rng.code_size();
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
                self.add_live(range, mi);
                self.rng.fill(w.as_mut_slice());
                self.modules[mi].writable.push(w);
            }
            Err(e) => {
                let natural = match e {
                    CodeError::CommitLimit { requested, .. } => {
                        requested > self.manager.remaining_uncommitted()
                    }
                    CodeError::NotGrowable => true,
                    _ => false,
                };
                self.failure(e, natural);
                self.assert_unchanged();
            }
        }
    }

    /// Asks for more than can be committed, or more than a code space may hold.
    fn over_limit(&mut self, mi: usize) {
        let remaining = self.manager.remaining_uncommitted();
        let size = match self.rng.below(3) {
            0 => remaining + 1 + self.rng.below(2 * PAGE),
            1 => MAX_SPACE + 1,
            _ => MAX_COMMITTED,
        };
        match self.modules[mi].alloc.allocate(size) {
            Ok(w) => {
                // Possible only when it fits in free, already committed room (rare).
                self.add_live(w.range(), mi);
                self.modules[mi].writable.push(w);
            }
            Err(e) => {
                let natural = matches!(
                    e,
                    CodeError::CommitLimit { .. }
                        | CodeError::NotGrowable
                        | CodeError::CodeSpaceTooLarge { .. }
                );
                self.failure(e, natural);
                self.assert_unchanged();
            }
        }
    }

    fn publish(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.writable.is_empty() {
            return;
        }
        let i = self.rng.below(module.writable.len());
        let w = module.writable.swap_remove(i);
        let bytes = w.as_slice().to_vec();
        let range = w.range();
        match module.alloc.publish(w) {
            Ok(code) => {
                assert_eq!((code.range(), code.len()), (range, bytes.len()));
                module.published.push((code, Some(bytes.clone())));
                self.published(range, Some(&bytes));
            }
            Err(r) => {
                module.writable.push(r.code);
                match self.failure(r.error, false) {
                    Failure::Unchanged => {
                        // Bytes of its own range may have been written already.
                        self.forget_bytes(range);
                        self.check_counters_unchanged();
                    }
                    Failure::Changed => {
                        // Published, or half: the pages' protection is read back below.
                        self.forget_bytes(range);
                        self.resync_protection(range);
                    }
                }
            }
        }
    }

    fn free(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.published.is_empty() {
            return;
        }
        let i = self.rng.below(module.published.len());
        let (code, bytes) = module.published.swap_remove(i);
        let range = code.range();
        match free_published(&mut module.alloc, code) {
            Ok(()) => self.remove_live(range),
            Err(FreeError::NotFreed(e, code)) => {
                let _ = bytes;
                self.modules[mi].published.push((code, None));
                self.failure(e, false);
                self.forget_bytes(range);
                self.check_counters_unchanged();
            }
            Err(FreeError::Decommit(e)) => {
                self.failure(e, false);
                self.remove_live(range);
                self.finish_decommit(mi);
            }
            Err(e) => panic!("{}: {e:?}", self.label()),
        }
    }

    fn discard(&mut self, mi: usize) {
        let module = &mut self.modules[mi];
        if module.writable.is_empty() {
            return;
        }
        let i = self.rng.below(module.writable.len());
        let w = module.writable.swap_remove(i);
        let range = w.range();
        match module.alloc.discard(w) {
            Ok(()) => self.remove_live(range),
            Err(FreeError::NotFreed(e, w)) => {
                self.modules[mi].writable.push(w);
                self.failure(e, false);
                self.forget_bytes(range);
                self.check_counters_unchanged();
            }
            Err(FreeError::Decommit(e)) => {
                self.failure(e, false);
                self.remove_live(range);
                self.finish_decommit(mi);
            }
            Err(e) => panic!("{}: {e:?}", self.label()),
        }
    }

    /// A decommit failed part way: trimming finishes it, so the model's rule holds again.
    fn finish_decommit(&mut self, mi: usize) {
        self.machine.clear_failures();
        self.modules[mi].alloc.trim().unwrap();
    }

    /// Hands a handle to an allocator that does not own it, then gives it back.
    fn foreign(&mut self, mi: usize) {
        let other = (mi + 1 + self.rng.below(self.modules.len() - 1)) % self.modules.len();
        if let Some(stale) = self.stale.pop() {
            let target = &mut self.modules[other].alloc;
            let error = match stale {
                Stale::Writable(w) => target.publish(w).map(drop).unwrap_err().error,
                Stale::Published(p) => free_published(target, p).unwrap_err().error(),
            };
            assert_eq!(error, CodeError::ForeignCode);
        } else if self.rng.below(2) == 0 && !self.modules[mi].writable.is_empty() {
            let w = self.modules[mi].writable.pop().unwrap();
            let (range, bytes) = (w.range(), w.as_slice().to_vec());
            let w = if self.rng.below(2) == 0 {
                let r = self.modules[other].alloc.publish(w).map(drop).unwrap_err();
                assert_eq!(r.error, CodeError::ForeignCode);
                r.code
            } else {
                match self.modules[other].alloc.discard(w) {
                    Err(FreeError::Foreign(w)) => w,
                    r => panic!("{r:?}"),
                }
            };
            assert_eq!((w.range(), w.as_slice()), (range, &bytes[..]));
            self.modules[mi].writable.push(w);
        } else if let Some((p, bytes)) = self.modules[mi].published.pop() {
            match free_published(&mut self.modules[other].alloc, p) {
                Err(FreeError::Foreign(p)) => self.modules[mi].published.push((p, bytes)),
                r => panic!("{r:?}"),
            }
        }
        self.check_counters_unchanged();
    }

    /// Drops a writable handle without discarding it: the range stays allocated.
    fn leak(&mut self, mi: usize) {
        if let Some(w) = self.modules[mi].writable.pop() {
            self.modules[mi].leaked.push(w.range());
        }
    }

    /// Drops module `mi`'s allocator and makes a new one with the same configuration.
    fn recreate(&mut self, mi: usize) {
        // Creating the fixed allocator reserves its space: only when no failure is planned.
        self.machine.clear_failures();
        self.injected = None;
        let config = self.modules[mi].config;
        let fresh = Module {
            config,
            alloc: CodeAllocator::new(&self.manager, config).unwrap(),
            writable: Vec::new(),
            published: Vec::new(),
            leaked: Vec::new(),
        };
        let old = std::mem::replace(&mut self.modules[mi], fresh);
        let spaces = old.alloc.code_spaces().to_vec();
        let mut ranges: Vec<AddressRange> = old.leaked.clone();
        ranges.extend(old.writable.iter().map(WritableCode::range));
        ranges.extend(old.published.iter().map(|(p, _)| p.range()));
        let Module {
            alloc,
            mut writable,
            mut published,
            ..
        } = old;
        let mut alloc = alloc;
        // SAFETY: the software machine never runs its code; published code goes with the rest.
        unsafe { alloc.release_all() };
        drop(alloc);
        if let Some(w) = writable.pop() {
            self.stale.push(Stale::Writable(w));
        }
        if let Some((p, _)) = published.pop() {
            self.stale.push(Stale::Published(p));
        }
        for r in &ranges {
            assert_eq!(self.live.remove(&r.start()), Some((r.end(), mi)));
            self.allocated[mi] -= r.size();
        }
        assert_eq!(self.allocated[mi], 0);
        for space in spaces {
            self.touched.extend(space.pages());
            let dead: Vec<usize> = self
                .pages
                .range(space.start()..space.end())
                .map(|(&p, _)| p)
                .collect();
            for p in dead {
                self.pages.remove(&p);
            }
        }
    }

    // ---- the model ----

    fn add_live(&mut self, range: AddressRange, mi: usize) {
        if let Some((&s, &(e, _))) = self.live.range(..range.end()).next_back() {
            assert!(
                e <= range.start(),
                "{}: {range:?} overlaps [{s:#x}, {e:#x})",
                self.label()
            );
        }
        self.live.insert(range.start(), (range.end(), mi));
        self.touched.extend(range.pages());
        self.allocated[mi] += range.size();
        for page in range.pages() {
            self.pages.entry(page).or_insert_with(|| ShadowPage {
                executable: false,
                bytes: vec![None; PAGE],
            });
        }
    }

    /// The range was published with `bytes` (INT3 after them): every page executable.
    fn published(&mut self, range: AddressRange, bytes: Option<&[u8]>) {
        for page in range.pages() {
            let shadow = self.pages.get_mut(&page).unwrap();
            shadow.executable = true;
            let part = range.overlap(&AddressRange::new(page, page + PAGE));
            for addr in part.start()..part.end() {
                shadow.bytes[addr - page] =
                    bytes.map(|b| b.get(addr - range.start()).copied().unwrap_or(INT3));
            }
        }
        self.touched.extend(range.pages());
    }

    fn forget_bytes(&mut self, range: AddressRange) {
        for page in range.pages() {
            let shadow = self.pages.get_mut(&page).unwrap();
            let part = range.overlap(&AddressRange::new(page, page + PAGE));
            for addr in part.start()..part.end() {
                shadow.bytes[addr - page] = None;
            }
        }
    }

    /// After a failure that changed protections: take them from the page tables (the audit
    /// checks they are RW+NX or R+X and never both).
    fn resync_protection(&mut self, range: AddressRange) {
        self.manager.audit().unwrap();
        for page in range.pages() {
            let flags = leaf_flags(&self.machine, page);
            assert!(
                flags == R_X || flags == RW_NX,
                "{}: {flags:#x}",
                self.label()
            );
            self.pages.get_mut(&page).unwrap().executable = flags == R_X;
        }
        self.touched.extend(range.pages());
    }

    fn page_in_use(&self, page: usize) -> bool {
        self.live
            .range(..page + PAGE)
            .next_back()
            .is_some_and(|(_, &(end, _))| end > page)
    }

    /// V8's rule: a page dies when no live code touches it; freed bytes on pages that live on
    /// become INT3.
    fn remove_live(&mut self, range: AddressRange) {
        let (end, mi) = self.live.remove(&range.start()).expect("live");
        self.touched.extend(range.pages());
        assert_eq!(end, range.end());
        self.allocated[mi] -= range.size();
        for page in range.pages() {
            if self.page_in_use(page) {
                let shadow = self.pages.get_mut(&page).unwrap();
                let part = range.overlap(&AddressRange::new(page, page + PAGE));
                for addr in part.start()..part.end() {
                    shadow.bytes[addr - page] = Some(INT3);
                }
            } else {
                self.pages.remove(&page);
            }
        }
    }
}
