//! The `kiln` binary as a user runs it: `kiln infer` against a live server,
//! by feature name (JSON) and as a CSV row, and its errors.

mod common;

use std::process::Command;

use common::TestServer;

/// Tests that load the machine (bench, plan) take turns: the plan's
/// recommendation is checked at the rate it measured, which a concurrent
/// load would make a lie.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kiln_infer(server: &TestServer, input: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["infer", "--url", &server.addr.to_string(), "--model", "risk", input])
        .output()
        .expect("kiln runs")
}

fn probability(output: &std::process::Output) -> f64 {
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(report["model"], "risk");
    report["outputs"]["probability"][0][0].as_f64().expect("a probability")
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_by_feature_name_and_by_csv_row_agree_with_the_model() {
    let server = TestServer::built_in().await;
    let (rows, _) = common::wdbc();
    let expected = common::risk_in_process(&rows[..1])[0] as f64;
    let names: Vec<String> = {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/wdbc.csv")).expect("data");
        text.lines().next().expect("header").split(',').take(30).map(str::to_string).collect()
    };
    let object: serde_json::Map<String, serde_json::Value> =
        names.iter().zip(&rows[0]).map(|(n, v)| (n.clone(), serde_json::json!(v))).collect();
    let csv: Vec<String> = rows[0].iter().map(|v| v.to_string()).collect();
    let args = [serde_json::Value::Object(object).to_string(), csv.join(",")];
    for input in &args {
        // The binary runs its own client; keep the runtime free meanwhile.
        let output = tokio::task::block_in_place(|| kiln_infer(&server, input));
        assert!((probability(&output) - expected).abs() < 1e-6);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_names_what_is_wrong_and_fails() {
    let server = TestServer::built_in().await;
    let missing = tokio::task::block_in_place(|| kiln_infer(&server, r#"{"radius_mean": 1.0}"#));
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("missing features: texture_mean"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "a user error is not a crash: {stderr}");

    let negative = tokio::task::block_in_place(|| kiln_infer(&server, &["-1"; 30].join(",")));
    let stderr = String::from_utf8_lossy(&negative.stderr);
    assert!(
        !negative.status.success() && stderr.contains("InvalidArgument") && stderr.contains("valid_range"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_accounts_for_every_request_in_closed_and_open_loop() {
    let _turn = SERIAL.lock().await;
    let server = TestServer::built_in().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["bench", "--url", &server.addr.to_string(), "--model", "risk"])
            .args(["--concurrency", "1,4", "--rate", "200", "--duration", "1.5", "--requests", "2000"])
            .args(["--json".as_ref(), json.as_os_str()])
            .output()
            .expect("kiln runs")
    });
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("p99 ms") && table.contains("c=4") && table.contains("200/s"), "{table}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3);
    for step in steps {
        let sent = step["sent"].as_u64().expect("sent");
        let answered: u64 = step["answered"].as_object().expect("codes").values().map(|v| v.as_u64().expect("n")).sum();
        assert_eq!(sent, answered, "every request accounted for: {step}");
        assert!(step["answered"]["OK"].as_u64().unwrap_or(0) > 0, "{step}");
        let l = &step["latency_ms"];
        let p = |k: &str| l[k].as_f64().expect("percentile");
        assert!(p("p50") > 0.0 && p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p999"), "{l}");
        assert!(step["throughput"].as_f64().expect("throughput") > 0.0);
        assert!(step["server"]["batch_size"].as_f64().expect("batch size") >= 1.0, "{step}");
    }
    assert_eq!(steps[0]["mode"], "concurrency");
    assert_eq!(steps[2]["mode"], "rate");
    // The server's own count, independent of the bench's bookkeeping:
    // every request the bench says it sent (and did not refuse itself)
    // reached the server and was answered.
    let sent_to_server: u64 = steps
        .iter()
        .map(|s| s["sent"].as_u64().expect("sent") - s["answered"]["CLIENT_OVERLOADED"].as_u64().unwrap_or(0))
        .sum();
    let mut client = server.client().await;
    let stats = common::statistics(&mut client, "risk").await.inference_stats.expect("stats");
    let counted = |d: Option<kiln::api::pb::StatisticDuration>| d.map_or(0, |d| d.count);
    assert_eq!(counted(stats.success) + counted(stats.fail), sent_to_server, "server count against the bench's");
    // About 200/s for 1.5 s: Poisson, so only loosely.
    let open = steps[2]["sent"].as_u64().expect("sent");
    assert!((150..=450).contains(&open), "open loop sent {open}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_recommends_settings_that_meet_the_budget_from_real_measurements() {
    let _turn = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("plan.json");
    let overlay = dir.path().join("overlay");
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/base");
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["plan", "--model", "risk", "--budget-ms", "20", "--rate", "1000000", "--sim-requests", "2000"])
            .args(["--json".as_ref(), json.as_os_str()])
            .args(["--emit", "k8s", "--k8s-base", base, "--out"])
            .arg(&overlay)
            .output()
            .expect("kiln runs")
    });
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("recommended: max_batch_size = "), "{table}");
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    let curve = plan["measured"]["curve"].as_array().expect("curve");
    assert_eq!(curve.len(), 7, "batch sizes 1..64: {curve:?}");
    assert_eq!(plan["measured"]["serving_tail"].as_array().expect("tail").len(), 5);
    assert!(plan["measured"]["serving_ceiling"].as_f64().expect("ceiling") > 0.0);
    let best = &plan["recommended"];
    let rate = best["max_rate"].as_f64().expect("rate");
    assert!(rate > 0.0);
    assert!(best["p99_ms"].as_f64().expect("p99") <= 20.0, "{best}");
    // Every candidate met the budget at some rate: none is a placeholder.
    for c in plan["candidates"].as_array().expect("candidates") {
        assert!(c["max_rate"].as_f64().expect("rate") > 0.0 && c["p99_ms"].as_f64().expect("p99") > 0.0, "{c}");
    }
    let replicas = plan["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, (1e6 / rate).ceil() as u64);
    emitted_overlay_carries_the_plan(&overlay, best, replicas);
    recommended_settings_serve_their_rate(
        &std::fs::read_to_string(overlay.join("model.toml")).expect("model.toml"),
        best,
    )
    .await;
    let candidates = plan["candidates"].as_array().expect("candidates");
    // The best rate, or within 2 % of it with a lower p99.
    let top = candidates.iter().map(|c| c["max_rate"].as_f64().expect("rate")).fold(0.0, f64::max);
    // The same rule as the planner's, with an ulp of slack: the rates come
    // back through JSON, whose default float parsing may be one ulp off,
    // and candidates' rates (fractions of one ceiling) can sit exactly on
    // the 2 % line.
    assert!(rate >= 0.98 * top * (1.0 - 1e-9), "recommended {rate}/s, best {top}/s");
}

/// `kiln plan --emit k8s`: the overlay patches the base with the replica
/// count (at least two) and a per-pod request target below the planned
/// maximum; its model.toml holds the recommended settings.
fn emitted_overlay_carries_the_plan(overlay: &std::path::Path, best: &serde_json::Value, replicas: u64) {
    let read = |name: &str| std::fs::read_to_string(overlay.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let kustomization = read("kustomization.yaml");
    let base = overlay.join(kustomization.lines().find_map(|l| l.strip_prefix("  - ")).expect("a resource"));
    assert!(base.join("kustomization.yaml").is_file(), "{} is not the base", base.display());
    let floor = replicas.max(2);
    assert!(read("replicas.yaml").contains(&format!("\n  replicas: {floor}\n")));
    let hpa = read("hpa.yaml");
    assert!(hpa.contains(&format!("\n  minReplicas: {floor}\n")), "{hpa}");
    let per_pod = (best["max_rate"].as_f64().expect("rate") * 0.8).floor();
    assert!(hpa.contains(&format!("name: kiln_requests_per_second\n        target:\n          type: AverageValue\n          averageValue: \"{per_pod}\"")), "{hpa}");
    let toml: toml::Table = read("model.toml").parse().expect("model.toml is TOML");
    for key in ["max_batch_size", "instances"] {
        assert_eq!(toml[key].as_integer(), best[key].as_i64(), "{key}");
    }
    assert_eq!(
        toml["max_queue_delay_ms"].as_float().or(toml["max_queue_delay_ms"].as_integer().map(|i| i as f64)),
        best["max_queue_delay_ms"].as_f64()
    );
    assert_eq!(toml["latency_budget_ms"].as_integer(), Some(20));
}

/// A real server with the model.toml the plan wrote, driven at the
/// recommended rate: every answer OK, nothing refused (no timing asserted).
async fn recommended_settings_serve_their_rate(model_toml: &str, best: &serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("risk/1")).expect("mkdir");
    std::fs::write(dir.path().join("risk/model.toml"), model_toml).expect("model.toml");
    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/models/risk/1/model.safetensors");
    std::fs::copy(weights, dir.path().join("risk/1/model.safetensors")).expect("weights");
    let config = kiln::config::ServeConfig {
        repository: kiln::config::RepositorySource::Dir(dir.path().to_path_buf()),
        ..Default::default()
    };
    let server = TestServer::start(config).await;
    let rate = best["max_rate"].as_f64().expect("rate");
    let json = dir.path().join("bench.json");
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["bench", "--url", &server.addr.to_string(), "--model", "risk", "--duration", "1"])
            .args(["--rate", &format!("{rate:.0}")])
            .args(["--json".as_ref(), json.as_os_str()])
            .output()
            .expect("kiln runs")
    });
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("json");
    let step = &report["steps"][0];
    let answered = step["answered"].as_object().expect("codes");
    assert_eq!(answered.keys().collect::<Vec<_>>(), vec!["OK"], "at the recommended {rate:.0}/s: {step}");
    assert_eq!(answered["OK"].as_u64(), step["sent"].as_u64(), "{step}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_says_when_no_setting_meets_the_budget() {
    let _turn = SERIAL.lock().await;
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["plan", "--model", "risk", "--budget-ms", "0.001", "--sim-requests", "500"])
            .output()
            .expect("kiln runs")
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a plan with no setting must fail: {}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains("no configuration meets a 0.001 ms p99"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn infer_reads_its_input_from_stdin() {
    use std::io::Write;
    let server = TestServer::built_in().await;
    let (rows, _) = common::wdbc();
    let expected = common::risk_in_process(&rows[..1])[0] as f64;
    let csv: Vec<String> = rows[0].iter().map(|v| v.to_string()).collect();
    for args in [&["-"][..], &[][..]] {
        let output = tokio::task::block_in_place(|| {
            let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["infer", "--url", &server.addr.to_string(), "--model", "risk"])
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kiln runs");
            child.stdin.take().expect("stdin").write_all(csv.join(",").as_bytes()).expect("write stdin");
            child.wait_with_output().expect("kiln ends")
        });
        assert!((probability(&output) - expected).abs() < 1e-6, "args {args:?}");
    }
}

fn bench_json(server: &TestServer, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "--url", &server.addr.to_string(), "--model", "risk"])
        .args(extra)
        .args(["--json".as_ref(), json.as_os_str()])
        .output()
        .expect("kiln runs");
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json")
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_sends_rows_from_a_file_several_per_request_within_its_in_flight_bound() {
    let _turn = SERIAL.lock().await;
    let server = TestServer::built_in().await;
    let mut client = server.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Rows the model refuses (outside valid_range): every answer shows
    // that the file's rows, not generated ones, were sent.
    let file = dir.path().join("rows.csv");
    std::fs::write(&file, format!("{}\n", vec!["-1"; 30].join(","))).expect("write rows");
    let report = tokio::task::block_in_place(|| {
        bench_json(&server, &["--concurrency", "2", "--requests", "50", "--input-file", file.to_str().expect("utf-8")])
    });
    let step = &report["steps"][0];
    assert_eq!(step["answered"]["INVALID_ARGUMENT"].as_u64(), Some(50), "{step}");

    // --rows: three rows per request, as the server counts them.
    let before = common::statistics(&mut client, "risk").await.inference_count;
    let report =
        tokio::task::block_in_place(|| bench_json(&server, &["--concurrency", "2", "--requests", "40", "--rows", "3"]));
    assert_eq!(report["rows_per_request"].as_u64(), Some(3));
    let ok = report["steps"][0]["answered"]["OK"].as_u64().expect("OK answers");
    let after = common::statistics(&mut client, "risk").await.inference_count;
    assert_eq!(after - before, 3 * ok, "{report}");

    // --max-in-flight 1 at a rate far above one request at a time: the
    // excess is counted as CLIENT_OVERLOADED, never queued in the client.
    let report = tokio::task::block_in_place(|| {
        bench_json(&server, &["--rate", "20000", "--duration", "0.5", "--requests", "2000", "--max-in-flight", "1"])
    });
    let step = &report["steps"][0];
    let overloaded = step["answered"]["CLIENT_OVERLOADED"].as_u64().unwrap_or(0);
    assert!(overloaded > 0, "{step}");
    assert_eq!(
        step["answered"].as_object().expect("codes").values().map(|v| v.as_u64().unwrap_or(0)).sum::<u64>(),
        step["sent"].as_u64().expect("sent")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn find_max_rate_reports_a_rate_that_met_the_target_and_one_that_did_not() {
    let _turn = SERIAL.lock().await;
    let server = TestServer::built_in().await;
    let report = tokio::task::block_in_place(|| {
        bench_json(&server, &["--find-max-rate", "--p99-ms", "5", "--rate", "400", "--duration", "0.3"])
    });
    let found = &report["found"];
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(found["steps"].as_u64(), Some(steps.len() as u64), "{found}");
    let passed = |step: &serde_json::Value| {
        let sent = step["sent"].as_u64().expect("sent");
        step["answered"].as_object().expect("codes").len() == 1
            && step["answered"]["OK"].as_u64() == Some(sent)
            && step["latency_ms"]["p99"].as_f64().expect("p99") <= 5.0
    };
    let at = |rate: f64| steps.iter().find(|s| s["level"].as_f64() == Some(rate)).expect("a step at that rate");
    let rate = found["rate"].as_f64().expect("some rate met 5 ms on a built-in risk model");
    assert!(passed(at(rate)), "the reported rate's own step: {}", at(rate));
    if let Some(failed) = found["failed_at"].as_f64() {
        assert!(failed > rate && !passed(at(failed)), "{found}");
        assert!((failed - rate) / failed <= 0.05 || steps.len() == 30, "bracketed within 5 %: {found}");
    }
    // Every step ran open-loop: rates, never clients.
    assert!(steps.iter().all(|s| s["mode"] == "rate"));
}
