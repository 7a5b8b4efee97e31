//! Metric names, their documentation and buckets, the per-version handles
//! the hot path uses, and the `/metrics` HTTP endpoint.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The front end a request came through: the `protocol` label of the
/// request counts and durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc = 0,
    Http = 1,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
        }
    }
}

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
/// The most requests the queue holds (`max_queue`): what depth is measured
/// against when alerting on saturation.
pub const QUEUE_CAPACITY: &str = "kiln_queue_capacity";
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
/// Repository changes applied or refused, by model, action and outcome.
pub const MODEL_CHANGES: &str = "kiln_model_changes_total";
/// Requests answered by a model's fallback (answers only), by model and reason.
pub const FALLBACK_TOTAL: &str = "kiln_fallback_total";
/// Shadow comparisons: class agreement, cosine distance, shadow latency,
/// and copies not compared.
pub const SHADOW_COMPARED: &str = "kiln_shadow_rows_compared_total";
pub const SHADOW_DISTANCE: &str = "kiln_shadow_cosine_distance";
pub const SHADOW_DURATION: &str = "kiln_shadow_duration_seconds";
pub const SHADOW_DROPPED: &str = "kiln_shadow_dropped_total";
/// Admin actions, by action and outcome.
pub const ADMIN_ACTIONS: &str = "kiln_admin_actions_total";
pub const BUILD_INFO: &str = "kiln_build_info";
/// Share of wall time the version's executors spent running batches.
pub const EXECUTOR_BUSY: &str = "kiln_executor_busy_ratio";
/// Executor threads that died (a panic outside the model's guard) and were
/// restarted.
pub const EXECUTOR_RESTARTS: &str = "kiln_executor_restarts_total";
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
/// Request bytes held by calls now, against `max_inflight_bytes`.
pub const INFLIGHT_BYTES: &str = "kiln_inflight_bytes";
/// Calls refused at the door before decoding, by `reason`
/// (`inflight_bytes`, `message_size`, `wire`, `body_timeout`,
/// `unauthenticated`, `permission_denied`).
pub const INGRESS_REFUSED: &str = "kiln_ingress_refused_total";
/// Reasons of [`INGRESS_REFUSED`], registered at start so they export as 0.
pub const INGRESS_REASONS: [&str; 6] =
    ["inflight_bytes", "message_size", "wire", "body_timeout", "unauthenticated", "permission_denied"];
