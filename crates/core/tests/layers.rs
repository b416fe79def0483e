//! Tidy test: no layer of `crates/core/src` names a layer above it (ARCHITECTURE.md, "Code map").
//!
//! It reads the sources as text: every `crate::<name>` in a layer's files, including `use`
//! lines, paths in code and intra-doc links, is looked up in the layer table below. A name
//! re-exported at the crate root (`crate::SealedMemory`) counts as the layer it comes from,
//! read from `lib.rs`, so the root cannot be used to hide an import.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first, and what each may import besides itself and the layers below it.
const LAYERS: &[(&str, u8)] = &[
    ("sys", 0),
    ("error", 1),
    ("transport", 2),
    ("shared", 3),
    ("runtime", 4),
    ("process", 5),
    ("ipc", 6),
    ("pool", 6),
];

fn rank(layer: &str) -> Option<u8> {
    LAYERS.iter().find(|(name, _)| *name == layer).map(|(_, rank)| *rank)
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every identifier that follows `crate::` in `text`.
fn crate_paths(text: &str) -> Vec<&str> {
    text.match_indices("crate::")
        .filter(|(at, _)| {
            // `multiproc_core::` or `$crate::` are other crates' paths, not ours.
            !text[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
        })
        .map(|(at, m)| {
            let rest = &text[at + m.len()..];
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// The layer of each name the crate root re-exports (`pub use transport::bytes::Bytes;`).
fn root_reexports() -> HashMap<String, String> {
    let lib = fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let mut layers = HashMap::new();
    for item in lib.split(';') {
        let Some(path) = item.split("pub use ").nth(1) else {
            continue;
        };
        let layer = path.split("::").next().unwrap_or("").trim().to_owned();
        let names = match (path.find('{'), path.rfind("::")) {
            (Some(open), _) => path[open + 1..].trim_end_matches('}').to_owned(),
            (None, Some(last)) => path[last + 2..].to_owned(),
            (None, None) => continue,
        };
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let name = name.rsplit(" as ").next().unwrap_or(name);
            layers.insert(name.to_owned(), layer.clone());
        }
    }
    layers
}

#[test]
fn no_layer_names_a_layer_above_it() {
    let reexports = root_reexports();
    assert!(
        reexports.get("Bytes").map(String::as_str) == Some("transport"),
        "lib.rs re-exports were not read: {reexports:?}"
    );
    let mut violations = Vec::new();
    let mut checked = 0;
    for (layer, own_rank) in LAYERS {
        let dir = src().join(layer);
        let mut files = Vec::new();
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src().join(format!("{layer}.rs")));
        }
        for file in files {
            let text = fs::read_to_string(&file).expect("a source file");
            checked += 1;
            for name in crate_paths(&text) {
                let target = match reexports.get(name) {
                    Some(layer) => layer.as_str(),
                    None => name,
                };
                // `error.rs` names `ExitStatus` (in `process::status`): a child's failure is
                // data the error carries. It is the one exception.
                let allowed = *layer == "error" && target == "process";
                if let Some(target_rank) = rank(target)
                    && target_rank > *own_rank
                    && target != *layer
                    && !allowed
                {
                    violations.push(format!(
                        "{}: names crate::{name} ({target}), above {layer}",
                        file.strip_prefix(src()).unwrap_or(&file).display()
                    ));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} files were read");
    assert!(violations.is_empty(), "layer violations:\n{}", violations.join("\n"));
}

#[test]
fn the_scan_sees_an_upward_path() {
    let text = "use crate::pool::Pool;\n/// [`x`](crate::Bytes)\nmultiproc_core::pool";
    assert_eq!(crate_paths(text), ["pool", "Bytes"]);
}
