//! `cargo run [--release] -- [KERNEL ARGS...]`: builds the `demo` test kernel and boots it in QEMU
//! with `KERNEL ARGS` as its command line; exits with `run-qemu.sh`'s status (0 when the kernel
//! reported success, 1 on failure, 124 on timeout).

use codespace_qemu as launcher;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo run [--release] -- [KERNEL ARGS...]

Builds the codespace demo kernel (for x86_64-unknown-none, into target/kernel) and boots it in
QEMU through run-qemu.sh, with KERNEL ARGS joined by spaces as the kernel command line
(e.g. `cargo run -- bench`). The kernel is built with this program's profile (`--release` for an
optimized kernel); `bench` always builds it optimized, runs every row with one CPU, then the
rows that depend on the CPU count with two and four CPUs. `cargo run -- stress [SECONDS] [rox]`
runs the SMP stress mode for SECONDS (default 60) on 4 CPUs (`rox`: code on 2 MiB ROX pages), with a QEMU timeout of SECONDS + 120
(CODESPACE_QEMU_SMP and CODESPACE_QEMU_TIMEOUT override both). A leading `--` is dropped, so
`cargo run -- -- --help` passes `--help` to the kernel.

Exit status: 0 when the kernel reported success, 1 on failure, 124 on timeout.
Environment: CODESPACE_QEMU_TIMEOUT, CODESPACE_QEMU_MEMORY, CODESPACE_QEMU_SMP,
CODESPACE_QEMU_ACCEL (see run-qemu.sh).";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--") => {
            args.remove(0);
        }
        _ => {}
    }
    match run(&args.join(" ")) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("codespace-qemu: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds and boots the demo kernel with command line `append`; returns run-qemu.sh's status.
fn run(append: &str) -> Result<i32, String> {
    launcher::ensure_target()?;
    launcher::ensure_qemu()?;
    // Benchmarks always measure an optimized kernel, whatever profile built this launcher.
    let bench = append.split_ascii_whitespace().any(|w| w == "bench");
    let release = bench || !cfg!(debug_assertions);
    let demo = launcher::build_kernels(launcher::Kernels::Demo, release)?
        .into_iter()
        .find(|k| k.name == "demo")
        .ok_or("cargo built no `demo` kernel")?;
    // The demo's wasm module and the bench's (and for the bench the spec suite's bundle, whose
    // modules its ROX rows load), precompiled by the host tool.
    if std::env::var_os("CODESPACE_QEMU_MODULES").is_none() {
        std::env::set_var(
            "CODESPACE_QEMU_MODULES",
            launcher::precompile_test_wasm(bench)?,
        );
    }
    let (timeout, smp) = stress_settings(append)?;
    let append = (!append.is_empty()).then_some(append);
    if !bench {
        return Ok(launcher::run_kernel(&demo.path, append, timeout, smp)?.status);
    }
    // The bench: every row with one CPU, then the rows that depend on the CPU count again with
    // two and four.
    let mut status = launcher::run_kernel(&demo.path, append, None, Some(1))?.status;
    for cpus in [2, 4] {
        if status != 0 {
            break;
        }
        status = launcher::run_kernel(&demo.path, Some("bench smp-only"), None, Some(cpus))?.status;
    }
    Ok(status)
}

/// Extra seconds a stress run gets beyond what it asks for: booting, the last scenario round
/// (a round that starts just before the end finishes) and the teardown, under TCG.
const STRESS_SLACK_SECONDS: u64 = 120;

/// For `stress [SECONDS] [rox]` (the first word): 4 CPUs unless `CODESPACE_QEMU_SMP` says otherwise,
/// and a QEMU timeout of SECONDS (default 60) plus [`STRESS_SLACK_SECONDS`] unless
/// `CODESPACE_QEMU_TIMEOUT` is set. `(None, None)` otherwise: run-qemu.sh's defaults.
fn stress_settings(append: &str) -> Result<(Option<u64>, Option<usize>), String> {
    let env_smp = launcher::smp_from_env()?;
    let mut words = append.split_ascii_whitespace();
    if words.next() != Some("stress") {
        return Ok((None, None));
    }
    // `stress [SECONDS] [rox]`: `rox` puts the scenarios' code on 2 MiB ROX pages.
    let seconds = match words.find(|&w| w != "rox") {
        None => 60,
        Some(w) => w
            .parse::<u64>()
            .map_err(|_| format!("stress: {w:?} is not a number of seconds"))?,
    };
    let timeout_set = std::env::var("CODESPACE_QEMU_TIMEOUT").is_ok_and(|v| !v.trim().is_empty());
    let timeout = (!timeout_set).then_some(seconds + STRESS_SLACK_SECONDS);
    let smp = env_smp.is_none().then_some(4);
    Ok((timeout, smp))
}
