//! CI check: every public function of the types that can write code, page tables, jump-table
//! slots, code pointers or trap entries, or free code, is classified in
//! `tests/public_writers.txt` — `read` (writes none of those), `validated` (safe: it checks what
//! could break memory safety) or `unsafe` (the caller promises what it cannot check, in a
//! `# Safety` section). A new public function on one of those types fails this test until a
//! reviewer classifies it, and a function listed `unsafe` that became safe (or the reverse) fails
//! it too. `CODESPACE_WRITERS_PRINT=1 cargo test --test public_writers -- --nocapture` prints
//! what the source has, one line per function, to start a classification from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use syn::{Attribute, ImplItem, Item, TraitItem, Visibility};

/// Types whose public methods are checked (the last segment of the `impl` self type or trait).
const GUARDED: &[&str] = &[
    "CodeModule",
    "CodeAllocator",
    "CodeManager",
    "WritableCode",
    "PublishedCode",
    "Registries",
    "TrapTable",
    "CodeMap",
    "CodePointerTable",
    "CodeObject",
    "GraceDomain",
    "X86Mmu",
    "TlbFlush",
    "CommittedPage",
    "Mmu",
    "Smp",
    "Poke",
    "BreakpointSites",
    "CodeImage",
    "LandingPad",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Validated,
    Unsafe,
}

#[derive(Debug)]
struct Found {
    is_unsafe: bool,
    has_safety_doc: bool,
    file: PathBuf,
}

fn is_test_only(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && {
            let text = a
                .meta
                .require_list()
                .map(|l| l.tokens.to_string())
                .unwrap_or_default();
            // `any(test, feature = "test-hooks")` is public API with that feature: checked.
            text == "test"
                || text == "loom"
                || (text.starts_with("any (test") && !text.contains("feature"))
                || text.contains("loom")
        }
    })
}

fn has_safety_doc(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("doc")
            && matches!(&a.meta, syn::Meta::NameValue(nv)
                if quote_lit(&nv.value).trim_start().starts_with("# Safety"))
    })
}

fn quote_lit(expr: &syn::Expr) -> String {
    match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => s.value(),
        _ => String::new(),
    }
}

fn last_ident(ty: &syn::Type) -> Option<String> {
    match ty {
        syn::Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

fn collect(items: &[Item], file: &Path, out: &mut BTreeMap<String, Found>) {
    for item in items {
        match item {
            Item::Impl(imp) if !is_test_only(&imp.attrs) => {
                let Some(owner) = last_ident(&imp.self_ty) else {
                    continue;
                };
                // `impl Mmu for X86Mmu`: the trait's methods are checked on the trait itself.
                if imp.trait_.is_some() || !GUARDED.contains(&owner.as_str()) {
                    continue;
                }
                for it in &imp.items {
                    if let ImplItem::Fn(f) = it {
                        if matches!(f.vis, Visibility::Public(_)) && !is_test_only(&f.attrs) {
                            out.insert(
                                format!("{owner}::{}", f.sig.ident),
                                Found {
                                    is_unsafe: f.sig.unsafety.is_some(),
                                    has_safety_doc: has_safety_doc(&f.attrs),
                                    file: file.to_path_buf(),
                                },
                            );
                        }
                    }
                }
            }
            Item::Trait(t) if GUARDED.contains(&t.ident.to_string().as_str()) => {
                for it in &t.items {
                    if let TraitItem::Fn(f) = it {
                        out.insert(
                            format!("{}::{}", t.ident, f.sig.ident),
                            Found {
                                is_unsafe: f.sig.unsafety.is_some(),
                                has_safety_doc: has_safety_doc(&f.attrs),
                                file: file.to_path_buf(),
                            },
                        );
                    }
                }
            }
            Item::Mod(m) if !is_test_only(&m.attrs) => {
                if let Some((_, inner)) = &m.content {
                    collect(inner, file, out);
                }
            }
            _ => {}
        }
    }
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            // The host launcher and the software machine model touch no real memory.
            if name != "bin" && name != "soft" {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") && !name.contains("tests") && name != "loom_models.rs" {
            out.push(path);
        }
    }
}

fn found_in_source() -> BTreeMap<String, Found> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    files.sort();
    let mut out = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read source");
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", file.display()));
        collect(
            &parsed.items,
            file.strip_prefix(root).unwrap_or(&file),
            &mut out,
        );
    }
    out
}

fn listed() -> BTreeMap<String, (Kind, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/public_writers.txt");
    let text = std::fs::read_to_string(&path).expect("tests/public_writers.txt");
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (kind, why) = rest
            .trim_start()
            .split_once(char::is_whitespace)
            .unwrap_or((rest.trim(), ""));
        let name = name.to_owned();
        let kind = match Some(kind) {
            Some("read") => Kind::Read,
            Some("validated") => Kind::Validated,
            Some("unsafe") => Kind::Unsafe,
            other => panic!("public_writers.txt:{}: unknown kind {other:?}", n + 1),
        };
        let why = why.trim().to_owned();
        assert!(
            kind == Kind::Read || !why.is_empty(),
            "public_writers.txt:{}: a writer needs its reason",
            n + 1
        );
        assert!(
            out.insert(name.clone(), (kind, why)).is_none(),
            "{name} listed twice"
        );
    }
    out
}

#[test]
fn every_public_writer_is_classified_and_unsafe_where_listed_so() {
    let found = found_in_source();
    if std::env::var_os("CODESPACE_WRITERS_PRINT").is_some() {
        for (name, f) in &found {
            let kind = if f.is_unsafe { "unsafe" } else { "read" };
            println!("{name:<44} {kind:<9} {}", f.file.display());
        }
    }
    assert!(
        found.len() > 50,
        "the scan found only {} functions: is it broken?",
        found.len()
    );
    let listed = listed();
    let mut problems = Vec::new();
    for (name, f) in &found {
        match listed.get(name) {
            None => problems.push(format!("{name} ({}) is not classified", f.file.display())),
            Some((Kind::Unsafe, _)) if !f.is_unsafe => {
                problems.push(format!("{name} is listed unsafe but is a safe fn"))
            }
            Some((Kind::Read | Kind::Validated, _)) if f.is_unsafe => {
                problems.push(format!("{name} is an unsafe fn but listed as safe"))
            }
            _ => {}
        }
        if f.is_unsafe && !f.has_safety_doc {
            problems.push(format!("{name} is unsafe without a `# Safety` section"));
        }
    }
    for name in listed.keys().filter(|n| !found.contains_key(*n)) {
        problems.push(format!("{name} is listed but no longer exists"));
    }
    assert!(
        problems.is_empty(),
        "public writers:\n  {}",
        problems.join("\n  ")
    );
}
