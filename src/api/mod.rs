//! The gRPC border: V2 inference service, health and reflection. Protocol
//! types live here and in `client/`; everything behind works on Kiln's own.

pub mod deadline;
pub mod decode;
pub mod encode;
pub mod inference;
pub mod status;

/// Types and stubs generated from `proto/` (package `inference`).
pub mod pb {
    tonic::include_proto!("inference");

    /// Encoded descriptors for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");
}
