//! No request or connection can exhaust Kiln's memory or hold it: the
//! real binary, run as a child process, answers amplification messages for
//! every repeated field within twice their wire size plus 1 MiB of peak
//! memory (its VmHWM, reset before each); bytes in flight, body time,
//! silent and idle connections and the connection count are bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::TestServer;
use common::child::Server;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln::config::{LimitsConfig, ServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

const INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A request the risk model answers OK: a real patient's row.
fn good_request() -> kiln::api::pb::ModelInferRequest {
    kiln::client::fp32_request("risk", "features", &[common::wdbc().0[0].clone()])
}

/// Sends one already-encoded ModelInferRequest over plain HTTP/2 and returns
/// the gRPC status.
async fn call_raw(addr: SocketAddr, message: &[u8]) -> tonic::Status {
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    send_raw(&mut send, addr, message).await
}

/// One ModelInfer call with `message` as its body, on an open connection.
async fn send_raw(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    addr: SocketAddr,
    message: &[u8],
) -> tonic::Status {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.extend_from_slice(message);
    let request = infer_post(addr, http_body_util::Full::new(frame.freeze()));
    let response = send.send_request(request).await.expect("a response");
    grpc_status(response).await
}

/// A ModelInfer call as gRPC sends it, with `body` as its frames.
fn infer_post<B>(addr: SocketAddr, body: B) -> http::Request<B> {
    http::Request::post(format!("http://{addr}{INFER_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .expect("request")
}

async fn grpc_status(response: http::Response<hyper::body::Incoming>) -> tonic::Status {
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).unwrap_or_else(|| tonic::Status::ok(""))
}

/// A length-delimited protobuf field.
fn field(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let mut n = payload.len() as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(payload);
    out
}

/// `model_name = "risk"` followed by `body`.
fn to_risk(body: &[u8]) -> Vec<u8> {
    let mut out = field(0x0a, b"risk");
    out.extend_from_slice(body);
    out
}

/// The amplification messages of about `bytes` each: one per repeated
/// field, each cheap on the wire and costly as prost structs.
fn amplifiers(bytes: usize) -> Vec<(&'static str, Vec<u8>)> {
    let pairs = |pair: [u8; 2]| pair.repeat(bytes / 2);
    let ones = vec![1u8; bytes];
    // Map entries with distinct 3-character keys: equal keys would only
    // overwrite one another.
    let entries = |tag: u8| -> Vec<u8> {
        let printable = |i: usize| b' ' + (i % 95) as u8;
        (0..bytes / 7).flat_map(|i| [tag, 5, 0x0a, 3, printable(i), printable(i / 95), printable(i / 9025)]).collect()
    };
    vec![
        ("inputs (empty entries)", to_risk(&pairs([0x2a, 0x00]))),
        ("outputs (empty entries)", to_risk(&pairs([0x32, 0x00]))),
        ("raw_input_contents (empty entries)", to_risk(&pairs([0x3a, 0x00]))),
        ("parameters (distinct keys)", to_risk(&entries(0x22))),
        ("inputs[0].shape (1-byte varints)", to_risk(&field(0x2a, &field(0x1a, &ones)))),
        ("inputs[0].parameters (distinct keys)", to_risk(&field(0x2a, &entries(0x22)))),
        ("contents.int64_contents (1-byte varints)", to_risk(&field(0x2a, &field(0x2a, &field(0x1a, &ones))))),
        ("contents.bytes_contents (empty entries)", to_risk(&field(0x2a, &field(0x2a, &pairs([0x42, 0x00]))))),
        ("outputs[0].parameters (distinct keys)", to_risk(&field(0x32, &entries(0x12)))),
    ]
}

#[tokio::test]
async fn amplification_messages_cost_at_most_twice_their_wire_size_plus_a_mebibyte() {
    let mib: usize = std::env::var("KILN_AMPLIFY_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let server = Server::with_config("max_message_bytes = 67108864\n");
    // Warm up: the model answers a real request first.
    let mut client = server.client().await;
    let row = common::wdbc().0[0].clone();
    client.raw.model_infer(kiln::client::fp32_request("risk", "features", &[row])).await.expect("served");
    let mut failures = Vec::new();
    for (name, message) in amplifiers(mib << 20) {
        let before = server.reset_peak();
        let status = call_raw(server.grpc, &message).await;
        let grown = server.peak().saturating_sub(before);
        let bound = 2 * message.len() as u64 + (1 << 20);
        println!(
            "{name:42} wire {:6.1} MiB  peak +{:8.1} MiB  bound {:6.1} MiB  {:?}",
            message.len() as f64 / 1048576.0,
            grown as f64 / 1048576.0,
            bound as f64 / 1048576.0,
            status.code()
        );
        if status.code() != Code::InvalidArgument || grown > bound {
            failures.push(format!(
                "{name}: {:?} {:?}, peak +{grown} over bound {bound}",
                status.code(),
                status.message()
            ));
        }
    }
    // Still serving after all of them.
    client.raw.model_infer(good_request()).await.expect("alive");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn each_refusal_names_the_field_and_the_limit() {
    let server = TestServer::start(ServeConfig { max_message_bytes: 1 << 20, ..Default::default() }).await;
    for (name, message) in amplifiers(64 << 10) {
        let status = call_raw(server.addr, &message).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {}", status.message());
        let field = name.split(' ').next().expect("a field name");
        let leaf = field.rsplit('.').next().expect("leaf");
        assert!(
            status.message().contains(leaf) && status.message().contains("more than"),
            "{name}: {}",
            status.message()
        );
    }
}

fn limits(change: impl FnOnce(&mut LimitsConfig)) -> ServeConfig {
    let mut config = ServeConfig { max_message_bytes: 64 << 10, ..Default::default() };
    change(&mut config.limits);
    config
}

/// Opens a ModelInfer call whose body declares `declared` bytes and sends
/// only `sent` of them, holding the stream open.
async fn partial_call(
    addr: SocketAddr,
    declared: usize,
    sent: usize,
) -> (tokio::sync::mpsc::Sender<Bytes>, tokio::task::JoinHandle<tonic::Status>) {
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = http_body_util::StreamBody::new(futures::StreamExt::map(tokio_stream_from(body_rx), |b: Bytes| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b))
    }));
    let request = infer_post(addr, body);
    let mut head = BytesMut::new();
    head.put_u8(0);
    head.put_u32(declared as u32);
    head.extend_from_slice(&vec![0x0a; sent]);
    body_tx.send(head.freeze()).await.expect("send the first part");
    let answer = tokio::spawn(async move {
        let response = send.send_request(request).await.expect("a response");
        grpc_status(response).await
    });
    (body_tx, answer)
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn bytes_in_flight_are_bounded_and_given_back() {
    let server = TestServer::start(limits(|l| l.max_inflight_bytes = 100 << 10)).await;
    // Holds 60 KiB without finishing its body.
    let (hold, held) = partial_call(server.addr, 64 << 10, 60 << 10).await;
    server.wait_for_metric("kiln_inflight_bytes 61445").await;
    let (_second, refused) = partial_call(server.addr, 64 << 10, 60 << 10).await;
    let status = refused.await.expect("joined");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("max_inflight_bytes 102400"), "{}", status.message());
    // The held call ends (its client gives up); its bytes come back.
    drop(hold);
    let _ = held.await;
    server.wait_for_metric("kiln_inflight_bytes 0").await;
    let mut c = server.client().await;
    c.raw.model_infer(good_request()).await.expect("served again");
    assert!(server.metrics_text().await.contains("kiln_ingress_refused_total{reason=\"inflight_bytes\"} 1"));
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_at_the_body_timeout() {
    let server = TestServer::start(limits(|l| l.body_timeout_ms = 200)).await;
    let (_hold, answer) = partial_call(server.addr, 1000, 10).await;
    let status = tokio::time::timeout(Duration::from_secs(30), answer).await.expect("answered").expect("joined");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{}", status.message());
    assert!(status.message().contains("body_timeout_ms 200"), "{}", status.message());
}

/// Waits (bounded) for the server to close `stream`: a read returns EOF or
/// an error.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // SETTINGS, GOAWAY: keep reading to the close
            }
        }
    });
    waited.await.is_ok()
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_within_their_timeouts() {
    let server = TestServer::start(limits(|l| {
        l.handshake_timeout_ms = 200;
        l.idle_timeout_ms = 300;
    }))
    .await;
    // Never sends the HTTP/2 preface.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    assert!(closed_by_server(&mut silent).await, "a silent gRPC connection was held");
    // Same on the metrics port.
    let mut silent = TcpStream::connect(server.metrics_addr).await.expect("connect");
    assert!(closed_by_server(&mut silent).await, "a silent metrics connection was held");

    // Completes the handshake, makes a call, then goes quiet (half-open as
    // far as the server can tell): closed after idle_timeout_ms.
    let io = TokioIo::new(TcpStream::connect(server.addr).await.expect("connect"));
    let (send, connection) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Full<Bytes>>(TokioExecutor::new(), io)
            .await
            .expect("HTTP/2 handshake");
    let ended = tokio::spawn(connection);
    let ended = tokio::time::timeout(Duration::from_secs(20), ended).await;
    assert!(ended.is_ok(), "an idle connection was held past idle_timeout_ms");
    drop(send);
}

