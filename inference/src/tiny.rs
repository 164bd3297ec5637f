//! Deterministic generator of complete Hugging Face–format Qwen model directories with random
//! weights: tiny ones for tests and offline trials, and real-shaped ones for benchmarks.
//!
//! Weights come from our own seeded PRNG (each tensor seeded from its name), so a directory is
//! byte-identical on every machine. The tokenizer is a byte-level BPE trained here on an
//! embedded corpus, with the ChatML special tokens; for tiny shapes the model's vocabulary is
//! exactly the tokenizer's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::BpeTrainerBuilder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::rng::Rng;

const CORPUS: &str = include_str!("tiny_corpus.txt");
/// The pre-tokenizer split Qwen2 and Qwen3 use: contractions, letter runs, single digits,
/// punctuation runs, newlines, whitespace.
const SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TINY_VOCAB: usize = 512;
const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const THINK: [&str; 2] = ["<think>", "</think>"];
/// ChatML templates in Jinja, for tools that render chat prompts from `tokenizer_config.json`.
/// Qwen3's opens the assistant turn with an empty think block when thinking is off.
const CHAT_TEMPLATE_QWEN2: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
const CHAT_TEMPLATE_QWEN3: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

/// Which decoder to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    Qwen2,
    Qwen3,
    /// Llama 3 style: no attention bias, no q/k norms, Llama 3.1's scaled RoPE.
    Llama,
}

impl std::str::FromStr for TinyArch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "llama" => Ok(Self::Llama),
            other => Err(format!("unknown arch {other:?} (qwen2, qwen3 or llama)")),
        }
    }
}

/// Dimensions of the generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyShape {
    /// A few hundred thousand parameters: fast enough for every test.
    Tiny,
    /// The dimensions of Qwen2.5-0.5B (qwen2 arch) or Qwen3-0.6B (qwen3 arch), for benchmarks.
    Small,
    /// Tiny, but every weight matrix has rows of a multiple of 256 columns, so that k-quants
    /// (Q4_K, Q5_K, Q6_K: blocks of 256) can hold them all.
    Wide,
}

impl std::str::FromStr for TinyShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" | "qwen2.5-0.5b" | "qwen3-0.6b" => Ok(Self::Small),
            "wide" => Ok(Self::Wide),
            other => Err(format!(
                "unknown shape {other:?} (tiny, wide = tiny with rows of 256 columns, or small = \
                 Qwen2.5-0.5B / Qwen3-0.6B dimensions)"
            )),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyModelSpec {
    pub arch: TinyArch,
    pub shape: TinyShape,
    pub seed: u64,
    /// Split the weights into shards of at most this many bytes (with an index file).
    pub shard_bytes: Option<usize>,
    /// Pad a tiny model's vocabulary to this many ids past the tokenizer's, as real checkpoints
    /// pad theirs (ids no token decodes to).
    pub padded_vocab: Option<usize>,
}

