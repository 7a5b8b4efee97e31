//! Malformed requests each get the right code and a message naming the
//! problem, and the server keeps serving afterwards.

mod common;

use common::TestServer;
use kiln::api::pb::{
    InferParameter, ModelInferRequest, infer_parameter::ParameterChoice,
    model_infer_request::InferRequestedOutputTensor,
};
use kiln::client;
use tonic::Code;

fn good() -> ModelInferRequest {
    client::fp32_request("risk", "features", &[common::wdbc().0[0].clone()])
}

fn with(f: impl FnOnce(&mut ModelInferRequest)) -> ModelInferRequest {
    let mut r = good();
    f(&mut r);
    r
}

fn with_value(value: f32) -> ModelInferRequest {
    let mut row = common::wdbc().0[0].clone();
    row[3] = value;
    client::fp32_request("risk", "features", &[row])
}

fn param(name: &str, choice: ParameterChoice) -> ModelInferRequest {
    with(|r| {
        r.parameters.insert(name.into(), InferParameter { parameter_choice: Some(choice) });
    })
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_the_server_keeps_serving() {
    let server = TestServer::built_in().await;
    let mut c = server.client().await;
    let row = common::wdbc().0[0].clone();
    let cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        ("unknown model", with(|r| r.model_name = "nope".into()), Code::NotFound, "unknown model 'nope'"),
        ("unknown version", with(|r| r.model_version = "7".into()), Code::NotFound, "no version '7'"),
        ("non-numeric version", with(|r| r.model_version = "latest".into()), Code::NotFound, "no version 'latest'"),
        (
            "missing input",
            with(|r| {
                r.inputs.clear();
                r.raw_input_contents.clear();
            }),
            Code::InvalidArgument,
            "missing input 'features'",
        ),
        ("unknown input", with(|r| r.inputs[0].name = "feats".into()), Code::InvalidArgument, "unknown input 'feats'"),
        (
            "duplicate input",
            with(|r| {
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
            }),
            Code::InvalidArgument,
            "appears more than once",
        ),
        ("wrong datatype", with(|r| r.inputs[0].datatype = "FP64".into()), Code::InvalidArgument, "expected FP32"),
        ("wrong width", with(|r| r.inputs[0].shape = vec![1, 29]), Code::InvalidArgument, "dimension 1 must be 30"),
        ("wrong rank", with(|r| r.inputs[0].shape = vec![30]), Code::InvalidArgument, "rank 2"),
        ("negative dimension", with(|r| r.inputs[0].shape = vec![-1, 30]), Code::InvalidArgument, "negative dimension"),
        (
            "zero rows",
            with(|r| {
                r.inputs[0].shape = vec![0, 30];
                r.raw_input_contents[0].clear();
            }),
            Code::InvalidArgument,
            "zero rows",
        ),
        (
            "raw byte length",
            with(|r| {
                r.raw_input_contents[0].pop();
            }),
            Code::InvalidArgument,
            "raw contents hold 119 bytes, expected 120",
        ),
        (
            "typed count",
            client::fp32_request_typed("risk", "features", &[row[..29].to_vec()]),
            Code::InvalidArgument,
            "dimension 1 must be 30",
        ),
        (
            "typed values short",
            with(|r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents =
                    Some(kiln::api::pb::InferTensorContents { fp32_contents: vec![1.0; 29], ..Default::default() });
            }),
            Code::InvalidArgument,
            "fp32_contents holds 29 values, expected 30",
        ),
        (
            "typed and raw both",
            with(|r| {
                r.inputs[0].contents =
                    Some(kiln::api::pb::InferTensorContents { fp32_contents: vec![1.0; 30], ..Default::default() })
            }),
            Code::InvalidArgument,
            "use one form",
        ),
        (
            "raw buffer count",
            with(|r| r.raw_input_contents.push(vec![0; 4])),
            Code::InvalidArgument,
            "raw_input_contents has 2 entries",
        ),
        (
            "unknown output",
            with(|r| r.outputs.push(InferRequestedOutputTensor { name: "score".into(), ..Default::default() })),
            Code::InvalidArgument,
            "unknown requested output 'score'",
        ),
        ("NaN", with_value(f32::NAN), Code::InvalidArgument, "feature 'area_mean' is NaN"),
        ("infinity", with_value(f32::INFINITY), Code::InvalidArgument, "feature 'area_mean' is inf"),
        ("below valid_range", with_value(-1.0), Code::InvalidArgument, "'area_mean' = -1 is outside its valid_range"),
        ("above valid_range", with_value(1e9), Code::InvalidArgument, "outside its valid_range"),
        (
            "rows over max_batch_size",
            client::fp32_request("risk", "features", &vec![row.clone(); 65]),
            Code::InvalidArgument,
            "max_batch_size 64",
        ),
        (
            "timeout as string",
            param("timeout", ParameterChoice::StringParam("5s".into())),
            Code::InvalidArgument,
            "parameter 'timeout'",
        ),
        (
            "negative priority",
            param("priority", ParameterChoice::Int64Param(-1)),
            Code::InvalidArgument,
            "parameter 'priority': must be >= 0",
        ),
        (
            "tenant as number",
            param("tenant", ParameterChoice::Int64Param(3)),
            Code::InvalidArgument,
            "parameter 'tenant': expected a string",
        ),
        (
            "max_cost_us as double",
            param("max_cost_us", ParameterChoice::DoubleParam(1.5)),
            Code::InvalidArgument,
            "parameter 'max_cost_us'",
        ),
    ];
    assert!(cases.len() >= 15);
    for (what, request, code, message) in cases {
        let status = c.raw.model_infer(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(status.message().contains(message), "{what}: message {:?} lacks {message:?}", status.message());
    }

    // Unknown parameters (perf_analyzer sends its own) are accepted.
    let tolerated = param("triton_enable_empty_final_response", ParameterChoice::BoolParam(true));
    c.raw.model_infer(tolerated).await.expect("unknown parameters are ignored");
    let answer = c.raw.model_infer(good()).await.expect("still serving").into_inner();
    assert_eq!(client::output_fp32(&answer, 0).map(|v| v.len()), Some(1));
}

