//! The process `council serve` starts: one run core ([`crate::run`]) behind two doors, the gRPC
//! service ([`crate::service`]) and, when configured, task dispatch over NATS JetStream
//! ([`crate::dispatch`]); health and readiness, the metrics port, and the drain at shutdown.
//! The doors never import each other: this is where they meet.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use council_councils::spec::JudgeMode;
use council_inference::{Backend, Health};
use council_proto::fleet::orchestrator::v1::orchestrator_service_server::OrchestratorServiceServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::dispatch::{Dispatcher, Prepared};
use crate::model_source::servable_judge;
use crate::run::{Limits, ResultSink, Runner, metrics};
use crate::service::{Auth, LIVENESS_SERVICE, Tls, grpc, set_health};
use crate::store::CouncilStore;

/// Everything `serve` needs besides the backend and the store.
#[derive(Debug)]
pub struct Options {
    pub limits: Limits,
    /// How every deliberation's judges give verdicts (`councils.judge`); a log-prob judge
    /// becomes a text judge on a backend that cannot score choices.
    pub judge: JudgeMode,
    /// How long in-flight deliberations may take to finish after shutdown begins.
    pub grace: Duration,
    /// Finished records are deleted this long after they finished.
    pub retention: Duration,
    /// When set, every OrchestratorService call needs `authorization: Bearer <token>`.
    /// Health and reflection stay open (probes and tooling).
    pub auth_token: Option<String>,
    pub reflection: bool,
    pub tls: Option<Tls>,
    /// Where Prometheus scrapes `/metrics` (plain HTTP), if anywhere.
    pub metrics: Option<TcpListener>,
    /// Task dispatch over JetStream, when enabled (streams and consumer already checked).
    pub dispatch: Option<Prepared>,
}

impl Options {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            judge: crate::config::RawCouncils::default().judge().into(),
            grace: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
            auth_token: None,
            reflection: true,
            tls: None,
            metrics: None,
            dispatch: None,
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains (see [`Runner::drain`]).
/// Health is `SERVING` only while the backend and the store are healthy (checked every second;
/// the store was loaded before this is called) and `NOT_SERVING` from the first moment of
/// shutdown.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    store: Arc<dyn CouncilStore>,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    set_health(&health_reporter, ServingStatus::NotServing).await;
    let metrics = Arc::new(metrics::Metrics::new());
    let runner = Arc::new(Runner::new(
        backend.clone(),
        store.clone(),
        options.limits,
        servable_judge(backend.as_ref(), options.judge),
        metrics.clone(),
    ));
    let addr: SocketAddr = listener.local_addr()?;
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    runner.spawn_retention(
        options.retention,
        (options.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(300)),
        stopping_rx.clone(),
    );

    let dispatcher = options
        .dispatch
        .map(|prepared| Dispatcher::new(prepared, runner.clone()));
    let pulling = dispatcher
        .clone()
        .map(|d| tokio::spawn(d.run(stopping_rx.clone())));
    let orchestrator = grpc::Orchestrator::new(
        runner.clone(),
        dispatcher.clone().map(|d| d as Arc<dyn ResultSink>),
    );
    let readiness = Readiness {
        backend: backend.clone(),
        store: store.clone(),
        dispatcher: dispatcher.clone(),
    };

