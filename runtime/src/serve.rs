//! `council serve`: load the engine, open the council store, apply the default councils, serve
//! gRPC until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::model_source::ModelArgs;
use crate::service::{self, Limits};
use crate::store::{FileStore, apply_default_councils};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address of the gRPC server (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Directory of the persistent council store.
    #[arg(long, default_value = "council-data")]
    pub data_dir: PathBuf,
    /// Deliberations running at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent: usize,
    /// Deadline of a deliberation whose request sets no timeout_seconds.
    #[arg(long, default_value_t = 600)]
    pub default_timeout_secs: u64,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.max_concurrent == 0 {
        anyhow::bail!("--max-concurrent must be at least 1");
    }
    let store = FileStore::open(&args.data_dir).context("--data-dir")?;
    let created = apply_default_councils(&store)?;
    tracing::info!(created, path = %store.path().display(), "council store ready");
    let engine = args.model.start_engine()?;
    let limits = Limits {
        max_concurrent: args.max_concurrent,
        default_timeout: Duration::from_secs(args.default_timeout_secs),
        ..Limits::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        println!("listening on {}", listener.local_addr()?);
        service::serve(
            listener,
            Arc::new(engine),
            Arc::new(store),
            limits,
            shutdown_signal(),
        )
        .await
    })
}
