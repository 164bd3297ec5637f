//! Finding and loading a model: a Hugging Face layout directory, a GGUF file (or a directory
//! holding one), or a hub repo (its safetensors, or one of its GGUF files) resolved through the
//! standard Hugging Face cache.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::{Config, token_id_list};
use super::gguf::{GgufFile, is_gguf};
pub use super::model::LoadedModel;
use super::model::{QuantizedWeights, QwenModel};
use super::quant::{Quantization, quantize_weight};
use super::tokenizer::{ChatTokenizer, TemplateSource};
use crate::error::LoadError;

/// Where the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn open(self) -> Result<Device, LoadError> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(ordinal) => {
                Device::new_cuda(ordinal).map_err(|e| LoadError::Device(e.to_string()))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(_) => Err(LoadError::CudaNotBuilt),
        }
    }
}

/// The files of one model, checked to exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face layout: `config.json`, safetensors, `tokenizer.json`.
    Hf(HfFiles),
    /// One GGUF file: weights, configuration, tokenizer and chat template in one.
    Gguf(PathBuf),
}

/// The files of a Hugging Face layout model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    /// `chat_template.jinja`, where newer checkpoints keep the template.
    pub chat_template: Option<PathBuf>,
}

impl ModelFiles {
    /// A model directory: a Hugging Face layout when it has `config.json`, else the one GGUF
    /// file it holds.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::MissingFile {
                path: dir.to_owned(),
            });
        }
        if dir.join("config.json").is_file() {
            return HfFiles::from_dir(dir).map(Self::Hf);
        }
        let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| LoadError::Io {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_gguf(p))
            .collect();
        ggufs.sort();
        match ggufs.len() {
            0 => Err(LoadError::MissingFile {
                path: dir.join("config.json"),
            }),
            1 => Ok(Self::Gguf(ggufs.remove(0))),
            _ => Err(LoadError::Malformed {
                path: dir.to_owned(),
                reason: format!(
                    "holds no config.json and {} GGUF files ({}); name one with --model-file",
                    ggufs.len(),
                    ggufs
                        .iter()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// A GGUF file, or a model directory.
    pub fn from_path(path: &Path) -> Result<Self, LoadError> {
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if !path.is_file() {
            return Err(LoadError::MissingFile {
                path: path.to_owned(),
            });
        }
        if !is_gguf(path) {
            return Err(LoadError::Malformed {
                path: path.to_owned(),
                reason: "a model file must be a .gguf file (or give the model's directory)".into(),
            });
        }
        Ok(Self::Gguf(path.to_owned()))
    }

    /// The file or directory the model was found at.
    pub fn location(&self) -> &Path {
        match self {
            Self::Hf(hf) => &hf.dir,
            Self::Gguf(path) => path,
        }
    }
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

fn required(dir: &Path, name: &str) -> Result<PathBuf, LoadError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LoadError::MissingFile { path })
    }
}

fn optional(dir: &Path, name: &str) -> Option<PathBuf> {
    Some(dir.join(name)).filter(|p| p.is_file())
}

fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Malformed {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The shard file names listed by a `model.safetensors.index.json`, sorted and deduplicated.
fn shard_names(index: &Path) -> Result<Vec<String>, LoadError> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::Malformed {
            path: index.to_owned(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| LoadError::Malformed {
            path: index.to_owned(),
            reason: format!("weight_map entry {tensor} is not a file name"),
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(LoadError::Malformed {
                path: index.to_owned(),
                reason: format!("shard name {file:?} is not a plain file name"),
            });
        }
        names.insert(file.to_owned());
    }
    if names.is_empty() {
        return Err(LoadError::Malformed {
            path: index.to_owned(),
            reason: "empty weight_map".into(),
        });
    }
    Ok(names.into_iter().collect())
}

impl HfFiles {
    /// Checks that `dir` holds a complete Hugging Face model (single or sharded safetensors).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::MissingFile {
                path: dir.to_owned(),
            });
        }
        let config = required(dir, "config.json")?;
        let tokenizer = required(dir, "tokenizer.json")?;
        let weights = match optional(dir, INDEX) {
            Some(index) => shard_names(&index)?
                .iter()
                .map(|name| required(dir, name))
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![required(dir, SINGLE)?],
        };
        Ok(Self {
            dir: dir.to_owned(),
            config,
            tokenizer,
            weights,
            tokenizer_config: optional(dir, "tokenizer_config.json"),
            generation_config: optional(dir, "generation_config.json"),
            chat_template: optional(dir, "chat_template.jinja"),
        })
    }
}

