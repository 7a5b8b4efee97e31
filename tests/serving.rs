//! The built-in risk model served over real gRPC: answers equal the model
//! run in-process, held-out accuracy, batching under concurrency, metadata,
//! config, statistics, health and metrics.

mod common;

use common::TestServer;
use kiln::api::pb;
use kiln::client::{self, output_fp32};
use kiln::config::{RepositorySource, ServeConfig};

#[tokio::test]
async fn outputs_equal_the_model_run_in_process_in_both_content_forms() {
    let server = TestServer::built_in().await;
    let mut c = server.client().await;
    let (rows, _) = common::wdbc();
    let sample: Vec<Vec<f32>> = rows[..16].to_vec();
    let expected = common::risk_in_process(&sample);

    let raw = c.raw.model_infer(client::fp32_request("risk", "features", &sample)).await.expect("raw").into_inner();
    let typed =
        c.raw.model_infer(client::fp32_request_typed("risk", "features", &sample)).await.expect("typed").into_inner();
    for response in [&raw, &typed] {
        assert_eq!(response.outputs[0].name, "probability");
        assert_eq!(response.outputs[0].shape, vec![16, 1]);
        let got = output_fp32(response, 0).expect("fp32 output");
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-6, "served {g} vs in-process {e}");
        }
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn heldout_accuracy_over_grpc_is_at_least_093() {
    let server = TestServer::built_in().await;
    let mut c = server.client().await;
    let (rows, labels) = common::wdbc();
    let heldout = common::heldout_rows();
    assert!(heldout.len() >= 100, "held-out split has {} rows", heldout.len());
    let mut correct = 0;
    for &i in &heldout {
        let r = c.infer_fp32("risk", "features", &[rows[i].clone()]).await.expect("served");
        let p = output_fp32(&r, 0).expect("output")[0];
        assert!((0.0..=1.0).contains(&p), "probability {p}");
        if ((p >= 0.5) as u8 as f32) == labels[i] {
            correct += 1;
        }
    }
    let accuracy = correct as f64 / heldout.len() as f64;
    assert!(accuracy >= 0.93, "held-out accuracy {accuracy}");
}

#[tokio::test]
async fn concurrent_requests_are_all_answered_correctly_in_batches() {
    // The built-in risk model with a fixed wait. Here the client and the
    // server share the test's one thread, so requests reach the scheduler
    // one by one, slower than the model answers them: the shipped adaptive
    // wait rightly sends each alone then (tests/batching.rs shows it
    // batching what queues behind a running batch). A fixed wait makes
    // every request meet company, so this shows that answers are scattered
    // back to the right requests.
    let toml =
        common::RISK_TOML.replace("max_queue_delay_ms = 0.5\n", "max_queue_delay_ms = 5\nqueue_delay = \"fixed\"\n");
    assert!(toml.contains("queue_delay = \"fixed\""), "the shipped model.toml changed its delay line");
    let repo = common::risk_repo(&toml, &[1]);
    let config = ServeConfig { repository: RepositorySource::Dir(repo.path().to_path_buf()), ..Default::default() };
    let server = TestServer::start(config).await;
    let (rows, _) = common::wdbc();
    let expected = common::risk_in_process(&rows[..200]);
    // Several connections, many streams each: 200 requests in flight at once.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = clients[i % clients.len()].clone();
        let row = rows[i].clone();
        tasks.push(tokio::spawn(async move {
            let mut request = client::fp32_request("risk", "features", &[row]);
            request.id = format!("req-{i}");
            c.raw.model_infer(request).await.map(|r| r.into_inner())
        }));
    }
    let mut largest_batch = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let response = task.await.expect("task").expect("answered OK");
        assert_eq!(response.id, format!("req-{i}"), "request id echoed");
        let p = output_fp32(&response, 0).expect("output")[0];
        assert!((p - expected[i]).abs() < 1e-6, "request {i}: {p} vs {}", expected[i]);
        largest_batch = largest_batch.max(client::int_parameter(&response, "batch_size").expect("batch_size"));
    }
    let mut c = server.client().await;
    let stats = c
        .raw
        .model_statistics(pb::ModelStatisticsRequest { name: "risk".into(), version: String::new() })
        .await
        .expect("statistics")
        .into_inner();
    let s = &stats.model_stats[0];
    assert_eq!(s.version, "1");
    assert_eq!(s.inference_count, 200);
    assert!(s.execution_count < 200, "no batch larger than one formed: {} executions", s.execution_count);
    assert!(s.batch_stats.iter().any(|b| b.batch_size > 1), "batch_stats {:?}", s.batch_stats);
    assert!(largest_batch > 1, "responses report batch sizes up to {largest_batch}");
    let inference = s.inference_stats.as_ref().expect("stats");
    assert_eq!(inference.success.as_ref().map(|d| d.count), Some(200));
    assert!(inference.queue.as_ref().is_some_and(|d| d.count == 200 && d.ns > 0));
}

