//! The deployment under `deploy/`, checked against the code: a port, a variable, a subject or a
//! health name that differs between a manifest, the image and the code fails here, not in a
//! cluster.
//!
//! Every kustomization under `deploy/k8s` (the base, each overlay, the optional monitoring
//! layer) is resolved the way kustomize resolves it, as far as this layout uses kustomize
//! (resources, patches from files, `configMapGenerator`, `images`, `namespace`): any other
//! kustomize feature is refused, never ignored. [`check`] then loads the service's config with
//! the real loader (`council serve` as the container runs it: the ConfigMap's file, the image's
//! and the container's variables turned into flags, the Secrets as placeholder files) and
//! returns every mismatch with the code's defaults, the names the code reads and registers, and
//! between manifests. The tests at the end corrupt a copy in memory and require each corruption
//! to be reported, so the checker is known to fail when it should.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{CommandFactory, Parser};
use council_inference::tiny::TinyArch;
use council_inference::{
    Backend, BackendFuture, BackendLoad, EngineConfig, EngineHandle, GenerateRequest, Health,
    ModelInfo,
};
use council_runtime::cli::health::{self, HealthArgs};
use council_runtime::cli::server::{self, CONNECTION_LINGER, Options, PULL_STOP_TIMEOUT};
use council_runtime::cli::{Cli, Command};
use council_runtime::config::{
    DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, RawConfig, ServeConfig, StoreChoice,
};
use council_runtime::dispatch::DispatchConfig;
use council_runtime::model_source::VLLM_API_KEY_ENV;
use council_runtime::nats::NatsAuth;
use council_runtime::run::Limits;
use council_runtime::service::{LIVENESS_SERVICE, READINESS_SERVICES};
use council_runtime::store::{FileStore, apply_default_councils};
use council_tests::deploy::dockerfile::{Dockerfile, Images};
use council_tests::deploy::kustomize::*;
use council_tests::deploy::manifests::*;
use council_tests::deploy::nats_conf::*;
use council_tests::{engine, tiny_model};
use serde_json::{Value as Json, json};
use tonic_health::pb::health_check_response::ServingStatus;

// ---------------------------------------------------------------------------------------------
// Where things are.

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn k8s() -> PathBuf {
    repo().join("deploy/k8s")
}

/// What is deployed together: the base, each overlay, and the base with the optional
/// Prometheus Operator layer.
fn builds() -> Vec<(&'static str, Vec<PathBuf>)> {
    let k = k8s();
    vec![
        ("base", vec![k.join("base")]),
        ("overlays/cpu", vec![k.join("overlays/cpu")]),
        ("overlays/gpu", vec![k.join("overlays/gpu")]),
        ("overlays/vllm", vec![k.join("overlays/vllm")]),
        ("overlays/ha", vec![k.join("overlays/ha")]),
        (
            "base + 40-monitoring/prometheus-operator",
            vec![
                k.join("base"),
                k.join("base/40-monitoring/prometheus-operator"),
            ],
        ),
    ]
}

fn build(dirs: &[PathBuf]) -> Vec<Json> {
    let mut read = BTreeSet::new();
    let mut objects = Vec::new();
    for dir in dirs {
        objects
            .extend(kustomize(dir, &mut read).unwrap_or_else(|e| panic!("{}: {e}", dir.display())));
    }
    objects
}

fn built(name: &str) -> Vec<Json> {
    let (_, dirs) = builds()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a build of that name");
    build(&dirs)
}

fn secret_templates() -> Vec<Json> {
    let mut read = BTreeSet::new();
    yaml_docs(
        &k8s().join("base/00-foundation/secrets.template.yaml"),
        &mut read,
    )
    .expect("the secret templates parse")
}

fn images() -> Images {
    let read = |name: &str| Dockerfile {
        path: format!("deploy/{name}"),
        text: std::fs::read_to_string(repo().join("deploy").join(name))
            .unwrap_or_else(|e| panic!("deploy/{name}: {e}")),
    };
    Images {
        cpu: read("Dockerfile"),
        cuda: read("Dockerfile.cuda"),
    }
}

// ---------------------------------------------------------------------------------------------
// What the code reads and registers.

/// Every variable the binary reads: the `env` of every flag of `council serve` and the global
/// flags (clap's own definitions), the vLLM key variable, and names read directly by the code,
/// each confirmed in the source that reads it.
fn variables_the_code_reads() -> BTreeSet<String> {
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").expect("council serve");
    let mut names: BTreeSet<String> = cli
        .get_arguments()
        .chain(serve.get_arguments())
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.insert(VLLM_API_KEY_ENV.to_owned());
    for (var, file, needle) in [
        // tracing_subscriber's EnvFilter::try_from_default_env reads RUST_LOG.
        ("RUST_LOG", "runtime/src/main.rs", "try_from_default_env"),
        ("HF_HOME", "inference/src/engine/loader.rs", "\"HF_HOME\""),
        (
            "HF_HUB_CACHE",
            "inference/src/engine/loader.rs",
            "\"HF_HUB_CACHE\"",
        ),
        (
            "HF_HUB_OFFLINE",
            "inference/src/engine/loader.rs",
            "\"HF_HUB_OFFLINE\"",
        ),
    ] {
        let source = std::fs::read_to_string(repo().join(file)).expect("source");
        assert!(
            source.contains(needle),
            "{file} no longer reads {var}: update variables_the_code_reads"
        );
        names.insert(var.to_owned());
    }
    names
}

/// `[section.key]` of a `council serve` flag's help: the config file key it overrides.
fn config_key_of_variable(var: &str) -> Option<String> {
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve")?.clone();
    let arg = serve
        .get_arguments()
        .find(|a| a.get_env().is_some_and(|e| e == var))?;
    let help = arg.get_help()?.to_string();
    let key = help.strip_prefix('[')?.split(']').next()?;
    Some(key.to_owned())
}

/// The long flag that reads `var`, and whether it belongs to `serve` (else it is global).
fn flag_of_variable(var: &str) -> Option<String> {
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve")?.clone();
    cli.get_arguments()
        .chain(serve.get_arguments())
        .find(|a| a.get_env().is_some_and(|e| e == var))
        .and_then(|a| a.get_long())
        .map(|l| format!("--{l}"))
}

fn default_port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .expect("a default address")
        .port()
}

/// The content a placeholder file of secret `name`, key `key` holds: unique per secret and
/// key, so the loaded config shows which secret a value came from, and valid for every kind
/// (a bearer token needs 16 visible characters).
fn placeholder(secret: &str, key: &str) -> String {
    format!("placeholder-{secret}-{key}-0123456789abcdef")
}

// ---------------------------------------------------------------------------------------------
// The effective config of the council container.

#[derive(Debug)]
struct Effective {
    config: ServeConfig,
    /// Every variable the container sees (image, then container), with where it came from.
    env: BTreeMap<String, (String, String)>,
    /// The config file's own layer (before variables and flags).
    file: Json,
    /// The mirror of the container's files that `config`'s paths point into.
    _mirror: tempfile::TempDir,
}

