//! Server configuration and `model.toml`: one serde struct per file format,
//! defaults in one place, and errors that name the file and the field.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::model::DataType;

pub mod limits;
pub use limits::{LimitsConfig, MAX_DURATION_MS};

/// A configuration file that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file (or built-in path) at fault.
    pub file: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), message: message.into() }
    }
}

/// Default bound on one gRPC message, both directions: gRPC's own default.
/// The largest request the built-in models take is far smaller (64 risk
/// rows are 8 KiB; 64 MiniLM texts at their `max_text_bytes` are 1 MiB), and
/// every byte of a message is held for the whole call, so a larger bound
/// only buys room for abuse. Raise it for models with big tensors.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The largest `max_message_bytes` gRPC framing can carry (a u32 length).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = u32::MAX as usize;

/// Where the models come from.
#[derive(Debug, Clone)]
pub enum RepositorySource {
    /// The repository compiled into the binary (the `risk` model).
    BuiltIn,
    /// A folder of `NAME/model.toml` + `NAME/VERSION/...`.
    Dir(PathBuf),
}

/// A tenant's compute budget: a token bucket of compute-seconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Compute-seconds per second the tenant may spend on average (0.5 =
    /// half of one executor's time).
    pub budget: f64,
    /// Compute-seconds it may spend in a burst above the average.
    pub burst: f64,
}

/// Everything `kiln::serve` needs to know, already validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub repository: RepositorySource,
    /// Tenants with a compute budget; others are not limited.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Upper bound on one request or response message, in bytes.
    pub max_message_bytes: usize,
    /// How long a shutdown may take to answer what was admitted; past it
    /// the rest is answered UNAVAILABLE. Below Kubernetes' default 30 s
    /// termination grace period, so a drain ends before SIGKILL.
    pub drain_timeout: std::time::Duration,
    /// Threads that tokenize text requests before they queue.
    pub prepare_threads: usize,
    /// Bearer token the admin service requires; without one it is open
    /// (it only reads, for now).
    pub admin_token: Option<String>,
    /// The sampled request log, when configured.
    pub request_log: Option<RequestLogConfig>,
    /// Bytes in flight, connections, HTTP/2 settings and timeouts.
    pub limits: LimitsConfig,
}

impl ServeConfig {
    /// Checks the merged settings (flags over file) before anything starts.
    pub fn check(&self) -> Result<(), ConfigError> {
        let here = "server config";
        if !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&self.max_message_bytes) {
            return Err(ConfigError::new(
                here,
                format!("`max_message_bytes`: must be 1 to {MAX_MESSAGE_BYTES_LIMIT}, got {}", self.max_message_bytes),
            ));
        }
        if self.drain_timeout.is_zero() || self.drain_timeout > std::time::Duration::from_millis(MAX_DURATION_MS) {
            return Err(ConfigError::new(
                here,
                format!(
                    "`drain_timeout`: must be above 0 and at most {MAX_DURATION_MS} ms, got {:?}",
                    self.drain_timeout
                ),
            ));
        }
        self.limits.check(self.max_message_bytes).map_err(|m| ConfigError::new(here, m))
    }
}

/// How a logged request's inputs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputLogMode {
    /// Not at all: keep only what is needed.
    #[default]
    None,
    /// A keyed HMAC-SHA256 of each input: equal inputs link, values cannot
    /// be recovered by hashing guesses without the key.
    Hash,
    /// The values themselves.
    Full,
}

/// `[request_log]` section of the server config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLogConfig {
    /// JSON-lines file; rotated to `FILE.1`, `FILE.2`, ... past `max_bytes`.
    pub path: PathBuf,
    /// Share of answered requests logged, in [0, 1].
    #[serde(default = "defaults::log_sample_rate")]
    pub sample_rate: f64,
    /// Size at which the file is rotated.
    #[serde(default = "defaults::log_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept besides the live one.
    #[serde(default = "defaults::log_keep_files")]
    pub keep_files: usize,
    #[serde(default)]
    pub inputs: InputLogMode,
    /// HMAC key for `inputs = "hash"`; the `KILN_REQUEST_LOG_KEY`
    /// environment variable is read when absent, so it need not sit in a file.
    pub hmac_key: Option<String>,
}