    // Readiness follows the backend, the store and NATS until shutdown begins.
    let watcher = {
        let reporter = health_reporter.clone();
        let readiness = readiness.clone();
        let mut stopping = stopping_rx.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut alive = true;
            loop {
                if alive && let Health::Stopped { reason } = readiness.backend.health() {
                    // Nothing in this process brings the engine back: let the probe restart it.
                    tracing::error!(%reason, "the backend stopped for good: liveness NOT_SERVING");
                    reporter
                        .set_service_status(LIVENESS_SERVICE, ServingStatus::NotServing)
                        .await;
                    alive = false;
                }
                let problem = readiness.problem();
                let status = if problem.is_none() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                if last != Some(status) {
                    if let Some(reason) = &problem {
                        tracing::warn!(%reason, "NOT_SERVING");
                    }
                    set_health(&reporter, status).await;
                    last = Some(status);
                }
                tokio::select! {
                    _ = stopping.changed() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    };

    if let Some(metrics_listener) = options.metrics {
        let metrics_addr = metrics_listener.local_addr()?;
        let router = metrics_router(
            metrics.clone(),
            backend.clone(),
            readiness.clone(),
            runner.clone(),
        );
        let mut stopping = stopping_rx.clone();
        tokio::spawn(async move {
            let served = axum::serve(metrics_listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopping.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        tracing::info!(%metrics_addr, "serving Prometheus metrics on /metrics");
    }

    // Fired once drained: idle client connections then get a bounded moment to close.
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drained = {
        let reporter = health_reporter.clone();
        let runner = runner.clone();
        let grace = options.grace;
        async move {
            shutdown.await;
            tracing::info!("shutdown: NOT_SERVING, draining");
            let _ = stopping_tx.send(true);
            let _ = watcher.await;
            set_health(&reporter, ServingStatus::NotServing).await;
            // Dispatch stopped pulling with `stopping`; its tasks in hand finish within the
            // grace period or are cancelled by the drain and handed back (nak, no delay).
            let cancelled = runner.drain(grace).await;
            if let Some(pulling) = pulling {
                let _ = tokio::time::timeout(PULL_STOP_TIMEOUT, pulling).await;
            }
            if let Some(d) = &dispatcher
                && let Err(e) = d.client().drain().await
            {
                tracing::warn!(error = %e, "could not drain the NATS connection");
            }
            tracing::info!(cancelled, "drained; stopping the server");
            let _ = drained_tx.send(());
        }
    };

    let auth = Auth::new(options.auth_token);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        crate::install_crypto_provider();
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config)?;
    }
    // v1, and v1alpha for the clients that still ask it (grpcurl's fallback, grpcio's
    // reflection client).
    let reflection = |on: bool| {
        on.then(|| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(council_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        })
    };
    let reflection_v1 = reflection(options.reflection)
        .map(|b| b.build_v1())
        .transpose()?;
    let reflection_v1alpha = reflection(options.reflection)
        .map(|b| b.build_v1alpha())
        .transpose()?;
    tracing::info!(%addr, tls = options.tls.is_some(), auth = auth.is_on(), "serving gRPC");
    let server = builder
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(OrchestratorServiceServer::with_interceptor(
            orchestrator,
            move |r| auth.check(r),
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            drained,
        );
    // A graceful stop waits for clients to close their connections; one that never does must
    // not keep a drained process alive.
    let linger = async {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(CONNECTION_LINGER).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = server => served?,
        () = linger => tracing::warn!(
            linger_ms = CONNECTION_LINGER.as_millis() as u64,
            "clients kept connections open after the drain; closing them"
        ),
    }
    tracing::info!("gRPC server stopped");
    Ok(())
}

/// How long idle client connections may stay open once the service has drained.
pub const CONNECTION_LINGER: Duration = Duration::from_secs(5);

/// How long the drain waits, after the grace period, for dispatch to hand back what it holds.
/// With [`CONNECTION_LINGER`] it bounds what shutdown takes beyond `server.grace_secs`
/// (a pod's termination grace period must cover both).
pub const PULL_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What readiness depends on: the backend, the store and, with dispatch, the NATS connection.
#[derive(Debug, Clone)]
struct Readiness {
    backend: Arc<dyn Backend>,
    store: Arc<dyn CouncilStore>,
    dispatcher: Option<Arc<Dispatcher>>,
}

impl Readiness {
    /// Why the service is not ready, if it is not.
    fn problem(&self) -> Option<String> {
        if let Some(reason) = self.backend.health().problem() {
            return Some(format!("backend: {reason}"));
        }
        if let Err(reason) = self.store.health() {
            return Some(format!("store: {reason}"));
        }
        if let Some(Err(reason)) = self.dispatcher.as_ref().map(|d| d.health()) {
            return Some(format!("dispatch: {reason}"));
        }
        None
    }
}

/// `/metrics` (Prometheus text format), `/healthz` (alive) and `/readyz` (ready to deliberate).
fn metrics_router(
    metrics: Arc<metrics::Metrics>,
    backend: Arc<dyn Backend>,
    readiness: Readiness,
    runner: Arc<Runner>,
) -> axum::Router {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let scrape = {
        let backend = backend.clone();
        move || {
            let body = metrics.encode(&backend.load());
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }
    };
    let ready = move || {
        let ok = !runner.is_draining() && readiness.problem().is_none();
        async move {
            if ok {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
    };
    let alive = move || {
        let stopped = matches!(backend.health(), Health::Stopped { .. });
        async move {
            if stopped {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the backend stopped for good\n",
                )
            } else {
                (StatusCode::OK, "ok\n")
            }
        }
    };
    axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
}
