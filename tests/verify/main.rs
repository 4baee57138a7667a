//! The verifier of issue 13 on the host: stale-TLB tests on the per-CPU TLB model, and failure
//! injection at every backend call of every public operation.

#[path = "../common/mod.rs"]
mod common;

mod inject;
mod tlb;
mod world;
