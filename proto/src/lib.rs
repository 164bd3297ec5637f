//! The `fleet.orchestrator.v1` wire contract: generated prost messages and tonic service
//! code, and the encoded file descriptor set (for gRPC reflection and contract tests).
//! Nothing else lives here; conversions to and from domain types belong to `runtime`.

pub mod codec;

/// `fleet.orchestrator.v1`: the upstream-compatible orchestrator API.
pub mod fleet {
    pub mod orchestrator {
        pub mod v1 {
            #![allow(missing_debug_implementations, clippy::all)]
            tonic::include_proto!("fleet.orchestrator.v1");
        }
    }
}

/// `council.store.v1`: council's own storage format (deliberation records).
pub mod council {
    pub mod store {
        pub mod v1 {
            #![allow(missing_debug_implementations, clippy::all)]
            tonic::include_proto!("council.store.v1");
        }
    }
}

/// Encoded `FileDescriptorSet` of every proto in this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleet_descriptor.bin"));
