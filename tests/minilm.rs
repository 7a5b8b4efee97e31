//! The real all-MiniLM-L6-v2 served over gRPC, checked against embeddings
//! from an independent float64 implementation (scripts/minilm-reference.py,
//! committed as tests/fixtures/minilm_reference.json). The model comes from
//! scripts/fetch-minilm.sh; without it these tests fail, never skip.

mod common;

use std::path::PathBuf;

use common::{TestServer, expect_refusal, with_param};
use kiln::client::{ParameterChoice, bytes_request, output_fp32, text_request};
use kiln::config::{RepositorySource, ServeConfig};
use tonic::Code;

const MODEL: &str = "minilm";
const TOLERANCE: f64 = 1e-4;

fn repo() -> PathBuf {
    let models = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models"));
    let weights = models.join("minilm/1/model.safetensors");
    assert!(weights.exists(), "{} is missing: run scripts/fetch-minilm.sh first", weights.display());
    models
}

async fn server() -> TestServer {
    TestServer::start(ServeConfig { repository: RepositorySource::Dir(repo()), ..Default::default() }).await
}

struct Reference {
    text: String,
    tokens: usize,
    embedding: Vec<f64>,
}

fn reference() -> Vec<Reference> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minilm_reference.json"))
        .expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["sentences"]
        .as_array()
        .expect("sentences")
        .iter()
        .map(|s| Reference {
            text: s["text"].as_str().expect("text").to_string(),
            tokens: s["tokens"].as_u64().expect("tokens") as usize,
            embedding: s["embedding"].as_array().expect("embedding").iter().map(|x| x.as_f64().expect("f64")).collect(),
        })
        .collect()
}

fn cosine_distance(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "embedding width");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}

async fn embed(client: &mut kiln::client::Client, texts: &[&str]) -> Vec<Vec<f32>> {
    let response = client.raw.model_infer(text_request(MODEL, "text", texts)).await.expect("embedding").into_inner();
    assert_eq!(response.outputs[0].shape, vec![texts.len() as i64, 384]);
    output_fp32(&response, 0).expect("fp32").chunks(384).map(<[f32]>::to_vec).collect()
}

#[tokio::test]
async fn embeddings_match_the_independent_reference_alone_and_in_mixed_length_batches() {
    let server = server().await;
    let mut client = server.client().await;
    let reference = reference();
    let lengths: Vec<usize> = reference.iter().map(|r| r.tokens).collect();
    assert!(lengths.iter().max() > lengths.iter().min(), "the fixture mixes lengths: {lengths:?}");
    let texts: Vec<&str> = reference.iter().map(|r| r.text.as_str()).collect();

    // All in one request: every row padded to the longest.
    let together = embed(&mut client, &texts).await;
    // Each alone: no padding at all.
    let mut alone = Vec::new();
    for t in &texts {
        alone.push(embed(&mut client, &[t]).await.remove(0));
    }
    // Concurrent single requests: the batcher groups them as it likes.
    let mut tasks = Vec::new();
    for t in texts.iter().cycle().take(4 * texts.len()) {
        let (mut c, t) = (client.clone(), t.to_string());
        tasks.push(tokio::spawn(async move { embed(&mut c, &[&t]).await.remove(0) }));
    }
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.push(task.await.expect("task"));
    }
    for (i, r) in reference.iter().enumerate() {
        for (how, got) in [("alone", &alone[i]), ("together", &together[i]), ("concurrent", &concurrent[i])] {
            let d = cosine_distance(got, &r.embedding);
            assert!(d < TOLERANCE, "{how}: {:?}: cosine distance {d:e} from the reference", r.text);
        }
        for again in concurrent.iter().skip(i).step_by(texts.len()) {
            let d = cosine_distance(again, &alone[i].iter().map(|x| *x as f64).collect::<Vec<_>>());
            assert!(d < TOLERANCE, "{:?}: batching moved the answer by {d:e}", r.text);
        }
    }
    // The model is right, not merely consistent: related sentences are closer.
    let similarity = |a: usize, b: usize| 1.0 - cosine_distance(&alone[a], &reference[b].embedding);
    assert!(similarity(0, 1) > similarity(0, 2), "cat~feline should beat cat~unrelated");
    server.wait_for_metric("kiln_padding_ratio_count{model=\"minilm\",version=\"1\"}").await;

    // Concurrent requests of the same text share batches: while one batch
    // computes, the others queue and leave together.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let response = c.raw.model_infer(text_request(MODEL, "text", &[texts_for_batching()])).await;
            let response = response.expect("embedding").into_inner();
            kiln::client::int_parameter(&response, "batch_size").expect("batch_size on every answer")
        }));
    }
    let mut largest = 0;
    for task in tasks {
        largest = largest.max(task.await.expect("task"));
    }
    assert!(largest > 1, "32 concurrent requests never shared a batch");
}