/// Loads `council serve`'s config as the container would: files mounted from ConfigMaps are
/// written into a temporary mirror of the container's file system, Secrets as placeholders,
/// variables become flags, and the real loader (`ServeArgs::config`) validates the whole.
fn effective(
    objects: &[Json],
    secrets: &[Json],
    workload: &Json,
    container: &Json,
    image: &Dockerfile,
) -> Result<Effective, String> {
    // Where fetched models are cached and which index they come from are not config: the
    // loader never reads them, and the test suite may set them.
    const NOT_CONFIG: [&str; 2] = ["COUNCIL_CACHE_DIR", "COUNCIL_PYPI_INDEX_URL"];
    if let Some((k, _)) = std::env::vars()
        .find(|(k, _)| k.starts_with("COUNCIL_") && !NOT_CONFIG.contains(&k.as_str()))
    {
        panic!("{k} is set in the test's environment: the config loader would read it; unset it");
    }
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mounts = mirror(objects, secrets, workload, container, tmp.path())?;
    let relocate = |s: &str| -> String {
        mounts
            .iter()
            .filter(|m| s == m.as_str() || s.starts_with(&format!("{m}/")))
            .max_by_key(|m| m.len())
            .map_or_else(|| s.to_owned(), |_| format!("{}{s}", tmp.path().display()))
    };

    let mut env = BTreeMap::new();
    for (k, v) in image.env() {
        env.insert(k, (v, image.path.clone()));
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap_or("").to_owned();
        let value = match (e["value"].as_str(), &e["valueFrom"]["secretKeyRef"]) {
            (Some(v), _) => v.to_owned(),
            (None, r) if r.is_object() => placeholder(
                r["name"].as_str().unwrap_or(""),
                r["key"].as_str().unwrap_or(""),
            ),
            _ => String::new(),
        };
        env.insert(var, (value, format!("container {}", container["name"])));
    }

    // argv: the container's command (the image's entrypoint when unset) and args (its CMD).
    let entrypoint = match container.get("command") {
        Some(c) => strings(Some(c)),
        None => image.exec_form("ENTRYPOINT").unwrap_or_default(),
    };
    if entrypoint != ["council"] {
        return Err(format!(
            "{} runs {entrypoint:?}, not the council binary",
            id(workload)
        ));
    }
    let mut argv = vec!["council".to_owned()];
    argv.extend(match container.get("args") {
        Some(a) => strings(Some(a)),
        None => image.exec_form("CMD").unwrap_or_default(),
    });
    if argv.get(1).map(String::as_str) != Some("serve") {
        return Err(format!(
            "{} does not run `council serve`: {argv:?}",
            id(workload)
        ));
    }
    let given: BTreeSet<String> = argv
        .iter()
        .filter(|a| a.starts_with("--"))
        .cloned()
        .collect();
    let mut argv: Vec<String> = argv.iter().map(|a| relocate(a.as_str())).collect();
    for (var, (value, _)) in &env {
        if let Some(f) = flag_of_variable(var)
            && !given.contains(&f)
        {
            argv.push(f);
            argv.push(relocate(value));
        }
    }

    // The config file: loaded by the real loader; its paths moved into the mirror.
    let config_path = argv
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| argv.get(i + 1))
        .cloned();
    let mut file = json!({});
    if let Some(path) = &config_path {
        let raw = RawConfig::from_file(Path::new(path))
            .map_err(|e| format!("the config file of {} does not load: {e}", id(workload)))?;
        file = serde_json::to_value(&raw).map_err(|e| e.to_string())?;
        let mut moved = file.clone();
        relocate_strings(&mut moved, &relocate);
        let raw: RawConfig = serde_json::from_value(moved).map_err(|e| e.to_string())?;
        let text = toml::to_string(&raw).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| e.to_string())?;
    }

    let cli = Cli::try_parse_from(&argv).map_err(|e| format!("council {argv:?}: {e}"))?;
    let Command::Serve(args) = cli.command else {
        return Err("not `council serve`".into());
    };
    let config = args
        .config()
        .map_err(|e| format!("`council serve` refuses its config: {e:#}"))?;
    Ok(Effective {
        config,
        env,
        file,
        _mirror: tmp,
    })
}

fn relocate_strings(v: &mut Json, relocate: &dyn Fn(&str) -> String) {
    match v {
        Json::String(s) => *s = relocate(s),
        Json::Array(a) => a.iter_mut().for_each(|x| relocate_strings(x, relocate)),
        Json::Object(m) => m.values_mut().for_each(|x| relocate_strings(x, relocate)),
        _ => {}
    }
}

