//! Drift monitoring, the metrics catalogue and the request log against a
//! live server: the risk model with its committed reference, MiniLM with
//! a reference captured from its first requests, the admin DriftReport RPC
//! behind a token, `kiln drift`, and `/metrics` checked against the
//! README's catalogue in both directions.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{TestServer, with_param};
use kiln::api::admin_pb::DriftReportResponse;
use kiln::client::{self, Client, ParameterChoice};
use kiln::config::{InputLogMode, RepositorySource, RequestLogConfig, ServeConfig};
use rand::{Rng, SeedableRng};

const TOKEN: &str = "s3cret-admin-token";
const LOG_KEY: &str = "log-key";
/// area_mean: the feature the test scales.
const SCALED: usize = 3;

/// A repository with the risk model (its real weights and reference,
/// judged every half second) and MiniLM (reference captured from traffic).
fn repository() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let dir = tempfile::tempdir().expect("temp dir");
    let risk = dir.path().join("risk");
    std::fs::create_dir_all(risk.join("1")).expect("mkdir");
    let toml = std::fs::read_to_string(root.join("risk/model.toml")).expect("risk model.toml");
    let drift = "\n[drift]\nwindow_seconds = 60\nwindow_intervals = 120\nmin_samples = 500\nhysteresis = 2\n";
    std::fs::write(risk.join("model.toml"), toml + drift).expect("write");
    for file in ["model.safetensors", "reference.json"] {
        std::fs::copy(root.join("risk/1").join(file), risk.join("1").join(file)).expect("copy risk files");
    }
    let minilm = dir.path().join("minilm");
    std::fs::create_dir_all(minilm.join("1")).expect("mkdir");
    let toml = std::fs::read_to_string(root.join("minilm/model.toml")).expect("minilm model.toml");
    let head = toml.split("[drift]").next().expect("text before [drift]");
    let drift = "[drift]\nreference = \"auto\"\nauto_samples = 48\nmin_samples = 32\nwindow_seconds = 60\nwindow_intervals = 120\n";
    std::fs::write(minilm.join("model.toml"), format!("{head}{drift}")).expect("write");
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        let source = root.join("minilm/1").join(file);
        assert!(source.is_file(), "{} missing: run scripts/fetch-minilm.sh (scripts/test does)", source.display());
        std::os::unix::fs::symlink(&source, minilm.join("1").join(file)).expect("link MiniLM files");
    }
    dir
}

/// The rows the risk model was trained on.
fn training_rows() -> Vec<Vec<f32>> {
    let (rows, _) = common::wdbc();
    let heldout: BTreeSet<usize> = common::heldout_rows().into_iter().collect();
    rows.into_iter().enumerate().filter(|(i, _)| !heldout.contains(i)).map(|(_, r)| r).collect()
}

/// Sends `count` single-row requests drawn (with replacement) from the
/// training rows, `area_mean` multiplied by `scale`, from 8 clients.
async fn send_rows(server: &TestServer, count: usize, scale: f32, seed: u64) {
    send_rows_to(server, "risk", count, scale, seed).await
}