fn texts_for_batching() -> &'static str {
    "the same sentence, sent by many clients at once"
}

#[tokio::test]
async fn text_input_is_validated_and_token_limits_are_enforced() {
    let server = server().await;
    let mut client = server.client().await;
    let long = "the quick brown fox jumps over the lazy dog ".repeat(8);

    expect_refusal(
        &mut client,
        text_request(MODEL, "text", &["fine", ""]),
        Code::InvalidArgument,
        &["element 1", "empty"],
    )
    .await;
    let bad_utf8 = bytes_request(MODEL, "text", &[b"ok", &[0xff, 0xfe, 0x41]]);
    expect_refusal(&mut client, bad_utf8, Code::InvalidArgument, &["element 1", "UTF-8"]).await;

    // 9 words × 8 + [CLS] + [SEP] = 74 tokens.
    let refuse = with_param(
        with_param(text_request(MODEL, "text", &["short", &long]), "max_tokens", ParameterChoice::Int64Param(16)),
        "truncate",
        ParameterChoice::BoolParam(false),
    );
    expect_refusal(
        &mut client,
        refuse,
        Code::InvalidArgument,
        &["element 1", "74 tokens", "max_tokens 16", "truncate"],
    )
    .await;

    let cut = with_param(text_request(MODEL, "text", &[&long]), "max_tokens", ParameterChoice::Int64Param(16));
    let cut = client.raw.model_infer(cut).await.expect("truncated by default").into_inner();
    let full = embed(&mut client, &[&long]).await.remove(0);
    let truncated = output_fp32(&cut, 0).expect("fp32");
    let as_f64: Vec<f64> = full.iter().map(|x| *x as f64).collect();
    let d = cosine_distance(&truncated, &as_f64);
    assert!(d > TOLERANCE, "16 tokens embed differently from 74 (distance {d:e})");
    // The truncated text is exactly its first 14 word pieces.
    let first_14 = long.split_whitespace().take(14).collect::<Vec<_>>().join(" ");
    let expected = embed(&mut client, &[&first_14]).await.remove(0);
    let d = cosine_distance(&truncated, &expected.iter().map(|x| *x as f64).collect::<Vec<_>>());
    assert!(d < TOLERANCE, "truncation kept something other than the first tokens ({d:e})");

    let zero = with_param(text_request(MODEL, "text", &["x"]), "max_tokens", ParameterChoice::Int64Param(0));
    expect_refusal(&mut client, zero, Code::InvalidArgument, &["max_tokens", "at least 1"]).await;
    let not_bool =
        with_param(text_request(MODEL, "text", &["x"]), "truncate", ParameterChoice::StringParam("y".into()));
    expect_refusal(&mut client, not_bool, Code::InvalidArgument, &["truncate", "bool"]).await;
    let rows_model = with_param(
        kiln::client::fp32_request("risk", "features", &common::wdbc().0[..1]),
        "max_tokens",
        ParameterChoice::Int64Param(8),
    );
    expect_refusal(&mut client, rows_model, Code::InvalidArgument, &["max_tokens", "text models"]).await;

    // The server is still up and right.
    let again = embed(&mut client, &["still serving"]).await;
    assert_eq!(again[0].len(), 384);
}

#[tokio::test]
async fn metadata_describes_the_text_interface() {
    let server = server().await;
    let mut client = server.client().await;
    let m = client
        .raw
        .model_metadata(kiln::api::pb::ModelMetadataRequest { name: MODEL.into(), version: String::new() })
        .await
        .expect("metadata")
        .into_inner();
    assert_eq!(m.platform, "kiln_bert");
    assert_eq!((m.inputs[0].datatype.as_str(), m.inputs[0].shape.clone()), ("BYTES", vec![-1]));
    assert_eq!((m.outputs[0].datatype.as_str(), m.outputs[0].shape.clone()), ("FP32", vec![-1, 384]));
}

#[tokio::test]
async fn a_16_mib_text_is_refused_before_tokenizing_while_normal_texts_are_served() {
    let config =
        ServeConfig { repository: RepositorySource::Dir(repo()), max_message_bytes: 32 << 20, ..Default::default() };
    let server = TestServer::start(config).await;
    let mut steady = server.client().await;
    // A client sending normal texts the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut answered = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let request = text_request(MODEL, "text", &["a normal sentence about the weather"]);
                steady.raw.model_infer(request).await.expect("normal texts keep being served");
                answered += 1;
            }
            answered
        }
    });
    let huge = "word ".repeat((16 << 20) / 5);
    let mut client = server.client().await;
    for truncate in [true, false] {
        let request =
            with_param(text_request(MODEL, "text", &["fine", &huge]), "truncate", ParameterChoice::BoolParam(truncate));
        expect_refusal(
            &mut client,
            request,
            Code::InvalidArgument,
            &["element 1", "16777215 bytes of text", "max_text_bytes 16384", "before tokenizing"],
        )
        .await;
    }
    // Under the byte limit, a text to be cut is tokenized as a prefix and
    // answered like its first max_tokens tokens.
    let long = "word ".repeat(3000);
    let cut = client.raw.model_infer(text_request(MODEL, "text", &[&long])).await.expect("cut to max_tokens");
    let params = cut.into_inner().parameters;
    assert!(params.contains_key("queue_us"), "{params:?}");
    stop.store(true, std::sync::atomic::Ordering::Release);
    assert!(background.await.expect("joined") > 0);
}

