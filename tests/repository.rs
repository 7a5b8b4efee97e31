//! Model repositories on disk: a bad or missing config fails at start-up
//! naming the file and field; a folder with two versions serves the latest
//! by default and both under `version_policy = { all = true }`.

mod common;

use std::path::Path;

use common::{RISK_TOML, RISK_WEIGHTS, TestServer, risk_repo};
use kiln::api::pb;
use kiln::config::{RepositorySource, ServeConfig};

fn load_error(dir: &Path) -> String {
    match kiln::repository::load(&RepositorySource::Dir(dir.to_path_buf())) {
        Ok(_) => panic!("expected {} to be refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_field_is_named_with_its_file() {
    let dir = risk_repo(&RISK_TOML.replace("max_queue = ", "max_queue_len = "), &[1]);
    let err = load_error(dir.path());
    assert!(err.contains("risk/model.toml") && err.contains("max_queue_len"), "{err}");
}

#[test]
fn cuda_device_without_cuda_build_names_the_field() {
    if cfg!(feature = "cuda") {
        return; // with CUDA compiled in, cuda:0 may well load
    }
    let dir = risk_repo(&RISK_TOML.replace("device = \"auto\"", "device = \"cuda:0\""), &[1]);
    let err = load_error(dir.path());
    assert!(err.contains("field `device`") && err.contains("--features cuda"), "{err}");
}

#[test]
fn missing_config_and_missing_weights_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("empty")).expect("mkdir");
    let err = load_error(dir.path());
    assert!(err.contains("empty/model.toml") && err.contains("missing"), "{err}");

    let dir = risk_repo(RISK_TOML, &[]);
    std::fs::create_dir_all(dir.path().join("risk/3")).expect("mkdir");
    let err = load_error(dir.path());
    assert!(err.contains("risk/3/model.safetensors"), "{err}");
}

#[test]
fn declared_output_width_must_match_the_weights() {
    let dir = risk_repo(
        &RISK_TOML.replace(
            "name = \"probability\"\ndatatype = \"FP32\"\nshape = [-1, 1]",
            "name = \"probability\"\ndatatype = \"FP32\"\nshape = [-1, 2]",
        ),
        &[1],
    );
    let err = load_error(dir.path());
    assert!(err.contains("field `outputs`") && err.contains("1 units"), "{err}");
}

#[test]
fn default_version_must_exist_and_be_served() {
    let dir = risk_repo(&format!("default_version = 4\n{RISK_TOML}"), &[1]);
    let err = load_error(dir.path());
    assert!(err.contains("field `default_version`"), "{err}");
    let dir = risk_repo(&format!("default_version = 1\n{RISK_TOML}"), &[1, 2]);
    let err = load_error(dir.path());
    assert!(err.contains("field `default_version`") && err.contains("latest 1"), "{err}");
}

#[tokio::test]
async fn serve_refuses_a_bad_repository_instead_of_panicking() {
    let dir = risk_repo("kind = \"mlp\"\n", &[1]);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = ServeConfig { repository: RepositorySource::Dir(dir.path().to_path_buf()), ..Default::default() };
    let err = kiln::serve(config, kiln::Listeners { grpc, http: None, metrics: None }, std::future::pending())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("model.toml"), "{err}");
}

/// What serving two versions leaves to a test: the folder (kept until
/// the end), the server, a client, and a request pinning version 1.
type TwoVersions = (tempfile::TempDir, TestServer, kiln::client::Client, pb::ModelInferRequest);

/// Serves `toml` with versions 1 and 2 and checks the default is 2.
async fn two_versions(toml: &str) -> TwoVersions {
    let dir = risk_repo(toml, &[1, 2]);
    let server = TestServer::start(ServeConfig {
        repository: RepositorySource::Dir(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let row = common::wdbc().0[0].clone();
    let default = c.infer_fp32("risk", "features", std::slice::from_ref(&row)).await.expect("default");
    assert_eq!(default.model_version, "2");
    let mut pinned = kiln::client::fp32_request("risk", "features", &[row]);
    pinned.model_version = "1".into();
    (dir, server, c, pinned)
}

#[tokio::test]
async fn a_folder_repository_serves_the_latest_version_by_default() {
    let (_dir, _server, mut c, pinned) = two_versions(RISK_TOML).await;
    let err = c.raw.model_infer(pinned).await.expect_err("version 1 is not served under latest 1");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("no version '1'") && err.message().contains("versions: 2"), "{}", err.message());
}

#[tokio::test]
async fn a_folder_repository_serves_every_version_with_the_highest_as_default() {
    let (_dir, _server, mut c, pinned) = two_versions(&format!("version_policy = {{ all = true }}\n{RISK_TOML}")).await;
    assert_eq!(c.raw.model_infer(pinned).await.expect("pinned").into_inner().model_version, "1");
    let stats = c
        .raw
        .model_statistics(pb::ModelStatisticsRequest { name: "risk".into(), version: String::new() })
        .await
        .expect("stats")
        .into_inner();
    let versions: Vec<&str> = stats.model_stats.iter().map(|s| s.version.as_str()).collect();
    assert_eq!(versions, vec!["1", "2"]);
}

#[test]
fn duplicate_version_folders_are_a_start_up_error_naming_both() {
    let dir = risk_repo(RISK_TOML, &[1]);
    std::fs::create_dir_all(dir.path().join("risk/01")).expect("mkdir");
    std::fs::write(dir.path().join("risk/01/model.safetensors"), RISK_WEIGHTS).expect("write weights");
    let err = load_error(dir.path());
    assert!(err.contains("risk/01") && err.contains("risk/1 ") && err.contains("both version 1"), "{err}");
}

#[test]
fn a_timeout_that_overflows_a_duration_is_refused_at_load() {
    let dir = risk_repo(&RISK_TOML.replace("default_timeout_ms = 1000", "default_timeout_ms = 1e300"), &[1]);
    let err = load_error(dir.path());
    assert!(err.contains("risk/model.toml") && err.contains("field `default_timeout_ms`"), "{err}");
}
