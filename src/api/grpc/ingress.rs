//! The door every gRPC call passes before tonic decodes it. A unary call's
//! body is received here under three bounds: the message size
//! (`max_message_bytes`, checked from the 5-byte gRPC frame header before
//! the body arrives), the bytes of all calls in flight (`max_inflight_bytes`,
//! reserved frame by frame as the body arrives and released when the answer
//! has been sent) and the body timeout. A `ModelInfer` body is then checked
//! on the wire against its model (`wire`) so that no struct is built for a
//! request that would outgrow its size. Streaming calls (health Watch,
//! reflection) pass through; their services cap each message at
//! [`SMALL_MESSAGE_BYTES`].
//!
//! The door also asks who is calling before a byte of the body is read:
//! health checks (gRPC Health, ServerLive, ServerReady) are open so that
//! probes work; admin calls need an admin; every other call needs a caller
//! (with auth on), which is put on the request for the services, and a
//! ModelInfer body is refused PERMISSION_DENIED for a model its key does
//! not list before it is decoded.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::wire::{self, WireLimits};
use crate::api::status;
use crate::error::InferError;
use crate::pipeline::router;
use crate::repository::{LiveRepository, Repository};
use crate::security::{Auth, Caller, ClientCertificate};

/// Most bytes of any request message but ModelInfer's: names and versions.
/// At prost's worst expansion (~150× for empty repeated entries) this
/// stays under a megabyte decoded.
pub const SMALL_MESSAGE_BYTES: usize = 4096;

const INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";
/// gRPC's length-prefixed message header: compressed flag and u32 length.
const FRAME_HEADER: usize = 5;

/// The request bytes held by all calls, against `max_inflight_bytes`.
#[derive(Debug)]
pub struct InflightBudget {
    used: AtomicU64,
    max: u64,
}

impl InflightBudget {
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self { used: AtomicU64::new(0), max })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// An empty reservation that grows as a body arrives.
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }
}

/// Bytes held by one call; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<InflightBudget>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `more` bytes, or refuses without reserving any.
    pub fn grow(&mut self, more: usize) -> Result<(), InferError> {
        let more = more as u64;
        let max = self.budget.max;
        self.budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|total| *total <= max)
            })
            .map_err(|used| InferError::Overloaded {
                reason: "inflight_bytes",
                message: format!(
                    "server busy: {used} bytes of requests are in flight and this one needs {} more, over \
                     max_inflight_bytes {max}; retry shortly",
                    more
                ),
            })?;
        self.bytes += more;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A response body that holds `guard` until the body is finished or
/// dropped: the answer has been sent (or the call was abandoned).
pub struct Guarded<G> {
    inner: tonic::body::Body,
    _guard: G,
}

impl<G: Send + Unpin + 'static> Guarded<G> {
    pub fn wrap(inner: tonic::body::Body, guard: G) -> tonic::body::Body {
        tonic::body::Body::new(Self { inner, _guard: guard })
    }
}

impl<G: Unpin> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How the door treats a call, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// ModelInfer: up to `max_message_bytes`, checked on the wire.
    Infer,
    /// Another unary call: up to [`SMALL_MESSAGE_BYTES`].
    SmallUnary,
    /// Streaming or unknown: tonic's own per-message bound applies.
    Pass,
}

fn door(path: &str) -> Door {
    match path {
        INFER_PATH => Door::Infer,
        "/inference.GRPCInferenceService/ModelStreamInfer" | "/grpc.health.v1.Health/Watch" => Door::Pass,
        "/grpc.health.v1.Health/Check" => Door::SmallUnary,
        p if p.starts_with("/inference.GRPCInferenceService/") || p.starts_with("/kiln.admin.v1.Admin/") => {
            Door::SmallUnary
        }
        _ => Door::Pass,
    }
}

/// Who may make a call, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Health checks: probes must work without credentials.
    Open,
    /// `kiln.admin.v1`: the admin token or an admin identity.
    Admin,
    /// Everything else: a caller (anyone, with auth off).
    Caller,
}

fn access(path: &str) -> Access {
    match path {
        "/grpc.health.v1.Health/Check"
        | "/grpc.health.v1.Health/Watch"
        | "/inference.GRPCInferenceService/ServerLive"
        | "/inference.GRPCInferenceService/ServerReady" => Access::Open,
        p if p.starts_with("/kiln.admin.v1.Admin/") => Access::Admin,
        // Loading and unloading models are operator actions.
        "/inference.GRPCInferenceService/RepositoryModelLoad"
        | "/inference.GRPCInferenceService/RepositoryModelUnload" => Access::Admin,
        _ => Access::Caller,
    }
}