#[tokio::test]
async fn a_text_request_over_max_batch_tokens_is_refused_at_the_door() {
    let server = server().await;
    let mut client = server.client().await;
    // 32 texts of about 100 tokens pad to about 3200 tokens, over the
    // default max_batch_tokens of 2048: no batch could ever hold it.
    let text = "the quick brown fox jumps over the lazy dog ".repeat(10);
    let texts: Vec<&str> = vec![text.as_str(); 32];
    expect_refusal(
        &mut client,
        text_request(MODEL, "text", &texts),
        Code::InvalidArgument,
        &["32 texts padded to", "more than max_batch_tokens 2048", "send fewer texts"],
    )
    .await;
    let stats = client
        .raw
        .model_statistics(kiln::api::pb::ModelStatisticsRequest { name: MODEL.into(), version: "1".into() })
        .await
        .expect("statistics")
        .into_inner();
    assert_eq!(stats.model_stats[0].inference_count, 0, "the refused texts reached the model");
    client.raw.model_infer(text_request(MODEL, "text", &texts[..8])).await.expect("fewer texts are served");
}

/// OpenAI's embeddings API over HTTP: the same vectors as gRPC (within
/// 1e-6), base64 equal to float, `usage` counting the reference's tokens,
/// and its refusals in OpenAI's error shape.
#[tokio::test]
async fn openai_embeddings_over_http_equal_the_grpc_ones() {
    use common::http::{get, post_json};
    use serde_json::json;
    let server = server().await;
    let mut client = server.client().await;
    let reference = reference();
    let texts: Vec<&str> = reference.iter().map(|r| r.text.as_str()).collect();
    let grpc = embed(&mut client, &texts).await;

    let answer = post_json(server.http_addr, "/v1/embeddings", &json!({"input": texts, "model": MODEL})).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let v = answer.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MODEL);
    let tokens: usize = reference.iter().map(|r| r.tokens).sum();
    assert_eq!(v["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), texts.len());
    for (i, (row, expected)) in data.iter().zip(&grpc).enumerate() {
        assert_eq!(row["index"], i);
        assert_eq!(row["object"], "embedding");
        let got: Vec<f64> =
            row["embedding"].as_array().expect("floats").iter().map(|x| x.as_f64().expect("f")).collect();
        assert_eq!(got.len(), 384);
        let worst = got.iter().zip(expected).map(|(a, b)| (a - f64::from(*b)).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-6, "row {i}: {worst:e} from the gRPC embedding");
    }

    let one = post_json(
        server.http_addr,
        "/v1/embeddings",
        &json!({"input": texts[0], "model": MODEL, "encoding_format": "base64", "dimensions": 384}),
    )
    .await;
    assert_eq!(one.status, 200, "{}", String::from_utf8_lossy(&one.body));
    let encoded = one.json()["data"][0]["embedding"].as_str().expect("base64").to_string();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64");
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let worst = floats.iter().zip(&grpc[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-6, "base64 row: {worst:e} from gRPC");

    let refusals = [
        (json!({"input": [[101, 2023]], "model": MODEL}), 400, "token arrays are not accepted"),
        (json!({"input": "a", "model": MODEL, "dimensions": 128}), 400, "cannot shorten"),
        (json!({"input": "a", "model": MODEL, "encoding_format": "int8"}), 400, "encoding_format"),
        (json!({"input": "a", "model": "nope"}), 404, "nope"),
        (json!({"input": [], "model": MODEL}), 400, "empty list"),
    ];
    for (body, status, expected) in refusals {
        let answer = post_json(server.http_addr, "/v1/embeddings", &body).await;
        assert_eq!(answer.status, status, "{body}: {}", String::from_utf8_lossy(&answer.body));
        let error = &answer.json()["error"];
        assert!(error["message"].as_str().expect("message").contains(expected), "{body}: {error}");
        assert_eq!(error["type"], if status == 404 { "not_found_error" } else { "invalid_request_error" });
    }
    let models = get(server.http_addr, "/v1/models").await.json();
    assert_eq!(
        models["data"].as_array().expect("models").iter().map(|m| m["id"].clone()).collect::<Vec<_>>(),
        vec![json!(MODEL)]
    );
}
