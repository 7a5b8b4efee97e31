//! Starts a real Kiln server on 127.0.0.1:0 inside the test process and
//! stops it; reads the risk data set for checks.
#![allow(dead_code)]

pub mod child;
pub mod http;
pub mod load;

use std::net::SocketAddr;
use std::time::Duration;

use kiln::client::Client;
use kiln::config::ServeConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The HTTP front end (V2 REST, OpenAI embeddings).
    pub http_addr: SocketAddr,
    /// What its clients present: TLS settings and a key.
    pub credentials: kiln::client::Credentials,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), kiln::ServeError>>>,
}

impl TestServer {
    /// Starts `config` and waits until it answers ServerReady.
    pub async fn start(config: ServeConfig) -> Self {
        Self::start_with(config, kiln::client::Credentials::default()).await
    }

    /// Starts `config`, whose clients connect with `credentials`.
    pub async fn start_with(config: ServeConfig, credentials: kiln::client::Credentials) -> Self {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let addr = grpc.local_addr().expect("addr");
        let metrics_addr = metrics.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = kiln::Listeners { grpc, http: Some(http), metrics: Some(metrics) };
        let task = tokio::spawn(kiln::serve(config, listeners, async move {
            let _ = stopped.await;
        }));
        let server = Self { addr, metrics_addr, http_addr, credentials, stop: Some(stop), task: Some(task) };
        let mut client = server.client().await;
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(r) = client.raw.server_ready(kiln::api::pb::ServerReadyRequest {}).await
                    && r.into_inner().ready
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("server became ready");
        server
    }

    /// The built-in repository.
    pub async fn built_in() -> Self {
        Self::start(ServeConfig::default()).await
    }

    /// A fresh client connection.
    pub async fn client(&self) -> Client {
        // The listener is bound before serve starts, so connecting succeeds
        // as soon as the accept loop runs; retry briefly for that.
        for _ in 0..100 {
            if let Ok(c) = Client::connect_with(&self.addr.to_string(), &self.credentials).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("could not connect to {}", self.addr)
    }

    /// Fetches the Prometheus text.
    pub async fn metrics_text(&self) -> String {
        self.metrics_get("/metrics").await
    }

    /// The whole HTTP/1.1 answer (status line, headers, body) of the
    /// metrics port to `GET path`.
    pub async fn metrics_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr).await.expect("connect metrics");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    /// Stops the server gracefully and returns how `serve` ended.
    pub async fn stop(mut self) -> Result<(), kiln::ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running").await.expect("serve task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The WDBC rows (30 features) and labels, in file order.
pub fn wdbc() -> (Vec<Vec<f32>>, Vec<f32>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/wdbc.csv")).expect("data/wdbc.csv");
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for line in text.lines().skip(1) {
        let values: Vec<f32> = line.split(',').map(|v| v.parse().expect("number")).collect();
        labels.push(values[30]);
        rows.push(values[..30].to_vec());
    }
    (rows, labels)
}

/// The held-out row indices the training program set aside.
pub fn heldout_rows() -> Vec<usize> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/wdbc-split.json")).expect("split file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["heldout_rows"].as_array().expect("array").iter().map(|x| x.as_u64().expect("index") as usize).collect()
}

/// The risk model run in-process, for comparison with served answers.
pub fn risk_in_process(rows: &[Vec<f32>]) -> Vec<f32> {
    let loaded = kiln::repository::load(&kiln::config::RepositorySource::BuiltIn).expect("built-in loads");
    let version = &loaded[0].versions[&1];
    let input = kiln::model::Tensor {
        shape: vec![rows.len(), 30],
        data: kiln::model::TensorData::Fp32(rows.iter().flatten().copied().collect()),
    };
    let out = version.model.run(vec![input]).expect("model runs");
    match &out[0].data {
        kiln::model::TensorData::Fp32(v) => v.clone(),
        other => panic!("unexpected output {other:?}"),
    }
}

/// The built-in risk model's files, for repositories a test builds.
pub const RISK_TOML: &str = include_str!("../../models/risk/model.toml");
pub const RISK_WEIGHTS: &[u8] = include_bytes!("../../models/risk/1/model.safetensors");

/// Writes `risk` under `root`: `toml` as its model.toml, the built-in
/// weights as each of `versions`.
pub fn write_risk(root: &std::path::Path, toml: &str, versions: &[u64]) {
    let model = root.join("risk");
    std::fs::create_dir_all(&model).expect("mkdir");
    std::fs::write(model.join("model.toml"), toml).expect("write toml");
    for v in versions {
        std::fs::create_dir_all(model.join(v.to_string())).expect("mkdir version");
        std::fs::write(model.join(format!("{v}/model.safetensors")), RISK_WEIGHTS).expect("write weights");
    }
}

/// A repository holding only `risk` (see [`write_risk`]).
pub fn risk_repo(toml: &str, versions: &[u64]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_risk(dir.path(), toml, versions);
    dir
}