/// Writes what `container` sees at each of its mounts under `root`: ConfigMap data as it is,
/// Secret keys as placeholders (from the templates), empty directories for the rest. Returns
/// the mount paths.
fn mirror(
    objects: &[Json],
    secrets: &[Json],
    workload: &Json,
    container: &Json,
    root: &Path,
) -> Result<Vec<String>, String> {
    let volumes = pod_spec(workload)["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let mount = m["mountPath"].as_str().unwrap_or("").to_owned();
        if !m["subPath"].is_null() {
            return Err(format!(
                "{}: subPath mounts are not understood by this check",
                id(workload)
            ));
        }
        let volume = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .ok_or_else(|| format!("{}: no volume {}", id(workload), m["name"]))?;
        if !volume["configMap"]["items"].is_null() || !volume["secret"]["items"].is_null() {
            return Err(format!(
                "{}: volume items are not understood by this check",
                id(workload)
            ));
        }
        let files: BTreeMap<String, String> = if let Some(cm) = volume["configMap"]["name"].as_str()
        {
            let o = of_kind(objects, "ConfigMap")
                .find(|o| name(o) == cm)
                .ok_or_else(|| format!("{}: ConfigMap {cm} does not exist", id(workload)))?;
            labels(&o["data"])
        } else if let Some(s) = volume["secret"]["secretName"].as_str() {
            let o = secrets
                .iter()
                .find(|o| name(o) == s)
                .ok_or_else(|| format!("{}: Secret {s} has no template", id(workload)))?;
            o["stringData"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| (k.clone(), placeholder(s, k)))
                .collect()
        } else {
            BTreeMap::new()
        };
        let dir = root.join(mount.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for (k, v) in files {
            std::fs::write(dir.join(k), v).map_err(|e| e.to_string())?;
        }
        mounts.push(mount);
    }
    Ok(mounts)
}

// ---------------------------------------------------------------------------------------------
// The checker.

/// Every mismatch between `objects` (one resolved build), the secret templates, the images and
/// the code. Empty means consistent.
fn check(objects: &[Json], secrets: &[Json], images: &Images) -> Vec<String> {
    let mut out = Vec::new();
    check_generic(objects, secrets, &mut out);
    let councils: Vec<(&Json, &Json)> = workloads(objects)
        .flat_map(|w| containers(w).iter().map(move |c| (w, c)))
        .filter(|(_, c)| c["name"] == "council")
        .collect();
    let [(workload, container)] = councils.as_slice() else {
        out.push(format!(
            "expected one council container, found {}",
            councils.len()
        ));
        return out;
    };
    let image = images.for_image(container["image"].as_str().unwrap_or(""));
    match effective(objects, secrets, workload, container, image) {
        Ok(e) => check_council(objects, workload, container, image, &e, &mut out),
        Err(e) => out.push(e),
    }
    check_nats(objects, &mut out);
    out
}

/// Namespaces, requests, Service selectors and Secret references: true of every object.
fn check_generic(objects: &[Json], secrets: &[Json], out: &mut Vec<String>) {
    let namespaces: Vec<&str> = of_kind(objects, "Namespace").map(name).collect();
    let [ns] = namespaces.as_slice() else {
        out.push(format!("expected one Namespace, found {namespaces:?}"));
        return;
    };
    for o in objects.iter().filter(|o| o["kind"] != "Namespace") {
        if o["metadata"]["namespace"] != *ns {
            out.push(format!("{} is not in namespace {ns}", id(o)));
        }
    }
    for w in workloads(objects) {
        let selector = labels(&w["spec"]["selector"]["matchLabels"]);
        if !selects(&selector, &pod_labels(w)) {
            out.push(format!("{}: its selector does not match its pods", id(w)));
        }
        for c in containers(w) {
            for r in ["cpu", "memory"] {
                if c["resources"]["requests"][r].is_null() {
                    out.push(format!("{} container {}: no {r} request", id(w), c["name"]));
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                let r = &e["valueFrom"]["secretKeyRef"];
                if r.is_object() {
                    check_secret_key(w, r["name"].as_str(), r["key"].as_str(), secrets, out);
                }
            }
        }
        for v in pod_spec(w)["volumes"].as_array().into_iter().flatten() {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                check_secret_key(w, Some(s), None, secrets, out);
            }
        }
    }
    for s in of_kind(objects, "Service") {
        let selector = labels(&s["spec"]["selector"]);
        let hits: Vec<String> = workloads(objects)
            .filter(|w| selects(&selector, &pod_labels(w)))
            .map(id)
            .collect();
        if hits.len() != 1 {
            out.push(format!(
                "{} must select the pods of one workload, selects {hits:?}",
                id(s)
            ));
        }
    }
    for p in of_kind(objects, "PodDisruptionBudget") {
        let selector = labels(&p["spec"]["selector"]["matchLabels"]);
        if !workloads(objects).any(|w| labels(&w["spec"]["selector"]["matchLabels"]) == selector) {
            out.push(format!("{}: its selector is no workload's selector", id(p)));
        }
    }
    for s in secrets {
        for (k, v) in s["stringData"].as_object().into_iter().flatten() {
            if !v.as_str().is_some_and(|v| v.starts_with("<REPLACE")) {
                out.push(format!(
                    "secret template {}: {k} holds a value, not a <REPLACE…> placeholder",
                    name(s)
                ));
            }
        }
    }
    if objects.iter().any(|o| o["kind"] == "Secret") {
        out.push("a Secret is applied by kustomize: it would overwrite the real one (create secrets by hand, see deploy/README.md)".into());
    }
}

fn check_secret_key(
    w: &Json,
    secret: Option<&str>,
    key: Option<&str>,
    secrets: &[Json],
    out: &mut Vec<String>,
) {
    let secret = secret.unwrap_or("");
    match secrets.iter().find(|s| name(s) == secret) {
        None => out.push(format!(
            "{} uses Secret {secret}, which secrets.template.yaml does not define",
            id(w)
        )),
        Some(s) => {
            if let Some(key) = key
                && s["stringData"][key].is_null()
            {
                out.push(format!(
                    "{} uses key {key} of Secret {secret}, which its template lacks",
                    id(w)
                ));
            }
        }
    }
}

fn check_council(
    objects: &[Json],
    w: &Json,
    c: &Json,
    image: &Dockerfile,
    e: &Effective,
    out: &mut Vec<String>,
) {
    let cfg = &e.config;
    let grpc = cfg.server.listen.port();
    let wid = id(w);

    // Variables: only names the code reads; none that silently overrides the config file.
    let known = variables_the_code_reads();
    for (var, (_, origin)) in &e.env {
        if !known.contains(var) {
            out.push(format!("{origin} sets {var}, which the code never reads"));
        }
        if let Some(key) = config_key_of_variable(var) {
            let (section, field) = key.split_once('.').unwrap_or((key.as_str(), ""));
            if !e.file[section][field].is_null() {
                out.push(format!(
                    "the config file sets {key}, but {var} from {origin} overrides it: the file's value is dead"
                ));
            }
        }
    }

    // Ports: the code's defaults, reachable, and the same in every place that names them.
    if grpc != default_port(DEFAULT_LISTEN) {
        out.push(format!(
            "server.listen port {grpc} is not the code's default {DEFAULT_LISTEN}"
        ));
    }
    if !cfg.server.listen.ip().is_unspecified() {
        out.push(format!(
            "server.listen {} is not reachable from other pods",
            cfg.server.listen
        ));
    }
    let Some(metrics) = cfg.server.metrics_listen else {
        out.push("server.metrics_listen is off, but the monitoring layer scrapes it".into());
        return;
    };
    if metrics.port() != default_port(DEFAULT_METRICS_LISTEN) {
        out.push(format!(
            "server.metrics_listen port {} is not the code's default {DEFAULT_METRICS_LISTEN}",
            metrics.port()
        ));
    }
    if !metrics.ip().is_unspecified() {
        out.push(format!(
            "server.metrics_listen {metrics} is not reachable by Prometheus"
        ));
    }
    let wanted = BTreeMap::from([
        ("grpc".to_owned(), u64::from(grpc)),
        ("metrics".to_owned(), u64::from(metrics.port())),
    ]);
    let declared: BTreeMap<String, u64> = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                as_u64(&p["containerPort"]).unwrap_or(0),
            )
        })
        .collect();
    if declared != wanted {
        out.push(format!(
            "{wid} container ports {declared:?} are not the config's {wanted:?}"
        ));
    }
    let exposed: BTreeSet<u64> = image
        .last("EXPOSE")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.split('/').next()?.parse().ok())
        .collect();
    if exposed != wanted.values().copied().collect() {
        out.push(format!(
            "{} EXPOSEs {exposed:?}, the config listens on {wanted:?}",
            image.path
        ));
    }

    // Probes: native gRPC on the listen port, the names the service registers.
    if cfg.server.tls.is_some() {
        out.push("the gRPC port uses TLS: kubelet's gRPC probes cannot reach it".into());
    }
    for (probe, names) in [
        ("startupProbe", &[LIVENESS_SERVICE][..]),
        ("readinessProbe", &READINESS_SERVICES[..]),
        ("livenessProbe", &[LIVENESS_SERVICE][..]),
    ] {
        let p = &c[probe]["grpc"];
        if !p.is_object() {
            out.push(format!("{wid}: {probe} is not a native gRPC probe"));
            continue;
        }
        if as_u64(&p["port"]) != Some(u64::from(grpc)) {
            out.push(format!(
                "{wid}: {probe} port {} is not server.listen's {grpc}",
                p["port"]
            ));
        }
        let service = p["service"].as_str().unwrap_or("");
        if !names.contains(&service) {
            out.push(format!(
                "{wid}: {probe} asks for health service {service:?}; the code registers {names:?} for it"
            ));
        }
    }

    // Services and scraping: every port reaching the council pods targets a configured port.
    let pod = pod_labels(w);
    for s in of_kind(objects, "Service").filter(|s| selects(&labels(&s["spec"]["selector"]), &pod))
    {
        for p in s["spec"]["ports"].as_array().into_iter().flatten() {
            let target = resolve_port(c, p.get("targetPort").unwrap_or(&p["port"]));
            let port_name = p["name"].as_str().unwrap_or("");
            let want = wanted.get(port_name).copied();
            if target.is_none() || target != want || as_u64(&p["port"]) != want {
                out.push(format!(
                    "{} port {port_name} ({} → {}) is not the config's {port_name} port {want:?}",
                    id(s),
                    p["port"],
                    p.get("targetPort").unwrap_or(&Json::Null)
                ));
            }
        }
        let a = &s["metadata"]["annotations"];
        if a["prometheus.io/scrape"] == "true" {
            if as_u64(&a["prometheus.io/port"]) != Some(u64::from(metrics.port())) {
                out.push(format!(
                    "{}: prometheus.io/port {} is not server.metrics_listen's {}",
                    id(s),
                    a["prometheus.io/port"],
                    metrics.port()
                ));
            }
            // The route of cli::server::metrics_router.
            if a["prometheus.io/path"] != "/metrics" {
                out.push(format!("{}: prometheus.io/path is not /metrics", id(s)));
            }
        }
    }
    let scraped_by_annotation = of_kind(objects, "Service").any(|s| {
        s["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
            && selects(&labels(&s["spec"]["selector"]), &pod)
    });
    for m in of_kind(objects, "ServiceMonitor") {
        let selector = labels(&m["spec"]["selector"]["matchLabels"]);
        for ep in m["spec"]["endpoints"].as_array().into_iter().flatten() {
            let ok = of_kind(objects, "Service")
                .filter(|s| selects(&selector, &labels(&s["metadata"]["labels"])))
                .flat_map(|s| s["spec"]["ports"].as_array().into_iter().flatten())
                .any(|p| {
                    p["name"] == ep["port"]
                        && resolve_port(c, p.get("targetPort").unwrap_or(&p["port"]))
                            == Some(u64::from(metrics.port()))
                });
            if !ok || ep["path"] != "/metrics" {
                out.push(format!(
                    "{}: endpoint {} does not reach /metrics on the metrics port",
                    id(m),
                    ep["port"]
                ));
            }
        }
    }
    if !scraped_by_annotation && of_kind(objects, "ServiceMonitor").next().is_none() {
        out.push("nothing scrapes the metrics port".into());
    }

    // Rollout and disruption.
    if w["kind"] != "Deployment" {
        out.push(format!("{wid}: council runs as a Deployment"));
    }
    let strategy = &w["spec"]["strategy"];
    let max_unavailable = &strategy["rollingUpdate"]["maxUnavailable"];
    if strategy["type"] != "RollingUpdate" || !(*max_unavailable == 0 || *max_unavailable == "0%") {
        out.push(format!(
            "{wid}: the rollout must be RollingUpdate with maxUnavailable 0, is {strategy}"
        ));
    }
    let selector = labels(&w["spec"]["selector"]["matchLabels"]);
    if !of_kind(objects, "PodDisruptionBudget")
        .any(|p| labels(&p["spec"]["selector"]["matchLabels"]) == selector)
    {
        out.push(format!("{wid} has no PodDisruptionBudget"));
    }
    let replicas = as_u64(&w["spec"]["replicas"]).unwrap_or(1);
    if replicas > 1 && !matches!(cfg.store, StoreChoice::Nats(_)) {
        out.push(format!(
            "{wid} runs {replicas} replicas on a store they cannot share (store.kind must be nats)"
        ));
    }

    // Shutdown: preStop, then the drain, inside the termination grace period; and the drain
    // long enough for any deliberation the service accepts.
    let pre_stop = &c["lifecycle"]["preStop"];
    let sleep = as_u64(&pre_stop["sleep"]["seconds"]).or_else(|| {
        let cmd = strings(pre_stop["exec"].get("command"));
        match cmd.as_slice() {
            [s, n] if s.ends_with("sleep") => n.parse().ok(),
            _ => None,
        }
    });
    let Some(sleep) = sleep else {
        out.push(format!("{wid}: no preStop sleep"));
        return;
    };
    let tgps = as_u64(&pod_spec(w)["terminationGracePeriodSeconds"]).unwrap_or(30);
    let needed =
        Duration::from_secs(sleep) + cfg.server.grace + CONNECTION_LINGER + PULL_STOP_TIMEOUT;
    if Duration::from_secs(tgps) <= needed {
        out.push(format!(
            "{wid}: terminationGracePeriodSeconds {tgps} does not exceed preStop {sleep} s + server.grace_secs {} s + the drain's tail {} s",
            cfg.server.grace.as_secs(),
            (CONNECTION_LINGER + PULL_STOP_TIMEOUT).as_secs()
        ));
    }
    if cfg.server.grace < cfg.limits.max_timeout {
        out.push(format!(
            "server.grace_secs {} is shorter than limits.max_timeout_secs {}: a rollout would cut deliberations",
            cfg.server.grace.as_secs(),
            cfg.limits.max_timeout.as_secs()
        ));
    }

    // The user and the model cache.
    let sc = &pod_spec(w)["securityContext"];
    if sc["runAsNonRoot"] != true {
        out.push(format!("{wid}: runAsNonRoot is not set"));
    }
    let uid = image.last("USER").unwrap_or_default();
    let uid = uid.split(':').next().unwrap_or("");
    if let Some(run_as) = as_u64(&sc["runAsUser"])
        && run_as.to_string() != uid
    {
        out.push(format!(
            "{wid}: runAsUser {run_as} is not {}'s USER {uid}",
            image.path
        ));
    }
    match e.env.get("HF_HOME") {
        Some((home, _))
            if c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPath"] == home.as_str()) => {}
        other => out.push(format!(
            "{wid}: HF_HOME ({other:?}) is not a mounted volume"
        )),
    }

    // Dispatch: the stream and subject names are the contract with publishers.
    if let Some(d) = &cfg.dispatch {
        let want = DispatchConfig::default();
        for (field, have, default) in [
            ("tasks_stream", &d.tasks_stream, &want.tasks_stream),
            ("tasks_prefix", &d.tasks_prefix, &want.tasks_prefix),
            ("consumer", &d.consumer, &want.consumer),
            ("events_stream", &d.events_stream, &want.events_stream),
            ("events_subjects", &d.events_subjects, &want.events_subjects),
            (
                "completed_subject",
                &d.completed_subject,
                &want.completed_subject,
            ),
            ("failed_subject", &d.failed_subject, &want.failed_subject),
            ("dlq_stream", &d.dlq_stream, &want.dlq_stream),
            ("dlq_subject", &d.dlq_subject, &want.dlq_subject),
        ] {
            if have != default {
                out.push(format!(
                    "dispatch.{field} {have:?} is not the code's {default:?} (docs/DISPATCH.md)"
                ));
            }
        }
    }

    check_gpu(w, c, image, cfg, out);
    check_vllm(objects, cfg, out);
    check_council_nats(objects, cfg, out);
}