/// Loads `files` onto `device` in `dtype`.
pub fn load(
    files: &ModelFiles,
    name: &str,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel, LoadError> {
    load_as(files, name, device, dtype, Quantization::None)
}

/// Loads `files` onto `device` in `dtype`, the linear layers quantized as `quantization`
/// says (each weight quantized as it is read, so the unquantized model is never whole in
/// memory).
pub fn load_as(
    files: &ModelFiles,
    name: &str,
    device: &Device,
    dtype: DType,
    quantization: Quantization,
) -> Result<LoadedModel, LoadError> {
    match files {
        ModelFiles::Hf(hf) => load_hf(hf, name, device, dtype, quantization),
        ModelFiles::Gguf(path) => {
            super::gguf::load(&GgufFile::open(path)?, name, device, dtype, quantization)
        }
    }
}

/// A token as `tokenizer_config.json` writes it: a string, or an object with `content`.
fn token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The chat template of a Hugging Face model: `chat_template.jinja`, else `chat_template` in
/// `tokenizer_config.json` (a string, or a list of named templates of which `default` is
/// used).
fn hf_template(
    files: &HfFiles,
    tokenizer_config: Option<&serde_json::Value>,
) -> Result<TemplateSource, LoadError> {
    let template = match &files.chat_template {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| LoadError::Io {
                path: path.clone(),
                source,
            })?,
        ),
        None => match tokenizer_config.and_then(|c| c.get("chat_template")) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        },
    };
    Ok(TemplateSource {
        template,
        bos_token: token_text(tokenizer_config.and_then(|c| c.get("bos_token"))),
        eos_token: token_text(tokenizer_config.and_then(|c| c.get("eos_token"))),
    })
}

fn load_hf(
    files: &HfFiles,
    name: &str,
    device: &Device,
    dtype: DType,
    quantization: Quantization,
) -> Result<LoadedModel, LoadError> {
    let config = Config::from_file(&files.config)?;
    let mut eos: Vec<u32> = config.eos_token_ids.clone();
    if let Some(path) = &files.generation_config {
        eos.extend(token_id_list(read_json(path)?.get("eos_token_id")));
    }
    let tokenizer_config = files
        .tokenizer_config
        .as_deref()
        .map(read_json)
        .transpose()?;
    let template = hf_template(files, tokenizer_config.as_ref())?;
    let tokenizer = ChatTokenizer::from_file(
        &files.tokenizer,
        config.arch,
        config.vocab_size,
        eos,
        template,
    )?;

    if quantization != Quantization::None && !device.is_cpu() {
        return Err(LoadError::InvalidConfig {
            field: "quantization",
            reason: format!("{quantization} runs on the CPU engine only (GPUs run bf16)"),
        });
    }
    let mut tensors = Tensors {
        dense: HashMap::new(),
        quantized: HashMap::new(),
        quantize: match quantization {
            Quantization::None => BTreeSet::new(),
            _ => QwenModel::quantizable_weights(&config)
                .into_iter()
                .collect(),
        },
        quantization,
    };
    for path in &files.weights {
        read_safetensors(path, device, dtype, &mut tensors)?;
    }
    let vb = VarBuilder::from_tensors(tensors.dense, dtype, device);
    let model =
        QwenModel::with_quantized(&config, vb, &tensors.quantized, quantization).map_err(|e| {
            LoadError::Malformed {
                path: files.dir.clone(),
                reason: format!("weights do not match config.json: {e}"),
            }
        })?;
    Ok(LoadedModel {
        model,
        tokenizer,
        name: name.to_owned(),
    })
}

