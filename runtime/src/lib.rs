//! The council service and command line: wires the councils domain to inference backends.
//! It is the only crate that knows files, configuration, gRPC and NATS.

pub mod cli;
pub mod config;
pub mod dispatch;
pub mod driver;
pub mod eval;
pub mod judge;
pub mod model_source;
pub mod nats;
pub mod outcome_json;
pub mod run;
pub mod service;
pub mod store;

/// Chooses aws-lc-rs as the process's TLS crypto provider. Dependencies compile in both
/// aws-lc-rs and ring, so rustls cannot pick one by itself and would panic at the first TLS
/// handshake (gRPC or NATS). Idempotent: an error means one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
