//! The decoder's configuration: `config.json` as Hugging Face writes it for Qwen2, Qwen2.5,
//! Qwen3 and the Llama family (Llama 2 / 3.x, SmolLM, Mistral without sliding windows); a GGUF
//! file's metadata is turned into the same [`Config`] by [`super::gguf`].

use std::path::Path;

use serde::Deserialize;

use crate::error::LoadError;

/// Which decoder variant a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Qwen2 and Qwen2.5: biased q/k/v projections, `head_dim = hidden / heads`.
    Qwen2,
    /// Qwen3: per-head RMS norms on q and k, explicit `head_dim`, usually no attention bias.
    Qwen3,
    /// Llama (and Mistral): no attention bias, no q/k norms; Llama 3.1+ scales its RoPE.
    Llama,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Llama => "llama",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    #[serde(default)]
    use_sliding_window: bool,
    /// Mistral's window; `null` in the checkpoints that attend to everything.
    sliding_window: Option<serde_json::Value>,
    #[serde(default)]
    mlp_bias: bool,
    layer_types: Option<Vec<String>>,
    eos_token_id: Option<serde_json::Value>,
}

/// A validated decoder configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled, if at all.
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// End-of-sequence ids named in `config.json` (more may come from `generation_config.json`).
    pub eos_token_ids: Vec<u32>,
}

/// How the rotary frequencies `1 / θ^(2i/d)` are changed for long contexts.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, the band between
    /// interpolated (`rope_type: "llama3"` in `config.json`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency, as a GGUF file's `rope_freqs.weight` stores them.
    Divisors(Vec<f32>),
}

impl RopeScaling {
    /// The scaled inverse frequencies, computed in f32 as transformers does.
    pub fn inv_freq(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        let base = theta as f32;
        let plain = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32));
        match self {
            RopeScaling::None => plain.collect(),
            RopeScaling::Divisors(d) => plain.zip(d).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, original) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Reads an `eos_token_id` that may be a number or a list of numbers.
pub(crate) fn token_id_list(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::reading(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, LoadError> {
        let malformed = |reason: String| LoadError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let unsupported = |reason: String| LoadError::Unsupported {
            path: path.to_owned(),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        let arch = match raw.model_type.as_deref() {
            Some("qwen2") => Arch::Qwen2,
            Some("qwen3") => Arch::Qwen3,
            Some("llama" | "mistral") => Arch::Llama,
            Some(other) => {
                return Err(LoadError::UnsupportedModelType {
                    model_type: other.to_owned(),
                    path: path.to_owned(),
                });
            }
            None => return Err(malformed("missing field `model_type`".into())),
        };
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act {act:?} (only silu)")));
        }
        if raw.use_sliding_window
            || raw
                .layer_types
                .iter()
                .flatten()
                .any(|t| t != "full_attention")
        {
            return Err(unsupported("sliding-window attention".into()));
        }
        if raw.mlp_bias {
            return Err(unsupported("mlp_bias".into()));
        }
        // Mistral v0.1 attends within a window; later checkpoints write `null`.
        if let Some(window) = raw.sliding_window.as_ref().and_then(|w| w.as_u64())
            && (raw.use_sliding_window || arch == Arch::Llama)
            && (window as usize) < raw.max_position_embeddings
        {
            return Err(unsupported(format!("sliding-window attention ({window})")));
        }
        let (rope_theta, rope_scaling) = rope(&raw).map_err(unsupported)?;
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = raw
            .head_dim
            .unwrap_or_else(|| raw.hidden_size / heads.max(1));
        let config = Config {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            eos_token_ids: token_id_list(raw.eos_token_id.as_ref()),
        };
        config.validate().map_err(malformed)?;
        Ok(config)
    }

    /// Checks the dimensions are usable: positive, heads a multiple of KV heads, an even head
    /// size for the rotary embedding, a positive norm epsilon.
    pub fn validate(&self) -> Result<(), String> {
        let (heads, kv_heads) = (self.num_attention_heads, self.num_key_value_heads);
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err("rms_norm_eps must be positive".into());
        }
        if let RopeScaling::Divisors(d) = &self.rope_scaling
            && (d.len() != self.head_dim / 2 || d.iter().any(|v| !(v.is_finite() && *v > 0.0)))
        {
            return Err(format!(
                "{} RoPE frequency divisors for head_dim {}, or one not positive",
                d.len(),
                self.head_dim
            ));
        }
        Ok(())
    }
}

