//! The council service and command line: wires the councils domain to inference backends.
//! It is the only crate that knows files, configuration, gRPC and NATS.

pub mod cli;
pub mod dev;
pub mod generate;
pub mod model_source;
