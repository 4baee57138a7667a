//! The layout tables of `README.md` and `kernel/README.md` match the tree: every path they name
//! (a backticked cell of a table row that looks like a path) exists.

use std::path::Path;

/// Backticked words of the `path` column of every table in `text` whose header names one.
fn table_paths(text: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut column = None;
    for line in text.lines() {
        if !line.starts_with('|') {
            column = None;
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        match column {
            None => column = cells.iter().position(|c| *c == "path"),
            Some(i) => {
                let cell = cells.get(i).copied().unwrap_or("");
                paths.extend(cell.split('`').skip(1).step_by(2).map(str::to_string));
            }
        }
    }
    paths.retain(|p| !p.starts_with("---"));
    paths
}

fn check(readme: &Path, base: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(readme).expect("readable README");
    let paths = table_paths(&text);
    assert!(!paths.is_empty(), "{} names no path", readme.display());
    paths
        .into_iter()
        .filter(|p| {
            // `tests/*.rs`, `tests/*/`: the directory before the pattern.
            let p = p.split('*').next().unwrap_or(p);
            !base.join(p).exists()
        })
        .map(|p| format!("{}: `{p}` does not exist", readme.display()))
        .collect()
}

#[test]
fn every_path_in_the_layout_tables_exists() {
    let root = codespace_qemu::workspace();
    let mut missing = check(&root.join("README.md"), root);
    missing.extend(check(
        &root.join("kernel").join("README.md"),
        &root.join("kernel"),
    ));
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn a_renamed_file_is_noticed() {
    let root = codespace_qemu::workspace();
    let dir = std::env::temp_dir().join(format!("layout-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let readme = dir.join("README.md");
    std::fs::write(
        &readme,
        "| path | what |\n| --- | --- |\n| `src/lib.rs` | x |\n| `src/gone.rs` | `x.rs` |\n",
    )
    .unwrap();
    let missing = check(&readme, root);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].contains("src/gone.rs"));
}