impl RequestLogConfig {
    fn check(&mut self, file: &str) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(ConfigError::new(
                file,
                format!("field `request_log.sample_rate`: must be in [0, 1], got {}", self.sample_rate),
            ));
        }
        if self.max_bytes == 0 {
            return Err(ConfigError::new(file, "field `request_log.max_bytes`: must be at least 1"));
        }
        // Each rotation renames every kept file.
        if self.keep_files > 1000 {
            return Err(ConfigError::new(
                file,
                format!("field `request_log.keep_files`: at most 1000, got {}", self.keep_files),
            ));
        }
        if self.hmac_key.is_none() {
            self.hmac_key = std::env::var("KILN_REQUEST_LOG_KEY").ok().filter(|k| !k.is_empty());
        }
        if self.inputs == InputLogMode::Hash && self.hmac_key.is_none() {
            return Err(ConfigError::new(
                file,
                "field `request_log.hmac_key`: `inputs = \"hash\"` needs a key (or KILN_REQUEST_LOG_KEY); an \
                 unkeyed hash of a few numbers can be reversed by trying values",
            ));
        }
        Ok(())
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            repository: RepositorySource::BuiltIn,
            tenants: BTreeMap::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            drain_timeout: std::time::Duration::from_secs(25),
            prepare_threads: 1,
            admin_token: None,
            request_log: None,
            limits: LimitsConfig::default(),
        }
    }
}

/// The file given to `kiln serve --config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Overrides the default message size bound.
    pub max_message_bytes: Option<usize>,
    /// `[tenants.NAME]` sections: `budget` and `burst` in compute-seconds.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Bearer token for the admin service.
    pub admin_token: Option<String>,
    /// `[request_log]`: the sampled request log.
    pub request_log: Option<RequestLogConfig>,
    /// `[limits]`: bytes in flight, connections, HTTP/2 settings, timeouts.
    #[serde(default)]
    pub limits: LimitsConfig,
}

impl ServerFile {
    /// Reads and checks a server config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&file, format!("cannot read: {e}")))?;
        let mut parsed: Self = toml::from_str(&text).map_err(|e| ConfigError::new(&file, e.to_string()))?;
        if let Some(log) = parsed.request_log.as_mut() {
            log.check(&file)?;
        }
        if parsed.admin_token.as_deref() == Some("") {
            return Err(ConfigError::new(file, "field `admin_token`: must not be empty"));
        }
        if let Some(bytes) = parsed.max_message_bytes
            && !(1..=MAX_MESSAGE_BYTES_LIMIT).contains(&bytes)
        {
            return Err(ConfigError::new(
                file,
                format!("field `max_message_bytes`: must be 1 to {MAX_MESSAGE_BYTES_LIMIT}, got {bytes}"),
            ));
        }
        parsed
            .limits
            .check(parsed.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES))
            .map_err(|m| ConfigError::new(&file, m))?;
        for (name, t) in &parsed.tenants {
            for (field, value) in [("budget", t.budget), ("burst", t.burst)] {
                if !(value.is_finite() && value > 0.0) {
                    return Err(ConfigError::new(
                        &file,
                        format!(
                            "field `tenants.{name}.{field}`: must be a positive number of compute-seconds, got {value}"
                        ),
                    ));
                }
            }
        }
        Ok(parsed)
    }
}

/// The kinds of model Kiln can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Feed-forward network from `model.safetensors`.
    Mlp,
    /// BERT-family text encoder: `config.json`, `tokenizer.json`,
    /// `model.safetensors` (Hugging Face layout).
    Bert,
}

impl ModelKind {
    /// The files each version folder must hold.
    pub fn version_files(self) -> &'static [&'static str] {
        match self {
            Self::Mlp => &["model.safetensors"],
            Self::Bert => &["model.safetensors", "config.json", "tokenizer.json"],
        }
    }
}

/// How a sentence embedding is pooled from the token states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the real (unpadded) tokens, as sentence-transformers.
    #[default]
    Mean,
    /// The first token's state.
    Cls,
}

