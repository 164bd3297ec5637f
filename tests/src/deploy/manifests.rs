//! Reading resolved manifests: names, kinds, workloads, pods, containers, ports, flags, and the
//! Service a host name reaches.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

pub fn name(o: &Json) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

pub fn id(o: &Json) -> String {
    format!("{} {}", o["kind"].as_str().unwrap_or("?"), name(o))
}

pub fn of_kind<'a>(objects: &'a [Json], kind: &'a str) -> impl Iterator<Item = &'a Json> {
    objects.iter().filter(move |o| o["kind"] == kind)
}

pub const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"];

pub fn workloads(objects: &[Json]) -> impl Iterator<Item = &Json> {
    objects
        .iter()
        .filter(|o| WORKLOADS.iter().any(|k| o["kind"] == *k))
}

pub fn pod_spec(w: &Json) -> &Json {
    &w["spec"]["template"]["spec"]
}

pub fn pod_labels(w: &Json) -> BTreeMap<String, String> {
    labels(&w["spec"]["template"]["metadata"]["labels"])
}

pub fn labels(v: &Json) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn containers(w: &Json) -> &[Json] {
    pod_spec(w)["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

pub fn as_u64(v: &Json) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// The number a port reference (a number or a port name) stands for in `container`.
pub fn resolve_port(container: &Json, port: &Json) -> Option<u64> {
    match port {
        Json::String(n) => container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == n.as_str())
            .and_then(|p| as_u64(&p["containerPort"])),
        other => as_u64(other),
    }
}

pub fn container_port(container: &Json, port_name: &str) -> Option<u64> {
    resolve_port(container, &json!(port_name))
}

/// A container's `--flag value` (or `--flag=value`) from its command and args.
pub fn flag(container: &Json, flag: &str) -> Option<String> {
    let argv: Vec<String> = strings(container.get("command"))
        .into_iter()
        .chain(strings(container.get("args")))
        .collect();
    let eq = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            argv.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

/// The Service that `host` names (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`).
pub fn service_for_host<'a>(objects: &'a [Json], host: &str) -> Option<&'a Json> {
    of_kind(objects, "Service").find(|s| {
        let n = name(s);
        let ns = s["metadata"]["namespace"].as_str().unwrap_or("");
        [
            n.to_owned(),
            format!("{n}.{ns}"),
            format!("{n}.{ns}.svc"),
            format!("{n}.{ns}.svc.cluster.local"),
        ]
        .contains(&host.to_owned())
    })
}

/// What `service`'s port `port` reaches: the workload and container behind it, and the
/// container port, or why not.
pub fn follow_service<'a>(
    objects: &'a [Json],
    service: &Json,
    port: u64,
) -> Result<(&'a Json, &'a Json, u64), String> {
    let sp = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| as_u64(&p["port"]) == Some(port))
        .ok_or_else(|| format!("{} has no port {port}", id(service)))?;
    let selector = labels(&service["spec"]["selector"]);
    let w = workloads(objects)
        .find(|w| selects(&selector, &pod_labels(w)))
        .ok_or_else(|| format!("{} selects no pods", id(service)))?;
    let target = sp.get("targetPort").unwrap_or(&sp["port"]);
    for c in containers(w) {
        if let Some(p) = resolve_port(c, target)
            && c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|cp| as_u64(&cp["containerPort"]) == Some(p))
        {
            return Ok((w, c, p));
        }
    }
    Err(format!(
        "{} port {port} targets {target}, which no container of {} exposes",
        id(service),
        id(w)
    ))
}

/// `scheme://host:port[/...]` → (host, port).
pub fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), default_port)),
    }
}

/// The strings of a JSON array (`[]` for anything else).
pub fn strings(v: Option<&Json>) -> Vec<String> {
    v.and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
