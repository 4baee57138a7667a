//! Whole-address-space W^X audit: walks every PML4 slot of a page table and reports any leaf
//! that is writable and executable, and any writable mapping of a frame that some other mapping
//! executes (a writable alias of code).
//!
//! Rights are effective rights: writable only when every level allows writes, executable only
//! when no level sets NX.

use alloc::vec::Vec;
use core::fmt;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{PageTable, PageTableFlags as F, PhysFrame};

use crate::memory::PHYS_OFFSET;

/// One present leaf mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address.
    pub va: u64,
    /// First physical address.
    pub phys: u64,
    /// Bytes mapped (4 KiB, 2 MiB or 1 GiB).
    pub size: u64,
    /// Effective write permission.
    pub writable: bool,
    /// Effective execute permission.
    pub executable: bool,
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} -> {:#x} ({} KiB, {}{})",
            self.va,
            self.phys,
            self.size >> 10,
            if self.writable { "W" } else { "R" },
            if self.executable { "X" } else { "NX" }
        )
    }
}

/// What [`audit`] found.
#[derive(Debug, Default)]
pub struct WxReport {
    /// Present leaves walked.
    pub leaves: usize,
    /// Leaves that are writable and executable.
    pub writable_and_executable: Vec<Leaf>,
    /// `(writable leaf, executable leaf)` pairs mapping a common frame.
    pub writable_aliases: Vec<(Leaf, Leaf)>,
    /// Every executable leaf, by physical address (what may run at all).
    pub executable: Vec<Leaf>,
}

impl WxReport {
    /// No violation of either kind.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.writable_and_executable.is_empty() && self.writable_aliases.is_empty()
    }
}

impl fmt::Display for WxReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} leaves", self.leaves)?;
        for l in self.writable_and_executable.iter().take(8) {
            write!(f, "\n  W+X leaf: {l}")?;
        }
        for (w, x) in self.writable_aliases.iter().take(8) {
            write!(f, "\n  writable alias {w} of executable {x}")?;
        }
        Ok(())
    }
}

/// Audits the page table this CPU runs on.
#[must_use]
pub fn audit_active() -> WxReport {
    audit(Cr3::read().0)
}

/// Audits the page table rooted at `pml4`.
///
/// Reads the tables through the direct map without the page-table lock: call it when nothing
/// edits them (a test's quiet point); a concurrent edit can only make the report stale.
#[must_use]
pub fn audit(pml4: PhysFrame) -> WxReport {
    let mut leaves = Vec::new();
    walk(
        pml4.start_address().as_u64(),
        4,
        0,
        F::WRITABLE,
        false,
        &mut leaves,
    );
    let mut report = WxReport {
        leaves: leaves.len(),
        ..WxReport::default()
    };
    let mut exec: Vec<Leaf> = leaves.iter().copied().filter(|l| l.executable).collect();
    exec.sort_by_key(|l| l.phys);
    report.executable.clone_from(&exec);
    for l in &leaves {
        if l.writable && l.executable {
            report.writable_and_executable.push(*l);
        }
        if !l.writable {
            continue;
        }
        // Executable leaves starting before this one ends; any of them ending after its start
        // overlaps it. Leaves are at most 1 GiB, so look back from the first one past the end.
        let end = l.phys + l.size;
        let upto = exec.partition_point(|x| x.phys < end);
        for x in exec[..upto].iter().rev() {
            if x.phys + (1 << 30) <= l.phys {
                break;
            }
            if x.phys + x.size > l.phys && x.va != l.va {
                report.writable_aliases.push((*l, *x));
            }
        }
    }
    report
}

/// Walks the table at physical `table` of level `level` (4 = PML4) mapping from `base`, with the
/// rights the upper levels allow.
fn walk(table: u64, level: u32, base: u64, writable: F, nx: bool, out: &mut Vec<Leaf>) {
    // SAFETY: `table` comes from CR3 or a present non-leaf entry, so it is a page-table frame;
    // page tables live in the first 4 GiB, which the direct map covers. Only read.
    let entries = unsafe { &*((PHYS_OFFSET + table) as *const PageTable) };
    let span = 1u64 << (12 + 9 * (level - 1));
    for (i, e) in entries.iter().enumerate() {
        let flags = e.flags();
        if !flags.contains(F::PRESENT) {
            continue;
        }
        let mut va = base + i as u64 * span;
        if level == 4 && va >= 1 << 47 {
            va |= 0xFFFF_0000_0000_0000; // sign-extend the upper half
        }
        let w = writable & flags;
        let nx = nx || flags.contains(F::NO_EXECUTE);
        if level == 1 || (level < 4 && flags.contains(F::HUGE_PAGE)) {
            out.push(Leaf {
                va,
                phys: e.addr().as_u64(),
                size: span,
                writable: w.contains(F::WRITABLE),
                executable: !nx,
            });
        } else {
            walk(e.addr().as_u64(), level - 1, va, w, nx, out);
        }
    }
}
