//! Shutdown as an orchestrator does it, on the real binary: SIGTERM turns
//! health NOT_SERVING (Watch streams receive it, then end), new calls get
//! UNAVAILABLE, everything admitted is answered and the process exits 0,
//! unheld by a connection stuck in its handshake; past `--drain-timeout`
//! the rest is answered UNAVAILABLE; a second signal exits at once. A clean
//! stop joins every serving thread.

mod common;

use std::process::Command;
use std::time::Duration;

use common::child::{Server, kiln_bin};
use common::{wait_for_started, wide_mlp_repo, wide_request};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const M: &str = "wide";
/// A 1024-row request on this model takes a few hundred milliseconds.
const SETTINGS: &str = "max_batch_size = 1024\nmax_queue_delay_ms = 2\nmax_queue = 64\nlatency_budget_ms = 500\n\
                        default_timeout_ms = 60000";

/// A server of the wide model, with a long handshake timeout so that a
/// stuck connection would hold the exit if anything waited for it.
fn start(drain_timeout: &str) -> (Server, tempfile::TempDir) {
    let repo = wide_mlp_repo(M, 2048, SETTINGS);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, "[limits]\nhandshake_timeout_ms = 600000\n").expect("config");
    let mut command = Command::new(kiln_bin());
    command
        .args([
            "serve",
            "--grpc",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--drain-timeout",
            drain_timeout,
        ])
        .arg("--repo")
        .arg(repo.path())
        .arg("--config")
        .arg(&config);
    (Server::spawn(command, dir).expect("serves"), repo)
}

type Answer = tokio::task::JoinHandle<Result<tonic::Response<kiln::api::pb::ModelInferResponse>, tonic::Status>>;

/// `count` requests of `rows` rows, each from its own connection, the
/// first of them already computing when this returns.
async fn queue_work(server: &Server, count: usize, rows: usize) -> Vec<Answer> {
    let mut answers = Vec::new();
    for _ in 0..count {
        let mut c = server.client().await;
        answers.push(tokio::spawn(async move { c.raw.model_infer(wide_request(M, rows)).await }));
    }
    wait_for_started(&mut server.client().await, M, 1).await;
    answers
}

#[tokio::test]
async fn sigterm_answers_what_was_admitted_ends_watch_and_exits_zero() {
    let (mut server, _repo) = start("30");
    let channel = kiln::client::channel(&server.grpc.to_string()).await.expect("channel");
    let mut watch =
        HealthClient::new(channel).watch(HealthCheckRequest { service: M.into() }).await.expect("watch").into_inner();
    let first = watch.message().await.expect("a status").expect("open");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let _stuck = tokio::net::TcpStream::connect(server.grpc).await.expect("a connection that never speaks");
    let admitted = queue_work(&server, 4, 512).await;
    let mut late = server.client().await;

    server.signal("TERM");
    // Watch: NOT_SERVING, then the end of the stream.
    let mut last = None;
    while let Ok(Some(update)) =
        tokio::time::timeout(Duration::from_secs(20), watch.message()).await.expect("watch ended")
    {
        last = Some(update.status);
    }
    assert_eq!(last, Some(ServingStatus::NotServing as i32));
    // A new call is refused, not admitted: the server answers UNAVAILABLE,
    // or, once its GOAWAY has arrived, the client does not send it at all
    // (tonic reports that as CANCELLED).
    let refused = late.raw.model_infer(wide_request(M, 1)).await.expect_err("refused while draining");
    assert!(matches!(refused.code(), Code::Unavailable | Code::Cancelled), "{refused:?}");
    // Everything admitted before the signal is answered.
    for answer in admitted {
        let response = answer.await.expect("join").expect("admitted work is answered, not dropped");
        assert_eq!(kiln::client::output_fp32(response.get_ref(), 0).map(|v| v.len()), Some(512 * 2));
    }
    // Well before the 30 s drain timeout, and unheld by the stuck connection.
    let status = server.exited(Duration::from_secs(20)).expect("exited after the drain");
    assert_eq!(status.code(), Some(0), "{}", server.log.lock().expect("log"));
    // Every serving thread (scheduler, executors, drift, tokenization) ended
    // and was joined before the exit.
    let log = server.log.lock().expect("log").clone();
    assert!(log.contains("clean stop: every serving thread joined"), "{log}");
}

#[tokio::test]
async fn past_the_drain_timeout_the_rest_is_answered_unavailable() {
    let (mut server, _repo) = start("0.3");
    let queued = queue_work(&server, 8, 1024).await;
    server.signal("TERM");
    let mut unavailable = 0;
    for answer in queued {
        match answer.await.expect("join") {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
                assert!(status.message().contains("drain_timeout"), "{}", status.message());
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "eight batches of 1024 rows all fit in 0.3 s?");
    let status = server.exited(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(0), "{}", server.log.lock().expect("log"));
}

#[tokio::test]
async fn a_second_signal_exits_at_once_without_finishing_the_drain() {
    let (mut server, _repo) = start("60");
    let queued = queue_work(&server, 8, 1024).await;
    // Connected before the signal: the listener closes with it.
    let mut health = HealthClient::new(kiln::client::channel(&server.grpc.to_string()).await.expect("channel"));
    server.signal("TERM");
    // The first signal has taken effect once health says so (or the
    // connection is asked to go away).
    loop {
        match health.check(HealthCheckRequest { service: M.into() }).await {
            Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32 => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    server.signal("TERM");
    let status = server.exited(Duration::from_secs(20)).expect("exited");
    assert_eq!(status.code(), Some(130), "{}", server.log.lock().expect("log"));
    let mut unanswered = 0;
    for answer in queued {
        if answer.await.expect("join").is_err() {
            unanswered += 1;
        }
    }
    assert!(unanswered > 0, "the whole queue was drained before the second signal took effect");
}