#[derive(serde::Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Headers larger than this are refused rather than allocated.
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// The tensors read so far.
struct Tensors {
    dense: HashMap<String, candle_core::Tensor>,
    quantized: QuantizedWeights,
    /// Names of the weights to quantize as they are read.
    quantize: BTreeSet<String>,
    quantization: Quantization,
}

/// Reads the tensors of one safetensors file into `out`, converted to `dtype` on `device` (or
/// quantized, those `out` names), one tensor at a time: peak memory is the weights plus the
/// largest tensor, not the weights plus the whole file.
fn read_safetensors(
    path: &Path,
    device: &Device,
    dtype: DType,
    out: &mut Tensors,
) -> Result<(), LoadError> {
    use std::io::{Read, Seek, SeekFrom};
    let malformed = |reason: String| LoadError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let io = |source: std::io::Error| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| malformed("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER || header_len + 8 > file_len {
        return Err(malformed(format!(
            "header length {header_len} does not fit a {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| malformed(format!("header is not a JSON object: {e}")))?;
    entries.remove("__metadata__");
    let mut entries = entries
        .into_iter()
        .map(|(name, value)| {
            serde_json::from_value::<TensorEntry>(value)
                .map(|entry| (name.clone(), entry))
                .map_err(|e| malformed(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|(_, e)| e.data_offsets.0);
    let data_start = 8 + header_len;
    let mut buffer = Vec::new();
    for (name, entry) in entries {
        let file_dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            other => {
                return Err(malformed(format!(
                    "tensor {name} has unsupported dtype {other}"
                )));
            }
        };
        let (start, end) = entry.data_offsets;
        let expected = entry.shape.iter().product::<usize>() * file_dtype.size_in_bytes();
        if end < start || end - start != expected || data_start + end as u64 > file_len {
            return Err(malformed(format!(
                "tensor {name}: offsets {start}..{end} do not hold shape {:?} of {}",
                entry.shape, entry.dtype
            )));
        }
        buffer.resize(end - start, 0);
        file.seek(SeekFrom::Start(data_start + start as u64))
            .map_err(io)?;
        file.read_exact(&mut buffer).map_err(io)?;
        let tensor =
            candle_core::Tensor::from_raw_buffer(&buffer, file_dtype, &entry.shape, device)
                .map_err(|e| malformed(format!("tensor {name}: {e}")))?;
        if out.quantize.contains(&name)
            && let Some(q) = quantize_weight(&name, &tensor, out.quantization)?
        {
            out.quantized.insert(name, q);
            continue;
        }
        let tensor = tensor
            .to_dtype(dtype)
            .map_err(|e| malformed(format!("tensor {name}: {e}")))?;
        out.dense.insert(name, tensor);
    }
    Ok(())
}

/// A hub model reference `ORG/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub owner: String,
    pub name: String,
    pub revision: Option<String>,
}

impl std::str::FromStr for HubModel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_owned())),
            Some(_) => return Err(format!("{s:?}: empty revision after '@'")),
            None => (s, None),
        };
        match repo.split_once('/') {
            Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    owner: owner.to_owned(),
                    name: name.to_owned(),
                    revision,
                })
            }
            _ => Err(format!("{s:?} is not of the form ORG/NAME[@REVISION]")),
        }
    }
}

impl std::fmt::Display for HubModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)?;
        if let Some(rev) = &self.revision {
            write!(f, "@{rev}")?;
        }
        Ok(())
    }
}

/// The Hugging Face cache directory, as `HF_HUB_CACHE` / `HF_HOME` / the default say.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let user_home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            user_home.join(".cache").join("huggingface")
        });
    home.join("hub")
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"))
}

/// Checks that `file` names a `.gguf` file inside a hub repo (relative, no `..`).
pub fn check_repo_gguf_name(file: &str) -> Result<(), String> {
    if file.is_empty()
        || file.starts_with('/')
        || file.split('/').any(|p| p == "..")
        || !is_gguf(Path::new(file))
    {
        return Err(format!("{file:?} is not a .gguf file name inside the repo"));
    }
    Ok(())
}