/// `[bert]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertSection {
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise each embedding (cosine similarity becomes a dot product).
    #[serde(default = "defaults::normalize")]
    pub normalize: bool,
    /// Most tokens per text, special tokens included; requests may lower
    /// it with the `max_tokens` parameter.
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: usize,
    /// A longer text is cut to the limit (true, as sentence-transformers
    /// does) or refused with INVALID_ARGUMENT (false); requests may choose
    /// with the `truncate` parameter.
    #[serde(default = "defaults::truncate")]
    pub truncate: bool,
    /// Longest text in bytes, checked before tokenizing: a longer one is
    /// refused whatever `truncate` says, so no client can make the
    /// tokenizer chew on megabytes. Default: `max_tokens` ×
    /// [`TEXT_BYTES_PER_TOKEN`].
    pub max_text_bytes: Option<usize>,
}

/// Bytes of text allowed per token of `max_tokens` when `max_text_bytes`
/// is not set: English runs about 4-5 bytes a token, so this leaves room
/// for a text to be truncated while bounding what is tokenized.
pub const TEXT_BYTES_PER_TOKEN: usize = 64;

impl BertSection {
    /// The text byte limit in force.
    pub fn text_bytes_limit(&self) -> usize {
        self.max_text_bytes.unwrap_or(self.max_tokens.saturating_mul(TEXT_BYTES_PER_TOKEN))
    }
}

impl Default for BertSection {
    fn default() -> Self {
        Self {
            pooling: Pooling::Mean,
            normalize: true,
            max_tokens: defaults::max_tokens(),
            truncate: true,
            max_text_bytes: None,
        }
    }
}

/// Activation functions an MLP may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Sigmoid,
    None,
}

/// `[mlp]` section: how the layers in the weights file are joined.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MlpSection {
    /// Between hidden layers.
    #[serde(default)]
    pub activation: Activation,
    /// After the last layer (`sigmoid` for a probability).
    #[serde(default = "none_activation")]
    pub output_activation: Activation,
}

fn none_activation() -> Activation {
    Activation::None
}

/// One named feature (a column of a 2-D input).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureToml {
    pub name: String,
    /// Hard limits `[low, high]`; values outside are refused.
    pub valid_range: Option<[f64; 2]>,
    /// The value the upstream sends for "not known" (often 0 or -1): drift
    /// counts it as missing instead of as part of the distribution.
    pub missing_value: Option<f64>,
}

/// An input or output tensor as `model.toml` declares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorToml {
    pub name: String,
    pub datatype: String,
    /// With the batch dimension first, as -1.
    pub shape: Vec<i64>,
    #[serde(default)]
    pub features: Vec<FeatureToml>,
}

/// `model.toml`: a model's kind, interface and serving settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelToml {
    pub kind: ModelKind,
    /// Free text shown in metadata.
    #[serde(default)]
    pub description: String,
    /// The version served when a request names none; default: the highest.
    pub default_version: Option<u64>,
    /// `auto`, `cpu` or `cuda:N`.
    #[serde(default = "defaults::device")]
    pub device: String,
    /// Most requests in one batch.
    #[serde(default = "defaults::max_batch_size")]
    pub max_batch_size: usize,
    /// Text models: most padded tokens (longest row × rows) in one batch.
    pub max_batch_tokens: Option<usize>,
    /// Longest a request waits for others to join its batch.
    #[serde(default = "defaults::max_queue_delay_ms")]
    pub max_queue_delay_ms: f64,
    /// Most requests waiting; beyond it requests are refused at once.
    #[serde(default = "defaults::max_queue")]
    pub max_queue: usize,
    /// Executor threads, each running batches on its own.
    #[serde(default = "defaults::instances")]
    pub instances: usize,
    /// Target for queue + compute of each request (the p99 goal); the
    /// batcher stops waiting for company when it would be missed.
    #[serde(default = "defaults::latency_budget_ms")]
    pub latency_budget_ms: f64,
    /// Deadline of a request that sets none (nor a gRPC deadline).
    #[serde(default = "defaults::default_timeout_ms")]
    pub default_timeout_ms: f64,
    /// Most estimated compute one request may cost, in microseconds.
    pub max_cost_us: Option<u64>,
    /// Priority levels; 1 is the highest, as in Triton.
    #[serde(default = "defaults::priority_levels")]
    pub priority_levels: u32,
    /// Level of a request that sets none (or 0); default: the middle one.
    pub default_priority: Option<u32>,
    pub inputs: Vec<TensorToml>,
    pub outputs: Vec<TensorToml>,
    #[serde(default)]
    pub mlp: Option<MlpSection>,
    #[serde(default)]
    pub bert: Option<BertSection>,
    /// Drift monitoring: reference, windows and thresholds.
    #[serde(default)]
    pub drift: DriftSection,
}

