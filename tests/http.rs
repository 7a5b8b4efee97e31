//! The HTTP front end against a live server: every V2 REST endpoint, JSON
//! and binary tensors, errors by status code with gRPC's messages, the
//! limits, and HTTP and gRPC requests sharing one batch. The OpenAI
//! embeddings endpoint with the real MiniLM is in tests/minilm.rs.

mod common;

use common::TestServer;
use common::http::{call, get, post_json};
use kiln::client::{int_parameter, output_fp32};
use kiln::config::{AuthConfig, RepositorySource, ServeConfig};
use serde_json::json;

fn risk_row() -> Vec<f32> {
    common::wdbc().0.remove(0)
}

fn risk_request(row: &[f32]) -> serde_json::Value {
    json!({"id": "r1", "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [row]}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn every_v2_endpoint_answers_as_the_rest_binding_says() {
    let server = TestServer::start(ServeConfig::default()).await;
    let addr = server.http_addr;
    let meta = get(addr, "/v2").await;
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json()["name"], "kiln");
    assert!(meta.json()["extensions"].as_array().expect("extensions").contains(&json!("binary_tensor_data")));
    assert_eq!(get(addr, "/v2/health/live").await.status, 200);
    assert_eq!(get(addr, "/v2/health/ready").await.status, 200);
    for path in ["/v2/models/risk", "/v2/models/risk/versions/1"] {
        let model = get(addr, path).await;
        assert_eq!(model.status, 200, "{path}");
        let v = model.json();
        assert_eq!(v["name"], "risk");
        assert_eq!(v["versions"], json!(["1"]));
        assert_eq!(v["inputs"][0], json!({"name": "features", "datatype": "FP32", "shape": [-1, 30]}));
        assert_eq!(v["outputs"][0]["name"], "probability");
    }
    assert_eq!(get(addr, "/v2/models/risk/ready").await.status, 200);
    let config = get(addr, "/v2/models/risk/config").await.json();
    assert_eq!(config["max_batch_size"], 64);
    assert_eq!(config["input"][0], json!({"name": "features", "data_type": "TYPE_FP32", "dims": [30]}));
    assert_eq!(config["instance_group"][0]["kind"], "KIND_CPU");
    let stats = get(addr, "/v2/models/risk/stats").await.json();
    assert_eq!(stats["model_stats"][0]["name"], "risk");
    assert!(stats["model_stats"][0]["inference_stats"]["success"]["count"].is_u64());
    assert_eq!(get(addr, "/v2/models/stats").await.json()["model_stats"].as_array().map(Vec::len), Some(1));
    assert_eq!(get(addr, "/v2/models/risk/versions/1/ready").await.status, 200);
    let missing = get(addr, "/v2/models/nope").await;
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("nope"), "{}", missing.error());
    let version = get(addr, "/v2/models/risk/versions/9/ready").await;
    assert_eq!(version.status, 404, "{}", version.error());
    let unknown = get(addr, "/v3/anything").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.error().contains("no such endpoint: GET /v3/anything"));
    let models = get(addr, "/v1/models").await;
    assert_eq!(models.json()["data"], json!([]), "risk is not a text model");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_and_binary_tensors_give_the_grpc_answer() {
    let server = TestServer::start(ServeConfig::default()).await;
    let row = risk_row();
    let grpc = server.client().await.infer_fp32("risk", "features", std::slice::from_ref(&row)).await.expect("gRPC");
    let expected = output_fp32(&grpc, 0).expect("probability")[0];

    let answer = post_json(server.http_addr, "/v2/models/risk/infer", &risk_request(&row)).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let v = answer.json();
    assert_eq!(v["model_name"], "risk");
    assert_eq!(v["model_version"], "1");
    assert_eq!(v["id"], "r1");
    assert_eq!(v["outputs"][0]["name"], "probability");
    assert_eq!(v["outputs"][0]["shape"], json!([1, 1]));
    let got = v["outputs"][0]["data"][0].as_f64().expect("a number") as f32;
    assert!((got - expected).abs() <= 1e-6, "HTTP {got} against gRPC {expected}");
    for p in ["queue_us", "compute_us", "cost_us", "batch_size", "server_us"] {
        assert!(v["parameters"][p].is_u64(), "{p} missing: {v}");
    }
    assert_eq!(v["parameters"]["model_version"], "1");
    for protocol in ["grpc", "http"] {
        let series = format!("kiln_requests_total{{model=\"risk\",version=\"1\",code=\"OK\",protocol=\"{protocol}\"}}");
        server.wait_for_metric(&series).await;
    }
    server.wait_for_metric("kiln_request_duration_seconds_count{model=\"risk\",version=\"1\",protocol=\"http\"}").await;

    // Triton's binary extension both ways, as tritonclient.http sends it.
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "parameters": {"binary_data_size": 120}}],
        "outputs": [{"name": "probability", "parameters": {"binary_data": true}}]
    }))
    .expect("json");
    let mut body = header.clone();
    body.extend(row.iter().flat_map(|v| v.to_le_bytes()));
    let length = header.len().to_string();
    let headers = [("inference-header-content-length", length.as_str()), ("content-type", "application/octet-stream")];
    let answer = call(server.http_addr, "POST", "/v2/models/risk/versions/1/infer", &headers, body).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let json_length: usize =
        answer.headers["inference-header-content-length"].to_str().expect("ascii").parse().expect("n");
    let (json_part, raw) = answer.body.split_at(json_length);
    let v: serde_json::Value = serde_json::from_slice(json_part).expect("json header");
    assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 4);
    assert!(v["outputs"][0].get("data").is_none());
    let got = f32::from_le_bytes(raw.try_into().expect("4 bytes"));
    assert!((got - expected).abs() <= 1e-6, "binary {got} against gRPC {expected}");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_carry_the_grpc_message_under_the_rest_status() {
    let config = ServeConfig { max_message_bytes: 64 * 1024, ..ServeConfig::default() };
    let server = TestServer::start(config).await;
    let addr = server.http_addr;
    let row = risk_row();

    let shape = json!({"inputs": [{"name": "features", "shape": [1, 29], "datatype": "FP32", "data": [&row[..29]]}]});
    let answer = post_json(addr, "/v2/models/risk/infer", &shape).await;
    assert_eq!(answer.status, 400);
    let grpc = server
        .client()
        .await
        .infer_fp32("risk", "features", &[row[..29].to_vec()])
        .await
        .expect_err("refused over gRPC too");
    assert_eq!(answer.error(), grpc.message(), "the same message on both front ends");

    let answer = post_json(addr, "/v2/models/unknown/infer", &risk_request(&row)).await;
    assert_eq!(answer.status, 404);
    assert!(answer.error().contains("unknown"), "{}", answer.error());

    let answer = call(addr, "POST", "/v2/models/risk/infer", &[], b"{\"inputs\": [".to_vec()).await;
    assert_eq!(answer.status, 400);
    assert!(answer.error().contains("not a V2 inference request"), "{}", answer.error());

    let big = vec![b' '; 100 * 1024];
    let answer = call(addr, "POST", "/v2/models/risk/infer", &[], big).await;
    assert_eq!(answer.status, 413);
    assert!(answer.error().contains("over max_message_bytes 65536"), "{}", answer.error());

    let request = serde_json::to_vec(&risk_request(&row)).expect("json");
    let answer = call(addr, "POST", "/v2/models/risk/infer", &[("x-kiln-timeout-ms", "0")], request.clone()).await;
    assert_eq!(answer.status, 504, "{}", String::from_utf8_lossy(&answer.body));
    assert!(answer.error().contains("deadline"), "{}", answer.error());
    let answer = call(addr, "POST", "/v2/models/risk/infer", &[("x-kiln-timeout-ms", "soon")], request).await;
    assert_eq!(answer.status, 400);
    assert!(answer.error().contains("x-kiln-timeout-ms"), "{}", answer.error());

    // The server is still up and answering.
    assert_eq!(post_json(addr, "/v2/models/risk/infer", &risk_request(&row)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_needed_and_name_their_models_on_http_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = kiln::security::keys::generate("checkout", vec!["other".into()]);
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(&keys_file, kiln::security::keys::entry_toml(&key.entry)).expect("keys");
    let config =
        ServeConfig { auth: AuthConfig { keys_file: Some(keys_file), ..Default::default() }, ..Default::default() };
    let server = TestServer::start(config).await;
    let addr = server.http_addr;
    assert_eq!(get(addr, "/v2/health/ready").await.status, 200, "probes stay open");
    let request = serde_json::to_vec(&risk_request(&risk_row())).expect("json");
    let answer = call(addr, "POST", "/v2/models/risk/infer", &[], request.clone()).await;
    assert_eq!(answer.status, 401, "{}", String::from_utf8_lossy(&answer.body));
    let bearer = format!("Bearer {}", key.key.expose());
    let answer = call(addr, "POST", "/v2/models/risk/infer", &[("authorization", &bearer)], request).await;
    assert_eq!(answer.status, 403, "the key lists only `other`: {}", String::from_utf8_lossy(&answer.body));
    assert!(answer.error().contains("risk"), "{}", answer.error());
}

/// Two requests, one per front end, sent together to a model that waits
/// for a second request (a fixed wait: the adaptive one would not wait for
/// company it has never seen): both answers come from one batch of two.
#[tokio::test(flavor = "multi_thread")]
async fn http_and_grpc_requests_share_a_batch() {
    let repo = tempfile::tempdir().expect("tempdir");
    common::test_model(repo.path(), "pair", 1.0, "", "");
    let toml = repo.path().join("pair/model.toml");
    let text = std::fs::read_to_string(&toml).expect("model.toml");
    let text = text
        .replace("max_batch_size = 8\n", "max_batch_size = 2\n")
        .replace("max_queue_delay_ms = 1\n", "max_queue_delay_ms = 2000\nqueue_delay = \"fixed\"\n");
    std::fs::write(&toml, text).expect("model.toml");
    let config = ServeConfig { repository: RepositorySource::Dir(repo.path().to_path_buf()), ..Default::default() };
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let body = json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]});
    let rows = [vec![4.0, 5.0, 6.0]];
    let http = post_json(server.http_addr, "/v2/models/pair/infer", &body);
    let grpc = client.infer_fp32("pair", "x", &rows);
    let (http, grpc) = tokio::join!(http, grpc);
    let grpc = grpc.expect("gRPC answer");
    assert_eq!(http.status, 200, "{}", String::from_utf8_lossy(&http.body));
    let v = http.json();
    assert_eq!(v["outputs"][0]["data"], json!([6.0]), "y = Σx");
    assert_eq!(output_fp32(&grpc, 0).expect("y"), vec![15.0]);
    assert_eq!(v["parameters"]["batch_size"], 2, "{v}");
    assert_eq!(int_parameter(&grpc, "batch_size"), Some(2));
}

/// Shutdown drains HTTP as it drains gRPC: a request computing when the
/// signal comes (a 600 ms batch, stopped 200 ms in) is answered.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_answers_an_admitted_http_request() {
    let repo = tempfile::tempdir().expect("tempdir");
    common::test_model(repo.path(), "slow", 1.0, "", "delay_ms = 600");
    let config = ServeConfig { repository: RepositorySource::Dir(repo.path().to_path_buf()), ..Default::default() };
    let server = TestServer::start(config).await;
    let addr = server.http_addr;
    let body = json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]});
    let admitted = tokio::spawn(async move { post_json(addr, "/v2/models/slow/infer", &body).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let stopping = tokio::spawn(server.stop());
    let answer = admitted.await.expect("the request task");
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.json()["outputs"][0]["data"], json!([3.0]));
    stopping.await.expect("stop task").expect("a clean stop");
}