#[tokio::test]
async fn a_connection_past_its_maximum_age_is_asked_to_go_away() {
    // The idle timeout stays at its five-minute default: only age can end it.
    let server = TestServer::start(limits(|l| l.max_connection_age_ms = Some(300))).await;
    let io = TokioIo::new(TcpStream::connect(server.addr).await.expect("connect"));
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("HTTP/2 handshake");
    let ended = tokio::spawn(connection);
    // A call on it is served before its age runs out.
    let status = send_raw(&mut send, server.addr, &prost::Message::encode_to_vec(&good_request())).await;
    assert_eq!(status.code(), Code::Ok, "{}", status.message());
    let ended = tokio::time::timeout(Duration::from_secs(20), ended).await;
    assert!(ended.is_ok(), "a connection outlived max_connection_age_ms");
}

#[tokio::test]
async fn the_connection_cap_closes_new_connections_while_open_ones_are_served() {
    let server = TestServer::start(limits(|l| l.max_connections = 2)).await;
    let request = good_request;
    // The readiness probe's connection may still hold a slot for a moment.
    let mut open = Vec::new();
    while open.len() < 2 {
        let mut c = server.client().await;
        if c.raw.model_infer(request()).await.is_ok() {
            open.push(c);
        }
    }
    let mut third = TcpStream::connect(server.addr).await.expect("the kernel accepts");
    let _ = third.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(closed_by_server(&mut third).await, "a third connection was kept");
    for c in &mut open {
        c.raw.model_infer(request()).await.expect("open connections are still served");
    }
    let metrics = server.metrics_text().await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_connections_refused_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("counter exported");
    assert!(refused >= 1, "{refused}");
}

#[tokio::test]
async fn the_metrics_endpoint_answers_metrics_and_404_elsewhere() {
    let server = TestServer::built_in().await;
    for (path, status) in [("/metrics", "200 OK"), ("/other", "404 Not Found")] {
        let out = server.metrics_get(path).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {out:.80}");
    }
}
