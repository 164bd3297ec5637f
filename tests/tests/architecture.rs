//! The dependency direction of the workspace, from `cargo metadata`: `councils` knows no async
//! runtime, network or ML crate; `inference` does not know councils; only `runtime` (and the
//! test and bench packages) may know gRPC, NATS or the councils crate together with inference.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

struct Graph {
    /// package id -> (name, dependency ids of normal and build kinds)
    nodes: HashMap<String, (String, Vec<String>)>,
    ids: HashMap<String, String>,
}

fn graph() -> Graph {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let names: HashMap<String, String> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id").to_owned(),
                p["name"].as_str().expect("name").to_owned(),
            )
        })
        .collect();
    let mut nodes = HashMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let id = node["id"].as_str().expect("id").to_owned();
        let deps = node["deps"]
            .as_array()
            .expect("deps")
            .iter()
            .filter(|d| {
                // Dev-dependencies are test-only and do not ship.
                d["dep_kinds"]
                    .as_array()
                    .expect("kinds")
                    .iter()
                    .any(|k| k["kind"].as_str() != Some("dev"))
            })
            .map(|d| d["pkg"].as_str().expect("pkg").to_owned())
            .collect();
        nodes.insert(id.clone(), (names[&id].clone(), deps));
    }
    let ids = names
        .iter()
        .map(|(id, name)| (name.clone(), id.clone()))
        .collect();
    Graph { nodes, ids }
}

impl Graph {
    /// Names of every package `name` depends on, directly or not (normal and build edges).
    fn closure(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![self.ids[name].clone()];
        while let Some(id) = stack.pop() {
            for dep in &self.nodes[&id].1 {
                if seen.insert(self.nodes[dep].0.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen
    }
}

#[test]
fn councils_is_pure() {
    let deps = graph().closure("council-councils");
    for forbidden in [
        "tokio",
        "async-std",
        "futures",
        "candle-core",
        "candle-nn",
        "tokenizers",
        "tonic",
        "prost",
        "async-nats",
        "reqwest",
        "hyper",
        "hf-hub",
        "council-inference",
        "council-proto",
        "council-runtime",
    ] {
        assert!(!deps.contains(forbidden), "councils depends on {forbidden}");
    }
}

#[test]
fn inference_does_not_know_councils_grpc_or_nats() {
    let deps = graph().closure("council-inference");
    for forbidden in [
        "council-councils",
        "council-proto",
        "council-runtime",
        "tonic",
        "prost",
        "async-nats",
    ] {
        assert!(
            !deps.contains(forbidden),
            "inference depends on {forbidden}"
        );
    }
}

#[test]
fn only_runtime_wires_things_together() {
    let g = graph();
    let proto = g.closure("council-proto");
    assert!(
        !proto.iter().any(|d| d.starts_with("council-")),
        "proto depends on workspace crates: {proto:?}"
    );
    for name in ["council-councils", "council-inference", "council-proto"] {
        assert!(
            !g.closure(name).contains("council-runtime"),
            "{name} depends on runtime"
        );
    }
}

/// Module imports inside each crate, read from its sources: which sibling modules reach each
/// other (`crate::`, `super::` and `self::` paths, grouped `use` trees included; comments and
/// `#[cfg(test)]` items left out).
mod imports {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    /// A module path inside a crate (`[]` is the crate root).
    pub type Module = Vec<String>;

    /// Every module of the library rooted at `src/lib.rs` that has a file of its own.
    pub fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
        let mut found = BTreeMap::new();
        let mut dirs = vec![src.to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("source folder reads") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let rel = path
                    .strip_prefix(src)
                    .expect("under src")
                    .with_extension("");
                let mut parts: Module = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                match parts.last().map(String::as_str) {
                    Some("main") if parts.len() == 1 => continue,
                    Some("lib") if parts.len() == 1 => parts.clear(),
                    Some("mod") => {
                        parts.pop();
                    }
                    _ => {}
                }
                found.insert(parts, path);
            }
        }
        found
    }

    /// `text` without comments and without the items marked `#[cfg(test)]`.
    pub fn production_code(text: &str) -> String {
        let mut code = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("#[cfg(test)]") {
            code.push_str(&rest[..at]);
            let item = &rest[at..];
            let open = item.find('{');
            let semi = item.find(';');
            let end = match (open, semi) {
                (_, Some(s)) if open.is_none_or(|o| s < o) => s + 1,
                (Some(o), _) => matching_brace(item, o).map_or(item.len(), |c| c + 1),
                _ => item.len(),
            };
            rest = &item[end..];
        }
        code.push_str(rest);
        code.lines()
            .map(|line| line.find("//").map_or(line, |c| &line[..c]))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The index of the brace closing the one at `open`.
    fn matching_brace(text: &str, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for (i, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(open + i);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Every path that starts with `crate::`, `super::` or `self::`, grouped `use` trees
    /// expanded (`crate::a::{b, c::d}` gives `crate::a::b` and `crate::a::c::d`).
    pub fn paths(code: &str) -> Vec<String> {
        let mut found = Vec::new();
        for head in ["crate::", "super::", "self::"] {
            for (at, _) in code.match_indices(head) {
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                found.extend(tree(&code[at..]));
            }
        }
        found
    }

    /// The paths of the use tree (or plain path) at the start of `text`.
    fn tree(text: &str) -> Vec<String> {
        let len = text
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(text.len());
        let path = &text[..len];
        if !(path.ends_with("::") && text[len..].starts_with('{')) {
            return vec![path.trim_end_matches(':').to_owned()];
        }
        let Some(close) = matching_brace(text, len) else {
            return Vec::new();
        };
        let mut items = Vec::new();
        let (mut depth, mut from) = (0usize, len + 1);
        for (i, c) in text[len + 1..close].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&text[from..len + 1 + i]);
                    from = len + 2 + i;
                }
                _ => {}
            }
        }
        items.push(&text[from..close]);
        items
            .into_iter()
            .map(str::trim)
            .filter(|item| item.starts_with(|c: char| c.is_alphabetic() || c == '_'))
            .flat_map(tree)
            .map(|sub| format!("{path}{sub}"))
            .collect()
    }

