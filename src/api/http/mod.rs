//! The HTTP front end on its own listener (HTTP/1.1, through the accept
//! loop every listener shares: TLS, connection cap, timeouts, drain): the
//! KServe V2 REST binding with Triton's binary tensor extension ([`v2`]),
//! and OpenAI-compatible embeddings ([`openai`]).
//!
//! A body is held to the gRPC side's bounds: `max_message_bytes` from
//! Content-Length before a byte is read (413), bytes in flight reserved
//! as they arrive and given back once the answer is sent, the body
//! timeout. Health is open; everything else needs a caller (with auth on),
//! checked before the body is read. Inference goes through the same
//! release controls and pipeline as gRPC, so the two share batches.

pub mod openai;
pub mod triton;
pub mod v2;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{Method, StatusCode, header};
use hyper::body::Incoming;
use serde::Serialize;

use crate::api::grpc::decode::V2Request;
use crate::api::grpc::ingress::{Guarded, InflightBudget, Reservation, next_data, too_large};
use crate::api::status;
use crate::error::InferError;
use crate::pipeline::controls::{self, Served};
use crate::pipeline::{Call, Pipeline, router};
use crate::repository::{LiveRepository, ServedVersion};
use crate::security::{Auth, Caller, ClientCertificate};
use crate::server::drain::Drain;

/// The header naming the tenant when the request parameter does not.
const TENANT_HEADER: &str = "x-kiln-tenant";
/// The request's deadline in milliseconds from receipt; the `timeout`
/// parameter (microseconds, as Triton) is the other way to give one.
pub const TIMEOUT_HEADER: &str = "x-kiln-timeout-ms";

type Response = http::Response<tonic::body::Body>;

/// What the HTTP front end shares with the rest of the server.
pub struct HttpState {
    pub auth: Arc<Auth>,
    pub repo: Arc<LiveRepository>,
    pub pipeline: Arc<Pipeline>,
    pub budget: Arc<InflightBudget>,
    pub max_message_bytes: usize,
    pub body_timeout: Duration,
    pub drain: Arc<Drain>,
    /// False once shutdown starts.
    pub ready: Arc<AtomicBool>,
}

/// The tower service the accept loop drives.
#[derive(Clone)]
pub struct HttpService(Arc<HttpState>);

impl HttpService {
    pub fn new(state: Arc<HttpState>) -> Self {
        Self(state)
    }
}

impl tower::Service<http::Request<Incoming>> for HttpService {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move { Ok(handle(&state, request).await) })
    }
}

/// What a path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Server,
    Live,
    Ready,
    Model {
        name: String,
        version: String,
    },
    ModelReady {
        name: String,
        version: String,
    },
    Config {
        name: String,
        version: String,
    },
    /// Statistics of every model (`name` empty), a model, or a version.
    Stats {
        name: String,
        version: String,
    },
    Infer {
        name: String,
        version: String,
    },
    Embeddings,
    Models,
}

/// Which error shape a route answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    V2,
    OpenAi,
}

fn route(method: &Method, path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    Some(match (method, parts.as_slice()) {
        (&Method::GET, ["v2"]) => Route::Server,
        (&Method::GET, ["v2", "health", "live"]) => Route::Live,
        (&Method::GET, ["v2", "health", "ready"]) => Route::Ready,
        (&Method::GET, ["v2", "models", "stats"]) => Route::Stats { name: String::new(), version: String::new() },
        (m, ["v2", "models", name, rest @ ..]) => {
            let (version, rest) = match rest {
                ["versions", v, rest @ ..] => (v.to_string(), rest),
                _ => (String::new(), rest),
            };
            let name = name.to_string();
            match (m, rest) {
                (&Method::GET, []) => Route::Model { name, version },
                (&Method::GET, ["ready"]) => Route::ModelReady { name, version },
                (&Method::GET, ["config"]) => Route::Config { name, version },
                (&Method::GET, ["stats"]) => Route::Stats { name, version },
                (&Method::POST, ["infer"]) => Route::Infer { name, version },
                _ => return None,
            }
        }
        (&Method::POST, ["v1", "embeddings"]) => Route::Embeddings,
        (&Method::GET, ["v1", "models"]) => Route::Models,
        _ => return None,
    })
}

