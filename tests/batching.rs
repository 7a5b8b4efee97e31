//! The batching core against a live server with a real model of
//! controllable cost: deadlines, expiry, cancellation, priorities, cost
//! caps, tenant budgets, load shedding and overload.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    TestServer, expect_refusal, param, statistics, wait_for_started, wide_mlp_repo, wide_request, with_param,
};
use kiln::client::{self, ParameterChoice, RawClient};
use kiln::config::{RepositorySource, ServeConfig, TenantConfig};
use tonic::Code;

/// For a 2048-wide MLP: one row costs ~17 MFLOP, a 1024-row request
/// (the one that occupies the executor) a few hundred milliseconds.
const SETTINGS: &str = "max_batch_size = 1024\nmax_queue_delay_ms = 2\nmax_queue = 64\nlatency_budget_ms = 500\n\
                        default_timeout_ms = 20000\npriority_levels = 2\nmax_cost_us = 10000000";

/// These tests reason about what runs while something else runs; several
/// servers computing at once on a small machine would blur that, so they
/// take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn wide_server(
    model: &str,
    hidden: usize,
    settings: &str,
    tenants: BTreeMap<String, TenantConfig>,
) -> (TestServer, tempfile::TempDir) {
    let dir = wide_mlp_repo(model, hidden, settings);
    let config =
        ServeConfig { repository: RepositorySource::Dir(dir.path().to_path_buf()), tenants, ..Default::default() };
    (TestServer::start(config).await, dir)
}

/// Starts a slow 1024-row request and waits until the executor runs it.
async fn occupy_executor(
    server: &TestServer,
    model: &'static str,
) -> tokio::task::JoinHandle<Result<kiln::api::pb::ModelInferResponse, tonic::Status>> {
    let mut c = server.client().await;
    let before = statistics(&mut c, model).await.inference_stats.and_then(|i| i.queue).map_or(0, |q| q.count);
    let mut slow = server.client().await;
    let task =
        tokio::spawn(async move { slow.raw.model_infer(wide_request(model, 1024)).await.map(|r| r.into_inner()) });
    wait_for_started(&mut c, model, before + 1).await;
    task
}

type Answer = tokio::task::JoinHandle<Result<tonic::Response<kiln::api::pb::ModelInferResponse>, tonic::Status>>;

/// Sends `count` requests of `rows` rows (too small to fill a batch) at the
/// default priority and waits until all of them are queued.
async fn queue_behind(server: &TestServer, model: &'static str, count: usize, rows: usize) -> Vec<Answer> {
    let mut queued = Vec::new();
    for _ in 0..count {
        let mut c = server.client().await;
        queued.push(tokio::spawn(async move { c.raw.model_infer(wide_request(model, rows)).await }));
    }
    server
        .wait_for_metric(&format!("kiln_queue_depth{{model=\"{model}\",version=\"1\",priority=\"1\"}} {count}"))
        .await;
    queued
}

#[tokio::test]
async fn expired_request_is_never_computed_and_answers_before_the_running_batch_ends() {
    const M: &str = "expiry";
    let _turn = SERIAL.lock().await;
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let mut c = server.client().await;
    let slow = occupy_executor(&server, M).await;
    // 30 ms cannot be met behind a batch of hundreds of milliseconds.
    let hurried = with_param(wide_request(M, 1), "timeout", ParameterChoice::Int64Param(30_000));
    expect_refusal(&mut c, hurried, Code::DeadlineExceeded, &["never computed"]).await;
    // The running batch had not finished when the expiry was answered: the
    // executor counts a batch as soon as its compute returns, before any
    // answer of that batch is sent.
    let running = statistics(&mut c, M).await;
    assert_eq!(running.execution_count, 0, "the expiry waited for the running batch to end");
    slow.await.expect("join").expect("slow request answered");
    let s = statistics(&mut c, M).await;
    // Warm-up does not count; only the 1024 rows of the slow request ran.
    assert_eq!(s.inference_count, 1024, "the expired row reached the model");
    let metrics = server.metrics_text().await;
    let series = format!("kiln_rejected_total{{model=\"{M}\",version=\"1\",reason=\"expired_in_queue\"}} 1");
    assert!(metrics.contains(&series), "{metrics}");
}

