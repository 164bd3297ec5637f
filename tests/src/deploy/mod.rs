//! The deploy checker's readers (`tests/tests/deploy.rs` holds the checks): a small kustomize,
//! manifest queries, Dockerfiles and nats.conf.

pub mod dockerfile;
pub mod kustomize;
pub mod manifests;
pub mod nats_conf;
