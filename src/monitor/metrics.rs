//! Metric names, their documentation and buckets, the per-version handles
//! the hot path uses, and the `/metrics` HTTP endpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Requests answered, by gRPC status code name (`OK`, `INVALID_ARGUMENT`, ...).
pub const REQUESTS_TOTAL: &str = "kiln_requests_total";
/// Receipt to answer, per request.
pub const REQUEST_DURATION: &str = "kiln_request_duration_seconds";
/// Enqueue to batch dispatch, per request.
pub const QUEUE_DURATION: &str = "kiln_queue_duration_seconds";
/// Model time, per batch.
pub const COMPUTE_DURATION: &str = "kiln_compute_duration_seconds";
/// Requests per batch.
pub const BATCH_SIZE: &str = "kiln_batch_size";
/// Rows per batch.
pub const BATCH_UNITS: &str = "kiln_batch_units";
/// Requests waiting, per priority level.
pub const QUEUE_DEPTH: &str = "kiln_queue_depth";
/// Requests refused or dropped, by reason (`queue_full`, `cancelled`, ...).
pub const REJECTED_TOTAL: &str = "kiln_rejected_total";
/// Units over the batch limit, per batch: how full batches run.
pub const BATCH_FILL_RATIO: &str = "kiln_batch_fill_ratio";
/// Share of a batch's computed units that are padding (0 for row models).
pub const PADDING_RATIO: &str = "kiln_padding_ratio";
/// The latency model's terms, by `term` (`fixed`, `per_unit`).
pub const LATENCY_MODEL: &str = "kiln_latency_model_seconds";
/// Compute-seconds spent, by tenant (configured tenants, else `other`).
pub const COST_TOTAL: &str = "kiln_cost_seconds_total";
/// 1 while a version is loaded and serving.
pub const MODEL_READY: &str = "kiln_model_ready";
/// Always 1; its `version` label is Kiln's version.
pub const BUILD_INFO: &str = "kiln_build_info";
/// Share of wall time the version's executors spent running batches.
pub const EXECUTOR_BUSY: &str = "kiln_executor_busy_ratio";
/// Population stability index of a watched feature, output or text
/// statistic against the reference.
pub const DRIFT_PSI: &str = "kiln_drift_psi";
/// Drift status after hysteresis: 0 ok, 1 warn, 2 alert.
pub const DRIFT_STATUS: &str = "kiln_drift_status";
/// Rows whose drift sample was dropped because the drift task was behind.
pub const DRIFT_DROPPED: &str = "kiln_drift_samples_dropped_total";
/// Rows in the live drift window.
pub const DRIFT_WINDOW_ROWS: &str = "kiln_drift_window_rows";
/// Input value rates in the window, by `kind` (`out_of_range`, `missing`,
/// `non_finite`, and `unknown_token` for text).
pub const DRIFT_INPUT_RATE: &str = "kiln_drift_input_rate";
/// Live share of rows predicted in each output class.
pub const DRIFT_CLASS_RATE: &str = "kiln_drift_class_rate";
/// Text models: cosine distance between the live and reference embedding
/// centroids.
pub const DRIFT_EMBEDDING_DISTANCE: &str = "kiln_drift_embedding_distance";
/// Sampled request-log lines dropped because the writer was behind.
pub const REQUEST_LOG_DROPPED: &str = "kiln_request_log_dropped_total";

/// Geometric buckets from 10 µs to about 10 s: serving latencies here span
/// microseconds (the risk model) to seconds (large text batches).
fn duration_buckets() -> Vec<f64> {
    (0..=24).map(|i| 10e-6 * 1.8f64.powi(i)).collect()
}

/// Tenths, for ratios in [0, 1].
fn ratio_buckets() -> Vec<f64> {
    (1..=10).map(|i| i as f64 / 10.0).collect()
}

