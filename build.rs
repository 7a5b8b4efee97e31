//! Generates the V2 protocol types and gRPC stubs from `proto/`.
//!
//! protoc comes from the `protoc-bin-vendored` crate so that a fresh machine
//! needs no system install.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // RPCs Kiln does not implement (shared memory, tracing, streaming)
        // answer UNIMPLEMENTED through tonic's default stubs.
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("inference_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/grpc_service.proto", "proto/model_config.proto", "proto/kiln_admin.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
