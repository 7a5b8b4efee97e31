//! The one mapping from Kiln's errors to gRPC status codes.

use tonic::{Code, Status};

use crate::error::InferError;

/// The gRPC status for an error; its message is for the caller.
pub fn to_status(err: &InferError) -> Status {
    Status::new(code(err), err.to_string())
}

/// The gRPC code for an error (exhaustive: a new variant must choose one).
pub fn code(err: &InferError) -> Code {
    match err {
        InferError::NotFound(_) => Code::NotFound,
        InferError::InvalidArgument(_) | InferError::NonFinite { .. } => Code::InvalidArgument,
        InferError::QueueFull { .. }
        | InferError::CostCap { .. }
        | InferError::TenantBudget { .. }
        | InferError::Overloaded { .. } => Code::ResourceExhausted,
        InferError::Unimplemented(_) => Code::Unimplemented,
        InferError::DeadlineUnmeetable(_) | InferError::Expired(_) => Code::DeadlineExceeded,
        InferError::Unavailable(_) => Code::Unavailable,
        InferError::FailedPrecondition(_) => Code::FailedPrecondition,
        InferError::Unauthenticated(_) => Code::Unauthenticated,
        InferError::PermissionDenied(_) => Code::PermissionDenied,
        InferError::ModelFailed { .. } => Code::Internal,
    }
}

/// The code's canonical name, used as the `code` metric label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
