//! GGUF files (llama.cpp's format, what Ollama and LM Studio run): the decoder's configuration
//! from the metadata, the weights renamed to the checkpoint names the model takes, and the
//! tokenizer and chat template (built by [`vocab`]).
//!
//! Reading goes through candle's GGUF reader (v2 and v3), which bounds every length it reads by
//! the file's size, so a truncated or corrupt file is an error, never a panic or a huge
//! allocation. What each tensor becomes:
//!
//! - on the CPU, Q8_0 tensors stay Q8_0 (the projection kernel reads them; dequantizing is
//!   exact, so the logits are those of the file's weights); F32 stays; F16, BF16, Q4_0, Q4_1,
//!   Q4_K, Q5_K and Q6_K are dequantized to f32 (the kernel has no path for them): exact
//!   logits, at 4 bytes a weight. With `--quantize q8_0` they are requantized to Q8_0 instead
//!   (8.5 bits a weight; the logits then drift as `council dev quant-error` measures);
//! - on a GPU, everything is dequantized to bf16.
//!
//! llama.cpp stores a Llama model's `attn_q` / `attn_k` rows permuted for interleaved RoPE;
//! the loader puts them back in the Hugging Face order (rows are whole quantized blocks, so
//! this is a byte copy that keeps Q8_0 tensors exact), and the model applies half-split RoPE
//! as it does for safetensors checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub mod vocab;

use super::config::{Arch, Config, RopeScaling};
use super::model::{LoadedModel, QuantizedWeights, QwenModel};
use super::quant::{Quantization, quantize_weight};
use crate::error::LoadError;

/// A GGUF file's header, read and checked: metadata and where each tensor lies.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    content: Content,
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// ggml type ids that candle does not read, by llama.cpp's names, to name them in errors.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2",
        5 => "Q4_3",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The tensor types the engine loads.
fn supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q4K | Q5K | Q6K
    )
}

fn dtype_name(dtype: GgmlDType) -> String {
    use GgmlDType::*;
    match dtype {
        Q4K => "Q4_K".into(),
        Q5K => "Q5_K".into(),
        Q6K => "Q6_K".into(),
        Q2K => "Q2_K".into(),
        Q3K => "Q3_K".into(),
        Q8K => "Q8_K".into(),
        other => format!("{other:?}"),
    }
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path).map_err(|e| LoadError::reading(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            // candle may append a backtrace: the first line is the message.
            let full = e.to_string();
            let text = full.lines().next().unwrap_or_default().to_owned();
            // candle names an unknown type by its id only.
            if let Some(id) = text
                .strip_prefix("unknown dtype for tensor ")
                .and_then(|id| id.trim().parse::<u32>().ok())
            {
                return LoadError::UnsupportedTensorType {
                    tensor: "(a tensor)".into(),
                    dtype: ggml_type_name(id)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("ggml type {id}")),
                    path: path.to_owned(),
                };
            }
            LoadError::Malformed {
                path: path.to_owned(),
                reason: format!("not a readable GGUF file (truncated or corrupt?): {text}"),
            }
        })?;
        Ok(Self {
            path: path.to_owned(),
            content,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn malformed(&self, reason: String) -> LoadError {
        LoadError::Malformed {
            path: self.path.clone(),
            reason,
        }
    }

    /// A metadata string.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A metadata integer of any width; `Err` when present but not a non-negative integer.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, LoadError> {
        let value = match self.content.metadata.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match value {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| self.malformed(format!("{key} is {value:?}, not a count")))
    }

    fn required_uint(&self, key: &str) -> Result<usize, LoadError> {
        self.uint(key)?
            .map(|n| n as usize)
            .ok_or_else(|| self.malformed(format!("metadata {key} is missing")))
    }

    /// A metadata float (f32 or f64).
    fn float(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(f64::from(*v))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.malformed(format!("{key} is {other:?}, not a number"))),
        }
    }

    /// The decoder architecture named by `general.architecture`.
    pub fn arch(&self) -> Result<Arch, LoadError> {
        match self.string("general.architecture") {
            Some("llama") => Ok(Arch::Llama),
            Some("qwen2") => Ok(Arch::Qwen2),
            Some("qwen3") => Ok(Arch::Qwen3),
            Some(other) => Err(LoadError::UnsupportedArchitecture {
                arch: other.to_owned(),
                path: self.path.clone(),
            }),
            None => Err(self.malformed("metadata general.architecture is missing".into())),
        }
    }

    fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims())
    }

    /// The decoder configuration from the `{arch}.*` metadata and the tensors' shapes.
    pub fn config(&self) -> Result<Config, LoadError> {
        let arch = self.arch()?;
        let key = |k: &str| format!("{}.{k}", arch.as_str());
        let hidden = self.required_uint(&key("embedding_length"))?;
        let heads = self.required_uint(&key("attention.head_count"))?;
        let kv_heads = self
            .uint(&key("attention.head_count_kv"))?
            .map_or(heads, |n| n as usize);
        let head_dim = match self.uint(&key("attention.key_length"))? {
            Some(n) => n as usize,
            None => hidden / heads.max(1),
        };
        let vocab = match self.tensor_dims("token_embd.weight") {
            Some([vocab, width]) if *width == hidden => *vocab,
            Some(dims) => {
                return Err(self.malformed(format!(
                    "token_embd.weight has shape {dims:?}, expected [vocab, {hidden}]"
                )));
            }
            None => return Err(self.malformed("tensor token_embd.weight is missing".into())),
        };
        if let Some(scaling) = self.string(&key("rope.scaling.type"))
            && scaling != "none"
        {
            return Err(LoadError::Unsupported {
                path: self.path.clone(),
                reason: format!("RoPE scaling {scaling:?}"),
            });
        }
        let rope_scaling = match self.content.tensor_infos.get("rope_freqs.weight") {
            Some(_) => RopeScaling::Divisors(self.vector("rope_freqs.weight", head_dim / 2)?),
            None => RopeScaling::None,
        };
        let eps = self
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| {
                self.malformed(format!(
                    "metadata {} is missing",
                    key("attention.layer_norm_rms_epsilon")
                ))
            })?;
        let mut eos = Vec::new();
        for k in ["eos_token_id", "eot_token_id", "eom_token_id"] {
            if let Some(id) = self.uint(&format!("tokenizer.ggml.{k}"))? {
                eos.push(id as u32);
            }
        }
        let config = Config {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.required_uint(&key("feed_forward_length"))?,
            num_hidden_layers: self.required_uint(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.required_uint(&key("context_length"))?,
            rope_theta: self.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: eps,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            eos_token_ids: eos,
        };
        config
            .validate()
            .map_err(|reason| self.malformed(format!("metadata: {reason}")))?;
        Ok(config)
    }

    /// A 1-D f32 tensor of `len` values.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let mut reader = self.reader()?;
        let q = self.read_tensor(&mut reader, name)?;
        let t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.malformed(format!("tensor {name}: {e}")))?;
        if t.len() != len {
            return Err(self.malformed(format!("{name} has {} values, expected {len}", t.len())));
        }
        Ok(t)
    }

    fn reader(&self) -> Result<BufReader<std::fs::File>, LoadError> {
        std::fs::File::open(&self.path)
            .map(BufReader::new)
            .map_err(|source| LoadError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn read_tensor<R: Read + Seek>(
        &self,
        reader: &mut R,
        name: &str,
    ) -> Result<QTensor, LoadError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.malformed(format!("tensor {name} is missing")))?;
        if !supported(info.ggml_dtype) {
            return Err(LoadError::UnsupportedTensorType {
                tensor: name.to_owned(),
                dtype: dtype_name(info.ggml_dtype),
                path: self.path.clone(),
            });
        }
        info.read(reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| self.malformed(format!("tensor {name}: {e}")))
    }
}

