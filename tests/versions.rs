//! Versions while serving, under a steady client load that counts every
//! answer: a version folder appears (it warms up, then takes the traffic
//! and the one before it drains), a bad one appears (never served,
//! reported), a version is removed, `model.toml` changes (applied) and
//! breaks (refused, the old settings keep serving); under explicit control
//! an admin loads and unloads by RPC. Nothing is lost, and the only errors
//! are the ones a change implies.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::load::steady_load;
use common::{RISK_TOML, RISK_WEIGHTS, TestServer};
use kiln::api::pb;
use kiln::client::{Client, Credentials};
use kiln::config::{AuthConfig, ModelControl, RepositorySource, ServeConfig};
use kiln::security::keys::{entry_toml, generate};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const ADMIN_TOKEN: &str = "versions-test-admin-token";

/// Writes version `v` of `risk` under `root` the way a release tool
/// should: into a hidden staging folder, then renamed into place.
fn add_version(root: &Path, v: u64, weights: &[u8]) {
    let staging = root.join(format!(".staging-{v}"));
    std::fs::create_dir_all(&staging).expect("mkdir staging");
    std::fs::write(staging.join("model.safetensors"), weights).expect("write weights");
    std::fs::rename(&staging, root.join("risk").join(v.to_string())).expect("rename into place");
}

fn repo(toml: &str) -> tempfile::TempDir {
    common::risk_repo(toml, &[1])
}

/// Replaces `model.toml` in one step (a rename), as a config tool would.
fn set_config(root: &Path, toml: &str) {
    let staging = root.join(".model.toml");
    std::fs::write(&staging, toml).expect("write");
    std::fs::rename(&staging, root.join("risk/model.toml")).expect("rename");
}

/// RepositoryIndex of `risk`: version -> (state, reason).
async fn index(client: &mut Client) -> BTreeMap<String, (String, String)> {
    let r = client.raw.repository_index(pb::RepositoryIndexRequest::default()).await.expect("index").into_inner();
    r.models.into_iter().filter(|m| m.name == "risk").map(|m| (m.version, (m.state, m.reason))).collect()
}

fn state_of<'a>(index: &'a BTreeMap<String, (String, String)>, version: &str) -> Option<&'a str> {
    index.get(version).map(|(state, _)| state.as_str())
}