/// TLS handshakes that failed (no or an untrusted client certificate, a
/// client that does not trust the server, a protocol mismatch).
pub const TLS_HANDSHAKE_FAILURES: &str = "kiln_tls_handshake_failures_total";
/// Connections closed at once because `max_connections` were open.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "kiln_connections_refused_total";

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
            metrics::gauge!(INFLIGHT_BYTES).set(0.0);
            metrics::counter!(CONNECTIONS_REFUSED_TOTAL).increment(0);
            metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(0);
            for reason in INGRESS_REASONS {
                metrics::counter!(INGRESS_REFUSED, "reason" => reason).increment(0);
            }
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
    describe_counter!(EXECUTOR_RESTARTS, "Executor threads that died outside the model's guard and were restarted.");
    describe_histogram!(BATCH_SIZE, "Requests per formed batch.");
    describe_histogram!(BATCH_UNITS, "Units per formed batch: rows, or padded tokens for text.");
    describe_gauge!(QUEUE_DEPTH, "Requests waiting in the queue.");
    describe_gauge!(QUEUE_CAPACITY, "The most requests the queue holds (max_queue).");
    describe_counter!(REJECTED_TOTAL, "Requests refused or dropped before compute, by reason.");
    describe_histogram!(BATCH_FILL_RATIO, "Units per batch over the batch limit.");
    describe_histogram!(PADDING_RATIO, "Share of a batch's computed tokens that are padding.");
    describe_gauge!(LATENCY_MODEL, Unit::Seconds, "The latency model t = fixed + per_unit * units, by term.");
    describe_gauge!(INFLIGHT_BYTES, Unit::Bytes, "Request bytes held by calls in flight.");
    describe_counter!(INGRESS_REFUSED, "Calls refused before decoding, by reason.");
    describe_counter!(CONNECTIONS_REFUSED_TOTAL, "Connections closed at once because max_connections were open.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed (untrusted or missing client certificate, protocol mismatch)."
    );
    describe_gauge!(MODEL_READY, "1 when the model version is loaded and serving.");
    describe_counter!(
        MODEL_CHANGES,
        "Repository changes by model, action (load, unload, config) and outcome (ok, failed, refused)."
    );
    describe_counter!(
        ADMIN_ACTIONS,
        "Release actions by admins (promote, rollback, pause, resume, split), by outcome."
    );
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
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    /// By [`Protocol`], in its order.
    request_duration: [Histogram; 2],
    pub batch_size: Histogram,
    pub batch_units: Histogram,
    pub batch_fill_ratio: Histogram,
    pub padding_ratio: Histogram,
    /// One gauge per priority level (index 0 = level 1).
    pub queue_depth: Vec<Gauge>,
    pub ready: Gauge,
    pub executor_restarts: Counter,
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
            queue_duration: metrics::histogram!(QUEUE_DURATION, "model" => m.clone(), "version" => v.clone()),
            compute_duration: metrics::histogram!(COMPUTE_DURATION, "model" => m.clone(), "version" => v.clone()),
            request_duration: [Protocol::Grpc, Protocol::Http].map(|p| {
                metrics::histogram!(REQUEST_DURATION, "model" => m.clone(), "version" => v.clone(), "protocol" => p.as_str())
            }),
            batch_size: metrics::histogram!(BATCH_SIZE, "model" => m.clone(), "version" => v.clone()),
            batch_units: metrics::histogram!(BATCH_UNITS, "model" => m.clone(), "version" => v.clone()),
            queue_depth: (1..=priority_levels.max(1))
                .map(|level| {
                    metrics::gauge!(QUEUE_DEPTH, "model" => m.clone(), "version" => v.clone(), "priority" => level.to_string())
                })
                .collect(),
            ready: metrics::gauge!(MODEL_READY, "model" => m.clone(), "version" => v.clone()),
            executor_restarts: metrics::counter!(EXECUTOR_RESTARTS, "model" => m.clone(), "version" => v.clone()),
            busy_ns: Arc::new(AtomicU64::new(0)),
            busy_last: Arc::new(Mutex::new((Instant::now(), 0))),
            busy_ratio: metrics::gauge!(EXECUTOR_BUSY, "model" => m.clone(), "version" => v.clone()),
            model: m,
            version: v,
        }
    }

    /// The answered-requests counter for one gRPC code and front end.
    pub fn requests(&self, code: &'static str, protocol: Protocol) -> Counter {
        metrics::counter!(REQUESTS_TOTAL, "model" => self.model.clone(), "version" => self.version.clone(), "code" => code, "protocol" => protocol.as_str())
    }

    /// Receipt to answer, per front end (registered once, at load).
    pub fn request_duration(&self, protocol: Protocol) -> &Histogram {
        &self.request_duration[protocol as usize]
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

    /// Publishes the queue's capacity, so depth can be read as a share.
    pub fn publish_queue_capacity(&self, max_queue: usize) {
        metrics::gauge!(QUEUE_CAPACITY, "model" => self.model.clone(), "version" => self.version.clone())
            .set(max_queue as f64);
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

/// Keeps the recorder's histograms trimmed while the server runs.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Answers `GET /metrics` with the Prometheus text (200) and any other
/// path with 404; served by the same accept loop and limits as gRPC.
#[derive(Clone)]
pub struct MetricsService {
    handle: PrometheusHandle,
    inflight: Arc<crate::api::grpc::ingress::InflightBudget>,
}

impl MetricsService {
    pub fn new(handle: PrometheusHandle, inflight: Arc<crate::api::grpc::ingress::InflightBudget>) -> Self {
        Self { handle, inflight }
    }
}

impl<B> tower::Service<http::Request<B>> for MetricsService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (status, body) = if request.uri().path() == "/metrics" {
            metrics::gauge!(INFLIGHT_BYTES).set(self.inflight.used() as f64);
            (http::StatusCode::OK, render(&self.handle))
        } else {
            (http::StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n".to_string())
        };
        let mut response =
            http::Response::new(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body))));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
        std::future::ready(Ok(response))
    }
}
