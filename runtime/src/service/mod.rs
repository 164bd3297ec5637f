//! `council serve`: the gRPC service orchestrators call. Thin handlers in [`grpc`] validate,
//! convert, call and convert back; [`status`] is the one place errors become `tonic::Status`.

pub mod convert;
pub mod grpc;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use council_inference::{Backend, Health};
use council_proto::fleet::orchestrator::v1::orchestrator_service_server::OrchestratorServiceServer;
use tokio::net::TcpListener;

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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(3600),
        }
    }
}

/// Serves on `listener` until `shutdown` resolves. Health reports `SERVING` once started and
/// `NOT_SERVING` from the first moment of shutdown.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    store: Arc<dyn CouncilStore>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let service_name = "fleet.orchestrator.v1.OrchestratorService";
    let ready = matches!(backend.health(), Health::Ready);
    let status = if ready {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health_reporter
        .set_service_status(service_name, status)
        .await;
    health_reporter.set_service_status("", status).await;
    let orchestrator = grpc::Orchestrator::new(backend, store, limits);
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "serving gRPC");
    let reporter = health_reporter.clone();
    let shutdown = async move {
        shutdown.await;
        reporter
            .set_service_status(service_name, tonic_health::ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(OrchestratorServiceServer::new(orchestrator))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await?;
    Ok(())
}
