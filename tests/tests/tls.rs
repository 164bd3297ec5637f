//! TLS and mTLS of the gRPC port, with certificates made in the test (a private CA, a server
//! certificate for "localhost", a client certificate), end to end on 127.0.0.1:0.

use std::sync::Arc;
use std::time::Duration;

use council_inference::EngineConfig;
use council_inference::tiny::TinyArch;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use council_runtime::cli::server::{self, Options};
use council_runtime::run::Limits;
use council_runtime::service::Tls;
use council_runtime::store::{FileStore, apply_default_councils};
use council_tests::{engine, tiny_model};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    /// A client identity from another CA.
    stranger: (String, String),
}

fn ca() -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("ca");
    (Issuer::new(params, key), cert.pem())
}

fn leaf(issuer: &Issuer<'_, KeyPair>, name: &str) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .signed_by(&key, issuer)
        .expect("signed");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let (issuer, ca_pem) = ca();
    let (other, _) = ca();
    Pki {
        ca: ca_pem,
        server: leaf(&issuer, "localhost"),
        client: leaf(&issuer, "orchestrator"),
        stranger: leaf(&other, "orchestrator"),
    }
}

/// Serves with `tls`; returns the address and a guard that stops the server.
async fn start(
    tls: Tls,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    Vec<tempfile::TempDir>,
) {
    let model = tiny_model(TinyArch::Qwen2);
    let data = tempfile::tempdir().expect("data");
    let store = FileStore::open(data.path()).expect("store");
    apply_default_councils(&store).await.expect("defaults");
    let backend = engine(model.path(), EngineConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut options = Options::new(Limits::default());
    options.tls = Some(tls);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(
        listener,
        Arc::new(backend),
        Arc::new(store),
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop, vec![model, data])
}

async fn list(channel: Result<Channel, tonic::transport::Error>) -> Result<usize, String> {
    let channel = channel.map_err(|e| format!("connect: {e}"))?;
    OrchestratorServiceClient::new(channel)
        .list_councils(pb::ListCouncilsRequest::default())
        .await
        .map(|r| r.into_inner().councils.len())
        .map_err(|e| e.to_string())
}

async fn connect(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test]
async fn tls_serves_trusting_clients_and_refuses_plaintext() {
    let p = pki();
    let (addr, _stop, _dirs) = start(Tls {
        cert: p.server.0.clone().into_bytes(),
        key: p.server.1.clone().into_bytes(),
        client_ca: None,
    })
    .await;
    assert_eq!(list(connect(addr, &p.ca, None).await).await, Ok(5));
    // Plaintext HTTP/2 to a TLS port fails.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    assert!(list(plain).await.is_err());
    // A client that does not trust the server's CA refuses it.
    let (_, other_ca) = ca();
    assert!(list(connect(addr, &other_ca, None).await).await.is_err());
}

#[tokio::test]
async fn mtls_needs_a_client_certificate_from_the_configured_ca() {
    let p = pki();
    let (addr, _stop, _dirs) = start(Tls {
        cert: p.server.0.clone().into_bytes(),
        key: p.server.1.clone().into_bytes(),
        client_ca: Some(p.ca.clone().into_bytes()),
    })
    .await;
    assert_eq!(
        list(connect(addr, &p.ca, Some(&p.client)).await).await,
        Ok(5)
    );
    assert!(
        list(connect(addr, &p.ca, None).await).await.is_err(),
        "no client certificate"
    );
    assert!(
        list(connect(addr, &p.ca, Some(&p.stranger)).await)
            .await
            .is_err(),
        "a certificate from another CA"
    );
}
