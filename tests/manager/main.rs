//! Host integration tests of the code manager and its allocators on the software machine model
//! (4 CPUs with per-CPU TLBs and instruction views, a direct map).
//!
//! They mirror V8's code-manager unit tests (test-wasm-code-manager.cc: going over the commit
//! limit, the limit across modules, growable vs fixed modules, commit increments) and add what
//! codespace promises beyond V8: W^X at every page-table store and in every CPU's TLB, INT3 in
//! freed and padding bytes, reuse of freed code, guard pages, foreign handles, jump-table
//! patching. Every test ends with [`common::assert_sound`]: no violation recorded by the TLB
//! model, never a W+X leaf, a clean audit.

#[path = "../common/mod.rs"]
mod common;

mod commit;
mod failures;
mod patch;
mod publish;
mod rox;
mod spaces;

use codespace::manager::{AllocatorStats, ManagerStats};
use codespace::mmu::soft::{Snapshot, SoftMmu};
use codespace::{
    AllocatorConfig, AuditReport, CodeAllocator, CodeManager, ManagerConfig, PublishedCode,
};

pub fn allocator(m: &CodeManager<SoftMmu>) -> CodeAllocator<SoftMmu> {
    CodeAllocator::new(m, AllocatorConfig::default()).expect("allocator")
}

/// An allocator whose first code space (`bytes` large) is reserved up front.
pub fn allocator_with_space(m: &CodeManager<SoftMmu>, bytes: usize) -> CodeAllocator<SoftMmu> {
    let config = AllocatorConfig {
        initial_reservation: bytes,
        ..AllocatorConfig::default()
    };
    CodeAllocator::new(m, config).expect("allocator")
}

/// Allocates `len` bytes, fills them with `fill` and publishes them.
pub fn publish_filled(a: &mut CodeAllocator<SoftMmu>, len: usize, fill: u8) -> PublishedCode {
    let mut w = a.allocate(len).expect("allocate");
    w.as_mut_slice().fill(fill);
    a.publish(w).expect("publish")
}

/// Everything a failed operation must leave as it was: counters, the audit, and the machine's
/// leaves, data frames and their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    manager: ManagerStats,
    allocators: Vec<AllocatorStats>,
    audit: AuditReport,
    machine: Snapshot,
}

pub fn state(
    machine: &SoftMmu,
    m: &CodeManager<SoftMmu>,
    allocators: &[&CodeAllocator<SoftMmu>],
) -> State {
    State {
        manager: m.stats(),
        allocators: allocators.iter().map(|a| a.stats()).collect(),
        audit: m.audit().expect("audit"),
        machine: machine.snapshot(),
    }
}

/// A manager whose only setting changed from the default is `max_committed`.
pub fn limited(max_committed: usize) -> ManagerConfig {
    ManagerConfig {
        max_committed,
        ..ManagerConfig::default()
    }
}