impl TinyModelSpec {
    pub fn new(arch: TinyArch) -> Self {
        Self {
            arch,
            shape: TinyShape::Tiny,
            seed: 0,
            shard_bytes: None,
            padded_vocab: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TinyModelError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("training the tokenizer: {0}")]
    Tokenizer(String),
    #[error("writing GGUF: {0}")]
    Gguf(String),
    #[error("writing safetensors {path}: {reason}")]
    Safetensors { path: PathBuf, reason: String },
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyModelSummary {
    pub dir: PathBuf,
    pub parameters: usize,
    pub vocab_size: usize,
    pub files: Vec<PathBuf>,
}

struct Dims {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_positions: usize,
    rope_theta: f64,
    tied: bool,
}

fn dims(spec: &TinyModelSpec, tokenizer_vocab: usize) -> Dims {
    // Tiny shapes use the generated tokenizer's vocabulary, padded as asked.
    let tiny_vocab = spec
        .padded_vocab
        .unwrap_or(tokenizer_vocab)
        .max(tokenizer_vocab);
    match (spec.shape, spec.arch) {
        (TinyShape::Tiny, TinyArch::Qwen2) => Dims {
            vocab: tiny_vocab,
            hidden: 64,
            intermediate: 160,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            max_positions: 8192,
            rope_theta: 10_000.0,
            tied: true,
        },
        (TinyShape::Tiny, TinyArch::Qwen3) => Dims {
            vocab: tiny_vocab,
            hidden: 64,
            intermediate: 160,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 24,
            max_positions: 8192,
            rope_theta: 1_000_000.0,
            tied: false,
        },
        (TinyShape::Tiny, TinyArch::Llama) => Dims {
            vocab: tiny_vocab,
            hidden: 64,
            intermediate: 160,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            max_positions: 8192,
            rope_theta: 500_000.0,
            tied: true,
        },
        (TinyShape::Wide, arch) => Dims {
            vocab: tiny_vocab,
            hidden: 256,
            intermediate: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            max_positions: 8192,
            rope_theta: if arch == TinyArch::Qwen2 {
                10_000.0
            } else {
                500_000.0
            },
            tied: arch != TinyArch::Qwen3,
        },
        // SmolLM2-135M's dimensions.
        (TinyShape::Small, TinyArch::Llama) => Dims {
            vocab: 49_152,
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            max_positions: 8192,
            rope_theta: 100_000.0,
            tied: true,
        },
        (TinyShape::Small, TinyArch::Qwen2) => Dims {
            vocab: 151_936,
            hidden: 896,
            intermediate: 4864,
            layers: 24,
            heads: 14,
            kv_heads: 2,
            head_dim: 64,
            max_positions: 32_768,
            rope_theta: 1_000_000.0,
            tied: true,
        },
        (TinyShape::Small, TinyArch::Qwen3) => Dims {
            vocab: 151_936,
            hidden: 1024,
            intermediate: 3072,
            layers: 28,
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            max_positions: 40_960,
            rope_theta: 1_000_000.0,
            tied: true,
        },
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TinyModelError + '_ {
    move |source| TinyModelError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TinyModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TinyModelError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

/// Trains the byte-level BPE tokenizer and returns it with the ChatML (and, for Qwen3, think)
/// tokens appended after the learned vocabulary.
pub fn train_tokenizer(arch: TinyArch) -> Result<Tokenizer, TinyModelError> {
    let err = |e: tokenizers::Error| TinyModelError::Tokenizer(e.to_string());
    let skeleton = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": SPLIT_PATTERN }, "behavior": "Isolated", "invert": false },
            { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false }
        ]},
        "post_processor": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false },
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false },
        "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                   "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                   "ignore_merges": false, "vocab": {}, "merges": [] }
    });
    let mut tokenizer: Tokenizer = skeleton.to_string().parse().map_err(err)?;
    let added = SPECIAL.len()
        + if arch == TinyArch::Qwen3 {
            THINK.len()
        } else {
            0
        };
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(TINY_VOCAB - added)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, CORPUS.lines()).map_err(err)?;
    let special: Vec<AddedToken> = SPECIAL.iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(special).map_err(err)?;
    if arch == TinyArch::Qwen3 {
        let think: Vec<AddedToken> = THINK.iter().map(|t| AddedToken::from(*t, false)).collect();
        tokenizer.add_tokens(think).map_err(err)?;
    }
    Ok(tokenizer)
}

