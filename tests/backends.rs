//! The model registry and the serving threads' supervision, on a live
//! server, through the `test` kind (built only with the `test-backends`
//! feature, which scripts/test turns on): a kind registered in one place
//! serves real answers; an executor that dies outside the model's guard is
//! restarted; a scheduler that dies turns its version NOT_SERVING and
//! answers what it held.
#![cfg(feature = "test-backends")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestServer, expect_refusal};
use kiln::api::pb;
use kiln::config::{RepositorySource, ServeConfig};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

async fn serve(repo: &Path) -> TestServer {
    TestServer::start(ServeConfig { repository: RepositorySource::Dir(repo.to_path_buf()), ..Default::default() }).await
}

fn request(model: &str, x: [f32; 3]) -> pb::ModelInferRequest {
    kiln::client::fp32_request(model, "x", &[x.to_vec()])
}

/// The queue depth gauge of `model`'s version 1.
async fn queue_depth(server: &TestServer, model: &str) -> f64 {
    let series = format!("kiln_queue_depth{{model=\"{model}\",version=\"1\",priority=\"1\"}} ");
    let text = server.metrics_text().await;
    text.lines().find_map(|l| l.strip_prefix(series.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

async fn model_ready(server: &TestServer, model: &str) -> bool {
    let mut client = server.client().await;
    let r = pb::ModelReadyRequest { name: model.into(), version: String::new() };
    client.raw.model_ready(r).await.expect("ModelReady").into_inner().ready
}

#[tokio::test]
async fn a_kind_registered_in_one_place_serves_real_answers() {
    let repo = tempfile::tempdir().expect("tempdir");
    common::test_model(repo.path(), "t", 2.5, "", "");
    let server = serve(repo.path()).await;
    let mut client = server.client().await;
    let answer = client.raw.model_infer(request("t", [1.0, 2.0, 4.0])).await.expect("answered").into_inner();
    assert_eq!(kiln::client::output_fp32(&answer, 0), Some(vec![17.5]));
    let metadata = client
        .raw
        .model_metadata(pb::ModelMetadataRequest { name: "t".into(), version: String::new() })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(metadata.platform, "kiln_test");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_kind_says_which_files_and_section_it_needs() {
    let load = |repo: &Path| match kiln::repository::load(&RepositorySource::Dir(repo.to_path_buf())) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    let repo = tempfile::tempdir().expect("tempdir");
    common::test_model(repo.path(), "t", 1.0, "", "");
    std::fs::remove_file(repo.path().join("t/1/scale.json")).expect("remove");
    let err = load(repo.path());
    assert!(err.contains("t/1/scale.json") && err.contains("the test kind needs it"), "{err}");

    let repo = tempfile::tempdir().expect("tempdir");
    common::test_model(repo.path(), "t", 1.0, "", "delay = 3");
    let err = load(repo.path());
    assert!(err.contains("section `[test]`") && err.contains("delay"), "{err}");

    let repo = tempfile::tempdir().expect("tempdir");
    common::test_model(repo.path(), "t", 1.0, "", "");
    let toml = std::fs::read_to_string(repo.path().join("t/model.toml")).expect("read");
    std::fs::write(repo.path().join("t/model.toml"), toml.replace("kind = \"test\"", "kind = \"onnx\"")).expect("w");
    let err = load(repo.path());
    assert!(err.contains("unknown kind \"onnx\"; this build has mlp, bert, test"), "{err}");
}

#[tokio::test]
async fn an_executor_that_dies_outside_the_model_guard_is_restarted() {
    let repo = tempfile::tempdir().expect("tempdir");
    // The fixed wait: with the adaptive one, a lone request runs on the
    // inline lane, not on the executor thread this test is about.
    common::test_model(repo.path(), "t", 1.0, "queue_delay = \"fixed\"", "break_on = 777.0");
    common::test_model(repo.path(), "u", 1.0, "", "break_on = 777.0");
    let server = serve(repo.path()).await;
    let mut client = server.client().await;
    // On the inline lane the same panic fails that request alone, and the
    // version serves on without a restart.
    expect_refusal(&mut client, request("u", [777.0, 0.0, 0.0]), Code::Unavailable, &["executor stopped"]).await;
    let answer = client.raw.model_infer(request("u", [1.0, 1.0, 1.0])).await.expect("served on").into_inner();
    assert_eq!(kiln::client::output_fp32(&answer, 0), Some(vec![3.0]));
    // The test backend answers 777 with an output shorter than its shape:
    // splitting it panics in the executor, outside the model's guard.
    expect_refusal(&mut client, request("t", [777.0, 0.0, 0.0]), Code::Unavailable, &["executor stopped"]).await;
    for i in 0..3 {
        let x = [i as f32, 1.0, 1.0];
        let answer = client.raw.model_infer(request("t", x)).await.expect("served after the restart").into_inner();
        assert_eq!(kiln::client::output_fp32(&answer, 0), Some(vec![i as f32 + 2.0]));
    }
    server.wait_for_metric("kiln_executor_restarts_total{model=\"t\",version=\"1\"} 1").await;
    assert!(model_ready(&server, "t").await, "a restarted executor keeps its version ready");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_dead_scheduler_turns_its_version_not_serving_and_answers_its_queue() {
    let repo = tempfile::tempdir().expect("tempdir");
    // One request per batch, each taking 400 ms: the first computes while
    // the rest queue behind it.
    common::test_model(repo.path(), "slow", 1.0, "", "delay_ms = 400");
    common::test_model(repo.path(), "other", 3.0, "", "");
    let toml = std::fs::read_to_string(repo.path().join("slow/model.toml")).expect("read");
    std::fs::write(repo.path().join("slow/model.toml"), toml.replace("max_batch_size = 8", "max_batch_size = 1"))
        .expect("write");
    let server = serve(repo.path()).await;
    let mut health = HealthClient::new(server.channel().await);
    let check = |health: &mut HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move { health.check(HealthCheckRequest { service: "slow".into() }).await.expect("check").into_inner().status }
    };
    assert_eq!(check(&mut health).await, ServingStatus::Serving as i32);

    let mut calls = Vec::new();
    for i in 0..5 {
        let mut c = server.client().await;
        calls.push(tokio::spawn(async move { c.raw.model_infer(request("slow", [i as f32, 0.0, 0.0])).await }));
        if i == 0 {
            common::wait_for_started(&mut server.client().await, "slow", 1).await;
        }
    }
    // Once nothing is waiting in line, the scheduler is killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while queue_depth(&server, "slow").await < 2.0 {
        assert!(std::time::Instant::now() < deadline, "the requests never queued");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut fault = request("slow", [0.0; 3]);
    fault.id = kiln::fault::request_id("scheduler");
    let mut c = server.client().await;
    let killed = c.raw.model_infer(fault).await.expect_err("the request that killed the scheduler");
    assert_eq!(killed.code(), Code::Unavailable, "{}", killed.message());

    // What was already with the executor (computing, or staged behind it)
    // is answered; what waited in the scheduler's queue is answered
    // UNAVAILABLE, none left waiting.
    let (mut answered, mut refused) = (0, 0);
    for call in calls {
        match call.await.expect("join") {
            Ok(_) => answered += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
                assert!(status.message().contains("stopped serving"), "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(answered >= 1 && refused >= 2, "{answered} answered, {refused} refused");

    // Health, ModelReady and the gauge say so; new calls are refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while check(&mut health).await != ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < deadline, "health never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!model_ready(&server, "slow").await);
    server.wait_for_metric("kiln_model_ready{model=\"slow\",version=\"1\"} 0").await;
    let mut client = server.client().await;
    expect_refusal(&mut client, request("slow", [1.0; 3]), Code::Unavailable, &["not serving", "scheduler"]).await;

    // The rest of the server serves on.
    let answer = client.raw.model_infer(request("other", [1.0, 1.0, 1.0])).await.expect("other serves").into_inner();
    assert_eq!(kiln::client::output_fp32(&answer, 0), Some(vec![9.0]));
    assert!(model_ready(&server, "other").await);
    server.stop().await.expect("clean stop");
}
