//! `[drift]` in `model.toml`: where a version's reference comes from, its
//! live windows, and when drift warns or alerts.

use serde::Deserialize;

use crate::config::MAX_DURATION_MS;

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

/// What a drift alert does to the model besides logging and exporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAlert {
    #[default]
    None,
    /// Requests go to the model's `fallback` (the model is paused; with a
    /// fallback, paused requests are answered by it).
    Fallback,
    /// The model is paused: its calls answer UNAVAILABLE, or its fallback.
    Pause,
}

/// `[drift]` section: the live windows and when drift warns or alerts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSection {
    #[serde(default)]
    pub reference: ReferenceSource,
    /// What an alert does: `none` (the default), `fallback` or `pause`.
    /// Resuming is an operator's decision (`kiln admin resume`).
    #[serde(default)]
    pub on_alert: OnAlert,
    /// Rows captured when `reference = "auto"`.
    #[serde(default = "crate::config::defaults::auto_samples")]
    pub auto_samples: usize,
    /// How far back the live window reaches.
    #[serde(default = "crate::config::defaults::window_seconds")]
    pub window_seconds: f64,
    /// Intervals the window is kept in; statistics are recomputed once per
    /// interval, and the oldest interval leaves as a new one starts.
    #[serde(default = "crate::config::defaults::window_intervals")]
    pub window_intervals: usize,
    /// Most rows the window holds; older intervals leave beyond it.
    #[serde(default = "crate::config::defaults::window_max_samples")]
    pub window_max_samples: usize,
    /// Rows the window needs before statistics are computed: fewer make PSI
    /// noise look like drift.
    #[serde(default = "crate::config::defaults::min_samples")]
    pub min_samples: usize,
    /// PSI at which a feature warns.
    #[serde(default = "crate::config::defaults::psi_warn")]
    pub psi_warn: f64,
    /// PSI at which a feature alerts.
    #[serde(default = "crate::config::defaults::psi_alert")]
    pub psi_alert: f64,
    /// Consecutive evaluations a new status must hold before it is raised
    /// or cleared, so one noisy window neither alerts nor clears.
    #[serde(default = "crate::config::defaults::hysteresis")]
    pub hysteresis: u32,
    /// Batches waiting for the drift task; beyond it samples are dropped
    /// (and counted), never slowing inference.
    #[serde(default = "crate::config::defaults::channel_capacity")]
    pub channel_capacity: usize,
    /// A one-column score at or above it is the positive class.
    #[serde(default = "crate::config::defaults::class_threshold")]
    pub class_threshold: f64,
}

impl Default for DriftSection {
    fn default() -> Self {
        toml::from_str("").expect("every [drift] field has a default")
    }
}

impl DriftSection {
    pub(crate) fn check(&self) -> Result<(), String> {
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