fn body(bytes: impl Into<Bytes>) -> tonic::body::Body {
    tonic::body::Body::new(http_body_util::Full::new(bytes.into()))
}

fn respond(code: StatusCode, content_type: &'static str, bytes: impl Into<Bytes>) -> Response {
    let mut response = http::Response::new(body(bytes));
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn json<T: Serialize>(code: StatusCode, value: &T) -> Response {
    respond(code, "application/json", serde_json::to_vec(value).unwrap_or_default())
}

/// The HTTP status for an error: the gRPC code's REST equivalent, with a
/// body over the size limit as 413.
pub fn http_status(err: &InferError) -> StatusCode {
    use tonic::Code;
    if matches!(err, InferError::Overloaded { reason: "message_size", .. }) {
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    match status::code(err) {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error in the route's own shape: V2's `{"error": message}`, or
/// OpenAI's `{"error": {message, type, code}}`. The message is the one
/// gRPC sends.
fn error(dialect: Dialect, err: &InferError) -> Response {
    let code = http_status(err);
    let message = err.to_string();
    match dialect {
        Dialect::V2 => json(code, &serde_json::json!({ "error": message })),
        Dialect::OpenAi => {
            let kind = match code {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::FORBIDDEN => "permission_error",
                StatusCode::NOT_FOUND => "not_found_error",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                c if c.is_client_error() => "invalid_request_error",
                _ => "server_error",
            };
            let grpc = status::code_name(status::code(err));
            json(
                code,
                &serde_json::json!({ "error": { "message": message, "type": kind, "param": null, "code": grpc } }),
            )
        }
    }
}

async fn handle(state: &HttpState, request: http::Request<Incoming>) -> Response {
    let received = Instant::now();
    let Some(route) = route(request.method(), request.uri().path()) else {
        let message = format!("no such endpoint: {} {}", request.method(), request.uri().path());
        return json(StatusCode::NOT_FOUND, &serde_json::json!({ "error": message }));
    };
    let dialect = if matches!(route, Route::Embeddings | Route::Models) { Dialect::OpenAi } else { Dialect::V2 };
    let (parts, incoming) = request.into_parts();
    if matches!(route, Route::Live | Route::Ready) {
        let up = route == Route::Live || state.ready.load(Ordering::Acquire);
        return respond(if up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, "text/plain", "");
    }
    let client = parts.extensions.get::<ClientCertificate>();
    let caller = match state.auth.caller(&parts.headers, client) {
        Ok(caller) => caller,
        Err(e) => return error(dialect, &e),
    };
    let result = match route {
        Route::Server => Ok(json(StatusCode::OK, &server_metadata())),
        Route::Models => Ok(respond(StatusCode::OK, "application/json", text_models(state))),
        Route::Model { name, version } => model_metadata(state, &caller, &name, &version),
        Route::ModelReady { name, version } => model_ready(state, &caller, &name, &version),
        Route::Config { name, version } => served(state, &caller, &name, &version).map(|v| {
            json(StatusCode::OK, &triton::config(&crate::api::grpc::encode::model_config(&v.spec, &v.config)))
        }),
        Route::Stats { name, version } => stats(state, &caller, &name, &version),
        Route::Infer { name, version } => {
            infer(state, &parts, incoming, received, caller, Inference::V2 { name, version }).await
        }
        Route::Embeddings => infer(state, &parts, incoming, received, caller, Inference::Embeddings).await,
        Route::Live | Route::Ready => unreachable!("answered above"),
    };
    result.unwrap_or_else(|e| error(dialect, &e))
}

#[derive(Serialize)]
struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: [&'static str; 4],
}

fn server_metadata() -> ServerMetadata {
    ServerMetadata {
        name: "kiln",
        version: env!("CARGO_PKG_VERSION"),
        extensions: ["binary_tensor_data", "statistics", "model_repository", "parameters"],
    }
}

fn text_models(state: &HttpState) -> Vec<u8> {
    let repo = state.repo.get();
    let names: Vec<&str> = repo
        .models
        .iter()
        .filter(|(_, m)| m.versions.get(&m.default_version).is_some_and(|v| openai::text_interface(&v.spec).is_some()))
        .map(|(name, _)| name.as_str())
        .collect();
    openai::models(names.into_iter())
}

fn served(state: &HttpState, caller: &Caller, name: &str, version: &str) -> Result<Arc<ServedVersion>, InferError> {
    caller.permit(name)?;
    router::route(&state.repo.get(), name, version)
}

#[derive(Serialize)]
struct TensorMetadata<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
}

fn model_metadata(state: &HttpState, caller: &Caller, name: &str, version: &str) -> Result<Response, InferError> {
    let served = served(state, caller, name, version)?;
    let repo = state.repo.get();
    let versions: Vec<String> =
        repo.models.get(name).map(|m| m.versions.keys().map(u64::to_string).collect()).unwrap_or_default();
    let tensors = |specs: &'_ [crate::model::TensorSpec]| -> Vec<serde_json::Value> {
        specs
            .iter()
            .map(|t| {
                serde_json::to_value(TensorMetadata { name: &t.name, datatype: t.datatype.as_v2(), shape: &t.shape })
                    .unwrap_or_default()
            })
            .collect()
    };
    let spec = &served.spec;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "name": spec.name,
            "versions": versions,
            "platform": spec.platform,
            "inputs": tensors(&spec.inputs),
            "outputs": tensors(&spec.outputs),
        }),
    ))
}

