//! The gRPC front end: the door every call passes before tonic decodes it
//! (`ingress`, with the allocation-free `wire` check), the V2 inference
//! service and Kiln's admin service, V2 decoding into the pipeline's first
//! stage and encoding of its answer, and the `grpc-timeout` header.

pub(crate) mod admin;
pub(crate) mod deadline;
pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod inference;
pub(crate) mod ingress;
pub mod wire;

/// Who the door admitted to an admin call, as logs and the audit log name
/// them (in-process tests call without the door).
fn admin_name<T>(request: &tonic::Request<T>) -> String {
    request.extensions().get::<crate::security::Admin>().map_or_else(|| "an in-process caller".into(), |a| a.0.clone())
}