fn check_gpu(w: &Json, c: &Json, image: &Dockerfile, cfg: &ServeConfig, out: &mut Vec<String>) {
    let gpu = as_u64(&c["resources"]["limits"]["nvidia.com/gpu"]);
    let cuda_image = image.path.ends_with(".cuda");
    match (cfg.model.cuda, gpu, cuda_image) {
        (None, None, false) | (Some(_), Some(1..), true) => {}
        (cuda, gpu, cuda_image) => out.push(format!(
            "{}: model.cuda {cuda:?}, nvidia.com/gpu limit {gpu:?} and the CUDA image ({cuda_image}) must go together",
            id(w)
        )),
    }
}

fn check_vllm(objects: &[Json], cfg: &ServeConfig, out: &mut Vec<String>) {
    let servers: Vec<(&Json, &Json)> = workloads(objects)
        .flat_map(|w| containers(w).iter().map(move |c| (w, c)))
        .filter(|(_, c)| strings(c.get("command")).first().map(String::as_str) == Some("vllm"))
        .collect();
    let mut called = BTreeSet::new();
    for url in &cfg.model.vllm.urls {
        let Some((host, port)) = host_port(url, 80) else {
            out.push(format!("model.vllm_urls {url}: no host"));
            continue;
        };
        let Some(s) = service_for_host(objects, &host) else {
            out.push(format!("model.vllm_urls {url}: no Service {host}"));
            continue;
        };
        let (w, c, target) = match follow_service(objects, s, u64::from(port)) {
            Ok(x) => x,
            Err(e) => {
                out.push(format!("model.vllm_urls {url}: {e}"));
                continue;
            }
        };
        called.insert(id(w));
        if flag(c, "--port").and_then(|p| p.parse().ok()) != Some(target) {
            out.push(format!(
                "{}: vllm serve --port {:?} is not the container port {target} that {url} reaches",
                id(w),
                flag(c, "--port")
            ));
        }
        if flag(c, "--model").as_deref() != Some(cfg.model.model.as_str()) {
            out.push(format!(
                "{}: vllm serve --model {:?} is not council's model.repo {:?}",
                id(w),
                flag(c, "--model"),
                cfg.model.model
            ));
        }
        if flag(c, "--max-model-len")
            .and_then(|v| v.parse::<u64>().ok())
            .is_none_or(|v| v == 0)
        {
            out.push(format!("{}: vllm serve needs --max-model-len", id(w)));
        }
        if !flag(c, "--gpu-memory-utilization")
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.0 && v <= 1.0)
        {
            out.push(format!(
                "{}: vllm serve needs --gpu-memory-utilization in (0, 1]",
                id(w)
            ));
        }
        if as_u64(&c["resources"]["limits"]["nvidia.com/gpu"]).is_none() {
            out.push(format!("{}: the vLLM server has no GPU", id(w)));
        }
        // The key vLLM requires is the key council sends.
        let r = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "VLLM_API_KEY")
            .map(|e| &e["valueFrom"]["secretKeyRef"]);
        if let Some(r) = r {
            let want = placeholder(
                r["name"].as_str().unwrap_or(""),
                r["key"].as_str().unwrap_or(""),
            );
            let sent = cfg
                .model
                .vllm
                .api_key_file
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok());
            if sent.as_deref() != Some(want.as_str()) {
                out.push(format!(
                    "{}: vLLM requires the key of Secret {}/{}; council's model.vllm_api_key_file is not that key",
                    id(w),
                    r["name"],
                    r["key"]
                ));
            }
        }
    }
    for (w, _) in servers {
        if !called.contains(&id(w)) {
            out.push(format!(
                "{} serves vLLM, but council's model.vllm_urls do not reach it",
                id(w)
            ));
        }
    }
}

/// council's `nats.url` reaches the NATS client port, with the credentials NATS requires.
fn check_council_nats(objects: &[Json], cfg: &ServeConfig, out: &mut Vec<String>) {
    let Some(n) = &cfg.nats else {
        return;
    };
    let Some((host, port)) = host_port(&n.url, 4222) else {
        out.push(format!("nats.url {}: no host", n.url));
        return;
    };
    let Some(s) = service_for_host(objects, &host) else {
        out.push(format!("nats.url {}: no Service {host}", n.url));
        return;
    };
    let (w, c, target) = match follow_service(objects, s, u64::from(port)) {
        Ok(x) => x,
        Err(e) => {
            out.push(format!("nats.url {}: {e}", n.url));
            return;
        }
    };
    let conf = match nats_conf_of(objects, w, c) {
        Ok(conf) => conf,
        Err(e) => {
            out.push(e);
            return;
        }
    };
    if as_u64(&conf["port"]).unwrap_or(4222) != target {
        out.push(format!(
            "{}: nats.conf port {} is not the container port {target} that nats.url reaches",
            id(w),
            conf["port"]
        ));
    }
    // Token auth: NATS reads $VAR, which must come from the Secret key council reads.
    if let Some(var) = conf["authorization"]["token"]
        .as_str()
        .and_then(|t| t.strip_prefix('$'))
    {
        let r = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == var)
            .map(|e| &e["valueFrom"]["secretKeyRef"]);
        let want = r.map(|r| {
            placeholder(
                r["name"].as_str().unwrap_or(""),
                r["key"].as_str().unwrap_or(""),
            )
        });
        let sent = match &n.auth {
            NatsAuth::Token(t) => Some(t.expose().to_owned()),
            _ => None,
        };
        if want.is_none() || sent != want {
            out.push(format!(
                "{}: NATS requires the token ${var}; council's nats auth ({}) does not send that Secret's key",
                id(w),
                n.auth.kind()
            ));
        }
    }
}

