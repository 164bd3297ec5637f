//! `council health`: one `grpc.health.v1` check against a running `council serve`, for the
//! container image's `HEALTHCHECK` (Kubernetes uses its native gRPC probes instead). Exits 0
//! only when the named health service is `SERVING`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::config::DEFAULT_LISTEN;

/// Flags of `council health`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The service's gRPC address; an unspecified IP (0.0.0.0, [::]) means this host. It reads
    /// the variable `council serve --listen` reads, so in the image it needs no flag.
    #[arg(long, env = "COUNCIL_LISTEN", value_name = "IP:PORT", default_value = DEFAULT_LISTEN)]
    pub addr: String,
    /// The health service to ask: "" (readiness: backend, store and NATS healthy, not
    /// draining), or "liveness" (the process answers).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout_secs: u64,
}

pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    let addr = probe_addr(&args.addr)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let status = runtime.block_on(check(addr, &args.service, timeout))?;
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{addr} health of {:?}: {}",
        args.service,
        status.as_str_name()
    );
    println!("{}", status.as_str_name());
    Ok(())
}

/// `addr` as an address to connect to: an unspecified IP (what a server binds) becomes loopback.
pub fn probe_addr(addr: &str) -> anyhow::Result<SocketAddr> {
    let mut a: SocketAddr = addr
        .parse()
        .with_context(|| format!("--addr {addr:?} is not an IP:PORT address"))?;
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(ip) if ip.is_unspecified() => a.set_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => {}
    }
    Ok(a)
}

/// Asks the server at `addr` (plain gRPC) for the status of `service`, within `timeout`.
pub async fn check(
    addr: SocketAddr,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<ServingStatus> {
    let ask = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .with_context(|| format!("{addr} health of {service:?}"))?;
        anyhow::Ok(reply.into_inner().status())
    };
    tokio::time::timeout(timeout, ask)
        .await
        .with_context(|| format!("{addr} gave no health answer within {timeout:?}"))?
}
