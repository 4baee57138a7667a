//! The starting state the failure-injection driver re-creates for every failure point, what it
//! observes to decide "nothing changed", and the checks that a changed state is safe.

use std::collections::BTreeSet;
use std::sync::Arc;

use codespace::breakpoint::BreakpointSites;
use codespace::code_object::{CodeKind, CodeObject};
use codespace::code_pointer_table::CodePointerTable;
use codespace::jump_table::{JumpTableLayout, FAR_SLOT_TARGET_OFFSET};
use codespace::manager::{AllocatorStats, ManagerStats};
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::Leaf;
use codespace::module::{CodeModule, ModuleConfig, NewCode, Registries};
use codespace::{
    AllocatorConfig, CodeAllocator, CodeManager, ManagerConfig, PatchProtocol, PublishedCode,
    WritableCode,
};

use crate::common::*;

/// A runtime stub outside the window that slots may target.
pub const EXTERNAL: usize = 0xFFFF_FFFF_8020_0000;
pub const FUNCTIONS: u32 = 8;

/// A module with code in two code spaces (two jump tables), a retired object waiting for its
/// grace period, a wrapper a slot targets, code pointers; and a plain allocator on the same
/// manager with published code and two staged handles.
pub struct World {
    pub mode: Mode,
    pub machine: SoftMmu,
    pub manager: CodeManager<SoftMmu>,
    pub regs: &'static Registries,
    pub pointers: &'static CodePointerTable,
    pub module: Option<CodeModule<SoftMmu>>,
    pub other: Option<CodeModule<SoftMmu>>,
    pub alloc: CodeAllocator<SoftMmu>,
    /// Every object ever added, to find the registered ones.
    pub objects: Vec<Arc<CodeObject>>,
    pub writable: Vec<WritableCode>,
    pub published: Vec<PublishedCode>,
    pub wrapper: usize,
    /// The #BP hook's table under the INT3 protocol.
    pub sites: Option<&'static BreakpointSites>,
    _fillers: Vec<CodeAllocator<SoftMmu>>,
}

impl World {
    pub fn new(mode: Mode) -> World {
        Self::with_sites(mode, None)
    }

    /// The world with slots patched under the INT3 protocol (`PatchProtocol::Int3`): a CPU that
    /// fetches an INT3 in a slot goes where the #BP hook says.
    pub fn int3(mode: Mode) -> World {
        Self::with_sites(mode, Some(Box::leak(Box::new(BreakpointSites::new()))))
    }

    fn with_sites(mode: Mode, sites: Option<&'static BreakpointSites>) -> World {
        let machine = machine_for(1 << 14, mode.protection);
        let manager = manager_on(
            &machine,
            slot(),
            mode.manager(ManagerConfig {
                max_code_space_size: GIB,
                patch_protocol: sites.map_or(PatchProtocol::AtomicStore, PatchProtocol::Int3),
                ..ManagerConfig::default()
            }),
        );
        let regs = registries();
        let pointers: &'static CodePointerTable =
            Box::leak(Box::new(CodePointerTable::with_capacity(32, regs.grace())));
        let module = CodeModule::new(
            &manager,
            regs,
            mode.module(ModuleConfig {
                functions: FUNCTIONS,
                lazy_entry: Some(LAZY_ENTRY),
                initial_reservation: 16 * PAGE,
                ..ModuleConfig::default()
            }),
        )
        .expect("module");
        module.set_code_pointer_table(Some(pointers)).unwrap();
        // SAFETY: nothing executes on the software machine; EXTERNAL stands for kernel text
        // outside the window.
        unsafe { module.register_external(EXTERNAL) }.unwrap();
        let mut objects = Vec::new();
        let add = |objects: &mut Vec<Arc<CodeObject>>, code: &NewCode<'_>| {
            let o = module.add_code(code).expect("setup add");
            objects.push(Arc::clone(&o));
            o
        };

        // A second code space more than 2 GiB away, with its own table: fill the first, reserve
        // 3 GiB between, add there, then empty the first again.
        let filler = fill_free_space(&module);
        objects.push(Arc::clone(&filler));
        let mut fillers = far_fillers(&manager);
        add(&mut objects, &NewCode::function(4, &body(64, 0x44)));
        module.free_code(filler.instruction_start()).unwrap();
        pass_grace(regs);
        module.reclaim().unwrap();
        // A third space would be out of reach of both tables.
        fillers.extend(far_fillers(&manager));