/// What the door needs: the models (for wire limits) and the bounds.
pub struct IngressState {
    /// Who may call.
    pub auth: Arc<Auth>,
    pub repo: Arc<LiveRepository>,
    pub budget: Arc<InflightBudget>,
    pub max_message_bytes: usize,
    pub body_timeout: Duration,
    /// Once draining, new inference calls are answered UNAVAILABLE.
    pub drain: Arc<crate::server::drain::Drain>,
}

/// The tower service in front of tonic's routes.
#[derive(Clone)]
pub struct Ingress<S> {
    inner: S,
    state: Arc<IngressState>,
}

impl<S> Ingress<S> {
    pub fn new(inner: S, state: Arc<IngressState>) -> Self {
        Self { inner, state }
    }
}

type HttpRequest<B> = http::Request<B>;
type HttpResponse = http::Response<tonic::body::Body>;

fn refusal(err: &InferError) -> HttpResponse {
    let reason = match err {
        InferError::Overloaded { reason, .. } => Some(*reason),
        InferError::Expired(_) => Some("body_timeout"),
        InferError::InvalidArgument(_) | InferError::Unimplemented(_) => Some("wire"),
        InferError::Unauthenticated(_) => Some("unauthenticated"),
        InferError::PermissionDenied(_) => Some("permission_denied"),
        _ => None,
    };
    if let Some(reason) = reason {
        metrics::counter!(crate::monitor::metrics::INGRESS_REFUSED, "reason" => reason).increment(1);
    }
    status::to_status(err).into_http()
}

impl<S, B> tower::Service<HttpRequest<B>> for Ingress<S>
where
    S: tower::Service<HttpRequest<tonic::body::Body>, Response = HttpResponse> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<HttpResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest<B>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let kind = door(request.uri().path());
        let access = access(request.uri().path());
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let client = parts.extensions.get::<ClientCertificate>();
            let caller = match access {
                Access::Open => None,
                Access::Admin => match state.auth.admin(&parts.headers, client) {
                    Ok(admin) => {
                        parts.extensions.insert(admin);
                        None
                    }
                    Err(e) => return Ok(refusal(&e)),
                },
                Access::Caller => match state.auth.caller(&parts.headers, client) {
                    Ok(caller) => Some(caller),
                    Err(e) => return Ok(refusal(&e)),
                },
            };
            if let Some(caller) = &caller {
                parts.extensions.insert(caller.clone());
            }
            if kind == Door::Pass {
                return inner.call(HttpRequest::from_parts(parts, tonic::body::Body::new(body))).await;
            }
            if kind == Door::Infer && state.drain.draining() {
                return Ok(refusal(&InferError::Unavailable(
                    "the server is shutting down: send this call to another replica".into(),
                )));
            }
            let limit = if kind == Door::Infer { state.max_message_bytes } else { SMALL_MESSAGE_BYTES };
            let received = receive(body, limit, &state).await.and_then(|(bytes, reservation)| {
                if kind == Door::Infer {
                    check_infer(&bytes, &state.repo.get(), caller.as_ref())?;
                }
                Ok((bytes, reservation))
            });
            match received {
                Ok((bytes, reservation)) => {
                    let request =
                        HttpRequest::from_parts(parts, tonic::body::Body::new(http_body_util::Full::new(bytes)));
                    let response = inner.call(request).await?;
                    Ok(response.map(|body| Guarded::wrap(body, reservation)))
                }
                Err(err) => Ok(refusal(&err)),
            }
        })
    }
}

/// Receives one gRPC message (header included) within `limit`, the
/// in-flight budget and the body timeout.
async fn receive<B>(mut body: B, limit: usize, state: &IngressState) -> Result<(Bytes, Reservation), InferError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut reservation = state.budget.reserve();
    let mut buffer = BytesMut::new();
    let mut declared: Option<usize> = None;
    let deadline = tokio::time::Instant::now() + state.body_timeout;
    while let Some(data) = next_data(&mut body, deadline, state.body_timeout, buffer.len()).await? {
        let expected = declared.map_or(FRAME_HEADER + limit, |len| FRAME_HEADER + len);
        if buffer.len() + data.len() > expected {
            return Err(match declared {
                Some(_) => InferError::InvalidArgument(
                    "request body holds more than one message; a unary call carries exactly one".into(),
                ),
                None => too_large("message", buffer.len() + data.len() - FRAME_HEADER, limit),
            });
        }
        reservation.grow(data.len())?;
        buffer.extend_from_slice(&data);
        if declared.is_none() && buffer.len() >= FRAME_HEADER {
            if buffer[0] != 0 {
                return Err(InferError::Unimplemented(
                    "compressed messages are not accepted: send with grpc-encoding identity".into(),
                ));
            }
            let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if len > limit {
                return Err(too_large("message", len, limit));
            }
            declared = Some(len);
            // One allocation of the declared size; pages are touched only
            // as bytes arrive.
            buffer.reserve(FRAME_HEADER + len - buffer.len());
        }
    }
    if let Some(len) = declared
        && buffer.len() < FRAME_HEADER + len
    {
        return Err(InferError::InvalidArgument(format!(
            "request body ended after {} of the {len} message bytes it declared",
            buffer.len() - FRAME_HEADER
        )));
    }
    Ok((buffer.freeze(), reservation))
}