fn model_ready(state: &HttpState, caller: &Caller, name: &str, version: &str) -> Result<Response, InferError> {
    let served = served(state, caller, name, version)?;
    let ready = state.ready.load(Ordering::Acquire) && served.batcher.serving();
    Ok(respond(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, "text/plain", ""))
}

fn stats(state: &HttpState, caller: &Caller, name: &str, version: &str) -> Result<Response, InferError> {
    let stats = crate::api::grpc::inference::select_statistics(&state.repo.get(), caller, name, version)?;
    Ok(json(StatusCode::OK, &triton::statistics(&stats)))
}

/// Which inference endpoint a body is for.
enum Inference {
    V2 { name: String, version: String },
    Embeddings,
}

fn call(parts: &http::request::Parts, received: Instant, caller: Caller) -> Result<Call, InferError> {
    let deadline = match parts.headers.get(TIMEOUT_HEADER) {
        None => None,
        Some(value) => {
            let ms = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|ms| ms.is_finite() && *ms >= 0.0);
            let ms = ms.ok_or_else(|| {
                InferError::InvalidArgument(format!("header '{TIMEOUT_HEADER}': expected milliseconds, a number >= 0"))
            })?;
            Some(received + Duration::from_secs_f64((ms / 1e3).min(86_400.0)))
        }
    };
    let tenant = parts.headers.get(TENANT_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok(Call { received, deadline, caller, tenant, protocol: crate::monitor::metrics::Protocol::Http })
}

async fn infer(
    state: &HttpState,
    parts: &http::request::Parts,
    incoming: Incoming,
    received: Instant,
    caller: Caller,
    endpoint: Inference,
) -> Result<Response, InferError> {
    if let Inference::V2 { name, .. } = &endpoint {
        caller.permit(name)?;
    }
    if state.drain.draining() {
        return Err(InferError::Unavailable(
            "the server is shutting down: send this request to another replica".into(),
        ));
    }
    let call = call(parts, received, caller)?;
    let (bytes, reservation) = receive(incoming, &parts.headers, state).await?;
    let repo = state.repo.get();
    let response = match endpoint {
        Inference::V2 { name, version } => {
            let header_length = match parts.headers.get(v2::HEADER_LENGTH) {
                None => None,
                Some(v) => Some(v.to_str().ok().and_then(|v| v.parse::<usize>().ok()).ok_or_else(|| {
                    InferError::InvalidArgument(format!("header '{}': expected a byte count", v2::HEADER_LENGTH))
                })?),
            };
            let (message, binary) = v2::parse_request(&name, &version, &bytes, header_length)?;
            drop(bytes);
            let req = Arc::new(V2Request(message));
            let served = controls::serve(&state.pipeline, &repo, &req, &call).await?;
            let (body, json_length) = v2::encode_response(&served, &binary);
            match json_length {
                None => respond(StatusCode::OK, "application/json", body),
                Some(n) => {
                    let mut response = respond(StatusCode::OK, "application/octet-stream", body);
                    response.headers_mut().insert(v2::HEADER_LENGTH, header::HeaderValue::from(n));
                    response
                }
            }
        }
        Inference::Embeddings => {
            let request = openai::parse(&bytes)?;
            drop(bytes);
            call.caller.permit(&request.model)?;
            let primary = router::route(&repo, &request.model, "").map_err(|e| match e {
                InferError::NotFound(m) => InferError::NotFound(format!("field 'model': {m}")),
                other => other,
            })?;
            let (message, encoding) = openai::to_v2(&request, &primary.spec)?;
            let req = Arc::new(V2Request(message));
            let Served { answer, .. } = controls::serve(&state.pipeline, &repo, &req, &call).await?;
            respond(StatusCode::OK, "application/json", openai::encode(&request.model, &answer, encoding)?)
        }
    };
    Ok(response.map(|body| Guarded::wrap(body, reservation)))
}

