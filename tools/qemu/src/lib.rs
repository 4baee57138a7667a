//! Building codespace kernels and booting them in QEMU, shared by the `codespace-qemu` binary
//! (`cargo run` at the workspace root) and the `kernel` integration test (`cargo test` at the
//! root runs it).
//!
//! A host-only package of its own, so that the published `codespace` package is only the
//! `no_std` library (a kernel crate can `cargo doc` it without `std`).
//!
//! Errors are one-line `String`s: both users print them and fail.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The kernels' target triple.
pub const TARGET: &str = "x86_64-unknown-none";

/// The Debian package that provides `qemu-system-x86_64`.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// The workspace root, where `Cargo.toml` and `run-qemu.sh` live.
pub fn workspace() -> &'static Path {
    // This package lives in `tools/qemu` of the workspace.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Installs the kernel target with rustup unless its standard library is already there.
pub fn ensure_target() -> Result<(), String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .current_dir(workspace())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let installed = libdir
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .is_some_and(|mut entries| entries.next().is_some());
    if installed {
        return Ok(());
    }
    eprintln!(
        "codespace-qemu: target {TARGET} is not installed; running `rustup target add {TARGET}`"
    );
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .current_dir(workspace())
        .status()
        .map_err(|e| format!("cannot run rustup to install target {TARGET}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`rustup target add {TARGET}` failed ({status})"))
    }
}

/// Makes sure `qemu-system-x86_64` is on `PATH`, installing it with apt-get when running as root.
pub fn ensure_qemu() -> Result<(), String> {
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("qemu-system-x86_64").is_file())
    });
    if on_path {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if !root {
        return Err(format!(
            "qemu-system-x86_64 not found: install the package {QEMU_PACKAGE} (e.g. `sudo apt-get install {QEMU_PACKAGE}`)"
        ));
    }
    eprintln!(
        "codespace-qemu: qemu-system-x86_64 not found; installing {QEMU_PACKAGE} with apt-get"
    );
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if apt(&["update"]) && apt(&["install", "-y", QEMU_PACKAGE]) {
        Ok(())
    } else {
        Err(format!("installing {QEMU_PACKAGE} with apt-get failed"))
    }
}

/// Which kernels [`build_kernels`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Every `kernel/tests/*.rs` test kernel.
    Tests,
    /// The `demo` kernel that `cargo run` boots.
    Demo,
    /// The `harness_selftest` example kernel.
    HarnessSelftest,
    /// The `integration` example kernel (the integration guide's code).
    Integration,
}

/// One built kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The cargo target name (`boot`, `demo`, ...).
    pub name: String,
    /// The cargo target kind: `test`, `bin` or `example`.
    pub kind: String,
    /// The executable, a Multiboot image.
    pub path: PathBuf,
}

/// Builds kernels with cargo into `target/kernel` (a directory of their own, so this nested cargo
/// never waits for the lock of the cargo that runs us) and returns the images it produced.
/// Cargo's progress and diagnostics go to our stderr.
pub fn build_kernels(kernels: Kernels, release: bool) -> Result<Vec<Kernel>, String> {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(OsString::from))
        .unwrap_or_else(|| "cargo".into());
    // Building tests also builds the bins (for `CARGO_BIN_EXE_*`): keep only the wanted kind.
    let (selection, kind): (&[&str], _) = match kernels {
        Kernels::Tests => (&["--tests"], "test"),
        Kernels::Demo => (&["--bin", "demo"], "bin"),
        Kernels::HarnessSelftest => (&["--example", "harness_selftest"], "example"),
        Kernels::Integration => (&["--example", "integration"], "example"),
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "codespace-kernel", "--target", TARGET])
        .arg("--message-format=json-render-diagnostics")
        .args(selection)
        .args(release.then_some("--release"))
        .env(
            "CARGO_TARGET_DIR",
            workspace().join("target").join("kernel"),
        )
        .current_dir(workspace())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut built = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
        built.extend(parse_artifact(&line).filter(|k| k.kind == kind));
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the kernels failed (cargo: {status})"));
    }
    built.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(built)
}

