//! The window audit: what the page tables say, checked against what the manager believes.

use super::state::State;
use crate::mmu::Mmu;
use crate::PAGE_SIZE;

/// Result of [`CodeManager::audit`](super::CodeManager::audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditReport {
    /// Mapped pages in the window.
    pub mapped_pages: usize,
    /// Pages both writable and executable (must be 0).
    pub writable_and_executable: usize,
    /// Pages neither RW+NX nor R+X, e.g. read-only non-executable (must be 0).
    pub unexpected_protection: usize,
    /// Walks with NX on an intermediate entry (must be 0: the leaf decides).
    pub intermediate_nx: usize,
    /// Mapped pages outside every code space, guard and alias pages included (must be 0).
    pub outside_code_spaces: usize,
    /// The manager's committed-bytes counter, to compare with `mapped_pages * PAGE_SIZE`.
    pub committed_counter: usize,
}

impl AuditReport {
    /// Whether every check holds: no W+X page, no stray mapping, and the counter matches.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.writable_and_executable == 0
            && self.unexpected_protection == 0
            && self.intermediate_nx == 0
            && self.outside_code_spaces == 0
            && self.mapped_pages * PAGE_SIZE == self.committed_counter
    }
}

pub(super) fn audit<M: Mmu>(state: &State<M>) -> AuditReport {
    let mut report = AuditReport {
        committed_counter: state.committed,
        ..AuditReport::default()
    };
    state.mmu.for_each_mapping(state.window, &mut |page, m| {
        report.mapped_pages += 1;
        if m.writable && m.executable {
            report.writable_and_executable += 1;
        } else if m.protection().is_none() {
            report.unexpected_protection += 1;
        }
        if m.intermediate_nx {
            report.intermediate_nx += 1;
        }
        let inside = state
            .spaces
            .range(..=page)
            .next_back()
            .is_some_and(|(_, (usable, _))| usable.contains(page));
        if !inside {
            report.outside_code_spaces += 1;
        }
    });
    report
}
