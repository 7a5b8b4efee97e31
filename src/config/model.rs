//! `model.toml`: a model's kind, interface and serving settings. Each
//! kind's own section (`[mlp]`, `[bert]`) is checked by the kind itself,
//! found through the model registry; `[drift]` lives beside drift.

use serde::Deserialize;

use super::{ConfigError, MAX_DURATION_MS};
use crate::model::DataType;
pub use crate::model::DeviceChoice;
use crate::model::registry::{self, SectionFacts};
use crate::monitor::drift::config::DriftSection;

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

/// `fallback`: what answers when this model cannot (paused, unhealthy, or
/// with `fallback_on_deadline`, too slow for the deadline).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackToml {
    /// Another model (its `version`, or its default).
    pub model: Option<String>,
    /// A version (of `model`, or of this model).
    pub version: Option<u64>,
    /// A fixed answer instead: every declared output's values for one row.
    pub answer: Option<std::collections::BTreeMap<String, Vec<f64>>>,
}

/// `model.toml`: a model's kind, interface and serving settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelToml {
    /// A kind in the model registry (`mlp`, `bert`).
    pub kind: String,
    /// Free text shown in metadata.
    #[serde(default)]
    pub description: String,
    /// The version served when a request names none; default: the highest
    /// served.
    pub default_version: Option<u64>,
    /// Which version folders are served: `{ latest = N }` (default 1),
    /// `{ all = true }` or `{ specific = [..] }`.
    #[serde(default)]
    pub version_policy: crate::repository::policy::VersionPolicy,
    /// `auto`, `cpu` or `cuda:N`.
    #[serde(default = "crate::config::defaults::device")]
    pub device: String,
    /// Most requests in one batch.
    #[serde(default = "crate::config::defaults::max_batch_size")]
    pub max_batch_size: usize,
    /// Text models: most padded tokens (longest row × rows) in one batch.
    pub max_batch_tokens: Option<usize>,
    /// Longest a request waits for others to join its batch (the bound of
    /// the adaptive wait).
    #[serde(default = "crate::config::defaults::max_queue_delay_ms")]
    pub max_queue_delay_ms: f64,
    /// `adaptive` (the default): a batch that is not full waits only as
    /// long as the requests expected meanwhile pay for the wait, within
    /// its slack and `max_queue_delay_ms`; `fixed`: until one of those runs
    /// out, as Triton and TF Serving do.
    #[serde(default)]
    pub queue_delay: crate::batcher::policy::QueueWait,
    /// Most requests waiting; beyond it requests are refused at once.
    #[serde(default = "crate::config::defaults::max_queue")]
    pub max_queue: usize,
    /// Executor threads, each running batches on its own.
    #[serde(default = "crate::config::defaults::instances")]
    pub instances: usize,
    /// Target for queue + compute of each request (the p99 goal); the
    /// batcher stops waiting for company when it would be missed.
    #[serde(default = "crate::config::defaults::latency_budget_ms")]
    pub latency_budget_ms: f64,
    /// Deadline of a request that sets none (nor a gRPC deadline).
    #[serde(default = "crate::config::defaults::default_timeout_ms")]
    pub default_timeout_ms: f64,
    /// Most estimated compute one request may cost, in microseconds.
    pub max_cost_us: Option<u64>,
    /// Priority levels; 1 is the highest, as in Triton.
    #[serde(default = "crate::config::defaults::priority_levels")]
    pub priority_levels: u32,
    /// Level of a request that sets none (or 0); default: the middle one.
    pub default_priority: Option<u32>,
    pub inputs: Vec<TensorToml>,
    pub outputs: Vec<TensorToml>,
    /// What answers when this model cannot.
    pub fallback: Option<FallbackToml>,
    /// Send a request whose deadline the model cannot meet to the fallback
    /// (when the fallback can) instead of answering DEADLINE_EXCEEDED.
    #[serde(default)]
    pub fallback_on_deadline: bool,
    /// Drift monitoring: reference, windows and thresholds.
    #[serde(default)]
    pub drift: DriftSection,
    /// The kind's own section (`[mlp]`, `[bert]`), as written; the kind
    /// reads it when it loads.
    #[serde(skip)]
    pub section: Option<toml::Value>,
    /// What the kind's section says that sizing depends on.
    #[serde(skip)]
    pub facts: SectionFacts,
}

