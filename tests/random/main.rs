//! Long random runs against simple reference models, on the TLB model with failure injection:
//! modules (add, replace, batches, slot patches, references, frees, grace periods, lookups,
//! module drops) and allocators (allocate, publish, free, discard, foreign handles, drops),
//! each with code on 4 KiB pages (alias and flip modes) and on 2 MiB ROX pages (issue 20).
//!
//! `cargo test` runs a few thousand steps per seed. Longer runs are opt-in:
//!
//! ```sh
//! CODESPACE_RANDOM_STEPS=10000000 cargo test --release --test random -- --nocapture
//! CODESPACE_RANDOM_SEED=0x5eed0003 CODESPACE_RANDOM_STEPS=200000 cargo test --test random random_modules
//! ```
//!
//! Each run prints its steps per second; a failing run prints its seed and step and the command
//! that replays it.

#[path = "../common/mod.rs"]
mod common;

mod allocators;
mod modules;

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Instant;

/// A number from the environment, decimal or `0x` hexadecimal.
fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim().replace('_', "");
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// What one random run gets: its seed, its number of steps, and where to report progress.
pub struct Trial<'a> {
    pub seed: u64,
    pub steps: u64,
    step: &'a Cell<u64>,
    started: Instant,
}

impl Trial<'_> {
    /// Records that step `n` is running; long runs print their rate now and then.
    pub fn at(&self, n: u64) {
        self.step.set(n);
        if n > 0 && n.is_multiple_of(1_000_000) {
            let rate = n as f64 / self.started.elapsed().as_secs_f64();
            eprintln!("  seed {:#x}: {n} steps, {rate:.0} steps/s", self.seed);
        }
    }
}

/// Runs `run` for every seed (or the one `CODESPACE_RANDOM_SEED` names), each for
/// `CODESPACE_RANDOM_STEPS` steps (or `default_steps`).
pub fn drive(name: &str, default_steps: u64, default_seeds: &[u64], run: impl Fn(&Trial<'_>)) {
    let steps = env_number("CODESPACE_RANDOM_STEPS").unwrap_or(default_steps);
    let seeds = match env_number("CODESPACE_RANDOM_SEED") {
        Some(seed) => vec![seed],
        None => default_seeds.to_vec(),
    };
    for seed in seeds {
        let step = Cell::new(0);
        let started = Instant::now();
        let trial = Trial {
            seed,
            steps,
            step: &step,
            started,
        };
        match catch_unwind(AssertUnwindSafe(|| run(&trial))) {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "{name}: seed {seed:#x}: {steps} steps in {secs:.2} s ({:.0} steps/s)",
                    steps as f64 / secs
                );
            }
            Err(panic) => {
                eprintln!(
                    "{name}: seed {seed:#x} FAILED at step {}. Replay with\n  \
                     CODESPACE_RANDOM_SEED={seed:#x} CODESPACE_RANDOM_STEPS={steps} \
                     cargo test --test random {name} -- --nocapture",
                    step.get()
                );
                resume_unwind(panic);
            }
        }
    }
}

#[test]
fn random_modules_against_a_model() {
    drive(
        "random_modules_against_a_model",
        4_000,
        &[0x5EED_0003, 0x5EED_0004],
        |t| modules::run(t, common::Mode::ALIAS),
    );
}

/// The same run with every module's code on 2 MiB ROX pages (issue 20).
#[test]
fn random_rox_modules_against_a_model() {
    drive(
        "random_rox_modules_against_a_model",
        4_000,
        &[0x5EED_0005, 0x5EED_0006],
        |t| modules::run(t, common::Mode::ROX),
    );
}

#[test]
fn random_allocators_alias_against_a_model() {
    drive(
        "random_allocators_alias_against_a_model",
        3_000,
        &[0x5EED_0002],
        |t| allocators::run(t, common::Mode::ALIAS),
    );
}

#[test]
fn random_allocators_flip_against_a_model() {
    drive(
        "random_allocators_flip_against_a_model",
        3_000,
        &[0x5EED_0001],
        |t| allocators::run(t, common::Mode::FLIP),
    );
}

/// The same run with the allocators' code on 2 MiB ROX pages (issue 20), some steps with no
/// 2 MiB frame left.
#[test]
fn random_allocators_rox_against_a_model() {
    drive(
        "random_allocators_rox_against_a_model",
        3_000,
        &[0x5EED_0007],
        |t| allocators::run(t, common::Mode::ROX),
    );
}
