//! The model's `config.json` as Hugging Face writes it for Qwen2, Qwen2.5 and Qwen3.

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
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
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
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// End-of-sequence ids named in `config.json` (more may come from `generation_config.json`).
    pub eos_token_ids: Vec<u32>,
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
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::MissingFile {
                path: path.to_owned(),
            },
            _ => LoadError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
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
        let rope_theta = rope_theta(&raw).map_err(unsupported)?;
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = raw
            .head_dim
            .unwrap_or_else(|| raw.hidden_size / heads.max(1));
        for (name, value) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("head_dim", head_dim),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(malformed(format!("{name} must be positive")));
            }
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(malformed(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(malformed(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }
        if raw.rms_norm_eps.is_nan() || raw.rms_norm_eps <= 0.0 {
            return Err(malformed("rms_norm_eps must be positive".into()));
        }
        Ok(Config {
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
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            eos_token_ids: token_id_list(raw.eos_token_id.as_ref()),
        })
    }
}

/// The RoPE base, from the classic `rope_theta` or the newer `rope_parameters`; scaled RoPE
/// variants are refused rather than silently run unscaled.
fn rope_theta(raw: &RawConfig) -> Result<f64, String> {
    let default_type = |v: &serde_json::Value| {
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str());
        matches!(kind, None | Some("default"))
    };
    if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null())
        && !default_type(scaling)
    {
        return Err(format!("rope_scaling {scaling}"));
    }
    if let Some(params) = raw.rope_parameters.as_ref().filter(|v| !v.is_null()) {
        if !default_type(params) {
            return Err(format!("rope_parameters {params}"));
        }
        if let Some(theta) = params.get("rope_theta").and_then(|t| t.as_f64()) {
            return Ok(theta);
        }
    }
    Ok(raw.rope_theta.unwrap_or(10_000.0))
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
        let json = QWEN3.replace("\"qwen3\"", "\"llama\"");
        match parse(&json) {
            Err(LoadError::UnsupportedModelType { model_type, .. }) => {
                assert_eq!(model_type, "llama")
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
}