#[tokio::test]
async fn metadata_config_and_index_describe_the_model() {
    let server = TestServer::built_in().await;
    let mut c = server.client().await;
    let meta = c
        .raw
        .model_metadata(pb::ModelMetadataRequest { name: "risk".into(), version: String::new() })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(meta.versions, vec!["1"]);
    assert_eq!(meta.inputs[0].name, "features");
    assert_eq!(meta.inputs[0].datatype, "FP32");
    assert_eq!(meta.inputs[0].shape, vec![-1, 30]);
    assert_eq!(meta.outputs[0].shape, vec![-1, 1]);

    let config = c
        .raw
        .model_config(pb::ModelConfigRequest { name: "risk".into(), version: "1".into() })
        .await
        .expect("config")
        .into_inner()
        .config
        .expect("config present");
    assert_eq!(config.input[0].dims, vec![30], "dims exclude the batch dimension");
    assert_eq!(config.input[0].data_type, pb::DataType::TypeFp32 as i32);
    assert!(config.max_batch_size > 0);
    let names: Vec<String> =
        serde_json::from_str(&config.parameters["features.feature_names"].string_value).expect("json");
    assert_eq!(names.len(), 30);
    assert_eq!(names[0], "radius_mean");
    let ranges: Vec<[f64; 2]> =
        serde_json::from_str(&config.parameters["features.valid_ranges"].string_value).expect("json");
    assert!(ranges.iter().all(|[lo, hi]| *lo == 0.0 && *hi > 0.0));
    let sha = &config.parameters["weights_sha256"].string_value;
    assert_eq!(sha.len(), 64);
    let meta_sha = match &meta.kiln_parameters["weights_sha256"].parameter_choice {
        Some(kiln::client::ParameterChoice::StringParam(s)) => s.clone(),
        other => panic!("weights_sha256 in metadata: {other:?}"),
    };
    assert_eq!(&meta_sha, sha);
    let weights =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/risk/1/model.safetensors")).expect("weights");
    assert_eq!(sha, &kiln::model::sha256_hex(&weights), "the hash is of the weights file itself");

    // Every answer carries the version and the weights' hash.
    let r = c.infer_fp32("risk", "features", &[common::wdbc().0[0].clone()]).await.expect("infer");
    assert_eq!(r.model_version, "1");
    assert_eq!(client::string_parameter(&r, "weights_sha256").as_ref(), Some(sha));
    for p in ["queue_us", "compute_us", "batch_size"] {
        assert!(client::int_parameter(&r, p).is_some(), "parameter {p}");
    }

    let index = c.raw.repository_index(pb::RepositoryIndexRequest::default()).await.expect("index").into_inner();
    assert_eq!(index.models.len(), 1);
    assert_eq!((index.models[0].name.as_str(), index.models[0].state.as_str()), ("risk", "READY"));

    let server_meta = c.raw.server_metadata(pb::ServerMetadataRequest {}).await.expect("server metadata").into_inner();
    assert_eq!(server_meta.name, "kiln");
    assert!(server_meta.extensions.iter().any(|e| e == "statistics"));
    assert!(c.raw.server_live(pb::ServerLiveRequest {}).await.expect("live").into_inner().live);
    let ready = c.raw.model_ready(pb::ModelReadyRequest { name: "risk".into(), version: String::new() }).await;
    assert!(ready.expect("model ready").into_inner().ready);
}

#[tokio::test]
async fn health_service_reports_serving_then_not_serving_on_shutdown() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let server = TestServer::built_in().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel);
    for service in ["", "risk", "inference.GRPCInferenceService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.expect("check").into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let mut watch = health.watch(HealthCheckRequest { service: "risk".into() }).await.expect("watch").into_inner();
    assert_eq!(watch.message().await.expect("first").expect("some").status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.stop());
    let next = watch.message().await.expect("stream").expect("an update before close");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    stopping.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn metrics_endpoint_exports_request_queue_and_batch_metrics() {
    let server = TestServer::built_in().await;
    let mut c = server.client().await;
    let (rows, _) = common::wdbc();
    c.infer_fp32("risk", "features", &rows[..2]).await.expect("infer");
    let text = server.metrics_text().await;
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(200)]);
    for name in [
        "kiln_requests_total{model=\"risk\",version=\"1\",code=\"OK\",protocol=\"grpc\"}",
        "kiln_request_duration_seconds_bucket",
        "kiln_queue_duration_seconds_bucket",
        "kiln_compute_duration_seconds_bucket",
        "kiln_batch_size_bucket",
        "kiln_batch_units_bucket",
        "kiln_queue_depth",
        "kiln_model_ready",
        "kiln_build_info",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}

#[tokio::test]
async fn reflection_lists_the_inference_and_health_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::built_in().await;
    let channel = server.channel().await;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(futures::stream::iter([request])).await.expect("reflection").into_inner();
    let response = responses.message().await.expect("stream").expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {:?}", response.message_response)
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["inference.GRPCInferenceService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}