/// Whole-model tensors: GGUF name, checkpoint name.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// A decoder layer's modules: GGUF name (`blk.N.{name}.weight`), checkpoint name
/// (`model.layers.N.{name}.weight`).
const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The checkpoint name of a GGUF tensor (`blk.3.attn_q.weight` → `model.layers.3.
/// self_attn.q_proj.weight`); `None` for tensors the model does not take.
pub fn checkpoint_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(g, _)| *g == gguf) {
        return Some((*hf).to_owned());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, module) = LAYER_MODULES.iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// The GGUF name of a checkpoint tensor: the inverse of [`checkpoint_name`].
pub fn gguf_name(checkpoint: &str) -> Option<String> {
    if let Some((g, _)) = MODEL_TENSORS.iter().find(|(_, hf)| *hf == checkpoint) {
        return Some((*g).to_owned());
    }
    let (layer, rest) = checkpoint.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (part, _) = LAYER_MODULES.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{part}.{suffix}"))
}

/// Puts the rows of a Llama `attn_q` / `attn_k` tensor back in Hugging Face order: llama.cpp's
/// converter moved row `h·d + t·d/2 + j` (head `h`, half `t`, pair `j`) to `h·d + 2j + t`.
/// Rows are copied as bytes, so a quantized tensor stays exactly what it was.
fn unpermute_rows(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        candle_core::bail!("{rows} rows cannot hold {heads} heads of even size");
    }
    let data = q.data()?;
    if !data.len().is_multiple_of(rows.max(1)) {
        candle_core::bail!("{} bytes are not {rows} rows", data.len());
    }
    let row_bytes = data.len() / rows;
    let d = rows / heads;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..d / 2 {
                let to = h * d + t * (d / 2) + j;
                let from = h * d + 2 * j + t;
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, q.dtype())?;
    QTensor::new(storage, dims)
}

