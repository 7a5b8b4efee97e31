//! Release controls against a live server under a steady load that counts
//! every answer: promote, a sticky canary split, pause and resume,
//! rollback, each by an admin and written to the audit log; the state is
//! kept in `release.json`, survives a restart, and a change another
//! replica writes there is picked up by the poll.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::TestServer;
use common::load::steady_load;
use kiln::api::admin_pb::{ReleaseChange, ReleaseState};
use kiln::api::pb;
use kiln::client::Credentials;
use kiln::config::{RepositorySource, ServeConfig};
use tonic::Code;

const ADMIN_TOKEN: &str = "release-test-admin-token";

fn two_versions() -> tempfile::TempDir {
    common::risk_repo(&format!("version_policy = {{ all = true }}\n{}", common::RISK_TOML), &[1, 2])
}

async fn serve(repo: &Path, audit: &Path) -> TestServer {
    TestServer::start(ServeConfig {
        repository: RepositorySource::Dir(repo.to_path_buf()),
        repository_poll: Duration::from_millis(100),
        admin_token: Some(ADMIN_TOKEN.into()),
        audit_log: Some(audit.to_path_buf()),
        ..Default::default()
    })
    .await
}

fn change(version: &str, reason: &str) -> ReleaseChange {
    ReleaseChange { model: "risk".into(), version: version.into(), reason: reason.into(), ..Default::default() }
}

/// One row to `risk` with request id `id`; the version that answered.
async fn answered_by(client: &mut kiln::client::Client, id: &str) -> Result<String, tonic::Status> {
    let mut request = kiln::client::fp32_request("risk", "features", &[common::wdbc().0[0].clone()]);
    request.id = id.into();
    client.raw.model_infer(request).await.map(|r| r.into_inner().model_version)
}