type PlainHttp2 =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>;

/// A V2 client over plain HTTP/2. tonic's `Channel` enforces `grpc-timeout`
/// on its own side too, and its local timer (reported as CANCELLED) races
/// the server's answer at the same instant; this client leaves the deadline
/// to the server, which is what the test is about.
fn client_without_local_deadline(server: &TestServer) -> RawClient<PlainHttp2> {
    let http =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let origin = format!("http://{}", server.addr).parse().expect("server address is a URI");
    RawClient::with_origin(http, origin)
}

#[tokio::test]
async fn grpc_timeout_header_answers_deadline_exceeded_not_cancelled() {
    const M: &str = "grpc_deadline";
    let _turn = SERIAL.lock().await;
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let mut c = client_without_local_deadline(&server);
    let slow = occupy_executor(&server, M).await;
    let mut request = tonic::Request::new(wide_request(M, 1));
    request.set_timeout(Duration::from_millis(30));
    let status = c.model_infer(request).await.expect_err("deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    slow.await.expect("join").expect("slow answered");

    let mut malformed = tonic::Request::new(wide_request(M, 1));
    malformed.metadata_mut().insert("grpc-timeout", "soon".parse().expect("ascii"));
    let status = c.model_infer(malformed).await.expect_err("bad header");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("'grpc-timeout': not a valid gRPC timeout"), "{status:?}");
}

#[tokio::test]
async fn hopeless_request_is_refused_at_admission_with_the_predicted_time() {
    const M: &str = "hopeless";
    let _turn = SERIAL.lock().await;
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let mut c = server.client().await;
    let request = with_param(wide_request(M, 1024), "timeout", ParameterChoice::Uint64Param(50));
    let status = c.raw.model_infer(request).await.expect_err("hopeless");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{}", status.message());
    // "... N µs left, but computing 1024 rows takes about M µs even if run now"
    let number_before = |text: &str, marker: &str| -> u64 {
        let head = text.split(marker).next().expect("marker");
        head.rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {marker:?}: {text}"))
    };
    let message = status.message();
    let left = number_before(message, " µs left");
    let after = message.split("takes about ").nth(1).unwrap_or_else(|| panic!("no prediction: {message}"));
    let predicted = number_before(after, " µs even if run now");
    assert!(message.contains("computing 1024 rows"), "{message}");
    assert!(left <= 50 && predicted > left, "predicted {predicted} µs against {left} µs left: {message}");
    // The prediction is the server's own latency model for 1024 rows.
    let metrics = server.metrics_text().await;
    let term = |t: &str| -> f64 {
        let key = format!("kiln_latency_model_seconds{{model=\"{M}\",version=\"1\",term=\"{t}\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&key)).expect("latency model exported");
        line[key.len()..].parse().expect("number")
    };
    let modelled_us = (term("fixed") + 1024.0 * term("per_unit")) * 1e6;
    assert!(
        (predicted as f64 - modelled_us).abs() <= 0.05 * modelled_us + 2.0,
        "{predicted} µs vs model {modelled_us} µs"
    );
    assert_eq!(statistics(&mut c, M).await.inference_count, 0);
}

#[tokio::test]
async fn cancelled_request_is_removed_from_the_queue_and_not_computed() {
    const M: &str = "cancel";
    let _turn = SERIAL.lock().await;
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let mut c = server.client().await;
    let slow = occupy_executor(&server, M).await;
    let mut doomed_client = server.client().await;
    let doomed = tokio::spawn(async move { doomed_client.raw.model_infer(wide_request(M, 3)).await });
    // Wait until it is queued, then the caller goes away.
    server.wait_for_metric(&format!("kiln_queue_depth{{model=\"{M}\",version=\"1\",priority=\"1\"}} 1")).await;
    doomed.abort();
    let _ = doomed.await;
    slow.await.expect("join").expect("slow answered");
    // The next request runs after the sweep; wait for the cancel to count.
    server.wait_for_metric(&format!("kiln_rejected_total{{model=\"{M}\",version=\"1\",reason=\"cancelled\"}} 1")).await;
    c.raw.model_infer(wide_request(M, 1)).await.expect("served");
    assert_eq!(statistics(&mut c, M).await.inference_count, 1025, "the cancelled rows were computed");
}

#[tokio::test]
async fn full_queue_is_refused_at_once_and_the_queued_are_served() {
    let _turn = SERIAL.lock().await;
    const M: &str = "queue_full";
    let settings = SETTINGS.replace("max_queue = 64", "max_queue = 2");
    let (server, _dir) = wide_server(M, 2048, &settings, BTreeMap::new()).await;
    let slow = occupy_executor(&server, M).await;
    // One-row requests never fill a batch, so they wait in the queue.
    let queued = queue_behind(&server, M, 2, 1).await;
    let mut c = server.client().await;
    let status = c.raw.model_infer(wide_request(M, 1)).await.expect_err("the queue holds two");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("queue full (2 requests waiting)"), "{}", status.message());
    slow.await.expect("join").expect("slow answered");
    for q in queued {
        q.await.expect("join").expect("queued requests are served");
    }
    let refused = format!("kiln_rejected_total{{model=\"{M}\",version=\"1\",reason=\"queue_full\"}} 1");
    assert!(server.metrics_text().await.contains(&refused));
}