/// The tensors of the model, by name, with their shapes and the scale of their init.
fn tensor_plan(arch: TinyArch, d: &Dims) -> Vec<(String, Vec<usize>, Init)> {
    let (h, q, kv) = (d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let proj = |fan_in: usize| Init::Normal((fan_in as f64).powf(-0.5));
    // Output projections write into the residual stream: larger, so that layers outweigh the
    // token's own embedding and greedy decoding does not just echo its input (tied embeddings).
    let out_proj = |fan_in: usize| Init::Normal(4.0 * (fan_in as f64).powf(-0.5));
    let mut plan = vec![
        (
            "model.embed_tokens.weight".to_owned(),
            vec![d.vocab, h],
            Init::Normal(0.5),
        ),
        ("model.norm.weight".to_owned(), vec![h], Init::NormWeight),
    ];
    if !d.tied {
        plan.push((
            "lm_head.weight".to_owned(),
            vec![d.vocab, h],
            Init::Normal(0.5),
        ));
    }
    for i in 0..d.layers {
        let p = |name: &str| format!("model.layers.{i}.{name}");
        plan.extend([
            (p("input_layernorm.weight"), vec![h], Init::NormWeight),
            (
                p("post_attention_layernorm.weight"),
                vec![h],
                Init::NormWeight,
            ),
            (p("self_attn.q_proj.weight"), vec![q, h], proj(h)),
            (p("self_attn.k_proj.weight"), vec![kv, h], proj(h)),
            (p("self_attn.v_proj.weight"), vec![kv, h], proj(h)),
            (p("self_attn.o_proj.weight"), vec![h, q], out_proj(q)),
            (p("mlp.gate_proj.weight"), vec![d.intermediate, h], proj(h)),
            (p("mlp.up_proj.weight"), vec![d.intermediate, h], proj(h)),
            (
                p("mlp.down_proj.weight"),
                vec![h, d.intermediate],
                out_proj(d.intermediate),
            ),
        ]);
        match arch {
            TinyArch::Qwen2 => plan.extend([
                (p("self_attn.q_proj.bias"), vec![q], Init::Normal(0.1)),
                (p("self_attn.k_proj.bias"), vec![kv], Init::Normal(0.1)),
                (p("self_attn.v_proj.bias"), vec![kv], Init::Normal(0.1)),
            ]),
            TinyArch::Llama => {}
            TinyArch::Qwen3 => plan.extend([
                (
                    p("self_attn.q_norm.weight"),
                    vec![d.head_dim],
                    Init::NormWeight,
                ),
                (
                    p("self_attn.k_norm.weight"),
                    vec![d.head_dim],
                    Init::NormWeight,
                ),
            ]),
        }
    }
    plan.sort_by(|a, b| a.0.cmp(&b.0));
    plan
}

#[derive(Debug, Clone, Copy)]
enum Init {
    Normal(f64),
    /// Around one, as trained norm weights are.
    NormWeight,
}

/// FNV-1a of the name, so a tensor's values depend on its name and the seed only.
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn tensor_bytes(seed: u64, name: &str, len: usize, init: Init) -> Vec<u8> {
    let mut rng = Rng::new(name_seed(seed, name));
    let mut bytes = Vec::with_capacity(len * 4);
    for _ in 0..len {
        let value = match init {
            Init::Normal(std) => rng.next_normal() * std,
            Init::NormWeight => 1.0 + 0.1 * rng.next_normal(),
        } as f32;
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Scale by which [`quiet_non_text_rows`] shrinks a row.
const NON_TEXT_SCALE: f32 = 0.1;

/// Shrinks the embedding (and output) rows of the tokenizer's ids that do not decode to text on
/// their own: control tokens and the byte tokens that are only part of a UTF-8 character. A
/// random real-shaped model otherwise tends to repeat one of them, so its replies decode to
/// nothing, and a whole deliberation cannot run on it; trained models rarely emit them. Rows
/// past the tokenizer (padding) are left alone: the engine never samples them.
fn quiet_non_text_rows(data: &mut [u8], hidden: usize, tokenizer: &Tokenizer) {
    let row_bytes = hidden * 4;
    for id in 0..tokenizer.get_vocab_size(true) {
        let id = id as u32;
        let text = tokenizer.decode(&[id], true).unwrap_or_default();
        if !text.trim().is_empty() && !text.contains('\u{FFFD}') {
            continue;
        }
        let start = id as usize * row_bytes;
        let Some(row) = data.get_mut(start..start + row_bytes) else {
            continue;
        };
        for value in row.chunks_exact_mut(4) {
            let v = f32::from_le_bytes([value[0], value[1], value[2], value[3]]) * NON_TEXT_SCALE;
            value.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// A tensor ready to write: name, shape, little-endian f32 bytes.
type NamedTensor = (String, Vec<usize>, Vec<u8>);

fn write_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<(), TinyModelError> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TinyModelError::Safetensors {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let metadata = Some(
        [("format".to_owned(), "pt".to_owned())]
            .into_iter()
            .collect(),
    );
    safetensors::tensor::serialize_to_file(views, metadata, path).map_err(|e| {
        TinyModelError::Safetensors {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    })
}

/// Writes a complete model directory into `dir` (created if needed).
pub fn write_tiny_model(
    dir: &Path,
    spec: &TinyModelSpec,
) -> Result<TinyModelSummary, TinyModelError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tokenizer = train_tokenizer(spec.arch)?;
    let tokenizer_vocab = tokenizer.get_vocab_size(true);
    let d = dims(spec, tokenizer_vocab);
    let id = |t: &str| tokenizer.token_to_id(t);
    let (eot, im_end) = (id(SPECIAL[0]), id(SPECIAL[2]));
    let mut files = Vec::new();

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| TinyModelError::Tokenizer(e.to_string()))?;
    std::fs::write(&tokenizer_path, tokenizer_json + "\n").map_err(io_err(&tokenizer_path))?;
    files.push(tokenizer_path);

    let (model_type, architecture) = match spec.arch {
        TinyArch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        TinyArch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        TinyArch::Llama => ("llama", "LlamaForCausalLM"),
    };
    let mut config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "max_position_embeddings": d.max_positions,
        "max_window_layers": d.layers,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": d.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": d.tied,
        "use_sliding_window": false,
        "sliding_window": null,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": "float32",
        "bos_token_id": eot,
        "eos_token_id": eot,
    });
    if spec.arch == TinyArch::Qwen3 {
        config["head_dim"] = json!(d.head_dim);
        config["attention_bias"] = json!(false);
    }
    if spec.arch == TinyArch::Llama {
        config["attention_bias"] = json!(false);
        config["mlp_bias"] = json!(false);
        config["head_dim"] = json!(d.head_dim);
        // Llama 3.1's scaling, with a short original context so the tiny model's frequencies
        // fall in all three bands.
        config["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        });
        if let Some(c) = config.as_object_mut() {
            for key in ["use_sliding_window", "sliding_window", "max_window_layers"] {
                c.remove(key);
            }
        }
    }
    let named: Vec<(&str, serde_json::Value)> = vec![
        ("config.json", config),
        (
            "generation_config.json",
            json!({
                "bos_token_id": eot,
                "eos_token_id": [im_end, eot],
                "do_sample": false,
            }),
        ),
        (
            "tokenizer_config.json",
            json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": d.max_positions,
                "eos_token": SPECIAL[2],
                "pad_token": SPECIAL[0],
                "bos_token": null,
                "unk_token": null,
                "clean_up_tokenization_spaces": false,
                "chat_template": match spec.arch {
                    TinyArch::Qwen2 | TinyArch::Llama => CHAT_TEMPLATE_QWEN2,
                    TinyArch::Qwen3 => CHAT_TEMPLATE_QWEN3,
                },
            }),
        ),
    ];
    for (name, value) in named {
        let path = dir.join(name);
        write_json(&path, &value)?;
        files.push(path);
    }

    let plan = tensor_plan(spec.arch, &d);
    let parameters = plan
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum();
    let mut shards: Vec<Vec<NamedTensor>> = vec![Vec::new()];
    let mut shard_size = 0;
    for (name, shape, init) in plan {
        let len: usize = shape.iter().product();
        let bytes = len * 4;
        if let Some(limit) = spec.shard_bytes
            && shard_size > 0
            && shard_size + bytes > limit
        {
            shards.push(Vec::new());
            shard_size = 0;
        }
        shard_size += bytes;
        let mut data = tensor_bytes(spec.seed, &name, len, init);
        if spec.shape == TinyShape::Small
            && (name == "model.embed_tokens.weight" || name == "lm_head.weight")
        {
            quiet_non_text_rows(&mut data, d.hidden, &tokenizer);
        }
        if let Some(shard) = shards.last_mut() {
            shard.push((name, shape, data));
        }
    }
    if spec.shard_bytes.is_none() {
        let path = dir.join("model.safetensors");
        write_safetensors(&path, &shards[0])?;
        files.push(path);
    } else {
        let count = shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            let path = dir.join(&file);
            write_safetensors(&path, shard)?;
            for (name, _, _) in shard {
                weight_map.insert(name.clone(), file.clone());
            }
            files.push(path);
        }
        let index = dir.join("model.safetensors.index.json");
        write_json(
            &index,
            &json!({ "metadata": { "total_size": parameters * 4 }, "weight_map": weight_map }),
        )?;
        files.push(index);
    }
    Ok(TinyModelSummary {
        dir: dir.to_owned(),
        parameters,
        vocab_size: d.vocab,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_training_is_deterministic_and_fills_the_vocabulary() {
        let a = train_tokenizer(TinyArch::Qwen3).expect("trains");
        let b = train_tokenizer(TinyArch::Qwen3).expect("trains");
        assert_eq!(a.to_string(false).ok(), b.to_string(false).ok());
        assert_eq!(a.get_vocab_size(true), TINY_VOCAB);
        let ids = a
            .encode("The council met at dawn.", false)
            .expect("encodes");
        assert!(
            ids.get_ids().len() < "The council met at dawn.".len(),
            "BPE learned no merges"
        );
        assert_eq!(
            a.decode(ids.get_ids(), true).expect("decodes"),
            "The council met at dawn."
        );
    }

    #[test]
    fn rows_of_tokens_that_are_not_text_are_quieted() {
        let tokenizer = train_tokenizer(TinyArch::Qwen2).expect("trains");
        let vocab = tokenizer.get_vocab_size(true);
        let hidden = 4;
        // One padding row past the tokenizer.
        let original = tensor_bytes(7, "e", (vocab + 1) * hidden, Init::Normal(1.0));
        let mut data = original.clone();
        quiet_non_text_rows(&mut data, hidden, &tokenizer);
        let row = |bytes: &[u8], id: usize| -> Vec<f32> {
            bytes[id * hidden * 4..(id + 1) * hidden * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        let id = |t: &str| tokenizer.token_to_id(t).expect("in the vocabulary") as usize;
        let word = tokenizer
            .encode("council", false)
            .expect("encodes")
            .get_ids()[0] as usize;
        assert_eq!(row(&data, word), row(&original, word), "a word is text");
        for quiet in SPECIAL.map(id) {
            let scaled: Vec<f32> = row(&original, quiet)
                .iter()
                .map(|v| v * NON_TEXT_SCALE)
                .collect();
            assert_eq!(row(&data, quiet), scaled, "control token {quiet}");
        }
        assert_eq!(row(&data, vocab), row(&original, vocab), "padding row");
        let changed = (0..vocab)
            .filter(|&i| row(&data, i) != row(&original, i))
            .count();
        assert!(
            changed > 3 && changed < vocab / 2,
            "{changed} of {vocab} rows quieted"
        );
    }

    #[test]
    fn weights_depend_on_name_and_seed_only() {
        let a = tensor_bytes(1, "x", 8, Init::Normal(1.0));
        assert_eq!(a, tensor_bytes(1, "x", 8, Init::Normal(1.0)));
        assert_ne!(a, tensor_bytes(2, "x", 8, Init::Normal(1.0)));
        assert_ne!(a, tensor_bytes(1, "y", 8, Init::Normal(1.0)));
    }
}
