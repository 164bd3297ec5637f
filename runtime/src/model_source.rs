//! Which model to run, as the command line names it, and how to open an engine on it.

use std::path::PathBuf;

use anyhow::Context;
use council_inference::engine::loader::{self, DeviceChoice, HubModel, ModelFiles};
use council_inference::{Engine, EngineConfig, EngineHandle};

/// The model served when none is named.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-0.5B-Instruct";

/// Model selection flags shared by every command that runs a model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A local Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub model_dir: Option<PathBuf>,
    /// A hub model ORG/NAME[@REVISION], resolved through the Hugging Face cache.
    #[arg(long, value_name = "ORG/NAME[@REV]", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Run on a CUDA GPU with this ordinal (needs a build with `--features cuda`).
    #[arg(long, value_name = "ORDINAL")]
    pub cuda: Option<usize>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Tokens one sequence may hold (prompt plus generation).
    #[arg(long, default_value_t = 4096)]
    pub max_seq_len: usize,
}

impl ModelArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch,
            max_seq_len: self.max_seq_len,
            device: self.cuda.map_or(DeviceChoice::Cpu, DeviceChoice::Cuda),
            ..EngineConfig::default()
        }
    }

    /// Finds the model files (from the hub cache or the hub when no directory is given).
    pub fn resolve(&self) -> anyhow::Result<(ModelFiles, String)> {
        if let Some(dir) = &self.model_dir {
            return Ok((ModelFiles::from_dir(dir)?, dir.display().to_string()));
        }
        let hub: HubModel = self
            .model
            .parse()
            .map_err(anyhow::Error::msg)
            .context("--model")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let files = runtime.block_on(loader::resolve_hub_model(&hub))?;
        Ok((files, hub.to_string()))
    }

    /// Resolves, loads and starts an engine.
    pub fn start_engine(&self) -> anyhow::Result<EngineHandle> {
        let (files, name) = self.resolve()?;
        Ok(Engine::load(&files, &name, self.engine_config())?)
    }
}