#[tokio::test]
async fn requests_queued_behind_a_running_batch_leave_together_under_the_adaptive_wait() {
    let _turn = SERIAL.lock().await;
    const M: &str = "together";
    // SETTINGS leaves `queue_delay` at its default, the adaptive wait.
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let slow = occupy_executor(&server, M).await;
    let queued = queue_behind(&server, M, 8, 1).await;
    slow.await.expect("join").expect("slow answered");
    for q in queued {
        let answer = q.await.expect("join").expect("queued request served").into_inner();
        assert_eq!(client::int_parameter(&answer, "batch_size"), Some(8), "the eight queued rows left apart");
    }
    let mut c = server.client().await;
    assert_eq!(statistics(&mut c, M).await.execution_count, 2, "the slow batch, then one batch of eight");
}

#[tokio::test]
async fn higher_priority_runs_before_an_earlier_lower_priority_request() {
    let _turn = SERIAL.lock().await;
    const M: &str = "priority";
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let slow = occupy_executor(&server, M).await;
    let send = |rows: usize, priority: u64| {
        let addr = server.addr.to_string();
        async move {
            let mut c = kiln::client::Client::connect(&addr).await.expect("connect");
            let mut r = wide_request(M, rows);
            r.parameters.insert("priority".into(), param(ParameterChoice::Uint64Param(priority)));
            let result = c.raw.model_infer(r).await.map(|r| r.into_inner());
            (Instant::now(), result)
        }
    };
    // Two 600-row requests cannot share a 1024-row batch: one runs after
    // the other. Low is queued first; high arrives later and still goes first.
    let low = tokio::spawn(send(600, 2));
    server.wait_for_metric(&format!("kiln_queue_depth{{model=\"{M}\",version=\"1\",priority=\"2\"}} 1")).await;
    let high = tokio::spawn(send(600, 1));
    slow.await.expect("join").expect("slow answered");
    let (high_done, high) = high.await.expect("join");
    let (low_done, low) = low.await.expect("join");
    let (high, low) = (high.expect("high answered"), low.expect("low answered"));
    assert!(high_done < low_done, "the low-priority request ran first");
    let queue_us = |r: &kiln::api::pb::ModelInferResponse| client::int_parameter(r, "queue_us").expect("queue_us");
    assert!(queue_us(&high) < queue_us(&low));

    let mut c = server.client().await;
    let mut bad = wide_request(M, 1);
    bad.parameters.insert("priority".into(), param(ParameterChoice::Int64Param(3)));
    let status = c.raw.model_infer(bad).await.expect_err("only two levels");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("parameter 'priority'"), "{}", status.message());
}

