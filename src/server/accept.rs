//! Accepts connections on one listener and drives each under the limits:
//! a cap on open connections (beyond it new ones are closed at once), a
//! handshake timeout, an idle timeout, an optional maximum age, HTTP/2
//! settings and keepalive pings, and a write-stall timeout. On stop every
//! connection is asked to go away (GOAWAY) and given `grace` to finish.
//!
//! With TLS the handshake runs within the same handshake timeout; a
//! verified client certificate's name goes on each of its requests. A
//! plaintext client on a TLS port is answered, in its own protocol, that
//! the port needs TLS (a gRPC status, or an HTTP 400), rather than left to
//! guess from a closed connection.
//!
//! Kiln runs this loop itself rather than tonic's `Server` because tonic
//! wraps every service in its own grpc-timeout enforcement, which answers
//! CANCELLED; Kiln must own that deadline and answer DEADLINE_EXCEEDED.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;

use super::io::GuardedIo;
use crate::api::grpc::ingress::Guarded;
use crate::config::LimitsConfig;
use crate::security::ClientCertificate;

/// Which HTTP a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC.
    Http2,
    /// The Prometheus endpoint (scrapers speak HTTP/1.1).
    Http1,
}

/// The client preface every HTTP/2 connection opens with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Calls open on one connection, to tell when it is idle.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    changed: Notify,
}

/// One open call; the connection is idle when none is left.
struct OpenCall(Arc<Activity>);

impl OpenCall {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_waiters();
        Self(activity.clone())
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl Activity {
    /// Completes once no call has been open for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(timeout) => return,
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// Counts a connection's calls from their start until their response body
/// is finished or dropped, and puts the connection's client certificate
/// (mutual TLS) on each.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    client: Option<ClientCertificate>,
}

type Response = http::Response<tonic::body::Body>;

impl<S> tower::Service<http::Request<Incoming>> for Tracked<S>
where
    S: tower::Service<http::Request<Incoming>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Incoming>) -> Self::Future {
        let open = OpenCall::new(&self.activity);
        if let Some(client) = &self.client {
            request.extensions_mut().insert(client.clone());
        }
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| Guarded::wrap(body, open)))
        })
    }
}

/// The HTTP/2 settings every gRPC connection gets.
fn http2(limits: &LimitsConfig) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .initial_stream_window_size(limits.stream_window_bytes)
        .initial_connection_window_size(limits.connection_window_bytes)
        .keep_alive_interval(limits.keepalive_interval())
        .keep_alive_timeout(limits.keepalive_timeout());
    builder
}

fn http1(limits: &LimitsConfig) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout())
        .max_buf_size((limits.max_header_list_bytes as usize).max(8192));
    builder
}

/// What every connection task shares.
struct Shared<S> {
    service: S,
    limits: LimitsConfig,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    h1: hyper::server::conn::http1::Builder,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// After the drain timeout, how long the last answers (UNAVAILABLE) get to
/// leave before the remaining connections are dropped.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// Serves connections from `listener` until `signal` completes, then asks
/// each to go away and waits at most `grace` for them to finish; past it
/// calls `expire` (so that waiting calls answer) and gives them
/// [`LAST_WORDS`] more.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop<S>(
    listener: TcpListener,
    service: S,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: LimitsConfig,
    signal: impl Future<Output = ()>,
    grace: Duration,
    expire: impl FnOnce(),
) where
    S: tower::Service<http::Request<Incoming>, Response = Response> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let shared = Arc::new(Shared { service, h2: http2(&limits), h1: http1(&limits), limits, protocol, tls });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a sender; recv() returns None once all
    // have ended (mini-redis's shutdown_complete).
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Closed at once: the open connections keep being served.
                    tracing::debug!(max = shared.limits.max_connections, "connection cap reached; closing a new one");
                    metrics::counter!(crate::monitor::metrics::CONNECTIONS_REFUSED_TOTAL).increment(1);
                    drop(stream);
                    continue;
                };
                let (shared, stop, done) = (shared.clone(), stop_rx.clone(), done_tx.clone());
                tokio::spawn(async move {
                    connection(stream, &shared, stop).await;
                    drop((permit, done));
                });
            }
            _ = &mut signal => break,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_ok() {
        return;
    }
    tracing::warn!(?grace, "drain timeout passed: answering what is still waiting UNAVAILABLE");
    expire();
    if tokio::time::timeout(LAST_WORDS, done_rx.recv()).await.is_err() {
        tracing::warn!("closing the connections still open after the drain");
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Reads the HTTP/2 client preface before `deadline`; returns it, to be
/// replayed.
async fn preface<IO: AsyncRead + Unpin>(stream: &mut IO, deadline: Instant) -> Option<Bytes> {
    let mut preface = [0u8; PREFACE.len()];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == PREFACE => Some(Bytes::copy_from_slice(&preface)),
        _ => None,
    }
}

/// Waits until the client has sent something (or `deadline` passes).
async fn first_byte(stream: &TcpStream, deadline: Instant) -> Option<u8> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut byte)).await {
        Ok(Ok(1)) => Some(byte[0]),
        _ => None,
    }
}

