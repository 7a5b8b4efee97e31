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
    /// A NaN or infinite value: refused, and counted by drift for the
    /// feature (declared input `input`, column `column`).
    #[error("{message}")]
    NonFinite { message: String, input: usize, column: usize },
    /// The model's queue is at `max_queue`.
    #[error(
        "model '{model}' version {version}: queue full ({max_queue} requests waiting); retry later or add capacity"
    )]
    QueueFull { model: String, version: u64, max_queue: usize },
    /// Refused at admission: even computed alone, right now, the request
    /// would finish after its deadline.
    #[error("{0}")]
    DeadlineUnmeetable(String),
    /// The deadline passed (or could no longer be met) before an answer.
    #[error("{0}")]
    Expired(String),
    /// The estimated cost is over the request's or the model's cap.
    #[error(
        "model '{model}': estimated cost {estimate_us} µs exceeds the {source_of_cap} max_cost_us of {cap_us} µs; \
         send fewer rows or raise the cap"
    )]
    CostCap { model: String, estimate_us: u64, cap_us: u64, source_of_cap: &'static str },
    /// The tenant has spent its compute budget for now.
    #[error(
        "tenant '{tenant}' compute budget spent: this request needs about {needed_us} µs, {available_us} µs \
         available; the budget refills at {rate} compute-seconds per second"
    )]
    TenantBudget { tenant: String, needed_us: u64, available_us: i64, rate: f64 },
    /// A server-wide bound is reached (bytes in flight, the preparation
    /// queue) or the message is over the size limit; `reason` labels it.
    #[error("{message}")]
    Overloaded { reason: &'static str, message: String },
    /// The call uses a feature Kiln does not offer (a compressed message).
    #[error("{0}")]
    Unimplemented(String),
    /// The server is not in a state where this can be done (a model that
    /// does not load, a repository call the control mode refuses).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The server is shutting down or the model is not serving.
    #[error("{0}")]
    Unavailable(String),
    /// The call names no caller, or one the server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (a model its key does not list, another
    /// tenant, admin without being an admin).
    #[error("{0}")]
    PermissionDenied(String),
    /// The model failed on the batch this request was in.
    #[error("model '{model}' version {version} failed on this batch: {reason}")]
    ModelFailed { model: String, version: u64, reason: String },
}

impl InferError {
    /// The `reason` label of `kiln_rejected_total` for refusals counted
    /// where the error is answered (expiry in the queue and cancellation are
    /// counted by the scheduler, which sees them happen).
    pub fn rejection_reason(&self) -> Option<&'static str> {
        match self {
            Self::QueueFull { .. } => Some("queue_full"),
            Self::CostCap { .. } => Some("cost_cap"),
            Self::TenantBudget { .. } => Some("tenant_budget"),
            Self::DeadlineUnmeetable(_) => Some("deadline"),
            Self::Overloaded { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// The message a panic carried, if it was a string.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