/// Where a version's drift reference comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceSource {
    /// `reference.json` in the version folder; no drift monitoring without it.
    #[default]
    File,
    /// Captured from the version's first `auto_samples` rows of traffic.
    Auto,
    /// No drift monitoring.
    Off,
}

/// `[drift]` section: the live windows and when drift warns or alerts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSection {
    #[serde(default)]
    pub reference: ReferenceSource,
    /// Rows captured when `reference = "auto"`.
    #[serde(default = "defaults::auto_samples")]
    pub auto_samples: usize,
    /// How far back the live window reaches.
    #[serde(default = "defaults::window_seconds")]
    pub window_seconds: f64,
    /// Intervals the window is kept in; statistics are recomputed once per
    /// interval, and the oldest interval leaves as a new one starts.
    #[serde(default = "defaults::window_intervals")]
    pub window_intervals: usize,
    /// Most rows the window holds; older intervals leave beyond it.
    #[serde(default = "defaults::window_max_samples")]
    pub window_max_samples: usize,
    /// Rows the window needs before statistics are computed: fewer make PSI
    /// noise look like drift.
    #[serde(default = "defaults::min_samples")]
    pub min_samples: usize,
    /// PSI at which a feature warns.
    #[serde(default = "defaults::psi_warn")]
    pub psi_warn: f64,
    /// PSI at which a feature alerts.
    #[serde(default = "defaults::psi_alert")]
    pub psi_alert: f64,
    /// Consecutive evaluations a new status must hold before it is raised
    /// or cleared, so one noisy window neither alerts nor clears.
    #[serde(default = "defaults::hysteresis")]
    pub hysteresis: u32,
    /// Batches waiting for the drift task; beyond it samples are dropped
    /// (and counted), never slowing inference.
    #[serde(default = "defaults::channel_capacity")]
    pub channel_capacity: usize,
    /// A one-column score at or above it is the positive class.
    #[serde(default = "defaults::class_threshold")]
    pub class_threshold: f64,
}

impl Default for DriftSection {
    fn default() -> Self {
        toml::from_str("").expect("every [drift] field has a default")
    }
}

impl DriftSection {
    fn check(&self) -> Result<(), String> {
        let positive = [
            ("auto_samples", self.auto_samples as f64),
            ("window_seconds", self.window_seconds),
            ("window_intervals", self.window_intervals as f64),
            ("window_max_samples", self.window_max_samples as f64),
            ("min_samples", self.min_samples as f64),
            ("psi_warn", self.psi_warn),
            ("psi_alert", self.psi_alert),
            ("hysteresis", self.hysteresis as f64),
            ("channel_capacity", self.channel_capacity as f64),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("field `drift.{field}`: must be a positive number, got {value}"));
            }
        }
        // Counts size buffers and a window is kept in memory: bound them
        // where a typo would otherwise allocate gigabytes.
        let bounded = [
            ("auto_samples", self.auto_samples as f64, 10_000_000.0),
            ("window_seconds", self.window_seconds, (MAX_DURATION_MS / 1000) as f64),
            ("window_intervals", self.window_intervals as f64, 10_000.0),
            ("window_max_samples", self.window_max_samples as f64, 10_000_000.0),
            ("hysteresis", self.hysteresis as f64, 1_000.0),
            ("channel_capacity", self.channel_capacity as f64, 1_000_000.0),
        ];
        for (field, value, max) in bounded {
            if value > max {
                return Err(format!("field `drift.{field}`: at most {max}, got {value}"));
            }
        }
        if self.psi_alert < self.psi_warn {
            return Err(format!(
                "field `drift.psi_alert`: {} is below `drift.psi_warn` {}; alert must be the higher level",
                self.psi_alert, self.psi_warn
            ));
        }
        if self.min_samples > self.window_max_samples {
            return Err(format!(
                "field `drift.min_samples`: {} is more than `drift.window_max_samples` {}, so the window could \
                 never be judged",
                self.min_samples, self.window_max_samples
            ));
        }
        if !(0.0..=1.0).contains(&self.class_threshold) {
            return Err(format!("field `drift.class_threshold`: must be in [0, 1], got {}", self.class_threshold));
        }
        Ok(())
    }
}

