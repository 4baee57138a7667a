//! Issue 18, soundness at the edges: one test per numbered item (`item_NN_…`), each checked once
//! against the code before the fix. Run on the software machine model (4 CPUs, per-CPU TLBs).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod cross_modify;
mod lifetime;
mod mmu;
mod pointers;
