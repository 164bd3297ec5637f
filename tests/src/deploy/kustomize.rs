//! A small kustomize: what this layout uses (resources, patches from files,
//! `configMapGenerator`, `images`, `namespace`), everything else refused, never ignored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::manifests::{name, strings};

pub const KUSTOMIZATION_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "configMapGenerator",
    "images",
];

pub fn yaml_docs(path: &Path, read: &mut BTreeSet<PathBuf>) -> Result<Vec<Json>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    read.insert(path.canonicalize().map_err(|e| e.to_string())?);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = Json::deserialize(doc).map_err(|e| format!("{}: {e}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Resolves the kustomization in `dir` (recursively), recording every file it reads.
pub fn kustomize(dir: &Path, read: &mut BTreeSet<PathBuf>) -> Result<Vec<Json>, String> {
    let file = dir.join("kustomization.yaml");
    let k = yaml_docs(&file, read)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} is empty", file.display()))?;
    let map = k
        .as_object()
        .ok_or_else(|| format!("{} is not a map", file.display()))?;
    if let Some(key) = map
        .keys()
        .find(|k| !KUSTOMIZATION_KEYS.contains(&k.as_str()))
    {
        return Err(format!(
            "{}: `{key}` is not understood by tests/tests/deploy.rs; teach it there rather than leave it unchecked",
            file.display()
        ));
    }
    if k["kind"] != "Kustomization" {
        return Err(format!("{}: kind must be Kustomization", file.display()));
    }
    let mut objects = Vec::new();
    for r in strings(k.get("resources")) {
        let path = dir.join(&r);
        if path.is_dir() {
            objects.extend(kustomize(&path, read)?);
        } else {
            objects.extend(yaml_docs(&path, read)?);
        }
    }
    for g in k
        .get("configMapGenerator")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        generate_config_map(dir, g, &mut objects, read)?;
    }
    for p in k
        .get("patches")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let keys: Vec<&String> = p
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        let Some(path) = p
            .get("path")
            .and_then(Json::as_str)
            .filter(|_| keys.len() == 1)
        else {
            return Err(format!(
                "{}: only `patches: - path: FILE` (a strategic merge patch naming its target) is understood, not {p}",
                file.display()
            ));
        };
        for patch in yaml_docs(&dir.join(path), read)? {
            let targets: Vec<&mut Json> = objects
                .iter_mut()
                .filter(|o| o["kind"] == patch["kind"] && name(o) == name(&patch))
                .collect();
            let [target] = <[&mut Json; 1]>::try_from(targets).map_err(|t| {
                format!(
                    "{path}: the patch of {} {} matches {} objects",
                    patch["kind"],
                    name(&patch),
                    t.len()
                )
            })?;
            strategic_merge(target, &patch, "")?;
        }
    }
    for image in k
        .get("images")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        set_image(image, &mut objects)?;
    }
    if let Some(ns) = k.get("namespace").and_then(Json::as_str) {
        for o in &mut objects {
            if o["kind"] != "Namespace" {
                o["metadata"]["namespace"] = json!(ns);
            }
        }
    }
    Ok(objects)
}

pub fn generate_config_map(
    dir: &Path,
    g: &Json,
    objects: &mut Vec<Json>,
    read: &mut BTreeSet<PathBuf>,
) -> Result<(), String> {
    let allowed = ["name", "behavior", "files", "literals"];
    if let Some(key) = g
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
        .find(|k| !allowed.contains(&k.as_str()))
    {
        return Err(format!("configMapGenerator key `{key}` is not understood"));
    }
    let cm_name = g["name"]
        .as_str()
        .ok_or("configMapGenerator without name")?;
    let mut data = serde_json::Map::new();
    for f in strings(g.get("files")) {
        let (key, path) = f.split_once('=').unwrap_or_else(|| {
            let base = Path::new(&f).file_name().and_then(|n| n.to_str());
            (base.unwrap_or(&f), f.as_str())
        });
        let path = dir.join(path);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        read.insert(path.canonicalize().map_err(|e| e.to_string())?);
        data.insert(key.to_owned(), json!(text));
    }
    for l in strings(g.get("literals")) {
        let (k, v) = l.split_once('=').ok_or("a literal without =")?;
        data.insert(k.to_owned(), json!(v));
    }
    let existing = objects
        .iter()
        .position(|o| o["kind"] == "ConfigMap" && name(o) == cm_name);
    match (g["behavior"].as_str().unwrap_or("create"), existing) {
        ("create", None) => objects.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": cm_name}, "data": data,
        })),
        ("replace", Some(i)) => objects[i]["data"] = Json::Object(data),
        ("merge", Some(i)) => {
            for (k, v) in data {
                objects[i]["data"][k] = v;
            }
        }
        (behavior, existing) => {
            return Err(format!(
                "configMapGenerator {cm_name}: behavior {behavior} with{} an existing ConfigMap",
                if existing.is_some() { "" } else { "out" }
            ));
        }
    }
    Ok(())
}

/// The merge key of a list field, as Kubernetes' strategic merge patch has it.
pub fn merge_key(field: &str, item: &Json) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" if item.get("containerPort").is_some() => Some("containerPort"),
        "ports" => Some("port"),
        _ => None,
    }
}

pub fn strategic_merge(base: &mut Json, patch: &Json, field: &str) -> Result<(), String> {
    match (base, patch) {
        (Json::Object(b), Json::Object(p)) => {
            for (k, v) in p {
                if k.starts_with('$') {
                    return Err(format!("patch directive {k} is not understood"));
                }
                if v.is_null() {
                    b.remove(k);
                } else if let Some(bv) = b.get_mut(k) {
                    strategic_merge(bv, v, k)?;
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (Json::Array(b), Json::Array(p)) => {
            for item in p {
                match merge_key(field, item) {
                    Some(key) => {
                        let id = item.get(key).ok_or_else(|| {
                            format!("a patch item of {field} without its merge key {key}")
                        })?;
                        match b.iter_mut().find(|x| x.get(key) == Some(id)) {
                            Some(x) => strategic_merge(x, item, "")?,
                            None => b.push(item.clone()),
                        }
                    }
                    None => {
                        *b = p.clone();
                        break;
                    }
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
    Ok(())
}

/// `image` without its tag or digest.
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

pub fn set_image(rule: &Json, objects: &mut [Json]) -> Result<(), String> {
    let from = rule["name"]
        .as_str()
        .ok_or("images: an entry without name")?;
    for o in objects.iter_mut() {
        for list in ["containers", "initContainers"] {
            let Some(containers) = o
                .pointer_mut(&format!("/spec/template/spec/{list}"))
                .and_then(Json::as_array_mut)
            else {
                continue;
            };
            for c in containers {
                let Some(current) = c["image"].as_str() else {
                    continue;
                };
                if image_name(current) != from {
                    continue;
                }
                let mut image = rule["newName"].as_str().unwrap_or(from).to_owned();
                if let Some(tag) = rule["newTag"].as_str() {
                    image = format!("{image}:{tag}");
                }
                if let Some(digest) = rule["digest"].as_str() {
                    image = format!("{image}@{digest}");
                }
                c["image"] = json!(image);
            }
        }
    }
    Ok(())
}
