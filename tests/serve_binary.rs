//! `kiln serve` as a user runs it: the server config file and the `KILN_*`
//! environment forms of the flags are parsed, validated and in effect in
//! the real binary (tenants, `[request_log]`, `max_message_bytes`, limits).

mod common;

use std::process::Command;
use std::time::Duration;

use common::child::{Server, kiln_bin};
use kiln::client::{ParameterChoice, fp32_request};
use tonic::Code;

fn serve_with_env(config: &str, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Result<Server, String> {
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, config).expect("write config");
    let mut command = Command::new(kiln_bin());
    command
        .arg("serve")
        .env("KILN_CONFIG", &path)
        .env("KILN_GRPC_ADDR", "127.0.0.1:0")
        .env("KILN_METRICS_ADDR", "127.0.0.1:0")
        .env("KILN_HTTP_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        command.env(k, v);
    }
    Server::spawn(command, dir)
}

#[tokio::test]
async fn the_config_file_and_environment_forms_are_in_effect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("requests.jsonl");
    let config = format!(
        "max_message_bytes = 100000\n\
         [tenants.small]\nbudget = 0.000001\nburst = 0.000001\n\
         [request_log]\npath = \"{}\"\nsample_rate = 1.0\n\
         [limits]\nmax_inflight_bytes = 1000000\n",
        log_path.display()
    );
    // The environment's KILN_MAX_MESSAGE_BYTES overrides the file's.
    let server = serve_with_env(&config, dir, &[("KILN_MAX_MESSAGE_BYTES", "200000")]).expect("serves");
    let mut client = server.client().await;
    let row = common::wdbc().0[0].clone();

    let mut tagged = fp32_request("risk", "features", std::slice::from_ref(&row));
    tagged.id = "from-the-binary".into();
    client.raw.model_infer(tagged).await.expect("served");

    // 150 kB passes the 200 kB bound (the file's 100 kB was overridden) and
    // reaches validation; 250 kB does not.
    let rows = |n| fp32_request("risk", "features", &vec![row.clone(); n]);
    let status = client.raw.model_infer(rows(1250)).await.expect_err("too many rows");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let status = client.raw.model_infer(rows(2100)).await.expect_err("over the bound");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("max_message_bytes 200000"), "{}", status.message());

    // The file's tenant budget holds.
    let mut spender = fp32_request("risk", "features", std::slice::from_ref(&row));
    spender.parameters.insert(
        "tenant".into(),
        kiln::api::pb::InferParameter { parameter_choice: Some(ParameterChoice::StringParam("small".into())) },
    );
    let status = client.raw.model_infer(spender).await.expect_err("a one-microsecond budget");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("tenant 'small'"), "{}", status.message());

    // The request log is written where the file says.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("\"from-the-binary\"") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the request log never held the request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_bad_config_stops_the_binary_naming_file_and_field() {
    for (config, env, needle) in [
        ("[limits]\nbody_timeout_ms = 0\n", &[][..], "field `limits.body_timeout_ms`"),
        ("[tenants.t]\nbudget = -1\nburst = 1\n", &[][..], "field `tenants.t.budget`"),
        ("", &[("KILN_MAX_MESSAGE_BYTES", "5000000000")][..], "max_message_bytes"),
        ("[limits]\nmax_inflight_bytes = 1000\n", &[][..], "field `limits.max_inflight_bytes`"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml").display().to_string();
        match serve_with_env(config, dir, env) {
            Ok(_) => panic!("{config:?} {env:?} was accepted"),
            Err(log) => {
                assert!(log.contains(needle), "{needle}: {log}");
                if !env.iter().any(|(k, _)| *k == "KILN_MAX_MESSAGE_BYTES") {
                    assert!(log.contains(&path), "{path}: {log}");
                }
            }
        }
    }
}
