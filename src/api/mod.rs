//! The front ends: the gRPC border (`grpc/`: V2 inference, Kiln's admin
//! service, the door before decoding, the wire check, V2 decoding and
//! encoding, the deadline header), health and reflection, the HTTP front
//! end (`http/`: V2 REST with binary tensors, OpenAI embeddings), and the
//! one error → status mapping. Protocol types live here and in `client/`;
//! everything behind works on Kiln's own, through the pipeline.

pub(crate) mod grpc;
pub mod http;
pub mod status;

pub use grpc::wire;

/// Types and stubs generated from `proto/` (package `inference`).
pub mod pb {
    tonic::include_proto!("inference");

    /// Encoded descriptors for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");
}

/// Types and stubs of Kiln's operator service (package `kiln.admin.v1`).
pub mod admin_pb {
    tonic::include_proto!("kiln.admin.v1");
}
