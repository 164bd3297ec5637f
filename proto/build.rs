//! Compiles the .proto files with protox (pure Rust, no system protoc) and generates the
//! tonic client and server plus a file descriptor set for reflection and contract tests.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/fleet/orchestrator/v1/orchestrator.proto",
        "proto/council/store/v1/record.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("fleet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::ClientErrorCodec")
        .compile_fds(fds)?;
    Ok(())
}