/// Receives a body within `max_message_bytes` (refused from
/// Content-Length before a byte is read), the in-flight budget and the
/// body timeout.
async fn receive(
    mut incoming: Incoming,
    headers: &http::HeaderMap,
    state: &HttpState,
) -> Result<(Bytes, Reservation), InferError> {
    let limit = state.max_message_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if let Some(len) = declared.filter(|len: &usize| *len > limit) {
        return Err(too_large("body", len, limit));
    }
    let mut reservation = state.budget.reserve();
    let mut buffer = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    let deadline = tokio::time::Instant::now() + state.body_timeout;
    while let Some(data) = next_data(&mut incoming, deadline, state.body_timeout, buffer.len()).await? {
        if buffer.len() + data.len() > limit {
            return Err(too_large("body", buffer.len() + data.len(), limit));
        }
        reservation.grow(data.len())?;
        buffer.extend_from_slice(&data);
    }
    Ok((buffer.freeze(), reservation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_method_and_path() {
        let get = |p| route(&Method::GET, p);
        let post = |p| route(&Method::POST, p);
        assert_eq!(get("/v2"), Some(Route::Server));
        assert_eq!(get("/v2/health/ready"), Some(Route::Ready));
        assert_eq!(get("/v2/models/risk"), Some(Route::Model { name: "risk".into(), version: String::new() }));
        assert_eq!(
            get("/v2/models/risk/versions/2/ready"),
            Some(Route::ModelReady { name: "risk".into(), version: "2".into() })
        );
        assert_eq!(post("/v2/models/risk/infer"), Some(Route::Infer { name: "risk".into(), version: String::new() }));
        assert_eq!(
            post("/v2/models/risk/versions/1/infer"),
            Some(Route::Infer { name: "risk".into(), version: "1".into() })
        );
        assert_eq!(post("/v1/embeddings"), Some(Route::Embeddings));
        assert_eq!(get("/v1/models"), Some(Route::Models));
        assert_eq!(get("/v2/models/stats"), Some(Route::Stats { name: String::new(), version: String::new() }));
        assert_eq!(get("/v2/models/risk/config"), Some(Route::Config { name: "risk".into(), version: String::new() }));
        assert_eq!(
            get("/v2/models/risk/versions/1/stats"),
            Some(Route::Stats { name: "risk".into(), version: "1".into() })
        );
        assert_eq!(get("/v2/models/risk/infer"), None, "infer is a POST");
        assert_eq!(post("/v2/models/risk/versions/1/other"), None);
        assert_eq!(get("/nothing"), None);
    }

    #[test]
    fn errors_map_to_the_statuses_rest_clients_expect() {
        let cases = [
            (InferError::InvalidArgument("x".into()), 400),
            (InferError::NotFound("x".into()), 404),
            (InferError::Unauthenticated("x".into()), 401),
            (InferError::PermissionDenied("x".into()), 403),
            (InferError::QueueFull { model: "m".into(), version: 1, max_queue: 1 }, 429),
            (too_large("body", 10, 5), 413),
            (InferError::Unavailable("x".into()), 503),
            (InferError::Expired("x".into()), 504),
            (InferError::DeadlineUnmeetable("x".into()), 504),
        ];
        for (err, code) in cases {
            assert_eq!(http_status(&err).as_u16(), code, "{err}");
        }
    }
}
