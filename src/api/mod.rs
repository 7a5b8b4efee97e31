//! The gRPC border: V2 inference service, Kiln's admin service, health and
//! reflection. Protocol
//! types live here and in `client/`; everything behind works on Kiln's own.

pub(crate) mod admin;
pub(crate) mod deadline;
pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod inference;
pub(crate) mod ingress;
pub mod status;
pub mod wire;

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