/// The kernel a `compiler-artifact` JSON message from cargo describes, if it is an executable
/// test, bin or example.
fn parse_artifact(line: &str) -> Option<Kernel> {
    if !line.contains(r#""reason":"compiler-artifact""#) {
        return None;
    }
    let path = json_string(line, "executable")?;
    let target = &line[line.find(r#""target":{"#)?..];
    let target = &target[..target.find('}')?];
    let kind = json_string(target, "kind")?;
    if !["test", "bin", "example"].contains(&kind.as_str()) {
        return None;
    }
    Some(Kernel {
        name: json_string(target, "name")?,
        kind,
        path: PathBuf::from(path),
    })
}

/// The string value of the first `"key":` in `json`, or the first element when the value is an
/// array of strings; `None` when absent or not a string (`null`).
fn json_string(json: &str, key: &str) -> Option<String> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let rest = rest.strip_prefix('[').unwrap_or(rest).strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Builds the host tool `codespace-wasm-precompile` (into `target/tools`, a directory of its
/// own: the tool's Cranelift never enters the library's or the kernel's build) and returns its
/// path.
fn precompile_tool() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(OsString::from))
        .unwrap_or_else(|| "cargo".into());
    let tools = workspace().join("target").join("tools");
    let status = Command::new(cargo)
        .args(["build", "-p", "codespace-wasm-precompile"])
        .env("CARGO_TARGET_DIR", &tools)
        .current_dir(workspace())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building codespace-wasm-precompile failed ({status})"
        ));
    }
    Ok(tools.join("debug").join("codespace-wasm-precompile"))
}

/// A path QEMU's `-initrd` list can take.
fn module_arg(path: &Path) -> Result<String, String> {
    let path = path.to_str().ok_or("non-UTF-8 path")?;
    if path.contains(',') {
        return Err(format!(
            "{path}: QEMU cannot take a module path with a comma"
        ));
    }
    Ok(path.to_owned())
}

/// Builds the host tool and precompiles every `kernel/tests/wasm/*.wat` into
/// `target/wasm/*.cwasm` (the demo's and `kernel/tests/wasm.rs`'s modules); with `spec`, also
/// builds the spec-suite bundle ([`spec_bundle`]). Returns every file as the comma-separated
/// list `run-qemu.sh` takes in `CODESPACE_QEMU_MODULES`.
pub fn precompile_test_wasm(spec: bool) -> Result<String, String> {
    let tool = precompile_tool()?;
    let source = workspace().join("kernel").join("tests").join("wasm");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&source)
        .map_err(|e| format!("reading {}: {e}", source.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wat" || x == "wasm"))
        .collect();
    inputs.sort();
    let out = workspace().join("target").join("wasm");
    let status = Command::new(&tool)
        .arg(&out)
        .args(&inputs)
        .current_dir(workspace())
        .status()
        .map_err(|e| format!("cannot run codespace-wasm-precompile: {e}"))?;
    if !status.success() {
        return Err(format!("precompiling kernel/tests/wasm failed ({status})"));
    }
    let mut list = Vec::new();
    for input in &inputs {
        let stem = input.file_stem().unwrap_or_default();
        list.push(module_arg(&out.join(stem).with_extension("cwasm"))?);
    }
    if spec {
        list.push(module_arg(&spec_bundle(&tool)?)?);
    }
    Ok(list.join(","))
}

/// What the bundle is built from: the tool itself (which embeds the v1 suite and the shared
/// settings) and, with `CODESPACE_SPEC_DIR`, every `.wast` file of that directory — by size and
/// modification time.
fn spec_inputs(tool: &Path, dir: Option<&Path>) -> Result<String, String> {
    let stamp = |p: &Path| -> Result<String, String> {
        let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(format!("{} {} {mtime}\n", p.display(), m.len()))
    };
    let mut key = stamp(tool)?;
    if let Some(dir) = dir {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wast"))
            .collect();
        files.sort();
        for f in files {
            key.push_str(&stamp(&f)?);
        }
    }
    Ok(key)
}

/// Builds `target/wasm/spec.bundle` with `codespace-wasm-precompile spec`: the v1 spec suite,
/// or every `.wast` of the directory `CODESPACE_SPEC_DIR` names, precompiled with the host's
/// reference outcomes. Cached: rebuilt only when its inputs ([`spec_inputs`]) changed.
pub fn spec_bundle(tool: &Path) -> Result<PathBuf, String> {
    let dir = std::env::var_os("CODESPACE_SPEC_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let out = workspace().join("target").join("wasm").join("spec.bundle");
    let key_file = out.with_extension("inputs");
    let key = spec_inputs(tool, dir.as_deref())?;
    let cached = std::fs::read_to_string(&key_file).is_ok_and(|k| k == key) && out.is_file();
    if cached {
        return Ok(out);
    }
    eprintln!("codespace-qemu: building the spec bundle (host reference run included)");
    let status = Command::new(tool)
        .arg("spec")
        .arg(&out)
        .args(dir.as_deref())
        .current_dir(workspace())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run codespace-wasm-precompile spec: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the spec bundle failed ({status}): run `{} spec {}` to see the host's table",
            tool.display(),
            out.display()
        ));
    }
    std::fs::write(&key_file, key).map_err(|e| format!("writing {}: {e}", key_file.display()))?;
    Ok(out)
}

