//! The test kernel's layers import only downward: a file of `kernel/src/<layer>` names
//! `crate::<module>` only for modules of its own layer or below (kernel/README.md, "Layout").
//! A layer above reaches a lower one's callers through hooks installed by `kernel_entry`.

use std::path::Path;

/// The layers, bottom to top, by their top-level module under `kernel/src`.
const LAYERS: &[&[&str]] = &[
    &["cpu"],
    &["memory"],
    &["boot"],
    &["smp"],
    &["code"],
    &["sched"],
    &["test"],
    &["jit", "wasm", "stress", "bench"],
];

/// Root items (`src/lib.rs`) and the layer they belong to.
const ROOT_ITEMS: &[(&str, usize)] = &[
    ("println", 0),
    ("print", 0),
    ("per_cpu", 0),
    ("exit", 0),
    ("ExitCode", 0),
    ("BootInfo", 2),
    ("boot_info", 2),
    ("entry_point", 6),
    ("kernel_tests", 6),
];

fn layer_of(name: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|l| l.contains(&name))
        .or_else(|| ROOT_ITEMS.iter().find(|(n, _)| *n == name).map(|&(_, l)| l))
}

/// `crate::x` names in `source` (comments dropped), `use crate::{a, b}` groups included.
fn crate_paths(source: &str) -> Vec<String> {
    let code: String = source
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            names.extend(
                group[..end]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or("").to_string()),
            );
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..end].to_string());
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every upward (or unknown) `crate::` reference of the files under `src`.
fn upward_imports(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut bad = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let top = rel.components().next().expect("a component");
        let top = top
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "bin" {
            continue; // the composition root and the binaries may use every layer
        }
        let own = layer_of(&top).unwrap_or_else(|| panic!("{top} is in no layer"));
        let source = std::fs::read_to_string(&file).expect("readable source");
        for name in crate_paths(&source) {
            match layer_of(&name) {
                Some(l) if l <= own => {}
                other => bad.push(format!(
                    "{}: crate::{name} ({}) from layer {own}",
                    rel.display(),
                    other.map_or("no layer".to_string(), |l| format!("layer {l}"))
                )),
            }
        }
    }
    bad
}

#[test]
fn the_kernel_layers_import_only_downward() {
    let src = codespace_qemu::workspace().join("kernel").join("src");
    let bad = upward_imports(&src);
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn an_upward_import_is_noticed() {
    let dir = std::env::temp_dir().join(format!("kernel-layers-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("cpu")).unwrap();
    std::fs::write(
        dir.join("cpu").join("interrupts.rs"),
        "use crate::memory::x;\n// crate::sched in a comment is fine\nfn f() { crate::sched::run(); }\n",
    )
    .unwrap();
    std::fs::write(dir.join("code.rs"), "use crate::{cpu, smp};\n").unwrap();
    let bad = upward_imports(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad.iter().all(|b| b.starts_with("cpu/interrupts.rs")),
        "{bad:?}"
    );
}
