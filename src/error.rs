//! The typed errors a request can end with behind the API. They are mapped
//! to gRPC status codes in one place, `api::status`.

/// Why a request was not answered with outputs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// Unknown model or version.
    #[error("{0}")]
    NotFound(String),
    /// The request does not match the model's declared interface.
    #[error("{0}")]
    InvalidArgument(String),
    /// The model's queue is at `max_queue`.
    #[error(
        "model '{model}' version {version}: queue full ({max_queue} requests waiting); retry later or add capacity"
    )]
    QueueFull { model: String, version: u64, max_queue: usize },
    /// The server is shutting down or the model is not serving.
    #[error("{0}")]
    Unavailable(String),
    /// The model failed on the batch this request was in.
    #[error("model '{model}' version {version} failed on this batch: {reason}")]
    ModelFailed { model: String, version: u64, reason: String },
}
