//! Fallback against a live server: a paused model is answered by its
//! fallback model, or by a fixed answer; a version that keeps failing
//! trips and its requests go to the fallback; with
//! `fallback_on_deadline`, a deadline only the fallback can meet is
//! answered by it. Every such answer says so and is counted. A fallback
//! that does not fit, or a cycle of fallbacks, stops the start.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{TestServer, test_model};
use kiln::api::admin_pb::ReleaseChange;
use kiln::api::pb;
use kiln::client::{Client, ParameterChoice};
use kiln::config::{RepositorySource, ServeConfig};

fn config(repo: &Path) -> ServeConfig {
    ServeConfig { repository: RepositorySource::Dir(repo.to_path_buf()), admin_insecure: true, ..Default::default() }
}

fn request(model: &str, rows: &[[f32; 3]]) -> pb::ModelInferRequest {
    kiln::client::fp32_request(model, "x", &rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>())
}

fn fallback_note(r: &pb::ModelInferResponse) -> String {
    match r.parameters.get("fallback").and_then(|p| p.parameter_choice.clone()) {
        Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => s,
        _ => String::new(),
    }
}

fn outputs(r: &pb::ModelInferResponse) -> Vec<f32> {
    r.raw_output_contents[0].chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

async fn pause(server: &TestServer, model: &str) {
    let mut admin = kiln::client::admin(&server.addr.to_string(), &Default::default()).await.expect("admin");
    let change = ReleaseChange { model: model.into(), reason: "bad answers".into(), ..Default::default() };
    admin.pause(change).await.expect("pause");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_model_is_answered_by_its_fallback_model_or_fixed_answer() {
    let repo = tempfile::tempdir().expect("tempdir");
    test_model(repo.path(), "primary", 2.0, "fallback = { model = \"simple\" }", "");
    test_model(repo.path(), "simple", 10.0, "", "");
    test_model(repo.path(), "fixed", 2.0, "fallback = { answer = { y = [0.5] } }", "");
    let server = TestServer::start(config(repo.path())).await;
    let mut c: Client = server.client().await;

    let before = c.raw.model_infer(request("primary", &[[1.0, 2.0, 3.0]])).await.expect("served").into_inner();
    assert_eq!((outputs(&before), fallback_note(&before)), (vec![12.0], String::new()));
    pause(&server, "primary").await;
    let after = c.raw.model_infer(request("primary", &[[1.0, 2.0, 3.0]])).await.expect("fallback").into_inner();
    assert_eq!(outputs(&after), vec![60.0], "computed by the fallback model");
    assert_eq!(after.model_name, "simple");
    assert!(fallback_note(&after).starts_with("paused: model 'primary' is paused (bad answers)"), "{after:?}");

    pause(&server, "fixed").await;
    let fixed = c.raw.model_infer(request("fixed", &[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])).await.expect("fixed");
    let fixed = fixed.into_inner();
    assert_eq!(outputs(&fixed), vec![0.5, 0.5], "one fixed row per request row");
    assert!(fallback_note(&fixed).starts_with("paused"), "{fixed:?}");
    let bad = c.raw.model_infer(kiln::client::fp32_request("fixed", "x", &[vec![1.0; 4]])).await.expect_err("checked");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "a fixed answer still validates the request");
    server.wait_for_metric("kiln_fallback_total{model=\"primary\",reason=\"paused\"} 1").await;
    server.wait_for_metric("kiln_fallback_total{model=\"fixed\",reason=\"paused\"} 1").await;
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_version_trips_and_a_hopeless_deadline_goes_to_the_fallback() {
    let repo = tempfile::tempdir().expect("tempdir");
    test_model(repo.path(), "flaky", 1.0, "fallback = { model = \"steady\" }", "fail_on = 7.0");
    test_model(
        repo.path(),
        "slow",
        1.0,
        "fallback = { model = \"steady\" }\nfallback_on_deadline = true",
        "delay_ms = 200",
    );
    test_model(repo.path(), "steady", 3.0, "", "");
    let server = TestServer::start(config(repo.path())).await;
    let mut c = server.client().await;

    // Five consecutive failures trip the breaker (`fallback::TRIP_AFTER`).
    for _ in 0..5 {
        let err = c.raw.model_infer(request("flaky", &[[7.0, 0.0, 0.0]])).await.expect_err("fails");
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    }
    let r = c.raw.model_infer(request("flaky", &[[1.0, 1.0, 1.0]])).await.expect("fallback").into_inner();
    assert_eq!((outputs(&r), r.model_name.as_str()), (vec![9.0], "steady"));
    assert!(fallback_note(&r).contains("unhealthy: 5 consecutive failures"), "{r:?}");

    // 200 ms per batch cannot meet 50 ms; the fallback can.
    let mut hurried = request("slow", &[[1.0, 1.0, 1.0]]);
    hurried.parameters = HashMap::from([("timeout".into(), common::param(ParameterChoice::Int64Param(50_000)))]);
    let r = c.raw.model_infer(hurried).await.expect("fallback meets it").into_inner();
    assert_eq!(r.model_name, "steady");
    assert!(fallback_note(&r).starts_with("deadline:"), "{r:?}");
    let unhurried = c.raw.model_infer(request("slow", &[[1.0, 1.0, 1.0]])).await.expect("slow serves").into_inner();
    assert_eq!((unhurried.model_name.as_str(), fallback_note(&unhurried)), ("slow", String::new()));
    server.wait_for_metric("kiln_fallback_total{model=\"flaky\",reason=\"unhealthy\"} 1").await;
    server.wait_for_metric("kiln_fallback_total{model=\"slow\",reason=\"deadline\"} 1").await;
    server.stop().await.expect("clean stop");
}

async fn start_error(repo: &Path) -> String {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let err = kiln::serve(config(repo), kiln::Listeners { grpc, http: None, metrics: None }, std::future::pending())
        .await
        .expect_err("refused");
    err.to_string()
}

#[tokio::test]
async fn a_cycle_or_a_misfit_fallback_stops_the_start() {
    let repo = tempfile::tempdir().expect("tempdir");
    test_model(repo.path(), "a", 1.0, "fallback = { model = \"b\" }", "");
    test_model(repo.path(), "b", 1.0, "fallback = { model = \"a\" }", "");
    let err = start_error(repo.path()).await;
    assert!(err.contains("cycle") && err.contains("a -> b -> a"), "{err}");

    let repo = tempfile::tempdir().expect("tempdir");
    test_model(repo.path(), "a", 1.0, "fallback = { model = \"risk\" }", "");
    common::write_risk(repo.path(), common::RISK_TOML, &[1]);
    let err = start_error(repo.path()).await;
    assert!(err.contains("a/model.toml") && err.contains("does not take input `x`"), "{err}");
}
