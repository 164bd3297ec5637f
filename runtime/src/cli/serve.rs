//! `council serve`: read the config (file, environment, flags), open the council store, apply
//! the default councils, load the engine, serve gRPC (and metrics) until SIGTERM or Ctrl-C,
//! then drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::server::{self, Options};
use crate::config::{RawConfig, ServeConfig, StoreChoice};
use crate::dispatch::Prepared;
use crate::store::{CouncilStore, FileStore, KvStore, apply_default_councils};

/// Flags of `council serve`: the config file, then every setting of [`RawConfig`] (each also
/// reads its environment variable; both override the file, whose keys are named in brackets).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// A TOML config file (sections model, server, limits, councils, store, nats, dispatch).
    #[arg(long, env = "COUNCIL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: RawConfig,
}

impl ServeArgs {
    /// File, then environment and flags over it, validated.
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        let base = match &self.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        Ok(base.overlay(self.settings.clone()).validate()?)
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
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("server.listen {}", config.server.listen))?;
        let metrics = match config.server.metrics_listen {
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
            judge: config.judge,
            grace: config.server.grace,
            retention: config.retention,
            auth_token: config.server.auth_token,
            reflection: config.server.reflection,
            tls: config.server.tls,
            metrics,
            dispatch,
        };
        server::serve(listener, backend, store, options, shutdown).await
    })
}
