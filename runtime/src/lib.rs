//! The council service and command line: wires the councils domain to inference backends.
//! It is the only crate that knows files, configuration, gRPC and NATS.

pub mod bench_dispatch;
pub mod bench_service;
pub mod cli;
pub mod config;
pub mod deliberate;
pub mod dev;
pub mod dispatch;
pub mod driver;
pub mod generate;
pub mod model_source;
pub mod nats;
pub mod serve;
pub mod service;
pub mod store;