impl ModelToml {
    /// Parses and checks `model.toml` text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let error = |message: String| ConfigError::new(file, message);
        let mut table: toml::Table = toml::from_str(text).map_err(|e| error(e.to_string()))?;
        let kind = match table.get("kind") {
            Some(toml::Value::String(name)) => registry::find(name).ok_or_else(|| error(registry::unknown(name)))?,
            Some(other) => return Err(error(format!("field `kind`: expected a string, got {other}"))),
            None => return Err(error("missing field `kind`".into())),
        };
        // The kind's section is the kind's to check; any other section is
        // unknown to this struct and refused by name.
        let section = table.remove(kind.name);
        let mut parsed: Self =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| error(e.message().to_string()))?;
        parsed.facts = (kind.section)(section.as_ref()).map_err(error)?;
        parsed.section = section;
        parsed.check().map_err(error)?;
        Ok(parsed)
    }

    fn check(&self) -> Result<(), String> {
        self.device_choice()?;
        self.version_policy.check()?;
        if let (Some(v), crate::repository::policy::VersionPolicy::Specific(listed)) =
            (self.default_version, &self.version_policy)
            && !listed.contains(&v)
        {
            return Err(format!(
                "field `default_version`: version {v} is not in `version_policy.specific` {listed:?}, so it is never \
                 served"
            ));
        }
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
        if self.max_cost_us == Some(0) {
            return Err("field `max_cost_us`: must be at least 1 µs (leave it out for no cap)".into());
        }
        match (self.facts.max_tokens, self.max_batch_tokens) {
            (Some(longest), Some(tokens)) if tokens < longest => {
                return Err(format!(
                    "field `max_batch_tokens`: {tokens} is less than `{}.max_tokens` {longest}, so a single \
                     longest text could never run",
                    self.kind
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "field `max_batch_tokens`: applies to text models only; a {} model batches rows",
                    self.kind
                ));
            }
            _ => {}
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
        self.check_fallback()?;
        if self.drift.on_alert == crate::monitor::drift::config::OnAlert::Fallback && self.fallback.is_none() {
            return Err("field `drift.on_alert`: \"fallback\" needs a `fallback`".into());
        }
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

    fn check_fallback(&self) -> Result<(), String> {
        let Some(f) = &self.fallback else {
            return match self.fallback_on_deadline {
                true => Err("field `fallback_on_deadline`: needs a `fallback`".into()),
                false => Ok(()),
            };
        };
        match (&f.answer, f.model.is_some() || f.version.is_some()) {
            (Some(_), true) => Err("field `fallback`: name a model/version or give an `answer`, not both".into()),
            (None, false) => Err("field `fallback`: name a `model`, a `version`, or give an `answer`".into()),
            (None, true) => Ok(()),
            (Some(answer), false) => {
                for name in answer.keys() {
                    if !self.outputs.iter().any(|o| &o.name == name) {
                        return Err(format!("field `fallback.answer.{name}`: not a declared output"));
                    }
                }
                for o in &self.outputs {
                    let width: i64 = o.shape.iter().skip(1).product();
                    let given = answer.get(&o.name).map(Vec::len);
                    if o.datatype == "BYTES" || o.shape.iter().skip(1).any(|d| *d < 1) {
                        return Err(format!("field `fallback.answer`: output `{}` has no fixed numeric shape", o.name));
                    }
                    if given != Some(width as usize) {
                        return Err(format!(
                            "field `fallback.answer.{}`: needs {width} values (one row), got {}",
                            o.name,
                            given.map_or("none".to_string(), |n| n.to_string())
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// The most units one batch may hold: padded tokens for text models,
    /// rows for the rest.
    pub fn max_batch_units(&self) -> usize {
        match self.facts.max_tokens {
            Some(longest) => {
                self.max_batch_tokens.unwrap_or_else(|| crate::config::defaults::MAX_BATCH_TOKENS.max(longest))
            }
            None => self.max_batch_size,
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
    fn cuda_ordinal_parses() {
        let m = ModelToml::parse("m.toml", &format!("device = \"cuda:1\"\n{GOOD}")).expect("valid");
        assert_eq!(m.device_choice(), Ok(DeviceChoice::Cuda(1)));
    }
}
