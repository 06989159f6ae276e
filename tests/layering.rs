//! The crate's modules import one way (docs/ARCHITECTURE.md, "Layers"): each module may use
//! only modules of a lower layer. This reads the sources and fails on an import that points
//! up or sideways, so a cycle cannot creep back in.

use std::collections::BTreeMap;
use std::path::Path;

/// Layer of every top-level module; a module may import only strictly lower layers.
const LAYERS: &[(&str, u8)] = &[
    // 0: shared types and pure building blocks that import nothing of ours.
    ("types", 0),
    ("proto", 0),
    ("slab", 0),
    ("timer", 0),
    ("logging", 0),
    ("ws", 0),
    ("deflate", 0),
    ("http", 0),
    ("tls13", 0),
    // 1: codecs over the wire message, and the configuration.
    ("codec", 1),
    ("config", 1),
    // 2: metrics, sockets (and the live upgrade's process side), the registry, the CLI client.
    ("metrics", 2),
    ("net", 2),
    ("registry", 2),
    ("client", 2),
    ("upgrade", 2),
    // 3: the cluster's link to Redis and its view of the nodes.
    ("cluster", 3),
    // 4: the internal API and the backends, neither importing the other.
    ("api", 4),
    ("backend", 4),
    // 5..7: the worker pool, the reactor, startup.
    ("worker", 5),
    ("reactor", 6),
    ("server", 7),
];

/// Every `crate::NAME` a file mentions (in `use` lines and inline paths).
fn crate_refs(src: &str) -> Vec<String> {
    let mut out = vec![];
    for (i, _) in src.match_indices("crate::") {
        let rest = &src[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `crate::{a, b}` groups.
        if name.is_empty() && rest.starts_with('{') {
            let group = &rest[1..rest.find('}').unwrap_or(rest.len())];
            for part in group.split(',') {
                let n: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !n.is_empty() {
                    out.push(n);
                }
            }
        } else if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

fn module_sources() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut m: BTreeMap<String, String> = BTreeMap::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            let mut all = String::new();
            for f in std::fs::read_dir(&p).unwrap() {
                all.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
            }
            m.insert(name, all);
        } else if p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            // (Not other files: src/admin.html is the admin page, included by api.rs.)
            m.insert(name, std::fs::read_to_string(&p).unwrap());
        }
    }
    m
}

#[test]
fn modules_import_only_lower_layers() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut bad = vec![];
    let mut graph = vec![];
    for (name, src) in module_sources() {
        let Some(&mine) = layer.get(name.as_str()) else {
            panic!("module {name} has no layer in tests/layering.rs: give it one");
        };
        let mut deps: Vec<String> = crate_refs(&src)
            .into_iter()
            .filter(|d| *d != name)
            .collect();
        deps.sort();
        deps.dedup();
        for d in &deps {
            match layer.get(d.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(&theirs) => bad.push(format!(
                    "{name} (layer {mine}) imports {d} (layer {theirs})"
                )),
                None => bad.push(format!("{name} imports unknown module {d}")),
            }
        }
        graph.push(format!("{name} -> {}", deps.join(", ")));
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n  {}\ngraph:\n  {}",
        bad.join("\n  "),
        graph.join("\n  ")
    );
}

#[test]
fn reactor_modules_name_what_they_import() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/reactor");
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        let src = std::fs::read_to_string(&p).unwrap();
        assert!(
            !src.contains("use super::*"),
            "{} imports its parent with a glob",
            p.display()
        );
    }
}

#[test]
fn the_reference_finder_sees_groups_and_inline_paths() {
    let refs = crate_refs("use crate::{a, b::C};\nfn f() { crate::ws::op::TEXT }");
    assert_eq!(refs, vec!["a", "b", "ws"]);
}