/// How a kernel run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// `run-qemu.sh`'s exit status: 0 pass, 1 fail, 124 timeout (128 + N when killed by signal N).
    pub status: i32,
    /// Everything the kernel printed on its serial port.
    pub output: String,
}

/// The CPU counts `CODESPACE_QEMU_SMP` asks for: `Some(n)` when set to a positive integer,
/// `None` when unset or empty; an error for anything else.
pub fn smp_from_env() -> Result<Option<usize>, String> {
    match std::env::var("CODESPACE_QEMU_SMP") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(format!(
                "CODESPACE_QEMU_SMP={v:?} is not a positive number of CPUs"
            )),
        },
    }
}

/// `1 cpu`, `4 cpus`.
pub fn cpus_label(n: usize) -> String {
    format!("{n} cpu{}", if n == 1 { "" } else { "s" })
}

/// The `cpus online: N` count a kernel printed at start, if it did.
pub fn cpus_online(output: &str) -> Option<usize> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("cpus online: "))
        .and_then(|n| n.trim().parse().ok())
}

/// Boots `kernel` with `run-qemu.sh`, with kernel command line `append`, a timeout in seconds and
/// `smp` CPUs (`None`: whatever `CODESPACE_QEMU_SMP` says, default 1). The kernel's output is
/// copied to our stdout as it arrives and also captured.
pub fn run_kernel(
    kernel: &Path,
    append: Option<&str>,
    timeout: Option<u64>,
    smp: Option<usize>,
) -> Result<RunResult, String> {
    let mut cmd = Command::new(workspace().join("run-qemu.sh"));
    cmd.arg(kernel)
        .current_dir(workspace())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(append) = append {
        cmd.env("CODESPACE_QEMU_APPEND", append);
    }
    if let Some(timeout) = timeout {
        cmd.env("CODESPACE_QEMU_TIMEOUT", timeout.to_string());
    }
    if let Some(smp) = smp {
        cmd.env("CODESPACE_QEMU_SMP", smp.to_string());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run run-qemu.sh: {e}"))?;
    let mut serial = child.stdout.take().expect("stdout is piped");
    let mut captured = Vec::new();
    let mut buf = [0u8; 4096];
    // Chunks rather than lines: `test name ... ` shows up while that test runs.
    loop {
        let n = match serial.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the kernel's output: {e}")),
        };
        let mut out = io::stdout().lock();
        // Our stdout going away (a closed pipe) must not stop the run.
        let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
        captured.extend_from_slice(&buf[..n]);
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for run-qemu.sh: {e}"))?;
    let status = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    Ok(RunResult {
        status,
        output: String::from_utf8_lossy(&captured).into_owned(),
    })
}

/// `(passed, failed)` from the last libtest-shaped `test result:` line of `output`.
pub fn parse_summary(output: &str) -> Option<(usize, usize)> {
    let line = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("test result: "))?;
    let count = |what: &str| -> Option<usize> {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(what))?
            .trim()
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    Some((count(" passed")?, count(" failed")?))
}