/// Powers of two up to 4096, for counts of requests and rows.
fn size_buckets() -> Vec<f64> {
    (0..=12).map(|i| 2f64.powi(i)).collect()
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls reuse
/// it, so several servers in one test process share it) and returns the
/// handle that renders the text format.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &duration_buckets())
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &size_buckets()))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_UNITS.into()), &size_buckets()))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_FILL_RATIO.into()), &ratio_buckets()))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PADDING_RATIO.into()), &ratio_buckets()))
                .expect("bucket lists are non-empty constants");
            let handle = builder.install_recorder().expect("the recorder is installed once, guarded by OnceLock");
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS_TOTAL, "Inference requests answered, by model, version and gRPC code.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time from receipt to answer per request.");
    describe_histogram!(QUEUE_DURATION, Unit::Seconds, "Time a request waited in the queue before its batch ran.");
    describe_histogram!(COMPUTE_DURATION, Unit::Seconds, "Model compute time per batch.");
    describe_histogram!(BATCH_SIZE, "Requests per formed batch.");
    describe_histogram!(BATCH_UNITS, "Units per formed batch: rows, or padded tokens for text.");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting in the queue.");
    describe_counter!(REJECTED_TOTAL, "Requests refused or dropped before compute, by reason.");
    describe_histogram!(BATCH_FILL_RATIO, "Units per batch over the batch limit.");
    describe_histogram!(PADDING_RATIO, "Share of a batch's computed tokens that are padding.");
    describe_gauge!(LATENCY_MODEL, Unit::Seconds, "The latency model t = fixed + per_unit * units, by term.");
    describe_gauge!(MODEL_READY, "1 when the model version is loaded and serving.");
    describe_gauge!(BUILD_INFO, "Kiln build information.");
    describe_gauge!(EXECUTOR_BUSY, "Share of wall time the executors spent running batches (last second).");
    describe_gauge!(DRIFT_PSI, "Population stability index of a watched statistic against the reference.");
    describe_gauge!(DRIFT_STATUS, "Drift status after hysteresis: 0 ok, 1 warn, 2 alert.");
    describe_counter!(DRIFT_DROPPED, "Rows whose drift sample was dropped because the drift task was behind.");
    describe_gauge!(DRIFT_WINDOW_ROWS, "Rows in the live drift window.");
    describe_gauge!(
        DRIFT_INPUT_RATE,
        "Share of window rows with out-of-range, missing, non-finite or unknown-token inputs."
    );
    describe_gauge!(DRIFT_CLASS_RATE, "Live share of rows predicted in each output class.");
    describe_gauge!(DRIFT_EMBEDDING_DISTANCE, "Cosine distance between live and reference embedding centroids.");
    describe_counter!(REQUEST_LOG_DROPPED, "Sampled request-log lines dropped because the writer was behind.");
}

/// Pre-registered handles for one model version, so the hot path does no
/// label formatting.
#[derive(Clone)]
pub struct VersionMetrics {
    model: String,
    version: String,
    pub request_duration: Histogram,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub batch_size: Histogram,
    pub batch_units: Histogram,
    pub batch_fill_ratio: Histogram,
    pub padding_ratio: Histogram,
    /// One gauge per priority level (index 0 = level 1).
    pub queue_depth: Vec<Gauge>,
    pub ready: Gauge,
    latency_fixed: Gauge,
    latency_per_unit: Gauge,
    /// The batch limit the fill ratio is measured against.
    pub max_batch_units: usize,
    /// Nanoseconds the executors spent on batches, and the last reading
    /// the busy ratio was computed from.
    busy_ns: Arc<AtomicU64>,
    busy_last: Arc<Mutex<(Instant, u64)>>,
    busy_ratio: Gauge,
}

impl VersionMetrics {
    pub fn new(model: &str, version: u64, priority_levels: u32, max_batch_units: usize) -> Self {
        let (m, v) = (model.to_string(), version.to_string());
        Self {
            batch_fill_ratio: metrics::histogram!(BATCH_FILL_RATIO, "model" => m.clone(), "version" => v.clone()),
            padding_ratio: metrics::histogram!(PADDING_RATIO, "model" => m.clone(), "version" => v.clone()),
            latency_fixed: metrics::gauge!(LATENCY_MODEL, "model" => m.clone(), "version" => v.clone(), "term" => "fixed"),
            latency_per_unit: metrics::gauge!(LATENCY_MODEL, "model" => m.clone(), "version" => v.clone(), "term" => "per_unit"),
            max_batch_units: max_batch_units.max(1),
            request_duration: metrics::histogram!(REQUEST_DURATION, "model" => m.clone(), "version" => v.clone()),
            queue_duration: metrics::histogram!(QUEUE_DURATION, "model" => m.clone(), "version" => v.clone()),
            compute_duration: metrics::histogram!(COMPUTE_DURATION, "model" => m.clone(), "version" => v.clone()),
            batch_size: metrics::histogram!(BATCH_SIZE, "model" => m.clone(), "version" => v.clone()),
            batch_units: metrics::histogram!(BATCH_UNITS, "model" => m.clone(), "version" => v.clone()),
            queue_depth: (1..=priority_levels.max(1))
                .map(|level| {
                    metrics::gauge!(QUEUE_DEPTH, "model" => m.clone(), "version" => v.clone(), "priority" => level.to_string())
                })
                .collect(),
            ready: metrics::gauge!(MODEL_READY, "model" => m.clone(), "version" => v.clone()),
            busy_ns: Arc::new(AtomicU64::new(0)),
            busy_last: Arc::new(Mutex::new((Instant::now(), 0))),
            busy_ratio: metrics::gauge!(EXECUTOR_BUSY, "model" => m.clone(), "version" => v.clone()),
            model: m,
            version: v,
        }
    }

