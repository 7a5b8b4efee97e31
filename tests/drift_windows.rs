//! Drift windows per version, and the drift handoff that never makes
//! inference wait: samples the drift thread cannot take are dropped and
//! counted, while every request is answered.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use kiln::config::{RepositorySource, ServeConfig};

/// The risk model as versions 1 and 2 (same weights and reference), with
/// `drift` appended to its model.toml.
fn two_versions(drift: &str) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/risk");
    let dir = tempfile::tempdir().expect("temp dir");
    let risk = dir.path().join("risk");
    let toml = std::fs::read_to_string(root.join("model.toml")).expect("risk model.toml");
    std::fs::create_dir_all(&risk).expect("mkdir");
    let toml = format!("version_policy = {{ all = true }}\n{toml}\n[drift]\n{drift}");
    std::fs::write(risk.join("model.toml"), toml).expect("write");
    for version in ["1", "2"] {
        std::fs::create_dir_all(risk.join(version)).expect("mkdir");
        for file in ["model.safetensors", "reference.json"] {
            std::fs::copy(root.join("1").join(file), risk.join(version).join(file)).expect("copy");
        }
    }
    dir
}

async fn serve(dir: &tempfile::TempDir) -> TestServer {
    // The admin service is open here: this test is about windows, not access.
    TestServer::start(ServeConfig {
        repository: RepositorySource::Dir(dir.path().to_path_buf()),
        admin_insecure: true,
        ..Default::default()
    })
    .await
}

/// Sends `count` single-row requests to `version` from 8 clients; returns
/// how many were answered OK.
async fn send(server: &TestServer, version: &str, count: usize) -> usize {
    let (rows, _) = common::wdbc();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (mut c, rows, version) = (server.client().await, rows.clone(), version.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in (worker..count).step_by(8) {
                let mut request = kiln::client::fp32_request("risk", "features", &[rows[i % rows.len()].clone()]);
                request.model_version = version.clone();
                if c.raw.model_infer(request).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("sender");
    }
    ok
}

async fn window_rows(server: &TestServer, version: &str) -> u64 {
    let report = kiln::client::drift::fetch(&server.addr.to_string(), "risk", version, &Default::default())
        .await
        .expect("connects")
        .expect("report");
    report.window_rows
}

#[tokio::test(flavor = "multi_thread")]
async fn each_version_has_its_own_window_and_a_new_version_starts_empty() {
    let dir = two_versions("window_seconds = 60\nwindow_intervals = 120\nmin_samples = 100\n");
    let server = serve(&dir).await;
    assert_eq!(send(&server, "1", 400).await, 400);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while window_rows(&server, "1").await < 400 {
        assert!(std::time::Instant::now() < deadline, "version 1's window never held its 400 rows");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(window_rows(&server, "2").await, 0, "version 2 saw none of version 1's traffic");
    // Version 2's own traffic lands in its own window only.
    assert_eq!(send(&server, "2", 160).await, 160);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while window_rows(&server, "2").await < 160 {
        assert!(std::time::Instant::now() < deadline, "version 2's window never held its rows");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(window_rows(&server, "2").await, 160);
    assert_eq!(window_rows(&server, "1").await, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_samples_are_dropped_and_counted_while_every_request_is_answered() {
    // A handoff channel of one batch: the drift thread falls behind at once.
    let dir = two_versions("channel_capacity = 1\n");
    let server = serve(&dir).await;
    let series = "kiln_drift_samples_dropped_total{model=\"risk\",version=\"2\"} ";
    let mut sent = 0;
    for _ in 0..20 {
        assert_eq!(send(&server, "", 2000).await, 2000, "a request was not answered OK");
        sent += 2000;
        let metrics = server.metrics_text().await;
        let dropped: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .expect("the dropped counter is exported");
        if dropped > 0.0 {
            assert!(dropped <= sent as f64, "{dropped} dropped of {sent}");
            return;
        }
    }
    panic!("no drift sample was ever dropped with a one-batch channel");
}