/// What became of the file's tensors, for the load log line.
#[derive(Debug, Default)]
struct Conversions {
    /// (file type, what it became) → count.
    counts: BTreeMap<(String, &'static str), usize>,
    file_bytes: usize,
}

/// Loads the model of a GGUF file onto `device` in `dtype` (see the module header for what
/// each tensor type becomes).
pub fn load(
    gguf: &GgufFile,
    name: &str,
    device: &Device,
    dtype: DType,
    quantization: Quantization,
) -> Result<LoadedModel, LoadError> {
    let config = gguf.config()?;
    let tokenizer = vocab::chat_tokenizer(gguf, &config)?;
    if quantization != Quantization::None && !device.is_cpu() {
        return Err(LoadError::InvalidConfig {
            field: "quantization",
            reason: format!("{quantization} runs on the CPU engine only (GPUs run bf16)"),
        });
    }
    let quantizable: std::collections::BTreeSet<String> = QwenModel::quantizable_weights(&config)
        .into_iter()
        .collect();
    let mut infos: Vec<(&String, u64)> = gguf
        .content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name, info.offset))
        .collect();
    infos.sort_by_key(|(_, offset)| *offset);
    let mut reader = gguf.reader()?;
    let mut dense = HashMap::new();
    let mut quantized = QuantizedWeights::new();
    let mut conversions = Conversions::default();
    for (gguf_name, _) in infos {
        let Some(hf) = checkpoint_name(gguf_name) else {
            if gguf_name != "rope_freqs.weight" {
                tracing::warn!(tensor = %gguf_name, "GGUF tensor not used by the model");
            }
            continue;
        };
        let mut q = gguf.read_tensor(&mut reader, gguf_name)?;
        conversions.file_bytes += q.storage_size_in_bytes();
        let file_type = dtype_name(q.dtype());
        let bad = |e: candle_core::Error| gguf.malformed(format!("tensor {gguf_name}: {e}"));
        if config.arch == Arch::Llama && hf.ends_with(".weight") {
            if hf.ends_with("self_attn.q_proj.weight") {
                q = unpermute_rows(&q, config.num_attention_heads).map_err(bad)?;
            } else if hf.ends_with("self_attn.k_proj.weight") {
                q = unpermute_rows(&q, config.num_key_value_heads).map_err(bad)?;
            }
        }
        let kept = device.is_cpu() && quantizable.contains(&hf);
        let became = if kept && q.dtype() == GgmlDType::Q8_0 {
            quantized.insert(hf, Arc::new(q));
            "kept as Q8_0"
        } else {
            let t = q.dequantize(&Device::Cpu).map_err(bad)?;
            if kept && let Some(q8) = quantize_weight(&hf, &t, quantization)? {
                quantized.insert(hf, q8);
                "requantized to Q8_0"
            } else {
                let t = t
                    .to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .map_err(bad)?;
                dense.insert(hf, t);
                if q.dtype() == GgmlDType::F32 && dtype == DType::F32 {
                    "kept as F32"
                } else if dtype == DType::F32 {
                    "dequantized to f32"
                } else {
                    "dequantized to bf16"
                }
            }
        };
        *conversions.counts.entry((file_type, became)).or_default() += 1;
    }
    let vb = VarBuilder::from_tensors(dense, dtype, device);
    let model = QwenModel::with_quantized(&config, vb, &quantized, quantization)
        .map_err(|e| gguf.malformed(format!("tensors do not match the metadata: {e}")))?;
    let summary: Vec<String> = conversions
        .counts
        .iter()
        .map(|((from, to), n)| format!("{n} {from} {to}"))
        .collect();
    tracing::info!(
        path = %gguf.path.display(),
        arch = config.arch.as_str(),
        tensors = %summary.join(", "),
        file_mib = conversions.file_bytes >> 20,
        memory_mib = model.weight_bytes() >> 20,
        "GGUF model loaded"
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn gguf_names_map_to_checkpoint_names() {
        for (gguf, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.bias",
                "model.layers.12.self_attn.k_proj.bias",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.attn_k_norm.weight",
                "model.layers.3.self_attn.k_norm.weight",
            ),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
        ] {
            assert_eq!(checkpoint_name(gguf).as_deref(), Some(hf), "{gguf}");
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
        }
        for other in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.ffn_gate_exps.weight",
        ] {
            assert_eq!(checkpoint_name(other), None, "{other}");
        }
    }

    /// llama.cpp's permutation (HF → GGUF), written the way its converter does it, undone.
    #[test]
    fn unpermuting_inverts_llama_cpp_permutation() -> candle_core::Result<()> {
        let (heads, d, cols) = (3, 8, 32);
        let rows = heads * d;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // reshape(heads, 2, d/2, cols).swapaxes(1, 2): GGUF row h·d + 2j + t holds HF row
        // h·d + t·d/2 + j.
        let mut permuted = vec![0f32; rows * cols];
        for h in 0..heads {
            for j in 0..d / 2 {
                for t in 0..2 {
                    let (to, from) = (h * d + 2 * j + t, h * d + t * (d / 2) + j);
                    permuted[to * cols..(to + 1) * cols]
                        .copy_from_slice(&hf[from * cols..(from + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_vec(permuted, (rows, cols), &Device::Cpu)?;
        for dtype in [GgmlDType::F32, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&t, dtype)?;
            let back = unpermute_rows(&q, heads)?.dequantize(&Device::Cpu)?;
            let want = QTensor::quantize(
                &Tensor::from_vec(hf.clone(), (rows, cols), &Device::Cpu)?,
                dtype,
            )?
            .dequantize(&Device::Cpu)?;
            assert_eq!(
                back.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "{dtype:?}"
            );
        }
        Ok(())
    }
}