#[tokio::test]
async fn the_message_bound_is_checked_from_the_frame_header_and_a_raised_one_reaches_validation() {
    // Default bound (4 MiB): a 5 MiB request is refused from its frame
    // header with RESOURCE_EXHAUSTED naming the setting, before its body is
    // buffered, and the server lives on.
    let server = TestServer::built_in().await;
    let mut c = server.client().await;
    let rows = vec![common::wdbc().0[0].clone(); 45_000];
    let big = client::fp32_request("risk", "features", &rows);
    assert!(big.raw_input_contents[0].len() > 5 << 20);
    let status = c.raw.model_infer(big.clone()).await.expect_err("over 4 MiB");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("max_message_bytes 4194304"), "{}", status.message());
    c.raw.model_infer(good()).await.expect("a small request is still served");

    // A raised bound: the same request passes the transport and is judged
    // by validation, which names what is wrong with it.
    let raised = kiln::config::ServeConfig { max_message_bytes: 64 << 20, ..Default::default() };
    let server = TestServer::start(raised).await;
    let mut c = server.client().await;
    let status = c.raw.model_infer(big).await.expect_err("too many rows");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("max_batch_size"), "{}", status.message());

    // A small configured bound holds the same way.
    let small = TestServer::start(kiln::config::ServeConfig { max_message_bytes: 1024, ..Default::default() }).await;
    let mut c = small.client().await;
    let status =
        c.raw.model_infer(client::fp32_request("risk", "features", &rows[..20])).await.expect_err("over 1 KiB");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    c.raw.model_infer(good()).await.expect("a small request is still served");
}