mod defaults {
    pub fn device() -> String {
        "auto".into()
    }
    pub fn max_batch_size() -> usize {
        64
    }
    pub fn max_queue_delay_ms() -> f64 {
        1.0
    }
    pub fn max_queue() -> usize {
        1024
    }
    pub fn instances() -> usize {
        1
    }
    pub fn latency_budget_ms() -> f64 {
        100.0
    }
    pub fn default_timeout_ms() -> f64 {
        10_000.0
    }
    pub fn priority_levels() -> u32 {
        1
    }
    pub fn normalize() -> bool {
        true
    }
    pub fn max_tokens() -> usize {
        512
    }
    pub fn truncate() -> bool {
        true
    }
    /// Past 1-2k padded tokens per batch CPU throughput of a small BERT
    /// falls (measured with MiniLM on two cores).
    pub const MAX_BATCH_TOKENS: usize = 2048;
    pub fn auto_samples() -> usize {
        1000
    }
    pub fn window_seconds() -> f64 {
        300.0
    }
    pub fn window_intervals() -> usize {
        10
    }
    pub fn window_max_samples() -> usize {
        20_000
    }
    pub fn min_samples() -> usize {
        500
    }
    /// The usual PSI reading: under 0.1 no change, 0.1-0.25 some, above
    /// 0.25 a shift worth acting on.
    pub fn psi_warn() -> f64 {
        0.1
    }
    pub fn psi_alert() -> f64 {
        0.25
    }
    pub fn hysteresis() -> u32 {
        3
    }
    pub fn channel_capacity() -> usize {
        1024
    }
    pub fn class_threshold() -> f64 {
        0.5
    }
    pub fn log_sample_rate() -> f64 {
        0.01
    }
    pub fn log_max_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn log_keep_files() -> usize {
        3
    }
}