/// What a plaintext client on a TLS port is told.
const NEEDS_TLS: &str = "this port accepts TLS only: connect with TLS (grpcs:// or https://, tritonclient ssl=True, \
                         perf_analyzer --ssl-grpc-use-ssl)";

fn needs_tls(protocol: Protocol) -> Response {
    match protocol {
        Protocol::Http2 => tonic::Status::failed_precondition(NEEDS_TLS).into_http(),
        Protocol::Http1 => {
            let mut response = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(Bytes::from(
                format!("{NEEDS_TLS}\n"),
            ))));
            *response.status_mut() = http::StatusCode::BAD_REQUEST;
            response
        }
    }
}

async fn connection<S>(stream: TcpStream, shared: &Shared<S>, mut stop: watch::Receiver<bool>)
where
    S: tower::Service<http::Request<Incoming>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Nagle's algorithm with delayed ACKs stalls small responses by ~40 ms.
    let _ = stream.set_nodelay(true);
    let stopped = stop.clone();
    let opened = tokio::select! {
        opened = open(stream, shared) => opened,
        _ = stop.wait_for(|s| *s) => None,
    };
    let Some((opened, replay)) = opened else {
        tracing::debug!("connection closed: no handshake within handshake_timeout_ms");
        return;
    };
    match opened {
        Opened::Plain(stream) => serve_io(stream, replay, shared.service.clone(), None, shared, stopped).await,
        Opened::Tls(stream) => {
            let client = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some()
                .then(|| ClientCertificate { common_name: crate::security::tls::client_name(&stream) });
            serve_io(stream, replay, shared.service.clone(), client, shared, stopped).await;
        }
        Opened::NeedsTls(stream) => {
            let protocol = shared.protocol;
            let refuse = tower::service_fn(move |_: http::Request<Incoming>| async move {
                Ok::<_, std::convert::Infallible>(needs_tls(protocol))
            });
            serve_io(stream, replay, refuse, None, shared, stopped).await;
        }
    }
}

/// Settles a new connection's transport (the TLS handshake, when the
/// listener has TLS) and reads the start of its protocol, all within the
/// handshake timeout; returns the bytes read, to be replayed.
async fn open<S>(stream: TcpStream, shared: &Shared<S>) -> Option<(Opened, Bytes)> {
    let deadline = Instant::now() + shared.limits.handshake_timeout();
    let http2 = shared.protocol == Protocol::Http2;
    let Some(tls) = &shared.tls else {
        let mut stream = stream;
        let replay = match http2 {
            true => preface(&mut stream, deadline).await?,
            // hyper's header_read_timeout bounds the rest of the head.
            false => first_byte(&stream, deadline).await.map(|_| Bytes::new())?,
        };
        return Some((Opened::Plain(stream), replay));
    };
    if first_byte(&stream, deadline).await? != TLS_HANDSHAKE {
        let mut stream = stream;
        let replay = if http2 { preface(&mut stream, deadline).await? } else { Bytes::new() };
        return Some((Opened::NeedsTls(stream), replay));
    }
    let mut stream = match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
        Ok(Ok(stream)) => Box::new(stream),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            metrics::counter!(crate::monitor::metrics::TLS_HANDSHAKE_FAILURES).increment(1);
            return None;
        }
        Err(_) => return None,
    };
    let replay = if http2 { preface(&mut stream, deadline).await? } else { Bytes::new() };
    Some((Opened::Tls(stream), replay))
}

/// A connection once its transport is settled.
enum Opened {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Plaintext on a TLS port.
    NeedsTls(TcpStream),
}

/// Serves HTTP on an open stream (after its preface, `replay`) until it
/// ends or is asked to go away.
async fn serve_io<IO, S, X>(
    io: IO,
    replay: Bytes,
    service: X,
    client: Option<ClientCertificate>,
    shared: &Shared<S>,
    stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    X: tower::Service<http::Request<Incoming>, Response = Response> + Clone + Send + 'static,
    X::Future: Send + 'static,
    X::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &shared.limits;
    let io = TokioIo::new(GuardedIo::new(io, replay, limits.write_timeout()));
    let activity = Arc::new(Activity::default());
    let service =
        hyper_util::service::TowerToHyperService::new(Tracked { inner: service, activity: activity.clone(), client });
    match shared.protocol {
        Protocol::Http2 => drive(shared.h2.serve_connection(io, service), &activity, limits, stop).await,
        Protocol::Http1 => drive(shared.h1.serve_connection(io, service), &activity, limits, stop).await,
    }
}

/// Runs one connection until it ends; asks it to go away (GOAWAY, or
/// close after the current HTTP/1 response) on stop, idleness or age.
async fn drive<C>(connection: C, activity: &Activity, limits: &LimitsConfig, mut stop: watch::Receiver<bool>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let age = async {
        match limits.max_connection_age() {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    let idle = activity.idle_for(limits.idle_timeout());
    tokio::pin!(age, idle);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !closing => {}
            _ = &mut age, if !closing => tracing::debug!("connection reached max_connection_age_ms"),
            _ = &mut idle, if !closing => tracing::debug!("connection idle for idle_timeout_ms"),
        }
        connection.as_mut().graceful_shutdown();
        closing = true;
    }
}