/// Waits (bounded) until the index satisfies `check`.
async fn index_until(
    client: &mut Client,
    what: &str,
    check: impl Fn(&BTreeMap<String, (String, String)>) -> bool,
) -> BTreeMap<String, (String, String)> {
    let mut last = BTreeMap::new();
    for _ in 0..300 {
        last = index(client).await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 15 s: {what}; index: {last:?}")
}

async fn max_batch_size(client: &mut Client) -> i32 {
    let r = client
        .raw
        .model_config(pb::ModelConfigRequest { name: "risk".into(), version: String::new() })
        .await
        .expect("config");
    r.into_inner().config.expect("config").max_batch_size
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_follows_the_folder_under_load_and_loses_nothing() {
    let dir = repo(RISK_TOML);
    let root = dir.path();
    let server = TestServer::start(ServeConfig {
        repository: RepositorySource::Dir(root.to_path_buf()),
        repository_poll: Duration::from_millis(100),
        admin_insecure: true,
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let load = steady_load(&server, 3).await;

    // A new version loads, warms up, takes the traffic; version 1 drains.
    add_version(root, 2, RISK_WEIGHTS);
    let seen = index_until(&mut c, "version 2 serving, version 1 unloaded", |i| {
        state_of(i, "2") == Some("READY") && state_of(i, "1") == Some("UNAVAILABLE")
    })
    .await;
    assert!(seen["1"].1.contains("version_policy latest 1 now serves [2]"), "{seen:?}");
    let metrics = server.metrics_text().await;
    let seeded = metrics.lines().find(|l| {
        l.starts_with("kiln_latency_model_seconds{") && l.contains("version=\"2\"") && l.contains("term=\"fixed\"")
    });
    assert!(seeded.is_some_and(|l| !l.ends_with(" 0")), "version 2's latency model was seeded by its warm-up");

    // A version that does not load is reported and never served.
    add_version(root, 3, b"not a safetensors file");
    let seen = index_until(&mut c, "version 3 reported", |i| state_of(i, "3") == Some("UNAVAILABLE")).await;
    assert!(seen["3"].1.contains("risk/3"), "the reason names the folder: {seen:?}");
    assert_eq!(state_of(&seen, "2"), Some("READY"), "version 2 keeps serving: {seen:?}");
    server.wait_for_metric("kiln_model_changes_total{model=\"risk\",action=\"load\",outcome=\"failed\"}").await;

    // The served version is removed: the latest that loads is 1 again.
    std::fs::remove_dir_all(root.join("risk/2")).expect("remove version 2");
    let seen = index_until(&mut c, "version 1 back, version 2 unloaded", |i| {
        state_of(i, "1") == Some("READY") && state_of(i, "2") == Some("UNAVAILABLE")
    })
    .await;
    assert!(seen["2"].1.contains("folder was removed"), "{seen:?}");

    // A changed model.toml applies; a broken one is refused and the old
    // settings keep serving.
    set_config(root, &RISK_TOML.replace("max_batch_size = 64", "max_batch_size = 8"));
    for _ in 0..300 {
        if max_batch_size(&mut c).await == 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(max_batch_size(&mut c).await, 8, "the new max_batch_size applied");
    set_config(root, &RISK_TOML.replace("max_batch_size = 64", "max_batch_size = 0"));
    let seen = index_until(&mut c, "broken model.toml refused", |i| {
        i.get("1").is_some_and(|(s, r)| s == "READY" && r.contains("model.toml not applied"))
    })
    .await;
    assert!(seen["1"].1.contains("max_batch_size"), "the reason names the field: {seen:?}");
    assert_eq!(max_batch_size(&mut c).await, 8, "the previous settings keep serving");

    // Poll mode owns the served set: explicit calls are refused, saying why.
    let refused = c
        .raw
        .repository_model_load(pb::RepositoryModelLoadRequest { model_name: "risk".into(), ..Default::default() })
        .await
        .expect_err("refused under poll");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("model_control = poll"), "{}", refused.message());

    let tally = load.finish().await;
    eprintln!("poll: {} sent, by version {:?}, {} errors", tally.sent, tally.by_version, tally.errors.len());
    assert!(
        tally.errors.is_empty(),
        "no change here implies an error: {:?}",
        &tally.errors[..5.min(tally.errors.len())]
    );
    assert!(tally.by_version.get("1").is_some_and(|n| *n > 0), "{tally:?}");
    assert!(tally.by_version.get("2").is_some_and(|n| *n > 0), "{tally:?}");
    assert!(!tally.by_version.contains_key("3"), "the bad version never answered: {tally:?}");
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn explicit_load_and_unload_are_admin_calls_and_lose_nothing() {
    let dir = repo(&format!("version_policy = {{ all = true }}\n{RISK_TOML}"));
    let root = dir.path();
    let keys = tempfile::tempdir().expect("tempdir");
    let caller = generate("checkout", vec![]);
    let keys_file = keys.path().join("keys.toml");
    std::fs::write(&keys_file, entry_toml(&caller.entry)).expect("write keys");
    let ordinary = Credentials { tls: None, bearer: Some(caller.key.expose().into()) };
    let server = TestServer::start_with(
        ServeConfig {
            repository: RepositorySource::Dir(root.to_path_buf()),
            model_control: Some(ModelControl::Explicit),
            repository_poll: Duration::from_millis(50),
            auth: AuthConfig { keys_file: Some(keys_file), ..Default::default() },
            admin_token: Some(ADMIN_TOKEN.into()),
            ..Default::default()
        },
        ordinary.clone(),
    )
    .await;
    let addr = server.addr.to_string();
    let mut c = server.client().await;
    let admin_credentials = Credentials { tls: None, bearer: Some(ADMIN_TOKEN.into()) };
    let mut admin = Client::connect_with(&addr, &admin_credentials).await.expect("admin client");
    let load_request = || pb::RepositoryModelLoadRequest { model_name: "risk".into(), ..Default::default() };
    let unload_request = || pb::RepositoryModelUnloadRequest { model_name: "risk".into(), ..Default::default() };
    let load = steady_load(&server, 3).await;

    // Nothing changes on its own under explicit control.
    add_version(root, 2, RISK_WEIGHTS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(index(&mut c).await.keys().collect::<Vec<_>>(), vec!["1"], "explicit control does not poll");

    // An ordinary key may not load; the admin may, and version 2 serves.
    let denied = c.raw.repository_model_load(load_request()).await.expect_err("not an admin");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    admin.raw.repository_model_load(load_request()).await.expect("admin loads");
    let seen = index(&mut c).await;
    assert_eq!((state_of(&seen, "1"), state_of(&seen, "2")), (Some("READY"), Some("READY")), "{seen:?}");
    let r = c.infer_fp32("risk", "features", &[common::wdbc().0[0].clone()]).await.expect("after load");
    assert_eq!(r.model_version, "2", "the highest served is the default");

    // A version that does not load fails the call, naming it.
    add_version(root, 3, b"not a safetensors file");
    let failed = admin.raw.repository_model_load(load_request()).await.expect_err("version 3 does not load");
    assert_eq!(failed.code(), Code::FailedPrecondition);
    assert!(failed.message().contains("version 3") && failed.message().contains("risk/3"), "{}", failed.message());
    std::fs::remove_dir_all(root.join("risk/3")).expect("remove version 3");

    // Unload under load: what was admitted is answered; later calls are
    // told the model was unloaded, and by whom.
    admin.raw.repository_model_unload(unload_request()).await.expect("admin unloads");
    let seen = index_until(&mut c, "both versions unloaded", |i| {
        state_of(i, "1") == Some("UNAVAILABLE") && state_of(i, "2") == Some("UNAVAILABLE")
    })
    .await;
    assert!(seen["2"].1.contains("unloaded by the admin token"), "{seen:?}");
    let gone = c.infer_fp32("risk", "features", &[common::wdbc().0[0].clone()]).await.expect_err("unloaded");
    assert_eq!(gone.code(), Code::NotFound);
    assert!(gone.message().contains("unloaded by the admin token"), "{}", gone.message());
    server.wait_for_metric("kiln_model_ready{model=\"risk\",version=\"2\"} 0").await;

    // Loaded again, it serves again.
    admin.raw.repository_model_load(load_request()).await.expect("admin loads again");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tally = load.finish().await;
    eprintln!("explicit: {} sent, by version {:?}, {} errors", tally.sent, tally.by_version, tally.errors.len());
    for (code, message) in &tally.errors {
        assert!(
            *code == Code::NotFound && message.contains("unloaded by the admin token"),
            "only the unload implies errors: {code:?} {message}"
        );
    }
    assert!(tally.by_version.get("2").is_some_and(|n| *n > 0), "{tally:?}");
    let r = c.infer_fp32("risk", "features", &[common::wdbc().0[0].clone()]).await.expect("after reload");
    assert_eq!(r.model_version, "2");
    server.stop().await.expect("clean stop");
}

/// `kiln repository ARGS` against `server`, with `env` set.
fn kiln_repository(server: &TestServer, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.arg("repository").args(args).arg("--url").arg(server.addr.to_string());
    for var in ["KILN_ADMIN_TOKEN", "KILN_API_KEY", "KILN_ADMIN_TOKEN_FILE", "KILN_API_KEY_FILE"] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied()).output().expect("run kiln repository")
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_repository_indexes_and_an_admin_unloads_and_loads_the_built_in_model() {
    let server = TestServer::start(ServeConfig { admin_token: Some(ADMIN_TOKEN.into()), ..Default::default() }).await;
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let admin = [("KILN_ADMIN_TOKEN", ADMIN_TOKEN)];
    let (index, refused, unloaded, after_unload, loaded, after_load) = tokio::task::block_in_place(|| {
        (
            kiln_repository(&server, &["index"], &[]),
            kiln_repository(&server, &["unload", "risk"], &[]),
            kiln_repository(&server, &["unload", "risk"], &admin),
            kiln_repository(&server, &["index"], &[]),
            kiln_repository(&server, &["load", "risk"], &admin),
            kiln_repository(&server, &["index"], &[]),
        )
    });
    assert!(text(&index).lines().any(|l| l.split_whitespace().eq(["risk", "1", "READY"])), "{}", text(&index));
    assert!(!refused.status.success(), "an unload without admin credentials was accepted");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"), "{refused:?}");
    assert!(unloaded.status.success(), "{unloaded:?}");
    let line = text(&after_unload);
    assert!(line.contains("UNLOADING") || line.contains("UNAVAILABLE"), "{line}");
    assert!(line.contains("unloaded by the admin token"), "{line}");
    assert!(loaded.status.success() && text(&loaded).contains("loaded risk"), "{loaded:?}");
    assert!(
        text(&after_load).lines().any(|l| l.split_whitespace().eq(["risk", "1", "READY"])),
        "{}",
        text(&after_load)
    );
    let mut c = server.client().await;
    c.infer_fp32("risk", "features", &[common::wdbc().0[0].clone()]).await.expect("served again");
    server.stop().await.expect("clean stop");
}

/// The model's gRPC health status, waited for (bounded) until `expected`.
async fn health_becomes(server: &TestServer, expected: ServingStatus) {
    let mut health = HealthClient::new(server.channel().await);
    let mut status = -1;
    for _ in 0..300 {
        let request = HealthCheckRequest { service: "risk".into() };
        status = health.check(request).await.expect("health check").into_inner().status;
        if status == expected as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("health of risk stayed {status}, expected {expected:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_follows_unload_and_load() {
    let server = TestServer::start(ServeConfig { admin_insecure: true, ..Default::default() }).await;
    let mut c = server.client().await;
    health_becomes(&server, ServingStatus::Serving).await;
    let unload = pb::RepositoryModelUnloadRequest { model_name: "risk".into(), ..Default::default() };
    c.raw.repository_model_unload(unload).await.expect("unload");
    health_becomes(&server, ServingStatus::NotServing).await;
    let (model_check, server_check) = tokio::task::block_in_place(|| {
        (kiln_health(&server.addr.to_string(), &["--model", "risk"]), kiln_health(&server.addr.to_string(), &[]))
    });
    assert_eq!(model_check.status.code(), Some(1), "{model_check:?}");
    assert!(String::from_utf8_lossy(&model_check.stdout).contains("model risk at"), "{model_check:?}");
    assert!(String::from_utf8_lossy(&model_check.stdout).contains("NOT_SERVING"), "{model_check:?}");
    assert!(server_check.status.success(), "the server itself still serves: {server_check:?}");
    let ready = c.raw.model_ready(pb::ModelReadyRequest { name: "risk".into(), version: String::new() }).await;
    assert!(!ready.expect("a known model answers ModelReady").into_inner().ready);
    let load = pb::RepositoryModelLoadRequest { model_name: "risk".into(), ..Default::default() };
    c.raw.repository_model_load(load).await.expect("load");
    health_becomes(&server, ServingStatus::Serving).await;
    let addr = server.addr.to_string();
    let model_check = tokio::task::block_in_place(|| kiln_health(&addr, &["--model", "risk"]));
    assert!(model_check.status.success() && String::from_utf8_lossy(&model_check.stdout).contains("SERVING"));
    server.stop().await.expect("clean stop");
    let gone = tokio::task::block_in_place(|| kiln_health(&addr, &["--timeout", "2"]));
    assert_eq!(gone.status.code(), Some(1), "a stopped server is not healthy: {gone:?}");
    assert!(String::from_utf8_lossy(&gone.stdout).contains("no answer"), "{gone:?}");
}

/// `kiln health --url ADDR ARGS` (the container healthcheck).
fn kiln_health(addr: &str, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(["health", "--url", addr]).args(args).env_remove("KILN_API_KEY").env_remove("KILN_API_KEY_FILE");
    command.output().expect("run kiln health")
}
