//! A pessimistic model of each simulated CPU's TLB and instruction stream.
//!
//! Hardware may cache any present translation at any time, speculatively too (Intel SDM
//! 4.10.2.3), and keeps it until that CPU invalidates it. So when a present leaf changes, the
//! model assumes **every** CPU still holds the old translation: it becomes *stale* on every CPU
//! until that CPU invalidates the page (or flushes everything). A CPU also keeps executing the
//! bytes it last fetched from a frame that another mapping changed, until it serializes
//! (cross-modifying code, SDM vol. 3 8.1.3): the model snapshots such frames per CPU.
//!
//! Paging-structure caches are modelled the same way: when a present entry pointing to a table
//! changes (a table unlinked, or a split table collapsed back into a huge leaf), every CPU may
//! still walk through the old entry into that table until it invalidates anything (`invlpg`
//! drops every paging-structure-cache entry of the PCID, Intel SDM 4.10.4.1).
//!
//! Nothing here says what is wrong; [`super::SoftMmu`] checks its promises against this state
//! and records [`Violation`]s.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use super::machine::{FrameData, HUGE};

const PAGE: u64 = crate::PAGE_SIZE as u64;

/// A translation a CPU may hold: one TLB entry, of a 4 KiB or a 2 MiB leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    /// Physical address of the first frame it maps.
    pub frame: u64,
    /// Bytes it maps: 4 KiB, or 2 MiB for a huge leaf (one entry for all of it).
    pub size: u64,
    /// Whether it grants writes.
    pub writable: bool,
    /// Whether it grants execution.
    pub executable: bool,
}

/// What the model caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// A frame went back to the allocator while a CPU may still reach it through a stale
    /// translation (free before flush), or, for a page-table frame, through a stale cached
    /// entry pointing to it.
    FreedWhileCached,
    /// A frame went back to the allocator while still mapped (for a page-table frame: while
    /// still linked into the page tables).
    FreedWhileMapped,
    /// A leaf became writable and executable at once.
    WritableAndExecutable,
    /// A frame became executable while some translation (present or stale, any CPU) still
    /// grants writes to it.
    ExecutableWhileWritable,
    /// A frame became writable while some translation (present or stale, any CPU) still grants
    /// execution of it.
    WritableWhileExecutable,
    /// A simulated access reached a free frame through a stale translation.
    AccessToFreedFrame,
}

/// A broken promise, with the operation during which the model caught it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// The backend operation (or simulated access) that caused it.
    pub op: &'static str,
    /// What went wrong.
    pub kind: ViolationKind,
    /// The virtual page involved.
    pub page: usize,
    /// The physical frame involved.
    pub frame: u64,
    /// The CPU whose TLB was involved, if one was.
    pub cpu: Option<usize>,
}

/// One simulated CPU.
#[derive(Clone, PartialEq, Eq, Default)]
pub(super) struct Cpu {
    /// Stale translations by page, oldest first.
    pub stale: BTreeMap<u64, Vec<Cached>>,
    /// Table frames this CPU may still reach through a cached entry that changed since.
    pub walks: BTreeSet<u64>,
    /// Bytes this CPU still executes for frames changed since it last serialized.
    pub code_view: BTreeMap<u64, FrameData>,
    /// EFER.NXE off.
    pub no_nxe: bool,
    /// CR0.WP off.
    pub no_wp: bool,
}

/// All CPUs' cached state.
#[derive(Clone, PartialEq, Eq, Default)]
pub(super) struct Tlbs {
    pub cpus: Vec<Cpu>,
}

impl Tlbs {
    pub fn new(cpus: usize) -> Self {
        Tlbs {
            cpus: (0..cpus).map(|_| Cpu::default()).collect(),
        }
    }

    /// The present translation `old` of `page` changed: every CPU may still hold it.
    pub fn went_stale(&mut self, page: u64, old: Cached) {
        for cpu in &mut self.cpus {
            let list = cpu.stale.entry(page).or_default();
            if !list.contains(&old) {
                list.push(old);
            }
        }
    }

    /// The present entry pointing to table frame `table` changed: every CPU may still walk
    /// through it.
    pub fn table_unlinked(&mut self, table: u64) {
        for cpu in &mut self.cpus {
            cpu.walks.insert(table);
        }
    }

    /// The CPUs that may still walk into table frame `table`.
    pub fn walking(&self, table: u64) -> impl Iterator<Item = usize> + '_ {
        (0..self.cpus.len()).filter(move |&i| self.cpus[i].walks.contains(&table))
    }

    /// CPU `cpu` invalidates `page` (`None`: everything); either drops its paging-structure
    /// caches. `invlpg` drops the entry of any size covering the address (Intel SDM 4.10.4.1):
    /// a 2 MiB entry is kept under its first page, so that key goes too.
    pub fn invalidate(&mut self, cpu: usize, page: Option<u64>) {
        if let Some(c) = self.cpus.get_mut(cpu) {
            c.walks.clear();
            match page {
                Some(p) => {
                    c.stale.remove(&p);
                    let base = p & !(HUGE - 1);
                    if let Some(list) = c.stale.get_mut(&base) {
                        list.retain(|t| t.size != HUGE);
                        if list.is_empty() {
                            c.stale.remove(&base);
                        }
                    }
                }
                None => c.stale.clear(),
            }
        }
    }

    /// Every stale translation covering `frame`: (cpu, page, translation).
    pub fn stale_of(&self, frame: u64) -> impl Iterator<Item = (usize, u64, Cached)> + '_ {
        self.cpus.iter().enumerate().flat_map(move |(i, c)| {
            c.stale.iter().flat_map(move |(&page, list)| {
                list.iter()
                    .filter(move |t| t.frame <= frame && frame - t.frame < t.size)
                    .map(move |&t| (i, page, t))
            })
        })
    }

    /// The translation CPU `cpu` uses for `page` when it holds stale ones: the newest (a 4 KiB
    /// entry of the page, else a 2 MiB one covering it, narrowed to the page).
    pub fn stale_for(&self, cpu: usize, page: u64) -> Option<Cached> {
        let c = self.cpus.get(cpu)?;
        if let Some(t) = c.stale.get(&page).and_then(|l| l.last()) {
            if t.size != HUGE || page.is_multiple_of(HUGE) {
                return Some(Cached { size: PAGE, ..*t });
            }
        }
        let base = page & !(HUGE - 1);
        let t = c.stale.get(&base)?.iter().rev().find(|t| t.size == HUGE)?;
        Some(Cached {
            frame: t.frame + (page - base),
            size: PAGE,
            ..*t
        })
    }

    /// Code in `frame` is about to change from `old`: every CPU keeps executing `old` until it
    /// serializes.
    pub fn code_changing(&mut self, frame: u64, old: &[u8; crate::PAGE_SIZE]) {
        for cpu in &mut self.cpus {
            cpu.code_view
                .entry(frame)
                .or_insert_with(|| alloc::boxed::Box::new(*old));
        }
    }

    /// `frame` went back to the allocator after every CPU invalidated it (which serialized
    /// them): no CPU executes bytes it fetched from it before.
    pub fn forget_code(&mut self, frame: u64) {
        for cpu in &mut self.cpus {
            cpu.code_view.remove(&frame);
        }
    }

    /// CPU `cpu` executed a serializing instruction.
    pub fn serialize(&mut self, cpu: usize) {
        if let Some(c) = self.cpus.get_mut(cpu) {
            c.code_view.clear();
        }
    }
}