        let f0 = body(100, 0x10);
        let mut code = NewCode::function(0, &f0);
        code.protected = &[10];
        code.landing_pad = Some(90);
        add(&mut objects, &code);
        add(
            &mut objects,
            &NewCode::function(1, &body(2 * PAGE + 100, 0x11)),
        );
        let wrapper = add(
            &mut objects,
            &NewCode::new(CodeKind::Wrapper, &body(64, 0x22)),
        )
        .instruction_start();
        // Function 2's first version spans whole pages and is retired, waiting.
        let v1_bytes = body(2 * PAGE + 300, 0x23);
        let mut v1 = NewCode::function(2, &v1_bytes);
        v1.protected = &[5];
        v1.landing_pad = Some(6);
        add(&mut objects, &v1);
        add(&mut objects, &NewCode::function(2, &body(64, 0x24)));
        module.patch_slots(&[(3, wrapper)]).unwrap();

        let mut alloc =
            CodeAllocator::new(&manager, mode.allocator(AllocatorConfig::default())).unwrap();
        let mut published = Vec::new();
        // Spaces of 1 page (the first, 64 bytes spare), 3 pages and 2 pages: the second code
        // spans three pages, its last shared with the fourth code and the second staged handle;
        // freeing it decommits two pages and fills INT3 on a live one.
        for (len, fill) in [
            (PAGE - 64, 0x30),
            (2 * PAGE + 64, 0x31),
            (64, 0x34),
            (64, 0x35),
        ] {
            let mut w = alloc.allocate(len).unwrap();
            w.as_mut_slice().fill(fill);
            published.push(alloc.publish(w).unwrap());
        }
        let writable = [(PAGE + 64, 0x32), (64, 0x33)]
            .into_iter()
            .map(|(len, fill)| {
                let mut w = alloc.allocate(len).unwrap();
                w.as_mut_slice().fill(fill);
                w
            })
            .collect();
        let world = World {
            mode,
            machine,
            manager,
            regs,
            pointers,
            module: Some(module),
            other: None,
            alloc,
            objects,
            writable,
            published,
            wrapper,
            sites,
            _fillers: fillers,
        };
        world.check("setup", true);
        mode.assert_in_use(&world.manager);
        world
    }

    pub fn module(&self) -> &CodeModule<SoftMmu> {
        self.module.as_ref().expect("module")
    }

    /// Adds and remembers the object.
    pub fn add(&mut self, object: &Arc<CodeObject>) {
        self.objects.push(Arc::clone(object));
    }

    /// Remembers functions an add installed although it reported an error (`SyncFailed`).
    pub fn adopt_installed(&mut self) {
        for i in 0..FUNCTIONS {
            let Some(start) = self.module().function_code(i).unwrap() else {
                continue;
            };
            if !self.objects.iter().any(|o| o.instruction_start() == start) {
                let o = self
                    .regs
                    .lookup_code(start)
                    .expect("installed code is registered");
                self.objects.push(o);
            }
        }
    }

    /// Objects PC lookup still finds (live or retired, not yet freed).
    pub fn registered(&self) -> Vec<&Arc<CodeObject>> {
        self.objects
            .iter()
            .filter(|o| finds(self.regs, o.instruction_start(), o))
            .collect()
    }

    pub fn observe(&self) -> Observation {
        let snapshot = self.machine.snapshot();
        let window = self.manager.window();
        let (leaves, direct): (Vec<Leaf>, Vec<Leaf>) = snapshot
            .leaves
            .into_iter()
            .partition(|l| window.contains(l.virt));
        let module = self.module();
        let tables = module.jump_tables().unwrap();
        let stats = |s: AllocatorStats| AllocatorStats { freed: 0, ..s };
        Observation {
            leaves,
            sealed: direct
                .iter()
                .filter(|l| !l.writable)
                .map(|l| l.virt)
                .collect(),
            data_frames: snapshot.data_frames,
            manager: self.manager.stats(),
            module: stats(module.stats().unwrap()),
            alloc: stats(self.alloc.stats()),
            code_count: module.code_count().unwrap(),
            traps: self.regs.traps.len(),
            code_map: self.regs.code.len(),
            pointers: self.pointers.len(),
            code: self
                .registered()
                .iter()
                .map(|o| {
                    let r = o.instructions();
                    (r.start(), read(&self.manager, r.start(), r.size()))
                })
                .collect(),
            published: self
                .published
                .iter()
                .map(|p| read(&self.manager, p.start(), p.len()))
                .collect(),
            tables: tables
                .iter()
                .map(|t| read(&self.manager, t.base(), t.total_size()))
                .collect(),
            functions: (0..FUNCTIONS)
                .map(|i| module.function_code(i).unwrap())
                .collect(),
            slots: (0..FUNCTIONS)
                .map(|i| module.slot_target(i).unwrap())
                .collect(),
            function_pointers: (0..FUNCTIONS)
                .map(|i| {
                    module
                        .function_pointer(i)
                        .unwrap()
                        .map(|p| self.pointers.get(p))
                })
                .collect(),
            executed: self.executed(),
        }
    }

    /// Where every slot of every table sends every CPU.
    fn executed(&self) -> Vec<Option<usize>> {
        let tables = self.module().jump_tables().unwrap();
        let mut out = Vec::new();
        for cpu in 0..self.machine_cpus() {
            for t in &tables {
                for i in 0..FUNCTIONS {
                    out.push(self.destination(cpu, t, i));
                }
            }
        }
        out
    }

    /// Where slot `i` of `t` sends CPU `cpu`: [`executed_destination`], or, when the CPU fetches
    /// an INT3 there under the INT3 protocol, where the #BP hook resumes it (`None`: a stray
    /// breakpoint).
    fn destination(&self, cpu: usize, t: &JumpTableLayout, i: u32) -> Option<usize> {
        let near = t.near_slot_addr(i).unwrap();
        let mut head = [0; 1];
        self.machine.exec_as(cpu, near, &mut head).unwrap();
        let Some(sites) = self.sites.filter(|_| head[0] == INT3) else {
            return executed_destination(&self.machine, cpu, t, i);
        };
        let resume = sites.resume_at(near + 1)?;
        if Some(resume) != t.far_slot_addr(i) {
            return Some(resume);
        }
        let mut target = [0; 8];
        self.machine
            .exec_as(cpu, resume + FAR_SLOT_TARGET_OFFSET, &mut target)
            .unwrap();
        Some(u64::from_le_bytes(target) as usize)
    }

    fn machine_cpus(&self) -> usize {
        use codespace::mmu::Mmu;
        self.machine.online_cpus()
    }

    /// Finishes what a failed operation left pending, the way later operations do: any manager
    /// operation (pending flush, flip back), the module's reclaim (frees that could not start,
    /// retired code after a grace period), the grace domain (dropped modules).
    pub fn recover(&mut self) {
        self.manager.audit().unwrap();
        self.module().reclaim().unwrap();
        settle(self.regs);
        self.module().reclaim().unwrap();
        settle(self.regs);
    }

    /// What must hold whatever failed: the machine saw no broken promise, every CPU executes
    /// every slot into code that is still allocated and registered (or a lazy slot), and the
    /// books match the machine. With `settled`, also: the audit is clean, no frame or range
    /// leaked, and every CPU executes exactly what the books say.
    pub fn check(&self, label: &str, settled: bool) {
        let v = self.machine.violations();
        assert!(v.is_empty(), "{label}: {v:#?}");
        assert!(!self.machine.wx_ever_observed(), "{label}: W+X");
        let module = self.module();
        let tables = module.jump_tables().unwrap();
        for cpu in 0..self.machine_cpus() {
            for t in &tables {
                for i in 0..FUNCTIONS {
                    let Some(to) = self.destination(cpu, t, i) else {
                        panic!("{label}: CPU {cpu} slot {i} is INT3 with lazy compilation on");
                    };
                    let books = module.slot_target(i).unwrap();
                    let lazy = t.lazy_slot_addr(i);
                    if settled {
                        assert_eq!(Some(to), books.or(lazy), "{label}: CPU {cpu} slot {i}");
                    }
                    if Some(to) == lazy || to == EXTERNAL {
                        continue;
                    }
                    let live = self.regs.lookup_code(to).is_some_and(|o| {
                        o.instruction_start() == to && o.kind() != CodeKind::JumpTable
                    });
                    assert!(
                        live,
                        "{label}: CPU {cpu} slot {i} runs into freed code at {to:#x}"
                    );
                }
            }
        }
        for i in 0..FUNCTIONS {
            if let Some(start) = module.function_code(i).unwrap() {
                let o = self
                    .regs
                    .lookup_code(start)
                    .expect("installed code is registered");
                assert_eq!(
                    (o.instruction_start(), o.index()),
                    (start, Some(i)),
                    "{label}"
                );
            }
        }
        if !settled {
            return;
        }
        let audit = self.manager.audit().unwrap();
        assert!(audit.is_clean(), "{label}: {audit:?}");
        assert_eq!(
            self.machine.snapshot().data_frames.len() * PAGE,
            self.manager.committed(),
            "{label}: a data frame leaked"
        );
        // Every byte the module has allocated belongs to registered code.
        let registered: usize = self
            .registered()
            .iter()
            .map(|o| o.instructions().size().next_multiple_of(64))
            .sum::<usize>()
            + tables_bytes(module);
        assert_eq!(
            module.stats().unwrap().allocated,
            registered,
            "{label}: a range leaked"
        );
        let (live, retired) = module.code_count().unwrap();
        assert_eq!(
            live + retired,
            self.registered().len() + tables.len(),
            "{label}"
        );
    }

    /// Later operations work: add and replace a function, patch slots, publish and free.
    pub fn follow_up(&mut self, label: &str) {
        let module = self.module.as_ref().unwrap();
        let f = module
            .add_code(&NewCode::function(7, &body(300, 0x77)))
            .unwrap_or_else(|e| panic!("{label}: follow-up add: {e:?}"));
        let g = module
            .add_code(&NewCode::function(7, &body(300, 0x78)))
            .unwrap_or_else(|e| panic!("{label}: follow-up replace: {e:?}"));
        module
            .patch_slots(&[(6, EXTERNAL), (5, g.instruction_start())])
            .unwrap_or_else(|e| panic!("{label}: follow-up patch: {e:?}"));
        self.add(&f);
        self.add(&g);
        let mut w = self.alloc.allocate(200).unwrap();
        w.as_mut_slice().fill(0x79);
        let p = self.alloc.publish(w).unwrap();
        free_published(&mut self.alloc, p).unwrap();
        self.recover();
        self.check(&format!("{label}, after a follow-up"), true);
    }
}

