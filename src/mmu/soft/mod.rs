//! [`Mmu`](super::Mmu) as a software machine: x86-64 paging in host memory, several CPUs with
//! pessimistic TLBs and instruction streams, an optional direct map, and failure injection.
//!
//! [`SoftMmu`] is a handle: clones share one machine, so a test gives one clone to a
//! [`CodeManager`](crate::CodeManager) and keeps another to simulate other CPUs' accesses
//! ([`read_as`](SoftMmu::read_as), [`write_as`](SoftMmu::write_as),
//! [`exec_as`](SoftMmu::exec_as)), plan failures ([`fail_nth`](SoftMmu::fail_nth)) and
//! inspect the machine. The model checks the [`Mmu`](super::Mmu) contract's promises as the
//! backend is used and records every broken one as a [`Violation`] (see [`tlb`] for the model):
//! a frame freed while a CPU may still cache it, a frame executable while any translation still
//! grants writes to it (or the reverse), a W+X leaf, an access through a stale translation to a
//! freed frame. Tests assert [`violations`](SoftMmu::violations) is empty.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

mod access;
mod backend;
mod checks;
mod inject;
mod machine;
mod reclaim;
mod rox;
pub mod tlb;

pub use access::Fault;
pub use inject::CallKind;
pub use machine::PHYS_BASE;
pub use tlb::{Violation, ViolationKind};

use super::{FlushStats, InterruptControl, Leaf};
use inject::Inject;
use machine::{Memory, ADDR, NX, W};
use tlb::{Cached, Tlbs};

/// The shared machine.
#[derive(Clone)]
struct Machine {
    mem: Memory,
    tlbs: Tlbs,
    stats: FlushStats,
    violations: Vec<Violation>,
    /// Physical frame -> window pages mapping it (4 KiB leaves outside the direct map).
    rmap: BTreeMap<u64, BTreeSet<u64>>,
    inject: Inject,
    irq: InterruptControl,
    leaf_stores: u64,
    wx_stores: u64,
    /// Split direct-map tables merged back into their huge page, freed after the next round.
    deferred: Vec<u64>,
    /// Pages outside the direct map whose leaf was ever stored present and executable.
    ever_executable: BTreeSet<u64>,
}

/// A software x86-64 machine; see the module docs. Cheap to clone (a shared handle); each
/// handle acts as one CPU ([`on_cpu`](Self::on_cpu)), CPU 0 by default.
#[derive(Clone)]
pub struct SoftMmu {
    machine: Arc<spin::Mutex<Machine>>,
    cpu: usize,
}

/// What a machine holds that operations may change: present leaves, which frames hold data,
/// and their bytes. Two equal snapshots mean "nothing changed".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every present leaf, in address order.
    pub leaves: Vec<Leaf>,
    /// Allocated frames that are not page tables.
    pub data_frames: BTreeSet<usize>,
    /// Bytes of those frames (frames never written are absent).
    pub contents: BTreeMap<usize, Vec<u8>>,
}

impl SoftMmu {
    /// A machine with `frames` physical frames (one becomes the PML4) and 4 CPUs online.
    ///
    /// # Panics
    /// If `frames` is 0 or the frames exceed 52-bit physical addresses.
    #[must_use]
    pub fn new(frames: usize) -> Self {
        Self::with_cpus(frames, 4)
    }

    /// A machine with `frames` frames and `cpus` CPUs online (at least 1).
    ///
    /// # Panics
    /// As [`new`](Self::new).
    #[must_use]
    pub fn with_cpus(frames: usize, cpus: usize) -> Self {
        assert!(frames > 0, "SoftMmu needs a frame for the PML4");
        assert!(
            (frames as u64)
                .checked_mul(4096)
                .and_then(|s| s.checked_add(PHYS_BASE))
                .is_some_and(|end| end - 1 <= (ADDR | 0xFFF)),
            "SoftMmu frames exceed the physical address space"
        );
        SoftMmu {
            machine: Arc::new(spin::Mutex::new(Machine {
                mem: Memory::new(frames),
                tlbs: Tlbs::new(cpus.max(1)),
                stats: FlushStats::default(),
                violations: Vec::new(),
                rmap: BTreeMap::new(),
                inject: Inject::default(),
                irq: InterruptControl::NONE,
                leaf_stores: 0,
                wx_stores: 0,
                deferred: Vec::new(),
                ever_executable: BTreeSet::new(),
            })),
            cpu: 0,
        }
    }

    /// Maps every frame at `base` in 2 MiB RW+NX pages (a kernel's direct map); publishing
    /// then splits them and seals code frames read-only there.
    ///
    /// # Panics
    /// If `base` is not 2 MiB aligned or canonical, or no frames are left for the tables.
    #[must_use]
    pub fn with_direct_map(self, base: usize) -> Self {
        assert!(base.is_multiple_of(2 << 20) && machine::canonical(base as u64));
        self.machine
            .lock()
            .mem
            .build_direct_map(base as u64)
            .expect("frames for the direct map's tables");
        self
    }

    /// A handle acting as CPU `cpu` (its `current_cpu`).
    #[must_use]
    pub fn on_cpu(&self, cpu: usize) -> Self {
        SoftMmu {
            machine: Arc::clone(&self.machine),
            cpu,
        }
    }