/// Resolves a hub model to a local snapshot directory: from the cache when every file is
/// there (no network), else by downloading into the cache. With `HF_HUB_OFFLINE=1` the
/// network is never used. With `gguf_file`, only that GGUF file of the repo is fetched.
pub async fn resolve_hub_model(
    model: &HubModel,
    gguf_file: Option<&str>,
) -> Result<ModelFiles, LoadError> {
    if let Some(file) = gguf_file {
        check_repo_gguf_name(file).map_err(|reason| LoadError::InvalidConfig {
            field: "gguf_file",
            reason,
        })?;
    }
    let cache = hub_cache_dir();
    let repo_name = model.to_string();
    let client = hf_hub::HFClient::builder()
        .cache_dir(cache.clone())
        .build()
        .map_err(|e| LoadError::Hub {
            repo: repo_name.clone(),
            reason: e.to_string(),
        })?;
    let repo = client.model(model.owner.clone(), model.name.clone());
    match fetch_all(&repo, model, gguf_file, true).await {
        Ok(files) => return Ok(files),
        Err(FetchError::Load(e)) => return Err(e),
        Err(FetchError::Hub(_)) if !hub_offline() => {}
        Err(FetchError::Hub(reason)) => {
            return Err(LoadError::HubUnavailable {
                repo: repo_name,
                cache,
                reason: format!("HF_HUB_OFFLINE is set and {reason}"),
            });
        }
    }
    fetch_all(&repo, model, gguf_file, false)
        .await
        .map_err(|e| match e {
            FetchError::Load(e) => e,
            FetchError::Hub(reason) => LoadError::HubUnavailable {
                repo: repo_name,
                cache,
                reason,
            },
        })
}

enum FetchError {
    Load(LoadError),
    Hub(String),
}

async fn fetch_all(
    repo: &hf_hub::HFRepository<hf_hub::RepoTypeModel>,
    model: &HubModel,
    gguf_file: Option<&str>,
    local_only: bool,
) -> Result<ModelFiles, FetchError> {
    let get = |filename: &str| {
        let request = repo
            .download_file()
            .filename(filename.to_owned())
            .maybe_revision(model.revision.clone())
            .local_files_only(local_only);
        async move { request.send().await }
    };
    if let Some(file) = gguf_file {
        let path = get(file)
            .await
            .map_err(|e| FetchError::Hub(e.to_string()))?;
        return Ok(ModelFiles::Gguf(path));
    }
    let config = get("config.json")
        .await
        .map_err(|e| FetchError::Hub(e.to_string()))?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    get("tokenizer.json")
        .await
        .map_err(|e| FetchError::Hub(e.to_string()))?;
    for optional in [
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        // Absent upstream is fine; a transport error is not.
        if let Err(e) = get(optional).await
            && !matches!(e, hf_hub::HFError::EntryNotFound { .. })
            && !(local_only && matches!(e, hf_hub::HFError::LocalEntryNotFound { .. }))
        {
            return Err(FetchError::Hub(e.to_string()));
        }
    }
    match get(INDEX).await {
        Ok(index) => {
            for shard in shard_names(&index).map_err(FetchError::Load)? {
                get(&shard)
                    .await
                    .map_err(|e| FetchError::Hub(e.to_string()))?;
            }
        }
        Err(hf_hub::HFError::EntryNotFound { .. })
        | Err(hf_hub::HFError::LocalEntryNotFound { .. }) => {
            get(SINGLE)
                .await
                .map_err(|e| FetchError::Hub(e.to_string()))?;
        }
        Err(e) => return Err(FetchError::Hub(e.to_string())),
    }
    HfFiles::from_dir(&dir)
        .map(ModelFiles::Hf)
        .map_err(FetchError::Load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_model_refs_parse_and_print() {
        let m: HubModel = "Qwen/Qwen2.5-0.5B-Instruct@main".parse().expect("valid");
        assert_eq!(m.owner, "Qwen");
        assert_eq!(m.name, "Qwen2.5-0.5B-Instruct");
        assert_eq!(m.revision.as_deref(), Some("main"));
        assert_eq!(m.to_string(), "Qwen/Qwen2.5-0.5B-Instruct@main");
        for bad in ["Qwen", "/x", "a/", "a/b/c", "a/b@"] {
            assert!(bad.parse::<HubModel>().is_err(), "{bad} should not parse");
        }
    }
}