/// Bytes of the module's jump-table allocations.
fn tables_bytes(module: &CodeModule<SoftMmu>) -> usize {
    module
        .jump_tables()
        .unwrap()
        .iter()
        .map(|t| {
            // The table object spans its whole-page allocation, trampoline included.
            let o = module.lookup_code(t.base()).expect("table registered");
            o.instructions().size()
        })
        .sum()
}

/// Everything a failed operation that reports "nothing changed" must leave as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    leaves: Vec<Leaf>,
    sealed: Vec<usize>,
    data_frames: BTreeSet<usize>,
    manager: ManagerStats,
    module: AllocatorStats,
    alloc: AllocatorStats,
    code_count: (usize, usize),
    traps: usize,
    code_map: usize,
    pointers: usize,
    code: Vec<(usize, Vec<u8>)>,
    published: Vec<Vec<u8>>,
    tables: Vec<Vec<u8>>,
    functions: Vec<Option<usize>>,
    slots: Vec<Option<usize>>,
    function_pointers: Vec<Option<usize>>,
    executed: Vec<Option<usize>>,
}

impl Observation {
    /// Whether `after` shows nothing changed since `self`. One difference is allowed: a
    /// rolled-back publish leaves the direct-map alias of a fresh page's frame read-only (sealed
    /// when the page was staged executable) until the page is decommitted — harmless, as the
    /// frame stays the manager's; the page itself is back to RW+NX.
    pub fn unchanged(&self, after: &Observation) -> bool {
        let extra_ok = self.sealed.iter().all(|va| after.sealed.contains(va))
            && after
                .sealed
                .iter()
                .filter(|va| !self.sealed.contains(va))
                .all(|&va| {
                    let frame = (va - DIRECT_MAP) as u64 + codespace::mmu::soft::PHYS_BASE;
                    after.leaves.iter().any(|l| l.frame == frame && l.writable)
                });
        let same = Observation {
            sealed: self.sealed.clone(),
            ..after.clone()
        };
        extra_ok && same == *self
    }

    /// The fields that differ, for failure messages.
    pub fn diff(&self, other: &Observation) -> String {
        let mut out = String::new();
        macro_rules! field {
            ($($f:ident),*) => {$(
                if self.$f != other.$f {
                    out += &format!("\n  {}: {:x?}\n   -> {:x?}", stringify!($f), self.$f, other.$f);
                }
            )*};
        }
        field!(
            leaves,
            sealed,
            data_frames,
            manager,
            module,
            alloc,
            code_count,
            traps,
            code_map,
            pointers,
            functions,
            slots,
            function_pointers,
            executed
        );
        for (name, a, b) in [
            (
                "code",
                format!("{:?}", self.code),
                format!("{:?}", other.code),
            ),
            (
                "published",
                format!("{:?}", self.published),
                format!("{:?}", other.published),
            ),
            (
                "tables",
                format!("{:?}", self.tables),
                format!("{:?}", other.tables),
            ),
        ] {
            if a != b {
                out += &format!("\n  {name} bytes differ");
            }
        }
        out
    }
}
