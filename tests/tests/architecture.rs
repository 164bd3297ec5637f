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