/// A repository holding `wide`: a real MLP 30 → `hidden` → `hidden` → 2
/// whose cost is controlled by its width and the rows sent (about
/// 2·hidden² flops per row). Weights come from a seeded generator.
pub fn wide_mlp_repo(name: &str, hidden: usize, settings: &str) -> tempfile::TempDir {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join(name);
    std::fs::create_dir_all(model.join("1")).expect("mkdir");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut tensor = |rows: usize, cols: usize| {
        let bound = 1.0 / (cols as f32).sqrt();
        let values: Vec<f32> = (0..rows * cols).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound).collect();
        candle_core::Tensor::from_vec(values, (rows, cols), &candle_core::Device::Cpu).expect("tensor")
    };
    let mut tensors = std::collections::HashMap::new();
    for (i, (out, inp)) in [(hidden, 30), (hidden, hidden), (2, hidden)].into_iter().enumerate() {
        tensors.insert(format!("layers.{i}.weight"), tensor(out, inp));
        tensors.insert(format!("layers.{i}.bias"), tensor(1, out).flatten_all().expect("flatten"));
    }
    candle_core::safetensors::save(&tensors, model.join("1/model.safetensors")).expect("save weights");
    let toml = format!(
        "kind = \"mlp\"\n{settings}\n[mlp]\nactivation = \"relu\"\n\n\
         [[inputs]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [-1, 30]\n\n\
         [[outputs]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [-1, 2]\n"
    );
    std::fs::write(model.join("model.toml"), toml).expect("write model.toml");
    dir
}

/// `rows` rows of ones, as a request for a wide model.
pub fn wide_request(model: &str, rows: usize) -> kiln::api::pb::ModelInferRequest {
    kiln::client::fp32_request(model, "x", &vec![vec![1.0; 30]; rows])
}

/// ModelStatistics of version 1 of `model`.
pub async fn statistics(client: &mut kiln::client::Client, model: &str) -> kiln::api::pb::ModelStatistics {
    let r = client
        .raw
        .model_statistics(kiln::api::pb::ModelStatisticsRequest { name: model.into(), version: "1".into() })
        .await
        .expect("statistics");
    r.into_inner().model_stats.remove(0)
}

/// Waits (bounded) until `model`'s executor has started `batches` batches:
/// queue time is recorded as each batch starts, before it computes.
pub async fn wait_for_started(client: &mut kiln::client::Client, model: &str, requests: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = statistics(client, model).await;
        if s.inference_stats.and_then(|i| i.queue).is_some_and(|q| q.count >= requests) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{model}: {requests} requests never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A parameter map entry.
pub fn param(choice: kiln::client::ParameterChoice) -> kiln::api::pb::InferParameter {
    kiln::api::pb::InferParameter { parameter_choice: Some(choice) }
}

/// Resident memory of this process, in bytes (Linux).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

impl TestServer {
    /// A raw channel, for services other than V2 inference.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    /// Waits (bounded) until the metrics text contains `series`, e.g.
    /// `kiln_queue_depth{model="m",version="1",priority="1"} 2`.
    pub async fn wait_for_metric(&self, series: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.metrics_text().await.contains(series) {
            assert!(std::time::Instant::now() < deadline, "metric never appeared: {series}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// `request` with one more parameter.
pub fn with_param(
    mut request: kiln::api::pb::ModelInferRequest,
    name: &str,
    choice: kiln::client::ParameterChoice,
) -> kiln::api::pb::ModelInferRequest {
    request.parameters.insert(name.into(), param(choice));
    request
}

/// Sends `request`, expects `code`, and checks the message names each of
/// `needles`.
pub async fn expect_refusal(
    client: &mut kiln::client::Client,
    request: kiln::api::pb::ModelInferRequest,
    code: tonic::Code,
    needles: &[&str],
) {
    let status = client.raw.model_infer(request).await.expect_err("expected a refusal");
    assert_eq!(status.code(), code, "{}", status.message());
    for needle in needles {
        assert!(status.message().contains(needle), "message {:?} lacks {needle:?}", status.message());
    }
}

/// What this test binary's in-process servers log: one global subscriber
/// per process, installed by the first caller and shared by the rest.
#[derive(Clone, Default)]
pub struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    pub fn install() -> Self {
        static LOG: std::sync::OnceLock<CapturedLog> = std::sync::OnceLock::new();
        LOG.get_or_init(|| {
            let log = Self::default();
            let writer = log.clone();
            let _ = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).try_init();
            log
        })
        .clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text().lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_string).collect()
    }
}

/// Writes a `test`-kind model (`y = scale × Σ x` over 3 features) with
/// `settings` (model.toml lines) and its `[test]` `section`.
pub fn test_model(repo: &std::path::Path, name: &str, scale: f32, settings: &str, section: &str) {
    let dir = repo.join(name);
    std::fs::create_dir_all(dir.join("1")).expect("folders");
    let toml = format!(
        "kind = \"test\"\nmax_batch_size = 8\nmax_queue_delay_ms = 1\ndefault_timeout_ms = 20000\n\
         latency_budget_ms = 5000\n{settings}\n\n[test]\n{section}\n\n\
         [[inputs]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [-1, 3]\n\n\
         [[outputs]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [-1, 1]\n"
    );
    std::fs::write(dir.join("model.toml"), toml).expect("model.toml");
    std::fs::write(dir.join("1/scale.json"), format!("{{\"scale\": {scale}}}")).expect("scale.json");
}