#[tokio::test]
async fn cost_caps_refuse_before_queueing_and_actual_cost_is_returned() {
    const M: &str = "cost";
    let _turn = SERIAL.lock().await;
    // One row costs a few ms (it reads every weight); 1024 rows far more.
    let settings = SETTINGS.replace("max_cost_us = 10000000", "max_cost_us = 50000");
    let (server, _dir) = wide_server(M, 2048, &settings, BTreeMap::new()).await;
    let mut c = server.client().await;

    let ok = c.raw.model_infer(wide_request(M, 1)).await.expect("cheap request").into_inner();
    let cost = client::int_parameter(&ok, "cost_us").expect("cost_us");
    let compute = client::int_parameter(&ok, "compute_us").expect("compute_us");
    assert!(cost > 0 && cost <= compute, "cost {cost} of a batch computing {compute}");

    let capped = with_param(wide_request(M, 1), "max_cost_us", ParameterChoice::Int64Param(0));
    expect_refusal(&mut c, capped, Code::ResourceExhausted, &["estimated cost", "request's max_cost_us of 0 µs"]).await;

    let status = c.raw.model_infer(wide_request(M, 1024)).await.expect_err("over the model's cap");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("model's max_cost_us of 50000 µs"), "{}", status.message());
    assert_eq!(statistics(&mut c, M).await.inference_count, 1, "a capped request was computed");
    let metrics = server.metrics_text().await;
    assert!(metrics.contains(&format!("model=\"{M}\",version=\"1\",reason=\"cost_cap\"}} 2")), "{metrics}");
    assert!(
        metrics.contains(&format!("kiln_cost_seconds_total{{model=\"{M}\",version=\"1\",tenant=\"other\"}}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_spent_tenant_budget_is_refused_and_others_are_not() {
    const M: &str = "tenant";
    let _turn = SERIAL.lock().await;
    // 50 ms of burst pays for a few 64-row requests (~10 ms each), not 50.
    let tenants = BTreeMap::from([("small".to_string(), TenantConfig { budget: 0.0001, burst: 0.05 })]);
    let (server, _dir) = wide_server(M, 2048, SETTINGS, tenants).await;
    let mut c = server.client().await;
    let mut refused = None;
    for _ in 0..50 {
        let mut r = wide_request(M, 64);
        r.parameters.insert("tenant".into(), param(ParameterChoice::StringParam("small".into())));
        match c.raw.model_infer(r).await {
            Ok(_) => {}
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("a 50 ms burst cannot pay for 50 batches of 64 rows");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("tenant 'small' compute budget spent"), "{}", status.message());

    // The same tenant named in metadata is refused too; another tenant is not.
    let mut by_header = tonic::Request::new(wide_request(M, 64));
    by_header.metadata_mut().insert("x-kiln-tenant", "small".parse().expect("ascii"));
    assert_eq!(c.raw.model_infer(by_header).await.expect_err("same tenant").code(), Code::ResourceExhausted);
    let mut other = wide_request(M, 64);
    other.parameters.insert("tenant".into(), param(ParameterChoice::StringParam("someone-else".into())));
    c.raw.model_infer(other).await.expect("unconfigured tenants are not limited");

    let metrics = server.metrics_text().await;
    assert!(metrics.contains(&format!("model=\"{M}\",version=\"1\",tenant=\"small\"}}")), "{metrics}");
    assert!(!metrics.contains("someone-else"), "client-chosen names must not become labels");
    assert!(metrics.contains(&format!("model=\"{M}\",version=\"1\",reason=\"tenant_budget\"}} 2")), "{metrics}");
}

#[tokio::test]
async fn open_loop_overload_answers_every_request_once_never_ok_late_and_bounds_memory() {
    const M: &str = "overload";
    let _turn = SERIAL.lock().await;
    // A 4096-wide model and small batches, so capacity is low enough for
    // this process to offer three times it.
    let settings = "max_batch_size = 16\nmax_queue_delay_ms = 1\nmax_queue = 32\nlatency_budget_ms = 50\n\
                    default_timeout_ms = 5000";
    let (server, _dir) = wide_server(M, 4096, settings, BTreeMap::new()).await;
    let mut c = server.client().await;
    // Capacity from the server's own latency model: full 16-row batches.
    let metrics = server.metrics_text().await;
    let term = |t: &str| -> f64 {
        let key = format!("kiln_latency_model_seconds{{model=\"{M}\",version=\"1\",term=\"{t}\"}} ");
        let line = metrics.lines().find(|l| l.starts_with(&key)).expect("latency model exported");
        line[key.len()..].parse().expect("number")
    };
    let rows_per_request = 4;
    let full_batch_s = term("fixed") + 16.0 * term("per_unit");
    let capacity = 16.0 / full_batch_s / rows_per_request as f64;
    let rate = (3.0 * capacity).min(3000.0);
    let sent = (rate * 2.0) as usize; // about two seconds
    // Relative to this machine's speed: an idle server meets it easily, an
    // overloaded queue cannot.
    let timeout_us = ((4.0 * full_batch_s).max(0.02) * 1e6) as i64;

    let rss_before = common::resident_bytes();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(sent);
    for i in 0..sent {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let mut client = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = wide_request(M, rows_per_request);
            r.parameters.insert("timeout".into(), param(ParameterChoice::Int64Param(timeout_us)));
            let sent_at = Instant::now();
            let result = client.raw.model_infer(r).await;
            (result.map(|r| r.into_inner()), sent_at.elapsed())
        }));
    }
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        let (result, elapsed) = task.await.expect("join");
        let code = match &result {
            Ok(r) => {
                // The server's own receipt-to-answer time (decode,
                // admission, queue, compute and encode) must be within the
                // deadline, and the client, whose clock started before
                // sending and stopped after receiving, must have waited at
                // least that long. The client's time alone also holds the
                // transit both ways, which is not the server's to bound.
                let server_us = client::int_parameter(r, "server_us").expect("server_us on every OK answer");
                let inside_us = client::int_parameter(r, "queue_us").expect("queue_us")
                    + client::int_parameter(r, "compute_us").expect("compute_us");
                assert!(server_us <= timeout_us, "answered OK after its deadline: {server_us} µs > {timeout_us} µs");
                assert!(inside_us <= server_us, "queue + compute {inside_us} µs outside server_us {server_us} µs");
                assert!(
                    elapsed.as_micros() as i64 >= server_us,
                    "the client waited {} µs for an answer the server took {server_us} µs on",
                    elapsed.as_micros()
                );
                "OK".to_string()
            }
            Err(s) => format!("{:?}", s.code()),
        };
        *by_code.entry(code).or_default() += 1;
    }
    let answered: usize = by_code.values().sum();
    assert_eq!(answered, sent, "answers by code {by_code:?}");
    assert!(by_code.get("OK").copied().unwrap_or(0) > 0, "nothing served: {by_code:?}");
    assert!(
        by_code.keys().all(|k| ["OK", "ResourceExhausted", "DeadlineExceeded"].contains(&k.as_str())),
        "{by_code:?}"
    );
    assert!(by_code.len() > 1, "at 3x capacity some requests must be shed: {by_code:?}");
    let growth = common::resident_bytes().saturating_sub(rss_before);
    assert!(growth < 256 << 20, "resident memory grew by {} MiB", growth >> 20);
    // The server counted each answer exactly once.
    let s = statistics(&mut c, M).await;
    let i = s.inference_stats.expect("stats");
    let counted = i.success.map_or(0, |d| d.count) + i.fail.map_or(0, |d| d.count);
    assert_eq!(counted as usize, sent);
}

