//! The gRPC door: the `fleet.orchestrator.v1` service orchestrators call. Thin handlers in
//! [`grpc`] convert at the edge ([`wire`]), call the run core ([`crate::run`]) and convert
//! back; the
//! health names, TLS and bearer auth of the port. The process that serves it is
//! [`crate::cli::server`].

pub mod grpc;
pub mod orchestrate;
pub mod wire;

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

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

pub async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in READINESS_SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// Checks bearer tokens in constant time.
#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Auth {
    /// Every call needs `authorization: Bearer <token>` when `token` is set.
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.into_bytes().into_boxed_slice())),
        }
    }

    /// Whether a token is required.
    pub fn is_on(&self) -> bool {
        self.token.is_some()
    }

    pub fn check(&self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
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
            Err(crate::run::error::RunError::Unauthenticated.to_status())
        }
    }
}