/// The parsed nats.conf a NATS container runs with (`--config` / `-c`).
fn nats_conf_of(objects: &[Json], w: &Json, c: &Json) -> Result<Json, String> {
    let text = nats_conf_text(objects, w, c)?;
    nats_conf(&text).map_err(|e| format!("{}: nats.conf: {e}", id(w)))
}

fn nats_conf_text(objects: &[Json], w: &Json, c: &Json) -> Result<String, String> {
    let path = flag(c, "--config")
        .or_else(|| flag(c, "-c"))
        .ok_or_else(|| format!("{}: nats-server runs without --config", id(w)))?;
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", &path));
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == dir)
        .ok_or_else(|| format!("{}: nothing is mounted at {dir}", id(w)))?;
    let cm = pod_spec(w)["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .and_then(|v| v["configMap"]["name"].as_str())
        .ok_or_else(|| format!("{}: {dir} is not a ConfigMap", id(w)))?;
    of_kind(objects, "ConfigMap")
        .find(|o| name(o) == cm)
        .and_then(|o| o["data"][file].as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: ConfigMap {cm} has no {file}", id(w)))
}

/// Every NATS server: JetStream on a persistent volume, a config nats-server accepts, cluster
/// routes to exactly its own replicas.
fn check_nats(objects: &[Json], out: &mut Vec<String>) {
    for w in workloads(objects) {
        for c in containers(w).iter().filter(|c| {
            strings(c.get("command")).first().map(String::as_str) == Some("nats-server")
        }) {
            let wid = id(w);
            let text = match nats_conf_text(objects, w, c) {
                Ok(t) => t,
                Err(e) => {
                    out.push(e);
                    continue;
                }
            };
            let conf = match nats_conf(&text) {
                Ok(conf) => conf,
                Err(e) => {
                    out.push(format!("{wid}: nats.conf: {e}"));
                    continue;
                }
            };
            nats_server_accepts(w, c, &text, out);
            if w["kind"] != "StatefulSet" {
                out.push(format!("{wid}: NATS runs as a StatefulSet"));
            }
            let js = &conf["jetstream"];
            let store = js["store_dir"].as_str().unwrap_or("");
            let claims: BTreeMap<String, u64> = w["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        name(t).to_owned(),
                        t["spec"]["resources"]["requests"]["storage"]
                            .as_str()
                            .and_then(bytes)
                            .unwrap_or(0),
                    )
                })
                .collect();
            let on_claim = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    let mp = m["mountPath"].as_str().unwrap_or("-");
                    (store == mp || store.starts_with(&format!("{mp}/")))
                        && m["name"].as_str().is_some_and(|n| claims.contains_key(n))
                });
            match on_claim {
                None => out.push(format!(
                    "{wid}: JetStream's store_dir {store:?} is not on a persistent volume claim"
                )),
                Some(m) => {
                    let size = claims[m["name"].as_str().unwrap_or("")];
                    let max = js["max_file_store"].as_str().and_then(bytes);
                    if max.is_none_or(|max| max > size) {
                        out.push(format!(
                            "{wid}: jetstream max_file_store {} must be set and fit its volume ({size} bytes)",
                            js["max_file_store"]
                        ));
                    }
                }
            }
            let replicas = as_u64(&w["spec"]["replicas"]).unwrap_or(1);
            let routes = strings(conf["cluster"].get("routes"));
            let sts = name(w);
            let headless = w["spec"]["serviceName"].as_str().unwrap_or("");
            let cluster_port = container_port(c, "cluster");
            let want: BTreeSet<String> = (0..replicas)
                .map(|i| format!("{sts}-{i}.{headless}"))
                .collect();
            let have: BTreeSet<String> = routes
                .iter()
                .filter_map(|r| {
                    let (h, p) = host_port(r, 6222)?;
                    (Some(u64::from(p)) == cluster_port).then_some(h)
                })
                .map(|h| h.split('.').take(2).collect::<Vec<_>>().join("."))
                .collect();
            if replicas > 1 && (have != want || as_u64(&conf["cluster"]["port"]) != cluster_port) {
                out.push(format!(
                    "{wid}: {replicas} replicas need cluster routes to {want:?} on the cluster port {cluster_port:?}, the config routes to {routes:?}"
                ));
            }
            if replicas == 1 && !conf["cluster"].is_null() {
                out.push(format!("{wid}: one replica with a cluster block"));
            }
            if replicas > 1 && conf["server_name"] != "$POD_NAME" {
                out.push(format!(
                    "{wid}: JetStream servers need distinct server_name ($POD_NAME)"
                ));
            }
        }
    }
}