#[tokio::test]
async fn graceful_stop_answers_every_admitted_request() {
    let _turn = SERIAL.lock().await;
    const M: &str = "shutdown";
    let (server, _dir) = wide_server(M, 2048, SETTINGS, BTreeMap::new()).await;
    let slow = occupy_executor(&server, M).await;
    let queued = queue_behind(&server, M, 3, 2).await;
    server.stop().await.expect("clean stop");
    slow.await.expect("join").expect("the running request is answered");
    for q in queued {
        let answer = q.await.expect("join").expect("queued requests are computed, not dropped");
        assert_eq!(client::output_fp32(answer.get_ref(), 0).map(|v| v.len()), Some(4));
    }
}

#[tokio::test]
async fn default_timeout_applies_when_a_request_sets_no_deadline() {
    const M: &str = "default_timeout";
    let _turn = SERIAL.lock().await;
    let settings = "max_batch_size = 1024\nmax_queue_delay_ms = 2\nlatency_budget_ms = 20\ndefault_timeout_ms = 50";
    let (server, _dir) = wide_server(M, 2048, settings, BTreeMap::new()).await;
    let mut c = server.client().await;
    // No grpc-timeout, no timeout parameter: the model's 50 ms is the
    // deadline, which 1024 rows (hundreds of ms) cannot meet.
    let status = c.raw.model_infer(wide_request(M, 1024)).await.expect_err("hopeless under the default");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{}", status.message());
    let left: u64 = status
        .message()
        .split(" µs left")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no time left stated: {}", status.message()));
    assert!(left <= 50_000, "{left} µs left of a 50 ms default");
    // A longer timeout parameter does not extend it: the earliest wins.
    let longer = with_param(wide_request(M, 1024), "timeout", ParameterChoice::Int64Param(60_000_000));
    expect_refusal(&mut c, longer, Code::DeadlineExceeded, &["cannot be met"]).await;
    c.raw.model_infer(wide_request(M, 1)).await.expect("a small request meets the default");
}

