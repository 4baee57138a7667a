//! Host integration tests of `CodeModule` on the software machine model (4 CPUs with per-CPU
//! TLBs and instruction views, a direct map).
//!
//! They check what a module promises on top of the code manager: jump tables per code space
//! (decoded with iced-x86 from bytes read back through the manager, and as every CPU executes
//! them), relocations resolved to the code's own table, the far path across code spaces more
//! than 2 GiB apart, slot patching through the private alias only, the safe free order (retired
//! until a grace period passed, then trap entry and PC lookup, then memory), reference counts,
//! code pointers, and failed operations that change nothing. Every test ends with
//! [`common::assert_sound`].

#[path = "../common/mod.rs"]
mod common;

mod errors;
mod failures;
mod lifetime;
mod tables;

use codespace::manager::AllocatorStats;
use codespace::mmu::soft::SoftMmu;
use codespace::mmu::Leaf;
use codespace::module::{CodeModule, Registries};
use codespace::{AuditReport, CodeManager, ManagerConfig};
use std::collections::BTreeSet;

use common::*;

/// A 4-CPU machine with a direct map and 256 MiB of frames, and a manager over the whole slot.
pub fn rig_with(config: ManagerConfig) -> (SoftMmu, CodeManager<SoftMmu>) {
    rig(1 << 16, config)
}

/// A rig for `mode` (room for a few 2 MiB pages in the ROX mode).
pub fn rig_in(mode: Mode) -> (SoftMmu, CodeManager<SoftMmu>) {
    rig(1 << 13, mode.manager(ManagerConfig::default()))
}

pub fn default_rig() -> (SoftMmu, CodeManager<SoftMmu>) {
    rig_with(ManagerConfig::default())
}

/// Everything a failed module operation must leave as it was. Free bytes of committed pages
/// are not compared (a rolled-back allocation leaves INT3 where zeros were, as harmless), nor
/// the allocator's cumulative `freed` counter (a rollback frees what it allocated).
#[derive(Debug, PartialEq, Eq)]
pub struct State {
    code_count: (usize, usize),
    committed: usize,
    stats: AllocatorStats,
    audit: AuditReport,
    code_map: usize,
    traps: usize,
    /// Leaves of the code window.
    leaves: Vec<Leaf>,
    /// Direct-map pages sealed read-only (code frames).
    sealed: Vec<usize>,
    data_frames: BTreeSet<usize>,
    tables: Vec<Vec<u8>>,
    functions: Vec<Option<usize>>,
    slots: Vec<Option<usize>>,
}

pub fn state(
    machine: &SoftMmu,
    m: &CodeManager<SoftMmu>,
    regs: &Registries,
    module: &CodeModule<SoftMmu>,
) -> State {
    let snapshot = machine.snapshot();
    let window = m.window();
    let (leaves, direct): (Vec<Leaf>, Vec<Leaf>) = snapshot
        .leaves
        .into_iter()
        .partition(|l| window.contains(l.virt));
    State {
        code_count: module.code_count().unwrap(),
        committed: m.committed(),
        stats: AllocatorStats {
            freed: 0,
            ..module.stats().unwrap()
        },
        audit: m.audit().unwrap(),
        code_map: regs.code.len(),
        traps: regs.traps.len(),
        leaves,
        sealed: direct
            .iter()
            .filter(|l| !l.writable)
            .map(|l| l.virt)
            .collect(),
        data_frames: snapshot.data_frames,
        tables: module
            .jump_tables()
            .unwrap()
            .iter()
            .map(|t| read(m, t.base(), t.total_size()))
            .collect(),
        functions: (0..64).map(|i| module.function_code(i).unwrap()).collect(),
        slots: (0..64).map(|i| module.slot_target(i).unwrap()).collect(),
    }
}