/// The device a model asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when there is one, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl ModelToml {
    /// Parses and checks `model.toml` text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let parsed: Self = toml::from_str(text).map_err(|e| ConfigError::new(file, e.to_string()))?;
        parsed.check().map_err(|message| ConfigError::new(file, message))?;
        Ok(parsed)
    }

    fn check(&self) -> Result<(), String> {
        self.device_choice()?;
        // Upper bounds keep a typo from sizing queues and buffers in the
        // billions, and durations within what `Instant` arithmetic holds.
        let counts = [
            ("max_batch_size", self.max_batch_size, 1 << 16),
            ("max_queue", self.max_queue, 1 << 24),
            ("instances", self.instances, 256),
            ("priority_levels", self.priority_levels as usize, 1_000),
            ("max_batch_tokens", self.max_batch_tokens.unwrap_or(1), 1 << 24),
        ];
        for (field, value, max) in counts {
            if !(1..=max).contains(&value) {
                return Err(format!("field `{field}`: must be 1 to {max}, got {value}"));
            }
        }
        if let Some(bert) = &self.bert {
            if !(1..=1 << 20).contains(&bert.max_tokens) {
                return Err(format!("field `bert.max_tokens`: must be 1 to {}, got {}", 1 << 20, bert.max_tokens));
            }
            if let Some(bytes) = bert.max_text_bytes
                && !(1..=1 << 30).contains(&bytes)
            {
                return Err(format!("field `bert.max_text_bytes`: must be 1 to {}, got {bytes}", 1 << 30));
            }
        }
        if self.max_cost_us == Some(0) {
            return Err("field `max_cost_us`: must be at least 1 µs (leave it out for no cap)".into());
        }
        match (self.kind, self.max_batch_tokens) {
            (ModelKind::Bert, Some(tokens)) => {
                let longest = self.bert.as_ref().map_or(defaults::max_tokens(), |b| b.max_tokens);
                if tokens < longest {
                    return Err(format!(
                        "field `max_batch_tokens`: {tokens} is less than `bert.max_tokens` {longest}, so a single \
                         longest text could never run"
                    ));
                }
            }
            (ModelKind::Bert, None) => {}
            (_, Some(_)) => return Err("field `max_batch_tokens`: applies to text (bert) models only".into()),
            (_, None) => {}
        }
        if self.max_queue == 0 {
            return Err("field `max_queue`: must be at least 1".into());
        }
        if self.instances == 0 {
            return Err("field `instances`: must be at least 1".into());
        }
        for (field, value) in [
            ("max_queue_delay_ms", self.max_queue_delay_ms),
            ("latency_budget_ms", self.latency_budget_ms),
            ("default_timeout_ms", self.default_timeout_ms),
        ] {
            if !(value.is_finite() && (0.0..=MAX_DURATION_MS as f64).contains(&value)) {
                return Err(format!("field `{field}`: must be 0 to {MAX_DURATION_MS} milliseconds, got {value}"));
            }
        }
        if self.latency_budget_ms > self.default_timeout_ms {
            return Err(format!(
                "field `latency_budget_ms`: {} ms exceeds `default_timeout_ms` {} ms; a budget longer than the \
                 deadline can never be used",
                self.latency_budget_ms, self.default_timeout_ms
            ));
        }
        if self.priority_levels == 0 {
            return Err("field `priority_levels`: must be at least 1".into());
        }
        if let Some(p) = self.default_priority
            && !(1..=self.priority_levels).contains(&p)
        {
            return Err(format!("field `default_priority`: {p} is not a level in 1..={}", self.priority_levels));
        }
        self.drift.check()?;
        if self.inputs.is_empty() {
            return Err("field `inputs`: a model needs at least one input".into());
        }
        if self.outputs.is_empty() {
            return Err("field `outputs`: a model needs at least one output".into());
        }
        for (section, tensors) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            for (i, t) in tensors.iter().enumerate() {
                check_tensor(t).map_err(|m| format!("field `{section}[{i}]` ({}): {m}", t.name))?;
                if tensors[..i].iter().any(|o| o.name == t.name) {
                    return Err(format!("field `{section}[{i}]`: duplicate name `{}`", t.name));
                }
            }
        }
        Ok(())
    }

    /// The most units one batch may hold: padded tokens for text models,
    /// rows for the rest.
    pub fn max_batch_units(&self) -> usize {
        match self.kind {
            ModelKind::Bert => self.max_batch_tokens.unwrap_or_else(|| {
                defaults::MAX_BATCH_TOKENS.max(self.bert.as_ref().map_or(defaults::max_tokens(), |b| b.max_tokens))
            }),
            ModelKind::Mlp => self.max_batch_size,
        }
    }

    /// The level of a request that asks for none.
    pub fn default_priority_level(&self) -> u32 {
        self.default_priority.unwrap_or(self.priority_levels.div_ceil(2))
    }

    /// The device this model asks for.
    pub fn device_choice(&self) -> Result<DeviceChoice, String> {
        match self.device.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            other => {
                let ordinal = match other.strip_prefix("cuda") {
                    Some("") => Some(0),
                    Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()),
                    None => None,
                };
                match ordinal {
                    Some(n) => Ok(DeviceChoice::Cuda(n)),
                    None => Err(format!("field `device`: expected \"auto\", \"cpu\" or \"cuda:N\", got {other:?}")),
                }
            }
        }
    }
}