    /// The module with a file of its own that `path`, written in `from`, names or lies in.
    pub fn resolve(from: &Module, path: &str, known: &BTreeMap<Module, PathBuf>) -> Module {
        let mut segments = path.split("::").peekable();
        let mut base = from.clone();
        match segments.peek().copied() {
            Some("crate") => {
                base.clear();
                segments.next();
            }
            Some("self") => {
                segments.next();
            }
            _ => {
                while segments.peek() == Some(&"super") {
                    base.pop();
                    segments.next();
                }
            }
        }
        let mut named = base;
        for segment in segments {
            named.push(segment.to_owned());
            if !known.contains_key(&named) {
                named.pop();
                break;
            }
        }
        named
    }

    /// Edges between sibling subtrees: `a -> b` when something inside `a` names something inside
    /// `b` and neither contains the other (both are children of their closest common parent).
    pub fn sibling_edges(src: &Path) -> BTreeSet<(Module, Module)> {
        let known = modules(src);
        let mut edges = BTreeSet::new();
        for (module, file) in &known {
            let text = std::fs::read_to_string(file).expect("source reads");
            for path in paths(&production_code(&text)) {
                let target = resolve(module, &path, &known);
                let common = module
                    .iter()
                    .zip(&target)
                    .take_while(|(a, b)| a == b)
                    .count();
                if common == module.len() || common == target.len() {
                    continue;
                }
                edges.insert((module[..=common].to_vec(), target[..=common].to_vec()));
            }
        }
        edges
    }

    /// The sets of sibling modules that import each other, directly or around a longer loop,
    /// each as sorted `a::b` names.
    pub fn cycles(edges: &BTreeSet<(Module, Module)>) -> BTreeSet<Vec<String>> {
        let mut next: BTreeMap<&Module, Vec<&Module>> = BTreeMap::new();
        for (a, b) in edges {
            next.entry(a).or_default().push(b);
        }
        let reach = |from: &Module| {
            let mut seen = BTreeSet::new();
            let mut stack = vec![from];
            while let Some(m) = stack.pop() {
                for &n in next.get(m).into_iter().flatten() {
                    if seen.insert(n) {
                        stack.push(n);
                    }
                }
            }
            seen
        };
        let reached: BTreeMap<&Module, BTreeSet<&Module>> =
            next.keys().map(|&m| (m, reach(m))).collect();
        let mut found = BTreeSet::new();
        for (&m, from_m) in &reached {
            if !from_m.contains(m) {
                continue;
            }
            let mut group: Vec<String> = from_m
                .iter()
                .filter(|&&n| reached.get(n).is_some_and(|r| r.contains(m)))
                .map(|n| n.join("::"))
                .collect();
            group.sort();
            found.insert(group);
        }
        found
    }
}

fn crate_src(name: &str) -> std::path::PathBuf {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .join(name)
        .join("src")
}

#[test]
fn no_import_cycle_between_modules_inside_a_crate() {
    let mut found = Vec::new();
    for name in ["councils", "inference", "proto", "runtime", "tests"] {
        for cycle in imports::cycles(&imports::sibling_edges(&crate_src(name))) {
            found.push(format!("{name}: {}", cycle.join(" <-> ")));
        }
    }
    assert!(
        found.is_empty(),
        "modules that import each other: {found:#?}"
    );
}

/// The two doors of the run core (gRPC and NATS) meet only in the process that starts them.
#[test]
fn dispatch_and_service_do_not_import_each_other() {
    let doors: Vec<String> = imports::sibling_edges(&crate_src("runtime"))
        .iter()
        .map(|(a, b)| (a.join("::"), b.join("::")))
        .filter(|(a, b)| (a == "dispatch" && b == "service") || (a == "service" && b == "dispatch"))
        .map(|(a, b)| format!("{a} -> {b}"))
        .collect();
    assert!(doors.is_empty(), "imports between the doors: {doors:?}");
}

#[test]
fn the_import_reader_sees_what_it_must() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).expect("mkdir");
    let files = [
        ("lib.rs", "mod a; mod b; mod c;\n"),
        (
            "a/mod.rs",
            "mod x;\nuse crate::{c::Thing, b::{self}};\n// use crate::d::Hidden;\n",
        ),
        ("a/x.rs", "use super::super::b::Other;\n"),
        (
            "b.rs",
            "fn f() { crate::a::x::call(); }\n#[cfg(test)]\nmod tests { use crate::c::T; }\n",
        ),
        ("c.rs", "/// [`crate::a`]\nfn g() {}\n"),
    ];
    for (path, text) in files {
        std::fs::write(src.join(path), text).expect("write");
    }
    let edges: BTreeSet<(String, String)> = imports::sibling_edges(src)
        .iter()
        .map(|(a, b)| (a.join("::"), b.join("::")))
        .collect();
    let expected: BTreeSet<(String, String)> = [("a", "b"), ("a", "c"), ("b", "a")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(edges, expected);
    let cycles = imports::cycles(&imports::sibling_edges(src));
    assert_eq!(
        cycles,
        BTreeSet::from([vec!["a".to_owned(), "b".to_owned()]])
    );
}