async fn send_rows_to(server: &TestServer, model: &str, count: usize, scale: f32, seed: u64) {
    let rows = training_rows();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let picked: Vec<Vec<f32>> = (0..count)
        .map(|_| {
            let mut row = rows[rng.random_range(0..rows.len())].clone();
            row[SCALED] *= scale;
            row
        })
        .collect();
    let mut tasks = Vec::new();
    for chunk in picked.chunks(count.div_ceil(8)) {
        let (chunk, mut c, model) = (chunk.to_vec(), server.client().await, model.to_string());
        tasks.push(tokio::spawn(async move {
            for row in chunk {
                c.infer_fp32(&model, "features", &[row]).await.expect("the model answers");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

/// Polls the drift report until `done` holds (at most a minute).
async fn report_until(
    server: &TestServer,
    model: &str,
    what: &str,
    done: impl Fn(&DriftReportResponse) -> bool,
) -> DriftReportResponse {
    let url = server.addr.to_string();
    let mut last = None;
    for _ in 0..600 {
        let report =
            client::drift::fetch(&url, model, "", &admin(Some(TOKEN))).await.expect("connects").expect("report");
        if done(&report) {
            return report;
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached; last report {last:?}")
}

fn feature<'a>(report: &'a DriftReportResponse, name: &str) -> &'a kiln::api::admin_pb::FeatureDrift {
    report.features.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("{name} not in {report:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_is_reported_alerted_exported_and_logged_on_a_live_server() {
    let log = common::CapturedLog::install();
    let repo = repository();
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log_path = log_dir.path().join("requests.jsonl");
    let server = TestServer::start(ServeConfig {
        repository: RepositorySource::Dir(repo.path().to_path_buf()),
        admin_token: Some(TOKEN.into()),
        request_log: Some(RequestLogConfig {
            path: log_path.clone(),
            sample_rate: 1.0,
            max_bytes: 64 << 20,
            keep_files: 1,
            inputs: InputLogMode::Hash,
            hmac_key: Some(LOG_KEY.into()),
            outputs: None,
        }),
        ..ServeConfig::default()
    })
    .await;
    let names: Vec<String> = {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/wdbc.csv")).expect("data");
        text.lines().next().expect("header").split(',').take(30).map(str::to_string).collect()
    };

    admin_calls_need_the_token(&server).await;

    // Traffic drawn from the reference: every statistic stays under 0.1.
    send_rows(&server, 1000, 1.0, 11).await;
    let quiet =
        report_until(&server, "risk", "1000 reference rows judged", |r| r.state == "ready" && r.window_rows == 1000)
            .await;
    assert!(quiet.reference_source.contains("wdbc-train.csv"), "{}", quiet.reference_source);
    assert_eq!(quiet.features.len(), 30 + 1 + 1, "30 inputs, the probability, request units");
    for f in &quiet.features {
        assert!(f.value < 0.1, "{} has PSI {} on reference traffic", f.name, f.value);
        assert_eq!(f.status, "ok", "{f:?}");
    }

    // One NaN refused: counted against its feature, not lost.
    let mut bad = training_rows()[0].clone();
    bad[5] = f32::NAN;
    let refused = server.client().await.infer_fp32("risk", "features", &[bad]).await.expect_err("NaN is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // The same traffic with area_mean tripled: that feature alone alerts.
    send_rows(&server, 1500, 3.0, 12).await;
    let drifted = report_until(&server, "risk", "area_mean alert", |r| {
        r.features.iter().any(|f| f.name == names[SCALED] && f.status == "alert")
    })
    .await;
    assert!(feature(&drifted, &names[SCALED]).value > 0.25);
    for (i, name) in names.iter().enumerate().filter(|(i, _)| *i != SCALED) {
        let f = feature(&drifted, name);
        assert!(f.value < 0.1, "input {i} {name} moved to {} though only area_mean was scaled", f.value);
        assert_eq!(f.status, "ok");
    }
    assert!(feature(&drifted, &names[SCALED]).out_of_range_rate > 0.1, "tripled areas pass the training maximum");
    assert!(feature(&drifted, "compactness_mean").non_finite_rate > 0.0, "the NaN refusal is counted");
    let high = drifted.classes.iter().find(|c| c.name == "at_or_above_0.5").expect("class rates");
    assert!(high.live > high.reference, "larger areas read as higher risk: {high:?}");

    let metrics = server.metrics_text().await;
    let status_line = format!("kiln_drift_status{{model=\"risk\",version=\"1\",feature=\"{}\"}} 2", names[SCALED]);
    assert!(metrics.contains(&status_line), "{status_line} not in /metrics");
    // The alert was logged once, naming model, version, feature and value,
    // and no other input was.
    let feature_field = format!("feature={}", names[SCALED]);
    let raised = log.lines_with(&["WARN", "drift status raised", "model=risk", "version=1", &feature_field, "alert"]);
    assert_eq!(raised.len(), 1, "{raised:#?}");
    assert!(raised[0].contains("value="), "{}", raised[0]);
    let others: Vec<String> = log
        .lines_with(&["drift status raised", "model=risk"])
        .into_iter()
        .filter(|l| names.iter().enumerate().any(|(i, n)| i != SCALED && l.contains(&format!("feature={n} "))))
        .collect();
    assert!(others.is_empty(), "{others:#?}");

    kiln_drift_prints_and_plots(&server, &names[SCALED]).await;
    minilm_captures_its_reference_and_watches_text(&server).await;
    request_log_holds_sampled_requests(&server, &log_path).await;

    // One refusal at admission, so that every catalogued series exists.
    let row = training_rows()[0].clone();
    let capped =
        with_param(client::fp32_request("risk", "features", &[row]), "max_cost_us", ParameterChoice::Uint64Param(1));
    let _ = server.client().await.raw.model_infer(capped).await.expect_err("over the cost cap");
    metrics_match_the_readme_catalogue(&server.metrics_text().await);
}

/// Credentials carrying `token` as the bearer, over plain HTTP/2.
fn admin(token: Option<&str>) -> client::Credentials {
    client::Credentials { tls: None, bearer: token.map(Into::into) }
}

async fn admin_calls_need_the_token(server: &TestServer) {
    let url = server.addr.to_string();
    for token in [None, Some("wrong")] {
        let answer = client::drift::fetch(&url, "risk", "", &admin(token)).await.expect("connects");
        let status = answer.expect_err("refused without the right token");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let unknown = client::drift::fetch(&url, "nope", "", &admin(Some(TOKEN))).await.expect("connects");
    assert_eq!(unknown.expect_err("unknown model").code(), tonic::Code::NotFound);
}

async fn kiln_drift_prints_and_plots(server: &TestServer, scaled: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let plot = dir.path().join("drift.svg");
    let run = |token: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(["drift", "--url", &server.addr.to_string(), "--model", "risk", "--plot"]).arg(&plot);
        command.env_remove("KILN_ADMIN_TOKEN").env_remove("KILN_API_KEY");
        if let Some(t) = token {
            command.env("KILN_ADMIN_TOKEN", t);
        }
        tokio::task::block_in_place(|| command.output().expect("kiln runs"))
    };
    let refused = run(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("authorization"), "{refused:?}");

    let output = run(Some(TOKEN));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let first_ranked = stdout
        .lines()
        .skip_while(|l| !l.starts_with("feature"))
        .nth(1)
        .unwrap_or_else(|| panic!("no ranked rows in:\n{stdout}"));
    assert!(first_ranked.starts_with(scaled) && first_ranked.contains("alert"), "{stdout}");
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains(scaled), "{svg}");
}

async fn minilm_captures_its_reference_and_watches_text(server: &TestServer) {
    let sentences: Vec<&str> = kiln::bench::inputs::sentences().collect();
    let mut c: Client = server.client().await;
    for round in 0..3 {
        for texts in sentences.chunks(8) {
            let request = client::text_request("minilm", "text", texts);
            c.raw.model_infer(request).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    let report = report_until(server, "minilm", "MiniLM judged", |r| r.state == "ready").await;
    assert!(report.reference_source.contains("captured from the first"), "{}", report.reference_source);
    let centroid = feature(&report, "output:embedding_centroid");
    assert_eq!(centroid.statistic, "cosine_distance");
    assert!(centroid.value < centroid.warn, "the same sentences keep the centroid: {centroid:?}");
    assert!(feature(&report, "text:tokens").value < 0.1);
}

async fn request_log_holds_sampled_requests(server: &TestServer, path: &Path) {
    let row = training_rows()[7].clone();
    let mut request = client::fp32_request("risk", "features", std::slice::from_ref(&row));
    request.id = "logged-request".into();
    server.client().await.raw.model_infer(request).await.expect("answered");
    let raw: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
    let expected_hash = kiln::monitor::request_log::hmac_hex(LOG_KEY.as_bytes(), &raw);
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("\"logged-request\"")) {
            let entry: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
            assert_eq!(entry["model"], "risk");
            assert_eq!(entry["version"], 1);
            assert!(entry["batch_id"].as_u64().is_some_and(|b| b > 0), "{entry}");
            assert!(entry["timings"]["compute_us"].is_u64() && entry["timings"]["queue_us"].is_u64(), "{entry}");
            assert_eq!(entry["outputs"]["probability"].as_array().map(Vec::len), Some(1), "{entry}");
            assert_eq!(entry["inputs_hmac_sha256"]["features"], expected_hash.as_str());
            assert!(entry.get("inputs").is_none(), "hash mode writes no values");
            assert!(text.lines().count() > 1000, "sample_rate 1 logs every answered request");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the request never reached {}", path.display());
}

/// The README's metrics table: name → (type, labels). Rows whose text
/// says "from the first" are series that appear with their first event
/// (an admin action, a fallback answer): they must be catalogued when
/// exported, and are not required before.
fn catalogue() -> BTreeMap<String, (String, Vec<String>)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme.split("\n## Metrics").nth(1).expect("a Metrics section").split("\n## ").next().expect("text");
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let labels = cells[3].split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "—").map(String::from);
            let kind = match cells.get(4).is_some_and(|what| what.contains("from the first")) {
                true => format!("{} (optional)", cells[2]),
                false => cells[2].to_string(),
            };
            Some((name.to_string(), (kind, labels.collect())))
        })
        .collect()
}

fn metrics_match_the_readme_catalogue(text: &str) {
    let catalogue = catalogue();
    assert!(catalogue.len() > 20, "the catalogue parsed: {catalogue:?}");
    let mut types: BTreeMap<&str, &str> = BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = l.split_whitespace();
        if let (Some(n), Some(t)) = (parts.next(), parts.next()) {
            types.insert(n, t);
        }
    }
    for (name, (kind, labels)) in &catalogue {
        let kind = match kind.strip_suffix(" (optional)") {
            Some(_) if !types.contains_key(name.as_str()) => {
                assert!(!text.contains(&format!("{name}{{")), "{name} exported without a type");
                continue;
            }
            Some(k) => k,
            None => kind.as_str(),
        };
        assert_eq!(types.get(name.as_str()).copied(), Some(kind), "{name}: type in /metrics");
        let series = if kind == "histogram" { format!("{name}_bucket") } else { name.clone() };
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.strip_prefix(series.as_str()).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .collect();
        assert!(!lines.is_empty(), "catalogued {name} is not exported");
        for label in labels {
            assert!(lines.iter().any(|l| l.contains(&format!("{label}=\""))), "{name} lacks label {label}: {lines:?}");
        }
    }
    for l in text.lines().filter(|l| l.starts_with("kiln_") || l.starts_with("process_")) {
        let series = l.split(['{', ' ']).next().expect("a name");
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                series.strip_suffix(s).filter(|b| catalogue.get(*b).is_some_and(|(k, _)| k.starts_with("histogram")))
            })
            .unwrap_or(series);
        assert!(catalogue.contains_key(base), "{series} is exported but not in the README catalogue");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alert_with_on_alert_fallback_switches_the_model_to_its_fallback() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/risk");
    let dir = tempfile::tempdir().expect("temp dir");
    // Not named risk: the other test counts its log lines by model name.
    let risk = dir.path().join("guarded");
    std::fs::create_dir_all(risk.join("1")).expect("mkdir");
    let toml = std::fs::read_to_string(root.join("model.toml")).expect("risk model.toml");
    let drift = "\n[drift]\nwindow_seconds = 60\nwindow_intervals = 120\nmin_samples = 500\nhysteresis = 2\n\
                 on_alert = \"fallback\"\n";
    let fallback = "fallback = { answer = { probability = [0.5] } }\n";
    std::fs::write(risk.join("model.toml"), format!("{fallback}{toml}{drift}")).expect("write");
    for file in ["model.safetensors", "reference.json"] {
        std::fs::copy(root.join("1").join(file), risk.join("1").join(file)).expect("copy risk files");
    }
    let server = TestServer::start(ServeConfig {
        repository: RepositorySource::Dir(dir.path().to_path_buf()),
        admin_token: Some(TOKEN.into()),
        ..ServeConfig::default()
    })
    .await;
    let mut c: Client = server.client().await;
    let row = training_rows()[0].clone();
    let direct = c.infer_fp32("guarded", "features", std::slice::from_ref(&row)).await.expect("served");
    assert!(!direct.parameters.contains_key("fallback"));

    send_rows_to(&server, "guarded", 600, 1.0, 1).await;
    let mut switched = None;
    for round in 0..60 {
        send_rows_to(&server, "guarded", 200, 3.0, 10 + round).await;
        let r = c.infer_fp32("guarded", "features", std::slice::from_ref(&row)).await.expect("answered");
        if r.parameters.contains_key("fallback") {
            switched = Some(r);
            break;
        }
    }
    let r = switched.expect("the drift alert switched the model to its fallback");
    let probability = f32::from_le_bytes(r.raw_output_contents[0][..4].try_into().expect("one FP32"));
    assert_eq!(probability, 0.5, "the fixed fallback answer");
    let mut admin_client = client::admin(&server.addr.to_string(), &admin(Some(TOKEN))).await.expect("admin");
    let change = kiln::api::admin_pb::ReleaseChange { model: "guarded".into(), ..Default::default() };
    let state = admin_client.release_status(change.clone()).await.expect("status").into_inner();
    assert!(state.paused && state.pause_reason.contains("drift alert on"), "{state:?}");
    assert_eq!(state.updated_by, "the drift monitor");
    // Resuming is the operator's decision.
    admin_client.resume(change).await.expect("resume");
    let r = c.infer_fp32("guarded", "features", std::slice::from_ref(&row)).await.expect("served");
    assert!(!r.parameters.contains_key("fallback"), "resumed: the model answers again");
    server.stop().await.expect("clean stop");
}