/// The RoPE base, from the classic `rope_theta` or the newer `rope_parameters`, and its
/// scaling: none, or Llama 3's; other scaled variants are refused rather than run unscaled.
fn rope(raw: &RawConfig) -> Result<(f64, RopeScaling), String> {
    let kind = |v: &serde_json::Value| {
        v.get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
    };
    let number = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(|n| n.as_f64())
            .ok_or_else(|| format!("rope scaling {v} has no number `{key}`"))
    };
    let scaling = |v: &serde_json::Value| -> Result<RopeScaling, String> {
        match kind(v).as_deref() {
            None | Some("default") => Ok(RopeScaling::None),
            Some("llama3") => {
                let scaling = RopeScaling::Llama3 {
                    factor: number(v, "factor")?,
                    low_freq_factor: number(v, "low_freq_factor")?,
                    high_freq_factor: number(v, "high_freq_factor")?,
                    original_max_position_embeddings: number(
                        v,
                        "original_max_position_embeddings",
                    )?,
                };
                match &scaling {
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } if *factor > 0.0
                        && *low_freq_factor > 0.0
                        && high_freq_factor > low_freq_factor
                        && *original_max_position_embeddings > 0.0 =>
                    {
                        Ok(scaling)
                    }
                    _ => Err(format!("rope scaling {v}: factors out of range")),
                }
            }
            Some(_) => Err(format!("rope_scaling {v}")),
        }
    };
    let mut result = (raw.rope_theta.unwrap_or(10_000.0), RopeScaling::None);
    if let Some(v) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        result.1 = scaling(v)?;
    }
    if let Some(params) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        result.1 = scaling(params)?;
        if let Some(theta) = params.get("rope_theta").and_then(|t| t.as_f64()) {
            result.0 = theta;
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, LoadError> {
        Config::from_json(json, Path::new("config.json"))
    }

    const QWEN3: &str = r#"{"model_type":"qwen3","vocab_size":100,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":32,"max_position_embeddings":512,
        "rope_theta":1000000.0,"rms_norm_eps":1e-6,"eos_token_id":[5,6]}"#;

    #[test]
    fn qwen3_explicit_head_dim_and_eos_list() {
        let c = parse(QWEN3).expect("valid config");
        assert_eq!(c.arch, Arch::Qwen3);
        assert_eq!(c.head_dim, 32);
        assert!(!c.attention_bias);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert_eq!(c.rope_theta, 1_000_000.0);
    }

    #[test]
    fn unknown_model_type_is_a_typed_error() {
        let json = QWEN3.replace("\"qwen3\"", "\"gpt_neox\"");
        match parse(&json) {
            Err(LoadError::UnsupportedModelType { model_type, .. }) => {
                assert_eq!(model_type, "gpt_neox")
            }
            other => panic!("expected UnsupportedModelType, got {other:?}"),
        }
    }

    #[test]
    fn scaled_rope_and_sliding_window_are_refused() {
        let json = QWEN3.replace(
            "\"rope_theta\"",
            "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4.0},\"rope_theta\"",
        );
        assert!(matches!(parse(&json), Err(LoadError::Unsupported { .. })));
        let json = QWEN3.replace(
            "\"rope_theta\"",
            "\"use_sliding_window\":true,\"rope_theta\"",
        );
        assert!(matches!(parse(&json), Err(LoadError::Unsupported { .. })));
    }

    #[test]
    fn rope_parameters_form_is_read() {
        let json = QWEN3.replace(
            "\"rope_theta\":1000000.0",
            "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":5000.0}",
        );
        assert_eq!(parse(&json).expect("valid").rope_theta, 5000.0);
    }

    #[test]
    fn malformed_and_inconsistent_configs_are_typed_errors() {
        assert!(matches!(
            parse("{not json"),
            Err(LoadError::Malformed { .. })
        ));
        assert!(matches!(
            parse(r#"{"model_type":"qwen2"}"#),
            Err(LoadError::Malformed { .. })
        ));
        let json = QWEN3.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(matches!(parse(&json), Err(LoadError::Malformed { .. })));
    }

    const LLAMA3: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"max_position_embeddings":131072,"rope_theta":500000.0,
        "rms_norm_eps":1e-5,"tie_word_embeddings":true,"attention_bias":false,"mlp_bias":false,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;

    #[test]
    fn llama3_config_with_scaled_rope() {
        let c = parse(LLAMA3).expect("valid llama config");
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(c.head_dim, 16);
        assert!(!c.attention_bias);
        let RopeScaling::Llama3 { factor, .. } = c.rope_scaling else {
            panic!("expected llama3 scaling, got {:?}", c.rope_scaling);
        };
        assert_eq!(factor, 8.0);
        // The highest frequencies are kept, the lowest divided by the factor, and the band
        // between lies between the two.
        let plain = RopeScaling::None.inv_freq(c.rope_theta, c.head_dim);
        let scaled = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert_eq!(scaled[last], plain[last] / 8.0);
        for (s, p) in scaled.iter().zip(&plain) {
            assert!(*s <= *p && *s >= *p / 8.0, "{s} outside [{}, {p}]", p / 8.0);
        }
        assert!(
            scaled
                .iter()
                .zip(&plain)
                .any(|(s, p)| *s < *p && *s > *p / 8.0),
            "no frequency in the interpolated band: {scaled:?}"
        );
    }

    #[test]
    fn llama_variants_that_would_run_wrongly_are_refused() {
        for (from, to) in [
            ("\"mlp_bias\":false", "\"mlp_bias\":true"),
            ("\"rope_type\":\"llama3\"", "\"rope_type\":\"longrope\""),
            ("\"low_freq_factor\":1.0", "\"low_freq_factor\":9.0"),
        ] {
            let json = LLAMA3.replace(from, to);
            assert!(
                matches!(parse(&json), Err(LoadError::Unsupported { .. })),
                "{to} should be refused"
            );
        }
        let mistral = LLAMA3
            .replace("\"llama\"", "\"mistral\"")
            .replace("\"mlp_bias\":false", "\"sliding_window\":4096");
        assert!(matches!(
            parse(&mistral),
            Err(LoadError::Unsupported { .. })
        ));
        let mistral = mistral.replace("\"sliding_window\":4096", "\"sliding_window\":null");
        assert_eq!(
            parse(&mistral).expect("windowless mistral").arch,
            Arch::Llama
        );
    }

    #[test]
    fn divisors_divide_each_frequency() {
        let plain = RopeScaling::None.inv_freq(10_000.0, 8);
        let scaled = RopeScaling::Divisors(vec![1.0, 2.0, 4.0, 8.0]).inv_freq(10_000.0, 8);
        for (i, (s, p)) in scaled.iter().zip(&plain).enumerate() {
            assert_eq!(*s, p / [1.0, 2.0, 4.0, 8.0][i]);
        }
    }
}