    /// Sets how many CPUs are online (at least 1); new ones start with empty TLBs.
    pub fn set_online(&self, cpus: usize) {
        self.machine
            .lock()
            .tlbs
            .cpus
            .resize_with(cpus.max(1), Default::default);
    }

    /// What the codespace locks use to disable interrupts (default: nothing to disable).
    pub fn set_interrupt_control(&self, control: InterruptControl) {
        self.machine.lock().irq = control;
    }

    /// Sets EFER.NXE of `cpu` (on by default).
    pub fn set_nxe(&self, cpu: usize, on: bool) {
        if let Some(c) = self.machine.lock().tlbs.cpus.get_mut(cpu) {
            c.no_nxe = !on;
        }
    }

    /// Sets CR0.WP of `cpu` (on by default).
    pub fn set_wp(&self, cpu: usize, on: bool) {
        if let Some(c) = self.machine.lock().tlbs.cpus.get_mut(cpu) {
            c.no_wp = !on;
        }
    }

    /// Every broken promise caught so far.
    #[must_use]
    pub fn violations(&self) -> Vec<Violation> {
        self.machine.lock().violations.clone()
    }

    /// Makes the `n`-th call of `kind` from now fail (0 = the next).
    pub fn fail_nth(&self, kind: CallKind, n: u64) {
        self.machine.lock().inject.fail_nth(kind, n);
    }

    /// Makes the next `count` calls of `kind` fail (consecutive failures, as of a CPU that stays
    /// unresponsive); replaces any failure planned for `kind`.
    pub fn fail_next(&self, kind: CallKind, count: u64) {
        self.machine.lock().inject.fail_next(kind, count);
    }

    /// Cancels planned failures.
    pub fn clear_failures(&self) {
        self.machine.lock().inject.clear();
    }

    /// Calls of `kind` so far (failed ones included).
    #[must_use]
    pub fn calls(&self, kind: CallKind) -> u64 {
        self.machine.lock().inject.calls(kind)
    }

    /// The machine's mappings, data frames and their bytes.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let m = self.machine.lock();
        let mut leaves = Vec::new();
        m.mem.visit(0, u64::MAX, &mut |l| leaves.push(*l));
        let data_frames = m.mem.data_frames();
        let contents = data_frames
            .iter()
            .filter_map(|&f| Some((f, m.mem.frame_bytes(f)?.to_vec())))
            .collect();
        Snapshot {
            leaves,
            data_frames,
            contents,
        }
    }

    /// The raw entries on the walk to `addr`: PML4, PDPT, PD, PT; the first non-present (or
    /// huge) entry is reported and the levels past it are `None`. All `None` if not canonical.
    #[must_use]
    pub fn raw_entries(&self, addr: usize) -> [Option<u64>; 4] {
        let m = self.machine.lock();
        let mut out = [None; 4];
        let va = addr as u64;
        if !machine::canonical(va) {
            return out;
        }
        let mut table = m.mem.pml4;
        for (level, slot) in out.iter_mut().enumerate() {
            let e = m.mem.entry(table, machine::index(va, level));
            *slot = Some(e);
            if !machine::present(e) || level == 3 || e & machine::PS != 0 {
                break;
            }
            table = m.mem.frame_index(e & ADDR).unwrap_or(usize::MAX);
        }
        out
    }

    /// Physical address of the PML4.
    #[must_use]
    pub fn cr3(&self) -> u64 {
        Memory::phys(self.machine.lock().mem.pml4)
    }

    /// Frames in the physical memory.
    #[must_use]
    pub fn total_frames(&self) -> usize {
        self.machine.lock().mem.total()
    }

    /// Frames used by page tables, the PML4 included.
    #[must_use]
    pub fn table_frames(&self) -> usize {
        self.machine.lock().mem.tables.len()
    }

    /// Whether any leaf store ever left a present leaf writable and executable.
    #[must_use]
    pub fn wx_ever_observed(&self) -> bool {
        self.machine.lock().wx_stores != 0
    }

    /// The pages of `range` (outside the direct map) whose leaf was ever stored present and
    /// executable, at any step of any operation, in address order: what "this byte was never
    /// executable" is checked against.
    #[must_use]
    pub fn ever_executable(&self, range: crate::AddressRange) -> Vec<usize> {
        let m = self.machine.lock();
        let (start, end) = (range.start() as u64, range.end() as u64);
        m.ever_executable
            .range(start..end)
            .map(|&p| p as usize)
            .collect()
    }

    /// Leaf stores so far.
    #[must_use]
    pub fn leaf_stores(&self) -> u64 {
        self.machine.lock().leaf_stores
    }
}

impl fmt::Debug for SoftMmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.machine.lock();
        f.debug_struct("SoftMmu")
            .field("cpu", &self.cpu)
            .field("cpus", &m.tlbs.cpus.len())
            .field("free", &m.mem.free_count())
            .field("stats", &m.stats)
            .field("violations", &m.violations.len())
            .finish_non_exhaustive()
    }
}

/// The translation (one TLB entry) a present leaf entry grants at `level` (3: 4 KiB, 2: 2 MiB;
/// intermediate entries never restrict).
fn cached(entry: u64, level: usize) -> Cached {
    Cached {
        frame: machine::leaf_frame(entry, level),
        size: if level == 2 { machine::HUGE } else { 4096 },
        writable: entry & W != 0,
        executable: entry & NX == 0,
    }
}
