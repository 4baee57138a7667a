//! The audit: what the page tables say, checked against what the manager believes and against
//! W^X over the whole address space.

use alloc::vec::Vec;

use super::state::State;
use crate::mmu::{Leaf, Mmu};
use crate::PAGE_SIZE;

/// Result of [`CodeManager::audit`](super::CodeManager::audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditReport {
    /// Mapped pages in the window.
    pub mapped_pages: usize,
    /// Window pages neither RW+NX, R+X nor R+NX (must be 0; W+X pages are counted in
    /// `writable_and_executable`).
    pub unexpected_protection: usize,
    /// Mapped window pages outside every code space, guard pages included (must be 0).
    pub outside_code_spaces: usize,
    /// Window pages mapped but not in the manager's books, or the reverse (must be 0).
    pub unaccounted: usize,
    /// The manager's committed-bytes counter, to compare with `mapped_pages * PAGE_SIZE`.
    pub committed_counter: usize,
    /// Leaves anywhere in the page table that are writable and executable (must be 0).
    pub writable_and_executable: usize,
    /// Writable leaves anywhere that map a frame some executable leaf maps too (must be 0):
    /// a direct-map or identity-map alias left writable, for instance.
    pub writable_aliases_of_executable: usize,
    /// Page-table leaves mapping the window's 4 KiB pages: one iTLB entry each.
    pub small_leaves: usize,
    /// Page-table leaves mapping the window's 2 MiB (ROX) pages: one iTLB entry each, for 512
    /// pages of code. `small_leaves + huge_leaves` is how many iTLB entries cover the code.
    pub huge_leaves: usize,
}

impl AuditReport {
    /// Whether every check holds.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.writable_and_executable == 0
            && self.writable_aliases_of_executable == 0
            && self.unexpected_protection == 0
            && self.outside_code_spaces == 0
            && self.unaccounted == 0
            && self.mapped_pages * PAGE_SIZE == self.committed_counter
    }
}

/// Visits leaves: calls its argument for each (e.g. [`Mmu::for_each_leaf`]).
pub type LeafWalk<'a> = dyn FnMut(&mut dyn FnMut(&Leaf)) + 'a;

/// W+X leaves and writable aliases of executable frames among the leaves `walk` visits:
/// `walk` is called twice (first to collect the executable frames, which are few, then to check
/// every writable leaf against them), so memory stays small however many leaves the tables hold.
pub fn wx_report(walk: &mut LeafWalk<'_>) -> (usize, usize) {
    let mut wx = 0;
    let mut exec: Vec<(u64, u64)> = Vec::new();
    walk(&mut |l| {
        if l.executable {
            exec.push(l.frames());
            if l.writable {
                wx += 1;
            }
        }
    });
    exec.sort_unstable();
    // Merge into disjoint sorted ranges.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(exec.len());
    for (s, e) in exec {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    // A W+X leaf is reported as such, not also as an alias of itself.
    let mut aliases = 0;
    walk(&mut |l| {
        if l.writable && !l.executable {
            let (s, e) = l.frames();
            let i = merged.partition_point(|r| r.1 <= s);
            if merged.get(i).is_some_and(|r| r.0 < e) {
                aliases += 1;
            }
        }
    });
    (wx, aliases)
}

pub(super) fn audit<M: Mmu>(state: &State<M>) -> AuditReport {
    let mut report = AuditReport {
        committed_counter: state.committed,
        ..AuditReport::default()
    };
    let mut in_window = 0;
    state.mmu.for_each_mapping(state.window, &mut |page, m| {
        report.mapped_pages += 1;
        if !(m.writable && m.executable) && m.protection().is_none() {
            report.unexpected_protection += 1;
        }
        if state.space_of(page).is_none() {
            report.outside_code_spaces += 1;
        }
        match state.pages.get(&page) {
            Some(c) if c.frame() == m.frame => in_window += 1,
            _ => report.unaccounted += 1,
        }
    });
    report.unaccounted += state.pages.len() - in_window;
    let window = state.window;
    state.mmu.for_each_leaf(&mut |l| {
        if window.contains(l.virt) {
            match l.size {
                PAGE_SIZE => report.small_leaves += 1,
                crate::mmu::HUGE_PAGE_SIZE => report.huge_leaves += 1,
                _ => report.unexpected_protection += 1,
            }
        }
    });
    (
        report.writable_and_executable,
        report.writable_aliases_of_executable,
    ) = wx_report(&mut |f| state.mmu.for_each_leaf(f));
    report
}