    /// The answered-requests counter for one gRPC code.
    pub fn requests(&self, code: &'static str) -> Counter {
        metrics::counter!(REQUESTS_TOTAL, "model" => self.model.clone(), "version" => self.version.clone(), "code" => code)
    }

    /// Publishes the latency model's current terms.
    pub fn publish_latency(&self, estimate: &crate::batcher::latency::LatencyEstimate) {
        self.latency_fixed.set(estimate.fixed_s);
        self.latency_per_unit.set(estimate.per_unit_s);
    }

    /// Adds compute-seconds spent for a tenant label.
    pub fn add_cost(&self, tenant: &str, seconds: f64) {
        add_float_counter(
            COST_TOTAL,
            [("model", &self.model), ("version", &self.version), ("tenant", tenant)],
            seconds,
        );
    }

    /// Adds one batch's executor time.
    pub fn add_busy(&self, spent: Duration) {
        self.busy_ns.fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Publishes the busy ratio since the last call, over `instances`
    /// executors.
    pub fn publish_busy(&self, instances: usize) {
        let now = Instant::now();
        let busy = self.busy_ns.load(Ordering::Relaxed);
        let mut last = self.busy_last.lock().unwrap_or_else(|p| p.into_inner());
        let wall = now.duration_since(last.0).as_nanos() as f64 * instances.max(1) as f64;
        if wall > 0.0 {
            self.busy_ratio.set(((busy - last.1) as f64 / wall).min(1.0));
        }
        *last = (now, busy);
    }

    /// The refusals counter for one reason.
    pub fn rejected(&self, reason: &'static str) -> Counter {
        metrics::counter!(REJECTED_TOTAL, "model" => self.model.clone(), "version" => self.version.clone(), "reason" => reason)
    }
}

/// Counters with fractional increments (the `metrics` facade's counters are
/// integers): name → labels → value, rendered after the facade's output.
type FloatCounters = BTreeMap<&'static str, BTreeMap<String, f64>>;
static FLOAT_COUNTERS: Mutex<FloatCounters> = Mutex::new(BTreeMap::new());

fn add_float_counter<const N: usize>(name: &'static str, labels: [(&str, &str); N], value: f64) {
    let rendered: Vec<String> =
        labels.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    let key = rendered.join(",");
    let mut counters = FLOAT_COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    *counters.entry(name).or_default().entry(key).or_insert(0.0) += value;
}

/// The Prometheus text: the facade's metrics, the float counters, then
/// the process's own (standard `process_*` names).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    out.push_str(&super::process::render());
    let counters = FLOAT_COUNTERS.lock().unwrap_or_else(|p| p.into_inner());
    for (name, series) in counters.iter() {
        if *name == COST_TOTAL {
            out.push_str("# HELP kiln_cost_seconds_total Compute-seconds spent, by model, version and tenant.\n");
        }
        out.push_str(&format!("# TYPE {name} counter\n"));
        for (labels, value) in series {
            out.push_str(&format!("{name}{{{labels}}} {value}\n"));
        }
    }
    out
}

/// Serves the Prometheus text format on `GET /metrics` (any path answers
/// it: scrapers are configured with one URL). Runs until `shutdown` ends.
pub async fn serve_http(listener: TcpListener, handle: PrometheusHandle, shutdown: impl Future<Output = ()>) {
    let upkeep = handle.clone();
    let upkeep_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let accept = async {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                // One request per connection; a scrape's request line and
                // headers fit easily, and the body is ignored.
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
                let body = render(&handle);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    upkeep_task.abort();
}