#[tokio::test(flavor = "multi_thread")]
async fn promote_split_pause_resume_rollback_under_load_audited_and_kept_across_a_restart() {
    let repo = two_versions();
    let logs = tempfile::tempdir().expect("tempdir");
    let audit = logs.path().join("audit.log");
    let server = serve(repo.path(), &audit).await;
    let credentials = Credentials { tls: None, bearer: Some(ADMIN_TOKEN.into()) };
    let mut admin = kiln::client::admin(&server.addr.to_string(), &credentials).await.expect("admin client");
    let mut c = server.client().await;
    let load = steady_load(&server, 3).await;

    let state: ReleaseState = admin.release_status(change("", "")).await.expect("status").into_inner();
    assert_eq!((state.versions.clone(), state.default_version.as_str()), (vec!["1".into(), "2".into()], "2"));

    // Promote: the next request without a version goes to 1.
    let state = admin.promote(change("1", "2 scores worse")).await.expect("promote").into_inner();
    assert_eq!((state.default_version.as_str(), state.promoted.as_str()), ("1", "1"));
    assert_eq!(answered_by(&mut c, "after-promote").await.expect("infer"), "1");

    // A canary split: both versions serve, each request id always lands on
    // the same one.
    let weights = [("1".to_string(), 50), ("2".to_string(), 50)].into();
    let split = ReleaseChange { weights, ..change("", "canary 2") };
    assert_eq!(admin.split(split).await.expect("split").into_inner().split.len(), 2);
    let mut seen = BTreeMap::new();
    for i in 0..40 {
        let id = format!("user-{i}");
        let first = answered_by(&mut c, &id).await.expect("infer");
        for _ in 0..3 {
            assert_eq!(answered_by(&mut c, &id).await.expect("infer"), first, "{id} moved between versions");
        }
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both sides of the split served: {seen:?}");

    // Pause: calls are refused, saying why; resume serves again.
    admin.pause(change("", "drift on radius_mean")).await.expect("pause");
    let paused = answered_by(&mut c, "while-paused").await.expect_err("paused");
    assert_eq!(paused.code(), Code::Unavailable);
    assert!(paused.message().contains("is paused (drift on radius_mean)"), "{}", paused.message());
    admin.resume(change("", "fixed upstream")).await.expect("resume");
    answered_by(&mut c, "after-resume").await.expect("resumed");
    let refused = admin.resume(change("", "again")).await.expect_err("not paused");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Rollback: the default before the promote, and the split ends.
    let state = admin.rollback(change("", "1 was a mistake")).await.expect("rollback").into_inner();
    assert_eq!((state.default_version.as_str(), state.split.len()), ("2", 0));
    assert_eq!(answered_by(&mut c, "after-rollback").await.expect("infer"), "2");

    let tally = load.finish().await;
    eprintln!("release: {} sent, by version {:?}, {} errors", tally.sent, tally.by_version, tally.errors.len());
    for (code, message) in &tally.errors {
        assert!(
            *code == Code::Unavailable && message.contains("is paused"),
            "only the pause implies errors: {message}"
        );
    }
    assert!(tally.by_version.get("1").is_some_and(|n| *n > 0) && tally.by_version.get("2").is_some_and(|n| *n > 0));

    // Every action, refused ones too, is in the audit log with who did it.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let actions: Vec<&str> = lines.iter().map(|l| l["action"].as_str().unwrap_or("")).collect();
    assert_eq!(actions, ["promote", "split", "pause", "resume", "resume", "rollback"]);
    assert!(lines.iter().all(|l| l["who"] == "the admin token"), "{lines:?}");
    assert_eq!(lines[0]["after"]["promoted"], 1);
    assert_eq!(lines[2]["reason"], "drift on radius_mean");
    assert_eq!(lines[4]["outcome"], "resume model 'risk': the model is not paused");
    server.wait_for_metric("kiln_admin_actions_total{action=\"resume\",outcome=\"refused\"} 1").await;

    // The state is in release.json: a restart serves it.
    admin.promote(change("1", "before the restart")).await.expect("promote");
    server.stop().await.expect("clean stop");
    let server = serve(repo.path(), &audit).await;
    let mut c = server.client().await;
    assert_eq!(answered_by(&mut c, "after-restart").await.expect("infer"), "1", "the promote survived the restart");

    // Another replica pauses the model through the shared file.
    let file = repo.path().join("risk/release.json");
    let mut shared: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    shared["paused"] = "paused by replica b".into();
    std::fs::write(repo.path().join("risk/.release.json.b"), shared.to_string()).expect("write");
    std::fs::rename(repo.path().join("risk/.release.json.b"), &file).expect("rename");
    let mut last = None;
    for _ in 0..200 {
        match answered_by(&mut c, "poll").await {
            Err(e) if e.message().contains("paused by replica b") => {
                last = None;
                break;
            }
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(last.is_none(), "the shared pause was not picked up: {last:?}");
    let index = c.raw.repository_index(pb::RepositoryIndexRequest::default()).await.expect("index").into_inner();
    assert!(index.models.iter().all(|m| m.state == "READY"), "a pause unloads nothing: {index:?}");
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_copies_are_compared_and_never_returned() {
    let repo = two_versions();
    let logs = tempfile::tempdir().expect("tempdir");
    let server = serve(repo.path(), &logs.path().join("audit.log")).await;
    let credentials = Credentials { tls: None, bearer: Some(ADMIN_TOKEN.into()) };
    let mut admin = kiln::client::admin(&server.addr.to_string(), &credentials).await.expect("admin client");
    let on = ReleaseChange { sample: 1.0, max_inflight: 64, ..change("1", "try 1 on real traffic") };
    let state = admin.shadow(on).await.expect("shadow").into_inner();
    assert_eq!((state.shadow_version.as_str(), state.shadow_max_inflight), ("1", 64));
    let mut c = server.client().await;
    let load = steady_load(&server, 2).await;
    for i in 0..50 {
        assert_eq!(answered_by(&mut c, &format!("s-{i}")).await.expect("infer"), "2", "the primary answers");
    }
    let tally = load.finish().await;
    assert!(tally.errors.is_empty(), "shadow traffic never fails a primary request: {:?}", tally.errors);
    assert_eq!(tally.by_version.keys().collect::<Vec<_>>(), ["2"], "only the primary answers");
    // Version 1 has version 2's weights: every row agrees. Every request
    // was copied (sample 1.0) unless 64 copies were already in flight.
    let compared = |text: &str, agree: &str| -> u64 {
        let series = format!("kiln_shadow_rows_compared_total{{model=\"risk\",version=\"1\",agree=\"{agree}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(series.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    let mut text = server.metrics_text().await;
    for _ in 0..200 {
        if compared(&text, "true") >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        text = server.metrics_text().await;
    }
    let dropped = text.lines().any(|l| l.starts_with("kiln_shadow_dropped_total{model=\"risk\",reason=\"inflight\"}"));
    assert!(compared(&text, "true") >= 50 || dropped, "copies compared: {text}");
    assert_eq!(compared(&text, "false"), 0, "identical weights never disagree");
    assert!(text.contains("kiln_shadow_duration_seconds_count{model=\"risk\",version=\"1\"}"), "latency of each copy");
    let off = admin.shadow(change("", "enough")).await.expect("shadow off").into_inner();
    assert!(off.shadow_version.is_empty());
    server.stop().await.expect("clean stop");
}