#[tokio::test]
async fn two_instances_compute_two_batches_at_once_with_the_same_answers() {
    const M: &str = "instances";
    let _turn = SERIAL.lock().await;
    let (server, _dir) = wide_server(M, 2048, &format!("{SETTINGS}\ninstances = 2"), BTreeMap::new()).await;
    let mut c = server.client().await;
    let slow = occupy_executor(&server, M).await;
    // One instance runs the 1024 rows; the other serves this at once.
    let quick = c.raw.model_infer(wide_request(M, 2)).await.expect("served beside the slow batch").into_inner();
    let running = statistics(&mut c, M).await;
    assert_eq!(running.execution_count, 1, "the quick batch finished while the slow one still ran");
    let slow = slow.await.expect("join").expect("slow answered");
    assert_eq!(statistics(&mut c, M).await.execution_count, 2);
    // Every row is the same input: both instances give the same answer (to
    // float rounding: batch size changes the order of the sums).
    let quick = client::output_fp32(&quick, 0).expect("fp32");
    let slow = client::output_fp32(&slow, 0).expect("fp32");
    assert_eq!(slow.len(), 1024 * 2);
    for row in quick.chunks(2).chain(slow.chunks(2).step_by(97)) {
        let gap = row.iter().zip(&slow[..2]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(gap < 1e-5, "instances disagree: {row:?} against {:?}", &slow[..2]);
    }
}

#[tokio::test]
async fn a_request_never_computed_is_refunded_to_its_tenant() {
    const M: &str = "refund";
    let _turn = SERIAL.lock().await;
    // 50 ms of burst and no refill to speak of: the balance only moves by
    // what admission charges and settling gives back.
    let tenants = BTreeMap::from([("t".to_string(), TenantConfig { budget: 1e-9, burst: 0.05 })]);
    let (server, _dir) = wide_server(M, 2048, SETTINGS, tenants).await;
    let mut c = server.client().await;
    let as_t = |request| with_param(request, "tenant", ParameterChoice::StringParam("t".into()));
    // A 1024-row request costs more than the whole burst: its refusal
    // states the balance, and charges nothing.
    let balance = |status: tonic::Status| -> i64 {
        assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
        let after = status.message().split(" µs, ").nth(1).unwrap_or_else(|| panic!("{}", status.message()));
        after.split(" µs available").next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{after}"))
    };
    let before = balance(c.raw.model_infer(as_t(wide_request(M, 1024))).await.expect_err("over the burst"));
    let slow = occupy_executor(&server, M).await;
    // 30 ms: met if run now, so admitted and charged; it expires behind
    // the running batch of hundreds of milliseconds, never computed.
    let hurried = with_param(as_t(wide_request(M, 1)), "timeout", ParameterChoice::Int64Param(30_000));
    expect_refusal(&mut c, hurried, Code::DeadlineExceeded, &[]).await;
    let after = balance(c.raw.model_infer(as_t(wide_request(M, 1024))).await.expect_err("over the burst"));
    assert!(after >= before - 1, "charged for a request never computed: {before} µs before, {after} µs after");
    slow.await.expect("join").expect("slow answered");
    assert_eq!(statistics(&mut c, M).await.inference_count, 1024, "the expired request was computed");
    // Computing does cost: a request that runs is charged.
    c.raw.model_infer(as_t(wide_request(M, 1))).await.expect("served");
    let charged = balance(c.raw.model_infer(as_t(wide_request(M, 1024))).await.expect_err("over the burst"));
    assert!(charged < after, "a computed request cost nothing: {after} µs, then {charged} µs");
}
