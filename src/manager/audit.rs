//! The audit: what the page tables say, checked against what the manager believes and against
//! W^X over the whole address space.

use alloc::vec::Vec;
use core::fmt;

use super::state::State;
use crate::mmu::{Leaf, Mmu};
use crate::PAGE_SIZE;

/// Result of [`CodeManager::audit`](super::CodeManager::audit): counts of every kind of
/// violation, and the first [`AuditFindings::CAPACITY`] offending leaves with their addresses
/// (its `Display` prints both).
///
/// What a clean report asks of the kernel's own mappings: no leaf anywhere in the page table is
/// writable and executable (kernel text R+X, data RW+NX, the boot identity map included), and
/// no writable leaf maps a frame some executable leaf maps (a direct map covering kernel text
/// must map it read-only; code frames' aliases are sealed by the backend through
/// `X86Mmu::with_linear_maps`).
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
    /// The first offending leaves, in walk order.
    pub findings: AuditFindings,
}

/// What an [`AuditFinding`] violates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditViolation {
    /// A leaf writable and executable at once.
    WritableAndExecutable,
    /// A writable leaf mapping a frame some executable leaf maps.
    WritableAliasOfExecutable,
    /// A window page neither RW+NX, R+X nor R+NX.
    UnexpectedProtection,
    /// A mapped window page outside every code space (a guard page, for instance).
    OutsideCodeSpaces,
    /// A window page mapped but not in the manager's books (or mapped to another frame).
    Unaccounted,
}

/// One offending leaf: where it is and what it maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditFinding {
    /// The rule it breaks.
    pub violation: AuditViolation,
    /// First virtual address of the leaf.
    pub virt: usize,
    /// Bytes it maps.
    pub size: usize,
    /// First physical address it maps.
    pub frame: u64,
}

/// The first [`Self::CAPACITY`] findings of an audit (a `Copy` list: audits run where
/// allocating a report would be unwelcome, and the counts say how many there were).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditFindings {
    list: [Option<AuditFinding>; AuditFindings::CAPACITY],
    len: usize,
}

impl AuditFindings {
    /// Findings kept; the counts of [`AuditReport`] go on beyond.
    pub const CAPACITY: usize = 8;

    fn push(&mut self, violation: AuditViolation, leaf: &Leaf) {
        if let Some(slot) = self.list.get_mut(self.len) {
            *slot = Some(AuditFinding {
                violation,
                virt: leaf.virt,
                size: leaf.size,
                frame: leaf.frame,
            });
            self.len += 1;
        }
    }

    /// The findings kept, in walk order.
    pub fn iter(&self) -> impl Iterator<Item = &AuditFinding> {
        self.list[..self.len].iter().flatten()
    }

    /// How many findings were kept (at most [`Self::CAPACITY`]).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was found.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for AuditFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} at {:#x} ({} KiB, frame {:#x})",
            self.violation,
            self.virt,
            self.size / 1024,
            self.frame
        )
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "W+X {}, writable aliases of executable {}, unexpected protection {}, outside code \
             spaces {}, unaccounted {}, {} pages mapped, {} bytes committed",
            self.writable_and_executable,
            self.writable_aliases_of_executable,
            self.unexpected_protection,
            self.outside_code_spaces,
            self.unaccounted,
            self.mapped_pages,
            self.committed_counter
        )?;
        for finding in self.findings.iter() {
            write!(f, "\n  {finding}")?;
        }
        Ok(())
    }
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

/// W+X leaves and writable aliases of executable frames among the leaves `walk` visits, counted
/// (returned) and the first of them recorded in `findings`: `walk` is called twice (first to
/// collect the executable frames, which are few, then to check every writable leaf against
/// them), so memory stays small however many leaves the tables hold.
pub fn wx_report(walk: &mut LeafWalk<'_>, findings: &mut AuditFindings) -> (usize, usize) {
    let mut wx = 0;
    let mut exec: Vec<(u64, u64)> = Vec::new();
    walk(&mut |l| {
        if l.executable {
            exec.push(l.frames());
            if l.writable {
                wx += 1;
                findings.push(AuditViolation::WritableAndExecutable, l);
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
                findings.push(AuditViolation::WritableAliasOfExecutable, l);
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
    let mut findings = AuditFindings::default();
    state.mmu.for_each_mapping(state.window, &mut |page, m| {
        report.mapped_pages += 1;
        let leaf = Leaf {
            virt: page,
            size: PAGE_SIZE,
            frame: m.frame,
            writable: m.writable,
            executable: m.executable,
        };
        if !(m.writable && m.executable) && m.protection().is_none() {
            report.unexpected_protection += 1;
            findings.push(AuditViolation::UnexpectedProtection, &leaf);
        }
        if state.space_of(page).is_none() {
            report.outside_code_spaces += 1;
            findings.push(AuditViolation::OutsideCodeSpaces, &leaf);
        }
        match state.pages.get(&page) {
            Some(c) if c.frame() == m.frame => in_window += 1,
            _ => {
                report.unaccounted += 1;
                findings.push(AuditViolation::Unaccounted, &leaf);
            }
        }
    });
    // Pages in the books but not mapped have no leaf to name: the count says it.
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
    ) = wx_report(&mut |f| state.mmu.for_each_leaf(f), &mut findings);
    report.findings = findings;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(virt: usize, frame: u64, writable: bool, executable: bool) -> Leaf {
        Leaf {
            virt,
            size: PAGE_SIZE,
            frame,
            writable,
            executable,
        }
    }

    #[test]
    fn findings_name_the_offending_leaves_and_counts_go_on_past_the_capacity() {
        // Code at frame 0x5000 (R+X), its direct-map alias left writable, a W+X leaf, and
        // more writable aliases than the list keeps.
        let mut leaves = alloc::vec![
            leaf(0xC000_0000, 0x5000, false, true),
            leaf(0xD000_5000, 0x5000, true, false),
            leaf(0xC000_1000, 0x6000, true, true),
            leaf(0xD000_7000, 0x7000, true, false), // a data page: no finding
        ];
        for i in 0..AuditFindings::CAPACITY {
            leaves.push(leaf(0xE000_0000 + i * PAGE_SIZE, 0x5000, true, false));
        }
        let mut findings = AuditFindings::default();
        let (wx, aliases) = wx_report(&mut |f| leaves.iter().for_each(&mut *f), &mut findings);
        assert_eq!((wx, aliases), (1, 1 + AuditFindings::CAPACITY));
        assert_eq!(findings.len(), AuditFindings::CAPACITY);
        let found: Vec<_> = findings.iter().map(|f| (f.violation, f.virt)).collect();
        assert_eq!(
            found[0],
            (AuditViolation::WritableAndExecutable, 0xC000_1000)
        );
        assert_eq!(
            found[1],
            (AuditViolation::WritableAliasOfExecutable, 0xD000_5000)
        );
        // W+X is not also reported as an alias of itself.
        assert!(!found[2..]
            .iter()
            .any(|&(_, v)| v == 0xC000_1000 || v == 0xD000_7000));
        let report = AuditReport {
            writable_and_executable: wx,
            writable_aliases_of_executable: aliases,
            findings,
            ..AuditReport::default()
        };
        let text = alloc::format!("{report}");
        assert!(
            text.contains("WritableAliasOfExecutable at 0xd0005000"),
            "{text}"
        );
        assert!(!report.is_clean());
    }
}