fn check_tensor(t: &TensorToml) -> Result<(), String> {
    if t.name.is_empty() {
        return Err("`name` must not be empty".into());
    }
    if DataType::from_v2(&t.datatype).is_none() {
        return Err(format!("`datatype`: expected one of FP32, FP64, INT32, INT64, BYTES, got {:?}", t.datatype));
    }
    if t.shape.first() != Some(&-1) {
        return Err("`shape`: the first dimension is the batch and must be -1".into());
    }
    if t.shape[1..].iter().any(|d| *d <= 0) {
        return Err(format!("`shape`: dimensions after the batch must be positive, got {:?}", t.shape));
    }
    if !t.features.is_empty() {
        if t.shape.len() != 2 || t.shape[1] as usize != t.features.len() {
            return Err(format!(
                "`features`: {} names given, but shape {:?} is not [-1, {}]",
                t.features.len(),
                t.shape,
                t.features.len()
            ));
        }
        for f in &t.features {
            if let Some(missing) = f.missing_value
                && !missing.is_finite()
            {
                return Err(format!("feature `{}`: `missing_value` must be a finite number, got {missing}", f.name));
            }
            if let Some([low, high]) = f.valid_range
                && !(low.is_finite() && high.is_finite() && low <= high)
            {
                return Err(format!("feature `{}`: `valid_range` must be [low, high] with low <= high", f.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
kind = "mlp"
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 2]
features = [{ name = "a", valid_range = [0.0, 1.0] }, { name = "b" }]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 1]
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let m = ModelToml::parse("m.toml", GOOD).expect("valid");
        assert_eq!(m.max_batch_size, 64);
        assert_eq!(m.device_choice(), Ok(DeviceChoice::Auto));
    }

    #[test]
    fn unknown_field_names_file_and_field() {
        let err = ModelToml::parse("m.toml", &format!("max_batch = 3\n{GOOD}")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("m.toml:"), "{text}");
        assert!(text.contains("max_batch"), "{text}");
    }

    #[test]
    fn bad_device_is_named() {
        let err = ModelToml::parse("m.toml", &format!("device = \"tpu\"\n{GOOD}")).unwrap_err();
        assert!(err.to_string().contains("field `device`"), "{err}");
    }

    #[test]
    fn feature_count_must_match_shape() {
        let bad = GOOD.replace("shape = [-1, 2]", "shape = [-1, 3]");
        let err = ModelToml::parse("m.toml", &bad).unwrap_err();
        assert!(err.to_string().contains("`features`"), "{err}");
    }

    #[test]
    fn budget_beyond_default_timeout_is_refused() {
        let err = ModelToml::parse("m.toml", &format!("latency_budget_ms = 50\ndefault_timeout_ms = 20\n{GOOD}"))
            .unwrap_err();
        assert!(err.to_string().contains("field `latency_budget_ms`"), "{err}");
    }

    #[test]
    fn default_priority_must_be_a_level() {
        let err =
            ModelToml::parse("m.toml", &format!("priority_levels = 2\ndefault_priority = 3\n{GOOD}")).unwrap_err();
        assert!(err.to_string().contains("field `default_priority`"), "{err}");
        let m = ModelToml::parse("m.toml", &format!("priority_levels = 3\n{GOOD}")).expect("valid");
        assert_eq!(m.default_priority_level(), 2);
    }

    #[test]
    fn numbers_out_of_range_are_named_not_panics() {
        for (line, field) in [
            ("default_timeout_ms = 1e300", "field `default_timeout_ms`"),
            ("max_queue_delay_ms = nan", "field `max_queue_delay_ms`"),
            ("max_batch_size = 0", "field `max_batch_size`"),
            ("max_batch_size = 100000000", "field `max_batch_size`"),
            ("instances = 100000", "field `instances`"),
            ("max_cost_us = 0", "field `max_cost_us`"),
            ("[drift]\nwindow_seconds = 1e300", "field `drift.window_seconds`"),
            ("[drift]\nchannel_capacity = 1000000000", "field `drift.channel_capacity`"),
            (
                "[[inputs]]\nname = \"z\"\ndatatype = \"FP32\"\nshape = [-1, 1]\nfeatures = [{ name = \"f\", missing_value = nan }]",
                "`missing_value`",
            ),
        ] {
            let text = if line.starts_with('[') { format!("{GOOD}\n{line}\n") } else { format!("{line}\n{GOOD}") };
            let err = ModelToml::parse("m.toml", &text).unwrap_err().to_string();
            assert!(err.starts_with("m.toml:") && err.contains(field), "{line}: {err}");
        }
    }

    #[test]
    fn server_file_limits_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        for (text, field) in [
            ("[limits]\nbody_timeout_ms = 0\n", "`limits.body_timeout_ms`"),
            ("[limits]\nmax_inflight_bytes = 10\n", "`limits.max_inflight_bytes`"),
            ("max_message_bytes = 0\n", "`max_message_bytes`"),
            ("[limits]\nconnections = 3\n", "connections"),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = ServerFile::load(&path).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        std::fs::write(&path, "[limits]\nmax_connections = 8\nidle_timeout_ms = 100\n").expect("write");
        let limits = ServerFile::load(&path).expect("valid").limits;
        assert_eq!((limits.max_connections, limits.idle_timeout_ms), (8, 100));
        assert_eq!(limits.body_timeout_ms, LimitsConfig::default().body_timeout_ms);
    }

    #[test]
    fn cuda_ordinal_parses() {
        let m = ModelToml::parse("m.toml", &format!("device = \"cuda:1\"\n{GOOD}")).expect("valid");
        assert_eq!(m.device_choice(), Ok(DeviceChoice::Cuda(1)));
    }
}