/// `nats-server -t` on the config, with the container's variables (placeholders for Secrets).
fn nats_server_accepts(w: &Json, c: &Json, text: &str, out: &mut Vec<String>) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            out.push(e.to_string());
            return;
        }
    };
    let path = dir.path().join("nats.conf");
    if let Err(e) = std::fs::write(&path, text) {
        out.push(e.to_string());
        return;
    }
    let mut cmd = std::process::Command::new("nats-server");
    cmd.arg("-t")
        .arg("-c")
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for e in c["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap_or("");
        let r = &e["valueFrom"]["secretKeyRef"];
        let value = e["value"].as_str().map(str::to_owned).unwrap_or_else(|| {
            placeholder(
                r["name"].as_str().unwrap_or("x"),
                r["key"].as_str().unwrap_or("x"),
            )
        });
        cmd.env(var, value);
    }
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => out.push(format!(
            "{}: nats-server -t refuses its nats.conf: {}",
            id(w),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => out.push(format!(
            "nats-server -t could not run ({e}): it checks nats.conf here; scripts/test installs it"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Images and scripts.

/// A token that silences a build step: `-q`, `-qq`, `--quiet`, `--silent`, a curl/wget `-s`,
/// output thrown away, or a failure swallowed.
fn quiet(line: &str) -> Option<String> {
    let downloads = line.contains("curl") || line.contains("wget");
    for t in line.split_whitespace() {
        let short = t.strip_prefix('-').filter(|s| !s.starts_with('-'));
        let silenced = matches!(t, "--quiet" | "--silent" | "-quiet")
            || short.is_some_and(|s| s.contains('q') && s.chars().all(|c| c.is_ascii_alphabetic()))
            || (downloads
                && short.is_some_and(|s| {
                    s.contains('s') && s.chars().all(|c| c.is_ascii_alphabetic())
                }))
            || t.contains("/dev/null");
        if silenced {
            return Some(t.to_owned());
        }
    }
    if line.contains("|| true") || line.contains("|| :") {
        return Some("|| true".into());
    }
    None
}

fn check_dockerfile(d: &Dockerfile, cuda: bool) -> Vec<String> {
    let mut out = Vec::new();
    let p = &d.path;
    for (i, args) in d.instructions() {
        if i == "RUN"
            && let Some(t) = quiet(&args)
        {
            out.push(format!(
                "{p}: RUN hides its output or failure ({t}): {args}"
            ));
        }
    }
    let stages = d.instructions().iter().filter(|(i, _)| i == "FROM").count();
    if stages < 2 {
        out.push(format!("{p}: not a multi-stage build"));
    }
    let builds: Vec<String> = d
        .instructions()
        .into_iter()
        .filter(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a)
        .collect();
    if builds.is_empty() {
        out.push(format!("{p}: no cargo build"));
    }
    for b in &builds {
        let features = b.contains("--features cuda");
        if !b.contains("--locked") || !b.contains("--release") || features != cuda {
            out.push(format!(
                "{p}: cargo build must be --release --locked{}: {b}",
                if cuda {
                    " --features cuda"
                } else {
                    ", without cuda"
                }
            ));
        }
    }
    if d.final_stage()
        .iter()
        .any(|(i, a)| i == "RUN" && a.contains("cargo"))
    {
        out.push(format!("{p}: the runtime stage builds"));
    }
    let user = d.last("USER").unwrap_or_default();
    let uid = user.split(':').next().unwrap_or("");
    if !uid.parse::<u32>().is_ok_and(|u| u != 0) {
        out.push(format!("{p}: USER {user:?} must be a numeric non-root uid"));
    }
    let env = d.env();
    let known = variables_the_code_reads();
    for var in env.keys().filter(|v| !known.contains(*v)) {
        out.push(format!("{p}: ENV {var} is not read by the code"));
    }
    for (var, default) in [
        ("COUNCIL_LISTEN", DEFAULT_LISTEN),
        ("COUNCIL_METRICS_LISTEN", DEFAULT_METRICS_LISTEN),
    ] {
        let ok = env
            .get(var)
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .is_some_and(|a| a.ip().is_unspecified() && a.port() == default_port(default));
        if !ok {
            out.push(format!(
                "{p}: ENV {var} must bind every interface on the code's default port ({default})"
            ));
        }
    }
    let volumes = d.last("VOLUME").unwrap_or_default();
    match env.get("HF_HOME") {
        Some(home) if volumes.contains(&format!("\"{home}\"")) => {}
        _ => out.push(format!("{p}: HF_HOME must be set and be a VOLUME")),
    }
    match d.exec_form("HEALTHCHECK") {
        Some(words) if words.first().map(String::as_str) == Some("council") => {
            match Cli::try_parse_from(&words) {
                Ok(cli) if matches!(cli.command, Command::Health(_)) => {}
                Ok(_) => out.push(format!("{p}: HEALTHCHECK is not `council health`")),
                Err(e) => out.push(format!("{p}: HEALTHCHECK {words:?}: {e}")),
            }
        }
        other => out.push(format!(
            "{p}: no exec-form `council health` HEALTHCHECK: {other:?}"
        )),
    }
    let entry = d.exec_form("ENTRYPOINT").unwrap_or_default();
    let cmd = d.exec_form("CMD").unwrap_or_default();
    let argv: Vec<String> = entry.into_iter().chain(cmd).collect();
    if argv.first().map(String::as_str) != Some("council")
        || !Cli::try_parse_from(&argv).is_ok_and(|c| matches!(c.command, Command::Serve(_)))
    {
        out.push(format!(
            "{p}: ENTRYPOINT + CMD {argv:?} is not `council serve`"
        ));
    }
    out
}

fn check_script(path: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    if first != Some("set -euo pipefail") {
        out.push(format!(
            "{path}: the first command must be `set -euo pipefail`"
        ));
    }
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if let Some(t) = quiet(line) {
            out.push(format!(
                "{path}: hides output or failure ({t}): {}",
                line.trim()
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The real files.

#[test]
fn every_build_matches_the_code() {
    let secrets = secret_templates();
    let images = images();
    let mut problems = Vec::new();
    for (name, dirs) in builds() {
        for p in check(&build(&dirs), &secrets, &images) {
            problems.push(format!("{name}: {p}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_images_match_the_code() {
    let images = images();
    let mut problems = check_dockerfile(&images.cpu, false);
    problems.extend(check_dockerfile(&images.cuda, true));
    // One runtime contract for both images.
    let (cpu, cuda) = (images.cpu.env(), images.cuda.env());
    if cpu != cuda {
        problems.push(format!("the images' ENV differ: {cpu:?} / {cuda:?}"));
    }
    for i in [
        "USER",
        "EXPOSE",
        "VOLUME",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
    ] {
        if images.cpu.last(i) != images.cuda.last(i) {
            problems.push(format!("the images' {i} differ"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn deploy_scripts_stop_at_the_first_failure() {
    let mut scripts = 0;
    let mut problems = Vec::new();
    for entry in std::fs::read_dir(repo().join("deploy")).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "sh") {
            scripts += 1;
            let text = std::fs::read_to_string(&path).expect("script");
            problems.extend(check_script(&path.display().to_string(), &text));
        }
    }
    assert!(scripts > 0, "deploy/ has its build script");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// No manifest escapes the check: every file under deploy/k8s is read by some build, or is a
/// secret template that no build reads.
#[test]
fn every_file_under_deploy_k8s_is_checked() {
    let mut read = BTreeSet::new();
    for (_, dirs) in builds() {
        for dir in dirs {
            kustomize(&dir, &mut read).expect("builds");
        }
    }
    let mut unread = Vec::new();
    let mut stack = vec![k8s()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let canonical = path.canonicalize().expect("path");
            let template = path.to_string_lossy().ends_with(".template.yaml");
            if template == read.contains(&canonical) {
                unread.push(path.display().to_string());
            }
        }
    }
    assert!(
        unread.is_empty(),
        "not checked (or a template that a build applies): {unread:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The checker fails when it should: each corruption of a copy is reported.

fn council_container(objects: &mut [Json]) -> &mut Json {
    objects
        .iter_mut()
        .filter(|o| o["kind"] == "Deployment" && name(o) == "council")
        .flat_map(|o| {
            o["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .expect("containers")
                .iter_mut()
        })
        .find(|c| c["name"] == "council")
        .expect("the council container")
}

fn council_deployment(objects: &mut [Json]) -> &mut Json {
    objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && name(o) == "council")
        .expect("the council Deployment")
}

fn object<'a>(objects: &'a mut [Json], kind: &str, n: &str) -> &'a mut Json {
    objects
        .iter_mut()
        .find(|o| o["kind"] == kind && name(o) == n)
        .unwrap_or_else(|| panic!("{kind} {n}"))
}

fn edit_config_map(objects: &mut [Json], cm: &str, key: &str, edit: impl Fn(&str) -> String) {
    let data = &mut object(objects, "ConfigMap", cm)["data"][key];
    let text = data.as_str().expect("text").to_owned();
    *data = json!(edit(&text));
}

type Mutation = (&'static str, &'static str, fn(&mut Vec<Json>));

/// Applies each mutation to a fresh copy of `build` and requires a mismatch containing its
/// needle; the unmutated copy must be clean.
fn each_is_reported(build_name: &str, mutations: &[Mutation]) {
    let secrets = secret_templates();
    let images = images();
    let clean = built(build_name);
    let found = check(&clean, &secrets, &images);
    assert!(found.is_empty(), "{build_name} is not clean: {found:#?}");
    for (what, needle, mutate) in mutations {
        let mut objects = clean.clone();
        mutate(&mut objects);
        let found = check(&objects, &secrets, &images);
        assert!(
            found.iter().any(|p| p.contains(needle)),
            "{what}: expected a mismatch containing {needle:?}, got {found:#?}"
        );
    }
}

#[test]
fn a_port_changed_in_one_place_is_reported() {
    each_is_reported(
        "overlays/cpu",
        &[
            ("readiness probe port", "readinessProbe port 50052", |o| {
                council_container(o)["readinessProbe"]["grpc"]["port"] = json!(50052);
            }),
            ("liveness probe port", "livenessProbe port", |o| {
                council_container(o)["livenessProbe"]["grpc"]["port"] = json!(8080);
            }),
            ("container port", "container ports", |o| {
                council_container(o)["ports"][0]["containerPort"] = json!(50052);
            }),
            ("Service target port", "Service council port grpc", |o| {
                object(o, "Service", "council")["spec"]["ports"][0]["targetPort"] = json!(50052);
            }),
            ("Service port", "Service council-headless port grpc", |o| {
                object(o, "Service", "council-headless")["spec"]["ports"][0]["port"] = json!(443);
            }),
            (
                "listen port by variable",
                "is not the code's default",
                |o| {
                    let env = council_container(o)["env"].as_array_mut().expect("env");
                    env.push(json!({"name": "COUNCIL_LISTEN", "value": "0.0.0.0:50052"}));
                },
            ),
            ("listen in the ConfigMap", "the file's value is dead", |o| {
                edit_config_map(o, "council-config", "council.toml", |t| {
                    t.replace("[server]\n", "[server]\nlisten = \"0.0.0.0:50051\"\n")
                });
            }),
            (
                "metrics port in the scrape annotation",
                "prometheus.io/port",
                |o| {
                    object(o, "Service", "council-metrics")["metadata"]["annotations"]["prometheus.io/port"] =
                        json!("9091");
                },
            ),
            ("metrics off", "metrics_listen is off", |o| {
                let env = council_container(o)["env"].as_array_mut().expect("env");
                env.push(json!({"name": "COUNCIL_METRICS_LISTEN", "value": "off"}));
            }),
            ("NATS client port", "nats.conf port 4223", |o| {
                edit_config_map(o, "nats-config", "nats.conf", |t| {
                    t.replace("port: 4222", "port: 4223")
                });
            }),
            ("NATS Service port", "nats.url", |o| {
                object(o, "Service", "nats")["spec"]["ports"][0]["port"] = json!(4223);
            }),
        ],
    );
}

#[test]
fn an_unknown_variable_or_config_key_is_reported() {
    each_is_reported(
        "base",
        &[
            (
                "unknown variable",
                "COUNCIL_LISTEN_PORT, which the code never reads",
                |o| {
                    let env = council_container(o)["env"].as_array_mut().expect("env");
                    env.push(json!({"name": "COUNCIL_LISTEN_PORT", "value": "50051"}));
                },
            ),
            ("unknown config key", "unknown field `port`", |o| {
                edit_config_map(o, "council-config", "council.toml", |t| {
                    t.replace("[server]\n", "[server]\nport = 50051\n")
                });
            }),
            ("invalid config value", "limits.max_concurrent", |o| {
                edit_config_map(o, "council-config", "council.toml", |t| {
                    t.replace("max_concurrent = 16", "max_concurrent = 0")
                });
            }),
            (
                "a Secret key that does not exist",
                "server.auth_token_file",
                |o| {
                    edit_config_map(o, "council-config", "council.toml", |t| {
                        t.replace("auth/token", "auth/bearer")
                    });
                },
            ),
            ("a Secret with no template", "has no template", |o| {
                council_deployment(o)["spec"]["template"]["spec"]["volumes"][1]["secret"]["secretName"] =
                    json!("council-token");
            }),
        ],
    );
}

#[test]
fn a_wrong_health_service_name_is_reported() {
    each_is_reported(
        "base",
        &[
            (
                "readiness on an unregistered name",
                "readinessProbe asks for health service \"council\"",
                |o| {
                    council_container(o)["readinessProbe"]["grpc"]["service"] = json!("council");
                },
            ),
            (
                "liveness on the readiness name",
                "livenessProbe asks for health service",
                |o| {
                    council_container(o)["livenessProbe"]["grpc"]["service"] =
                        json!("fleet.orchestrator.v1.OrchestratorService");
                },
            ),
            (
                "liveness on the overall name",
                "livenessProbe asks for health service \"\"",
                |o| {
                    council_container(o)["livenessProbe"]["grpc"]
                        .as_object_mut()
                        .expect("grpc")
                        .remove("service");
                },
            ),
            (
                "an HTTP startup probe",
                "startupProbe is not a native gRPC probe",
                |o| {
                    council_container(o)["startupProbe"] =
                        json!({"httpGet": {"path": "/healthz", "port": 9090}});
                },
            ),
        ],
    );
}

#[test]
fn a_stream_or_subject_other_than_the_codes_is_reported() {
    each_is_reported(
        "base",
        &[
            ("tasks stream", "dispatch.tasks_stream \"TASKS\"", |o| {
                edit_config_map(o, "council-config", "council.toml", |t| {
                    t.replace(
                        "tasks_stream = \"COUNCIL_TASKS\"",
                        "tasks_stream = \"TASKS\"",
                    )
                });
            }),
            ("completed subject", "dispatch.completed_subject", |o| {
                edit_config_map(o, "council-config", "council.toml", |t| {
                    t.replace(
                        "completed_subject = \"orchestration.deliberation.completed\"",
                        "completed_subject = \"orchestration.done\"",
                    )
                });
            }),
            ("a subject the code refuses", "dispatch.dlq_subject", |o| {
                edit_config_map(o, "council-config", "council.toml", |t| {
                    t.replace(
                        "dlq_subject = \"council.dlq.tasks\"",
                        "dlq_subject = \"council.tasks.dlq\"",
                    )
                });
            }),
        ],
    );
}

#[test]
fn an_unsafe_rollout_or_shutdown_is_reported() {
    each_is_reported(
        "base",
        &[
            (
                "short termination grace",
                "terminationGracePeriodSeconds 60",
                |o| {
                    council_deployment(o)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
                        json!(60);
                },
            ),
            (
                "grace shorter than a deliberation",
                "shorter than limits.max_timeout_secs",
                |o| {
                    edit_config_map(o, "council-config", "council.toml", |t| {
                        t.replace("max_timeout_secs = 600", "max_timeout_secs = 1200")
                    });
                },
            ),
            ("no preStop", "no preStop sleep", |o| {
                council_container(o)
                    .as_object_mut()
                    .expect("container")
                    .remove("lifecycle");
            }),
            ("maxUnavailable 1", "maxUnavailable 0", |o| {
                council_deployment(o)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] =
                    json!(1);
            }),
            (
                "no PodDisruptionBudget",
                "has no PodDisruptionBudget",
                |o| {
                    o.retain(|x| x["kind"] != "PodDisruptionBudget");
                },
            ),
            (
                "replicas on the file store",
                "store.kind must be nats",
                |o| {
                    edit_config_map(o, "council-config", "council.toml", |t| {
                        t.replace("kind = \"nats\"", "kind = \"file\"")
                    });
                },
            ),
            (
                "a Service selecting every pod of the app",
                "must select the pods of one workload",
                |o| {
                    let s = object(o, "Service", "council");
                    s["spec"]["selector"] = json!({"app.kubernetes.io/part-of": "council"});
                },
            ),
            ("no resource requests", "no memory request", |o| {
                council_container(o)["resources"] = json!({});
            }),
            (
                "a Secret applied with a placeholder",
                "a Secret is applied",
                |o| {
                    o.push(json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "council-auth", "namespace": "council"}}));
                },
            ),
        ],
    );
}

#[test]
fn a_gpu_mismatch_is_reported() {
    each_is_reported(
        "overlays/gpu",
        &[
            ("cuda off on the GPU", "model.cuda None", |o| {
                let env = council_container(o)["env"].as_array_mut().expect("env");
                env.retain(|e| e["name"] != "COUNCIL_CUDA");
            }),
            ("the CPU image on the GPU", "the CUDA image (false)", |o| {
                council_container(o)["image"] = json!("registry.example.com/council:0.1.0");
            }),
            ("no GPU requested", "nvidia.com/gpu limit None", |o| {
                council_container(o)["resources"]["limits"] = json!({"memory": "16Gi"});
            }),
        ],
    );
}

#[test]
fn a_vllm_mismatch_is_reported() {
    fn vllm(o: &mut [Json]) -> &mut Json {
        &mut object(o, "Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    }
    fn set_arg(o: &mut [Json], flag: &str, value: &str) {
        let args = vllm(o)["args"].as_array_mut().expect("args");
        let i = args.iter().position(|a| a == flag).expect("flag");
        args[i + 1] = json!(value);
    }
    each_is_reported(
        "overlays/vllm",
        &[
            ("vLLM port", "vllm serve --port", |o| {
                set_arg(o, "--port", "8001")
            }),
            ("vLLM model", "vllm serve --model", |o| {
                set_arg(o, "--model", "Qwen/Qwen3-0.6B");
            }),
            ("GPU fraction", "--gpu-memory-utilization", |o| {
                set_arg(o, "--gpu-memory-utilization", "1.5");
            }),
            ("the URL's port", "model.vllm_urls", |o| {
                let env = council_container(o)["env"].as_array_mut().expect("env");
                for e in env.iter_mut().filter(|e| e["name"] == "COUNCIL_VLLM_URL") {
                    e["value"] = json!("http://vllm.council.svc.cluster.local:8080");
                }
            }),
            ("another key", "vLLM requires the key", |o| {
                vllm(o)["env"][0]["valueFrom"]["secretKeyRef"]["name"] = json!("council-auth");
                vllm(o)["env"][0]["valueFrom"]["secretKeyRef"]["key"] = json!("token");
            }),
        ],
    );
}

#[test]
fn a_nats_mismatch_is_reported() {
    each_is_reported(
        "overlays/ha",
        &[
            (
                "more replicas than routes",
                "5 replicas need cluster routes",
                |o| {
                    object(o, "StatefulSet", "nats")["spec"]["replicas"] = json!(5);
                },
            ),
            (
                "JetStream off the volume",
                "not on a persistent volume claim",
                |o| {
                    edit_config_map(o, "nats-config", "nats.conf", |t| {
                        t.replace("/data/jetstream", "/tmp/jetstream")
                    });
                },
            ),
            (
                "a config nats-server refuses",
                "nats-server -t refuses",
                |o| {
                    edit_config_map(o, "nats-config", "nats.conf", |t| {
                        t.replace("$NATS_AUTH_TOKEN", "$NATS_TOKEN")
                    });
                },
            ),
            ("another token", "does not send that Secret's key", |o| {
                let c = &mut object(o, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"]
                    [0];
                c["env"][1]["valueFrom"]["secretKeyRef"] =
                    json!({"name": "council-auth", "key": "token"});
            }),
        ],
    );
}

#[test]
fn quiet_or_unsafe_images_and_scripts_are_reported() {
    let images = images();
    let corrupt = |from: &str, to: &str| Dockerfile {
        path: images.cpu.path.clone(),
        text: images.cpu.text.replace(from, to),
    };
    for (what, d, needle) in [
        (
            "cargo -q",
            corrupt("cargo build --release", "cargo build -q --release"),
            "(-q)",
        ),
        (
            "apt-get -qq",
            corrupt("apt-get update", "apt-get -qq update"),
            "(-qq)",
        ),
        (
            "|| true",
            corrupt(
                "rm -rf /var/lib/apt/lists/*",
                "rm -rf /var/lib/apt/lists/* || true",
            ),
            "|| true",
        ),
        (
            "root",
            corrupt("USER 10001:10001", "USER root"),
            "numeric non-root",
        ),
        (
            "another port",
            corrupt(
                "COUNCIL_LISTEN=0.0.0.0:50051",
                "COUNCIL_LISTEN=0.0.0.0:8080",
            ),
            "COUNCIL_LISTEN",
        ),
        (
            "an unknown variable",
            corrupt("COUNCIL_LOG_FORMAT=json", "COUNCIL_LOGS=json"),
            "COUNCIL_LOGS",
        ),
        (
            "no health check",
            corrupt("HEALTHCHECK", "# HEALTHCHECK"),
            "HEALTHCHECK",
        ),
        (
            "a health command the binary lacks",
            corrupt("\"council\", \"health\"", "\"council\", \"ping\""),
            "HEALTHCHECK",
        ),
    ] {
        let found = check_dockerfile(&d, false);
        assert!(
            found.iter().any(|p| p.contains(needle)),
            "{what}: expected {needle:?} in {found:#?}"
        );
    }
    let script = "#!/usr/bin/env bash\nset -euo pipefail\ndocker build -q .\n";
    assert!(
        check_script("s.sh", script)
            .iter()
            .any(|p| p.contains("(-q)"))
    );
    let script = "#!/usr/bin/env bash\ndocker build .\n";
    assert!(
        check_script("s.sh", script)
            .iter()
            .any(|p| p.contains("set -euo pipefail"))
    );
}

#[test]
fn the_small_kustomize_refuses_what_it_does_not_understand() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\ncommonLabels:\n  a: b\n",
    )
    .expect("write");
    let e = kustomize(dir.path(), &mut BTreeSet::new()).expect_err("refused");
    assert!(e.contains("commonLabels"), "{e}");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\npatches:\n  - target: {kind: Deployment}\n    patch: x\n",
    )
    .expect("write");
    let e = kustomize(dir.path(), &mut BTreeSet::new()).expect_err("refused");
    assert!(e.contains("only `patches: - path: FILE`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The health names the probes use, against the running service.

/// The engine, with a switch that makes it report itself unhealthy (a test double).
#[derive(Debug)]
struct Switchable {
    inner: EngineHandle,
    sick: Arc<AtomicBool>,
}

impl Backend for Switchable {
    fn generate(&self, request: GenerateRequest) -> BackendFuture {
        self.inner.generate(request)
    }
    fn score(&self, request: council_inference::ScoreRequest) -> council_inference::ScoreFuture {
        self.inner.score(request)
    }
    fn health(&self) -> Health {
        if self.sick.load(Ordering::SeqCst) {
            Health::Unavailable {
                reason: "switched off by the test".into(),
            }
        } else {
            self.inner.health()
        }
    }
    fn model_info(&self) -> &ModelInfo {
        self.inner.model_info()
    }
    fn load(&self) -> BackendLoad {
        self.inner.load()
    }
}

async fn wait_status(addr: SocketAddr, service: &str, want: ServingStatus) {
    for _ in 0..200 {
        if let Ok(s) = health::check(addr, service, Duration::from_secs(5)).await
            && s == want
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("health of {service:?} never became {want:?}");
}

/// `council health` as the image's HEALTHCHECK runs it, on its own thread (it makes its own
/// runtime).
async fn council_health(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let args = HealthArgs {
        addr: addr.to_string(),
        service: service.to_owned(),
        timeout_secs: 5,
    };
    tokio::task::spawn_blocking(move || health::run(args))
        .await
        .expect("joins")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_stays_serving_while_readiness_follows_the_backend() {
    let model = tiny_model(TinyArch::Qwen2);
    let data = tempfile::tempdir().expect("data dir");
    let store = FileStore::open(data.path()).expect("store");
    apply_default_councils(&store).await.expect("defaults");
    let sick = Arc::new(AtomicBool::new(false));
    let backend = Switchable {
        inner: engine(model.path(), EngineConfig::default()),
        sick: sick.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(
        listener,
        Arc::new(backend),
        Arc::new(store),
        Options::new(Limits::default()),
        async move {
            let _ = stopped.await;
        },
    ));

    for svc in READINESS_SERVICES {
        wait_status(addr, svc, ServingStatus::Serving).await;
    }
    let live = health::check(addr, LIVENESS_SERVICE, Duration::from_secs(5))
        .await
        .expect("liveness answers");
    assert_eq!(live, ServingStatus::Serving);
    council_health(addr, "").await.expect("ready: exit 0");
    council_health(addr, LIVENESS_SERVICE)
        .await
        .expect("alive: exit 0");

    // The model goes down: readiness follows, liveness does not (no restart for it).
    sick.store(true, Ordering::SeqCst);
    for svc in READINESS_SERVICES {
        wait_status(addr, svc, ServingStatus::NotServing).await;
    }
    let live = health::check(addr, LIVENESS_SERVICE, Duration::from_secs(5))
        .await
        .expect("liveness answers");
    assert_eq!(live, ServingStatus::Serving);
    let e = council_health(addr, "")
        .await
        .expect_err("not ready: exit 1");
    assert!(e.to_string().contains("NOT_SERVING"), "{e:#}");
    council_health(addr, LIVENESS_SERVICE)
        .await
        .expect("still alive: exit 0");

    // A name nobody registers is an error, never a pass.
    let e = council_health(addr, "council").await.expect_err("unknown");
    assert!(
        e.chain()
            .filter_map(|c| c.downcast_ref::<tonic::Status>())
            .any(|s| s.code() == tonic::Code::NotFound),
        "{e:#}"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), served)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean exit");
    let e = council_health(addr, "").await.expect_err("nothing listens");
    assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
}

#[test]
fn council_health_probes_this_host_when_bound_to_every_interface() {
    assert_eq!(
        health::probe_addr("0.0.0.0:50051").expect("parses"),
        "127.0.0.1:50051".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(
        health::probe_addr("[::]:50051").expect("parses"),
        "[::1]:50051".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(
        health::probe_addr("10.0.0.7:50051").expect("parses"),
        "10.0.0.7:50051".parse::<SocketAddr>().expect("addr")
    );
    assert!(health::probe_addr("localhost").is_err());
    // Without flags it asks the address `council serve` listens on by default.
    let cli = Cli::try_parse_from(["council", "health"]).expect("parses");
    let Command::Health(args) = cli.command else {
        panic!("health");
    };
    assert_eq!(args.addr, DEFAULT_LISTEN);
    assert_eq!(args.service, "");
}