/// The next data frame of a body (trailers skipped), `None` at its end;
/// refused past `deadline` (the body timeout, `timeout`) with how much had
/// arrived.
pub(crate) async fn next_data<B>(
    body: &mut B,
    deadline: tokio::time::Instant,
    timeout: Duration,
    arrived: usize,
) -> Result<Option<Bytes>, InferError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(InferError::Expired(format!(
                    "request body not received within body_timeout_ms {} ({arrived} bytes arrived)",
                    timeout.as_millis()
                )));
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(InferError::InvalidArgument(format!("request body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

/// A request over `max_message_bytes`; `what` names it (`message`, `body`).
pub(crate) fn too_large(what: &str, len: usize, limit: usize) -> InferError {
    InferError::Overloaded {
        reason: "message_size",
        message: format!("request {what} of {len} bytes is over max_message_bytes {limit}"),
    }
}

/// The wire check of a ModelInfer message against its model, after the
/// caller's permission for that model. An unknown model is answered
/// NOT_FOUND here, as the handler would.
fn check_infer(frame: &[u8], repo: &Repository, caller: Option<&Caller>) -> Result<(), InferError> {
    let Some(message) = frame.get(FRAME_HEADER..) else { return Ok(()) };
    let malformed = |e: wire::WireError| InferError::InvalidArgument(e.to_string());
    let (model, version) = wire::model_and_version(message).map_err(malformed)?;
    if let Some(caller) = caller {
        caller.permit(&model)?;
    }
    let served = router::route(repo, &model, &version)?;
    let limits = WireLimits::for_model(&served.spec, served.config.max_batch_size);
    wire::check_infer_request(message, &limits).map_err(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doors_by_path() {
        assert_eq!(door(INFER_PATH), Door::Infer);
        assert_eq!(door("/inference.GRPCInferenceService/ModelMetadata"), Door::SmallUnary);
        assert_eq!(door("/inference.GRPCInferenceService/RepositoryModelLoad"), Door::SmallUnary);
        assert_eq!(door("/kiln.admin.v1.Admin/DriftReport"), Door::SmallUnary);
        assert_eq!(door("/grpc.health.v1.Health/Watch"), Door::Pass);
        assert_eq!(door("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Door::Pass);
    }

    #[test]
    fn probes_are_open_admin_is_admin_and_the_rest_needs_a_caller() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access("/inference.GRPCInferenceService/ServerReady"), Access::Open);
        assert_eq!(access("/kiln.admin.v1.Admin/DriftReport"), Access::Admin);
        assert_eq!(access("/inference.GRPCInferenceService/RepositoryModelLoad"), Access::Admin);
        assert_eq!(access("/inference.GRPCInferenceService/RepositoryModelUnload"), Access::Admin);
        assert_eq!(access("/inference.GRPCInferenceService/RepositoryIndex"), Access::Caller);
        assert_eq!(access(INFER_PATH), Access::Caller);
        assert_eq!(access("/inference.GRPCInferenceService/ModelReady"), Access::Caller);
        assert_eq!(access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Access::Caller);
        assert_eq!(access("/unknown.Service/Call"), Access::Caller);
    }

    #[test]
    fn reservations_refuse_past_the_budget_and_give_back_on_drop() {
        let budget = InflightBudget::new(100);
        let mut a = budget.reserve();
        a.grow(60).expect("fits");
        let mut b = budget.reserve();
        let err = b.grow(50).unwrap_err();
        assert!(err.to_string().contains("max_inflight_bytes 100"), "{err}");
        assert_eq!(budget.used(), 60, "a refused reservation holds nothing");
        drop(a);
        b.grow(100).expect("the first call's bytes came back");
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
