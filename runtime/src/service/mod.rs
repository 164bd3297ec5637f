//! `council serve`: the gRPC service orchestrators call. Thin handlers in [`grpc`] validate,
//! convert, call and convert back; [`runs`] runs deliberations and keeps their records;
//! [`status`] is the one place errors become `tonic::Status`; [`metrics`] measures.

pub mod convert;
pub mod grpc;
pub mod metrics;
pub mod orchestrate;
pub mod runs;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use council_inference::{Backend, Health};
use council_proto::fleet::orchestrator::v1::orchestrator_service_server::OrchestratorServiceServer;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::CouncilStore;

/// Limits of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deliberations running at once; beyond it `RESOURCE_EXHAUSTED` at once.
    pub max_concurrent: usize,
    /// Deadline of a deliberation whose request names none.
    pub default_timeout: Duration,
    /// Upper bound on a request's `timeout_seconds`.
    pub max_timeout: Duration,
    /// How often a running deliberation refreshes its record; one silent for three periods
    /// belonged to a process that died and may be taken over.
    pub heartbeat: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// TLS of the gRPC port, PEM contents.
#[derive(Clone)]
pub struct Tls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("key", &"<redacted>")
            .field("mtls", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

/// Everything `serve` needs besides the backend and the store.
#[derive(Debug)]
pub struct Options {
    pub limits: Limits,
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
    pub dispatch: Option<crate::dispatch::Prepared>,
}

impl Options {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
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

/// The API's name in `grpc.health.v1`.
pub const SERVICE_NAME: &str = "fleet.orchestrator.v1.OrchestratorService";

/// Health names that say whether the service is ready: `SERVING` only while the backend, the
/// store and (with dispatch) NATS are healthy and shutdown has not begun.
pub const READINESS_SERVICES: [&str; 2] = ["", SERVICE_NAME];

/// A health name that is `SERVING` from the moment the gRPC port answers until the process
/// exits, drain included, unless the backend stopped for good (the engine thread ended): it
/// depends on nothing outside the process, so a liveness probe on it never restarts a replica
/// because NATS, the store or a remote model server is down, and always restarts one whose
/// engine is gone.
pub const LIVENESS_SERVICE: &str = "liveness";

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in READINESS_SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Checks bearer tokens in constant time.
#[derive(Clone)]
struct Auth {
    token: Option<Arc<[u8]>>,
}

impl Auth {
    fn check(&self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(presented.as_bytes().ct_eq(token)) {
            Ok(request)
        } else {
            Err(status::ServiceError::Unauthenticated.to_status())
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains (see [`runs::Runner::drain`]).
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
    let runner = Arc::new(runs::Runner::new(
        backend.clone(),
        store.clone(),
        options.limits,
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
        .map(|prepared| crate::dispatch::Dispatcher::new(prepared, runner.clone()));
    let pulling = dispatcher
        .clone()
        .map(|d| tokio::spawn(d.run(stopping_rx.clone())));
    let orchestrator = grpc::Orchestrator::new(
        runner.clone(),
        dispatcher.clone().map(|d| d as Arc<dyn grpc::ResultSink>),
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

    let auth = Auth {
        token: options
            .auth_token
            .map(|t| Arc::from(t.into_bytes().into_boxed_slice())),
    };
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
    tracing::info!(%addr, tls = options.tls.is_some(), auth = auth.token.is_some(), "serving gRPC");
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
    dispatcher: Option<Arc<crate::dispatch::Dispatcher>>,
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
    runner: Arc<runs::Runner>,
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
