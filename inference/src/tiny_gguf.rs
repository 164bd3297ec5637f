//! Writes a Hugging Face–layout model (such as a generated tiny one) as a GGUF file, the way
//! llama.cpp's converter lays it out: its tensor names, Llama's q/k rows permuted for
//! interleaved RoPE, the weight matrices in a chosen type (norms and biases stay F32, and a
//! matrix whose rows are not whole blocks of the type stays F32, as llama.cpp falls back), the
//! configuration as `{arch}.*` metadata, and the tokenizer as `tokenizer.ggml.*` with the chat
//! template. Tests load the result against the directory it came from; `council dev
//! tiny-model --gguf TYPE` writes one for users.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::engine::config::{Arch, Config, RopeScaling};
use crate::engine::gguf::gguf_name;
use crate::tiny::TinyModelError;

fn err(reason: impl std::fmt::Display) -> TinyModelError {
    TinyModelError::Gguf(reason.to_string())
}

/// llama.cpp's permutation of a Llama q/k weight: HF row `h·d + t·d/2 + j` to `h·d + 2j + t`.
fn permute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let d = rows / heads;
    t.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The tokenizer of `tokenizer.json` as GGUF metadata: tokens by id, their types, merges.
fn tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, TinyModelError> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(err)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(err)?;
    let mut tokens = vec![None; vocab_size];
    let mut types = vec![5i32; vocab_size];
    let vocab = json["model"]["vocab"]
        .as_object()
        .ok_or_else(|| err("tokenizer.json has no BPE vocab"))?;
    let mut set = |id: u64, token: &str, kind: i32| {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(token.to_owned());
            types[id as usize] = kind;
        }
    };
    for (token, id) in vocab {
        set(id.as_u64().unwrap_or(u64::MAX), token, 1);
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let special = added["special"].as_bool().unwrap_or(false);
        set(
            added["id"].as_u64().unwrap_or(u64::MAX),
            added["content"].as_str().unwrap_or(""),
            if special { 3 } else { 4 },
        );
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::Array(pair) => Value::String(format!(
                "{} {}",
                pair.first().and_then(|v| v.as_str()).unwrap_or(""),
                pair.get(1).and_then(|v| v.as_str()).unwrap_or("")
            )),
            other => Value::String(other.as_str().unwrap_or("").to_owned()),
        })
        .collect();
    let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut meta = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        // The tiny tokenizer splits as Qwen2's does.
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let id_of = |token: &str| -> Option<u32> {
        json["added_tokens"]
            .as_array()?
            .iter()
            .find(|t| t["content"].as_str() == Some(token))?["id"]
            .as_u64()
            .map(|id| id as u32)
    };
    if let Some(eos) = config["eos_token"].as_str().and_then(id_of) {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(template) = config["chat_template"].as_str() {
        meta.push((
            "tokenizer.chat_template".into(),
            Value::String(template.to_owned()),
        ));
    }
    Ok(meta)
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    /// Tensors by their type in the file.
    pub types: BTreeMap<String, usize>,
}

/// Writes the model in `dir` (f32 safetensors in one file) to `out` as GGUF, the weight
/// matrices in `dtype` where their rows are whole blocks of it.
pub fn write_gguf(dir: &Path, out: &Path, dtype: GgmlDType) -> Result<GgufSummary, TinyModelError> {
    let config = Config::from_file(&dir.join("config.json")).map_err(err)?;
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).map_err(err)?;
    let arch = config.arch.as_str();
    let u = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("council tiny".into())),
        (
            format!("{arch}.context_length"),
            u(config.max_position_embeddings),
        ),
        (format!("{arch}.embedding_length"), u(config.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u(config.intermediate_size),
        ),
        (format!("{arch}.block_count"), u(config.num_hidden_layers)),
        (
            format!("{arch}.attention.head_count"),
            u(config.num_attention_heads),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u(config.num_key_value_heads),
        ),
        (format!("{arch}.attention.key_length"), u(config.head_dim)),
        (format!("{arch}.attention.value_length"), u(config.head_dim)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        ),
    ];
    meta.extend(tokenizer_metadata(dir, config.vocab_size)?);

    let mut out_tensors: Vec<(String, QTensor)> = Vec::new();
    if !matches!(config.rope_scaling, RopeScaling::None) {
        // llama.cpp stores scaled RoPE as one divisor per frequency.
        let plain = RopeScaling::None.inv_freq(config.rope_theta, config.head_dim);
        let scaled = config
            .rope_scaling
            .inv_freq(config.rope_theta, config.head_dim);
        let divisors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        let n = divisors.len();
        let t = Tensor::from_vec(divisors, n, &Device::Cpu).map_err(err)?;
        out_tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).map_err(err)?,
        ));
    }
    let mut types = BTreeMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let gguf = gguf_name(name).ok_or_else(|| err(format!("no GGUF name for {name}")))?;
        let mut t = tensors[name].clone();
        if config.arch == Arch::Llama {
            if name.ends_with("q_proj.weight") {
                t = permute(&t, config.num_attention_heads).map_err(err)?;
            } else if name.ends_with("k_proj.weight") {
                t = permute(&t, config.num_key_value_heads).map_err(err)?;
            }
        }
        let matrix = t.rank() == 2;
        let cols = t.dims().last().copied().unwrap_or(0);
        let ty = if matrix && cols.is_multiple_of(dtype.block_size()) {
            dtype
        } else {
            GgmlDType::F32
        };
        *types.entry(format!("{ty:?}")).or_insert(0) += 1;
        out_tensors.push((gguf, QTensor::quantize(&t, ty).map_err(err)?));
    }
    let mut file = std::fs::File::create(out).map_err(|source| TinyModelError::Io {
        path: out.to_owned(),
        source,
    })?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        out_tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut file, &meta_refs, &tensor_refs).map_err(err)?;
    Ok(GgufSummary { types })
}
