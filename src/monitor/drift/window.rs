//! The live window: a ring of per-interval counts (the newest interval
//! added, the oldest subtracted as it leaves), the statistics computed from
//! it against the reference, and the hysteresis that turns them into
//! ok/warn/alert transitions. Pure logic: time is passed in.

use std::collections::VecDeque;
use std::time::Duration;

use super::layout::{BatchSample, Layout};
use super::reference::{Reference, centroid_thresholds, cosine_distance, psi};
use crate::config::DriftSection;

/// When the window judges and how.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSettings {
    pub interval: Duration,
    pub intervals: u64,
    pub max_rows: u64,
    pub min_rows: u64,
    pub psi_warn: f64,
    pub psi_alert: f64,
    pub hysteresis: u32,
}

impl From<&DriftSection> for WindowSettings {
    fn from(d: &DriftSection) -> Self {
        Self {
            interval: Duration::from_secs_f64(d.window_seconds / d.window_intervals as f64),
            intervals: d.window_intervals as u64,
            max_rows: d.window_max_samples as u64,
            min_rows: d.min_samples as u64,
            psi_warn: d.psi_warn,
            psi_alert: d.psi_alert,
            hysteresis: d.hysteresis,
        }
    }
}

/// A status level, as `kiln_drift_status` exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    #[default]
    Ok = 0,
    Warn = 1,
    Alert = 2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Alert => "alert",
        }
    }

    fn of(value: f64, warn: f64, alert: f64) -> Self {
        if value >= alert {
            Self::Alert
        } else if value >= warn {
            Self::Warn
        } else {
            Self::Ok
        }
    }
}

/// What a watched statistic describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Input,
    Output,
    Text,
    Cost,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
            Self::Text => "text",
            Self::Cost => "cost",
        }
    }
}

/// The feature label of the token-length statistic.
pub const TOKENS_FEATURE: &str = "text:tokens";
/// The feature label of the embedding-centroid statistic.
pub const CENTROID_FEATURE: &str = "output:embedding_centroid";
/// The feature label of the request-units statistic.
pub const COST_FEATURE: &str = "request_units";

/// Counts over some stretch of traffic; the same shape for one interval
/// and for the whole window, so intervals add and subtract.
#[derive(Debug, Clone, Default)]
struct Counts {
    rows: u64,
    /// One per histogram statistic, in `Window::watched` order.
    bins: Vec<Vec<u64>>,
    out_of_range: Vec<u64>,
    missing: Vec<u64>,
    /// Per feature: requests refused at the door for a NaN or infinite value.
    non_finite: Vec<u64>,
    refused_rows: u64,
    classes: Vec<u64>,
    unknown_tokens: u64,
    tokens: u64,
    embedding_sum: Vec<f64>,
    embedded_rows: u64,
}

impl Counts {
    /// Back to zero, keeping every allocation.
    fn reset(&mut self) {
        for v in self.bins.iter_mut().map(Vec::as_mut_slice).chain([
            self.out_of_range.as_mut_slice(),
            self.missing.as_mut_slice(),
            self.non_finite.as_mut_slice(),
            self.classes.as_mut_slice(),
        ]) {
            v.fill(0);
        }
        self.embedding_sum.fill(0.0);
        (self.rows, self.refused_rows, self.unknown_tokens, self.tokens, self.embedded_rows) = (0, 0, 0, 0, 0);
    }

    fn merge(&mut self, other: &Counts, add: bool) {
        fn each(a: &mut [u64], b: &[u64], add: bool) {
            for (x, y) in a.iter_mut().zip(b) {
                *x = if add { *x + y } else { x.saturating_sub(*y) };
            }
        }
        let scalar = |x: &mut u64, y: u64| *x = if add { *x + y } else { x.saturating_sub(y) };
        scalar(&mut self.rows, other.rows);
        scalar(&mut self.refused_rows, other.refused_rows);
        scalar(&mut self.unknown_tokens, other.unknown_tokens);
        scalar(&mut self.tokens, other.tokens);
        scalar(&mut self.embedded_rows, other.embedded_rows);
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            each(a, b, add);
        }
        each(&mut self.out_of_range, &other.out_of_range, add);
        each(&mut self.missing, &other.missing, add);
        each(&mut self.non_finite, &other.non_finite, add);
        each(&mut self.classes, &other.classes, add);
        if self.embedding_sum.len() < other.embedding_sum.len() {
            self.embedding_sum.resize(other.embedding_sum.len(), 0.0);
        }
        for (a, b) in self.embedding_sum.iter_mut().zip(&other.embedding_sum) {
            *a += if add { *b } else { -*b };
        }
    }
}

/// One statistic the window judges.
#[derive(Debug, Clone)]
struct Watched {
    name: String,
    kind: Kind,
    /// Index into `Counts::bins`, or `None` for the embedding centroid.
    bins: Option<usize>,
    status: Hysteresis,
}

/// Raises or clears a status only after `needed` consecutive evaluations
/// agree on the new level.
#[derive(Debug, Clone, Copy, Default)]
struct Hysteresis {
    level: Level,
    candidate: Level,
    streak: u32,
}

impl Hysteresis {
    fn step(&mut self, observed: Level, needed: u32) -> Option<Level> {
        if observed == self.level {
            self.streak = 0;
            return None;
        }
        if observed == self.candidate {
            self.streak += 1;
        } else {
            self.candidate = observed;
            self.streak = 1;
        }
        if self.streak >= needed {
            let from = self.level;
            self.level = observed;
            self.streak = 0;
            return Some(from);
        }
        None
    }
}

/// One statistic as last judged.
#[derive(Debug, Clone, PartialEq)]
pub struct StatisticReport {
    pub name: String,
    pub kind: Kind,
    /// `psi` or `cosine_distance`.
    pub statistic: &'static str,
    pub value: f64,
    pub warn: f64,
    pub alert: f64,
    /// After hysteresis.
    pub status: Level,
    pub edges: Vec<f64>,
    pub reference: Vec<f64>,
    pub live: Vec<f64>,
    /// Inputs only: shares of the window's rows.
    pub out_of_range_rate: f64,
    pub missing_rate: f64,
    /// Share of rows (answered or refused) refused for a NaN or infinity.
    pub non_finite_rate: f64,
}

/// A predicted class's share, reference against live.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassRate {
    pub name: String,
    pub reference: f64,
    pub live: f64,
}

/// The window as last judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub rows: u64,
    pub span: Duration,
    pub statistics: Vec<StatisticReport>,
    pub classes: Vec<ClassRate>,
    /// Text: (reference, live) unknown tokens over all tokens.
    pub unknown_token_rate: Option<(f64, f64)>,
}

/// A status change, logged once and exported.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub feature: String,
    pub from: Level,
    pub to: Level,
    pub value: f64,
}

/// The live window of one model version.
pub struct Window {
    reference: Reference,
    layout: Layout,
    settings: WindowSettings,
    watched: Vec<Watched>,
    /// (interval number, its counts), oldest first.
    ring: VecDeque<(u64, Counts)>,
    totals: Counts,
    empty: Counts,
    /// Reused for each sample's counts, so ingesting allocates nothing.
    scratch: Counts,
}

impl Window {
    pub fn new(reference: Reference, layout: Layout, settings: WindowSettings) -> Self {
        let mut watched = Vec::new();
        let mut bins = Vec::new();
        let mut histogram = |name: &str, kind: Kind, size: usize| {
            watched.push(Watched {
                name: name.to_string(),
                kind,
                bins: Some(bins.len()),
                status: Hysteresis::default(),
            });
            bins.push(vec![0u64; size]);
        };
        for f in &reference.features {
            histogram(&f.name, Kind::Input, f.histogram.bins());
        }
        for o in &reference.outputs {
            histogram(&o.name, Kind::Output, o.histogram.bins());
        }
        if let Some(text) = &reference.text {
            histogram(TOKENS_FEATURE, Kind::Text, text.token_lengths.bins());
        }
        histogram(COST_FEATURE, Kind::Cost, reference.request_units.bins());
        if reference.text.is_some() {
            watched.push(Watched {
                name: CENTROID_FEATURE.into(),
                kind: Kind::Output,
                bins: None,
                status: Hysteresis::default(),
            });
        }
        let n = reference.features.len();
        let empty = Counts {
            bins,
            out_of_range: vec![0; n],
            missing: vec![0; n],
            non_finite: vec![0; n],
            classes: vec![0; reference.classes.as_ref().map_or(0, |c| c.names.len())],
            ..Counts::default()
        };
        Self {
            reference,
            layout,
            settings,
            watched,
            ring: VecDeque::new(),
            totals: empty.clone(),
            scratch: empty.clone(),
            empty,
        }
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The names of every statistic judged, in report order.
    pub fn statistic_names(&self) -> impl Iterator<Item = &str> {
        self.watched.iter().map(|w| w.name.as_str())
    }

    fn interval_of(&self, now: Duration) -> u64 {
        (now.as_nanos() / self.settings.interval.as_nanos().max(1)) as u64
    }

    /// Drops intervals that left the window by age or by the row bound.
    fn expire(&mut self, now: Duration) {
        let current = self.interval_of(now);
        while let Some((number, _)) = self.ring.front() {
            let too_old = number + self.settings.intervals <= current;
            let too_many = self.ring.len() > 1 && self.totals.rows > self.settings.max_rows;
            if !(too_old || too_many) {
                break;
            }
            let (_, counts) = self.ring.pop_front().expect("front exists");
            self.totals.merge(&counts, false);
        }
    }

    fn current(&mut self, now: Duration) -> &mut Counts {
        self.expire(now);
        let number = self.interval_of(now);
        if self.ring.back().is_none_or(|(n, _)| *n != number) {
            self.ring.push_back((number, self.empty.clone()));
        }
        &mut self.ring.back_mut().expect("just pushed").1
    }

    /// Adds one batch's sample.
    pub fn ingest(&mut self, now: Duration, sample: &BatchSample) {
        let mut counts = std::mem::take(&mut self.scratch);
        counts.reset();
        count_sample(&self.reference, &self.layout, &mut counts, sample);
        self.current(now).merge(&counts, true);
        self.totals.merge(&counts, true);
        self.scratch = counts;
    }

    /// A request refused at the door for a non-finite value of `feature`.
    pub fn refused(&mut self, now: Duration, feature: Option<usize>) {
        let mut counts = self.empty.clone();
        counts.refused_rows = 1;
        if let Some(slot) = feature.and_then(|f| counts.non_finite.get_mut(f)) {
            *slot = 1;
        }
        self.current(now).merge(&counts, true);
        self.totals.merge(&counts, true);
    }

    /// Rows in the window now.
    pub fn rows(&mut self, now: Duration) -> u64 {
        self.expire(now);
        self.totals.rows
    }

    /// Judges the window: `None` while it holds fewer rows than the
    /// minimum (statuses keep their level), else the report and the status
    /// changes this evaluation made.
    pub fn evaluate(&mut self, now: Duration) -> Option<(Report, Vec<Transition>)> {
        self.expire(now);
        let t = &self.totals;
        if t.rows < self.settings.min_rows {
            return None;
        }
        let rows = t.rows as f64;
        let mut statistics = Vec::with_capacity(self.watched.len());
        let mut transitions = Vec::new();
        let histograms: Vec<_> = self
            .reference
            .features
            .iter()
            .chain(&self.reference.outputs)
            .map(|f| &f.histogram)
            .chain(self.reference.text.as_ref().map(|t| &t.token_lengths))
            .chain(std::iter::once(&self.reference.request_units))
            .collect();
        for (i, w) in self.watched.iter_mut().enumerate() {
            let (statistic, value, warn, alert, edges, reference, live) = match w.bins {
                Some(b) => {
                    let h = histograms[b];
                    let counts = &t.bins[b];
                    let total = counts.iter().sum::<u64>().max(1) as f64;
                    (
                        "psi",
                        psi(&h.proportions, self.reference.rows, counts),
                        self.settings.psi_warn,
                        self.settings.psi_alert,
                        h.edges.clone(),
                        h.proportions.clone(),
                        counts.iter().map(|c| *c as f64 / total).collect(),
                    )
                }
                None => {
                    let text = self.reference.text.as_ref().expect("centroid is watched for text models only");
                    let live: Vec<f64> = t.embedding_sum.iter().map(|s| s / t.embedded_rows.max(1) as f64).collect();
                    let (warn, alert) = centroid_thresholds(text, self.reference.rows, t.embedded_rows);
                    ("cosine_distance", cosine_distance(&live, &text.centroid), warn, alert, vec![], vec![], vec![])
                }
            };
            if let Some(from) = w.status.step(Level::of(value, warn, alert), self.settings.hysteresis) {
                transitions.push(Transition { feature: w.name.clone(), from, to: w.status.level, value });
            }
            let input = (w.kind == Kind::Input).then_some(i);
            let rate = |v: &[u64], denominator: f64| input.map_or(0.0, |f| v[f] as f64 / denominator.max(1.0));
            statistics.push(StatisticReport {
                name: w.name.clone(),
                kind: w.kind,
                statistic,
                value,
                warn,
                alert,
                status: w.status.level,
                edges,
                reference,
                live,
                out_of_range_rate: rate(&t.out_of_range, rows),
                missing_rate: rate(&t.missing, rows),
                non_finite_rate: rate(&t.non_finite, rows + t.refused_rows as f64),
            });
        }
        let classes = self
            .reference
            .classes
            .iter()
            .flat_map(|c| {
                let total = t.classes.iter().sum::<u64>().max(1) as f64;
                c.names.iter().zip(&c.rates).zip(&t.classes).map(move |((name, r), live)| ClassRate {
                    name: name.clone(),
                    reference: *r,
                    live: *live as f64 / total,
                })
            })
            .collect();
        let unknown_token_rate = self
            .reference
            .text
            .as_ref()
            .map(|text| (text.unknown_rate, t.unknown_tokens as f64 / t.tokens.max(1) as f64));
        let first = self.ring.front().map_or(0, |(n, _)| *n);
        let span = self.settings.interval * (self.interval_of(now) - first + 1) as u32;
        Some((Report { rows: t.rows, span, statistics, classes, unknown_token_rate }, transitions))
    }
}

/// A batch sample as counts, binned against the reference.
fn count_sample(reference: &Reference, layout: &Layout, c: &mut Counts, sample: &BatchSample) {
    c.rows = sample.rows as u64;
    let nf = layout.features.len();
    if nf > 0 {
        for row in sample.features.chunks(nf) {
            for (j, (x, f)) in row.iter().zip(&reference.features).enumerate() {
                if x.is_nan() || layout.features[j].is_missing(*x) {
                    c.missing[j] += 1;
                    continue;
                }
                let x = *x as f64;
                let [low, high] = f.training_range;
                if x < low || x > high {
                    c.out_of_range[j] += 1;
                }
                c.bins[j][f.histogram.bin(x)] += 1;
            }
        }
    }
    let no = layout.outputs.len();
    if no > 0 {
        let class_columns = layout.class_columns();
        for row in sample.scores.chunks(no) {
            for (j, (x, o)) in row.iter().zip(&reference.outputs).enumerate() {
                if x.is_finite() {
                    c.bins[nf + j][o.histogram.bin(*x as f64)] += 1;
                }
            }
            if let Some(slot) = c.classes.get_mut(layout.class_of(&row[..class_columns])) {
                *slot += 1;
            }
        }
    }
    let mut next = nf + no;
    if let (Some(text), Some(sample_text)) = (&reference.text, &sample.text) {
        for len in &sample_text.token_lengths {
            c.bins[next][text.token_lengths.bin(*len as f64)] += 1;
            c.tokens += *len as u64;
        }
        c.unknown_tokens = sample_text.unknown_tokens;
        let hidden = text.centroid.len();
        if hidden > 0 {
            c.embedding_sum.resize(hidden, 0.0);
            for row in sample_text.embeddings.chunks(hidden) {
                for (s, x) in c.embedding_sum.iter_mut().zip(row) {
                    *s += *x as f64;
                }
                c.embedded_rows += 1;
            }
        }
        next += 1;
    }
    for units in &sample.request_units {
        c.bins[next][reference.request_units.bin(*units as f64)] += 1;
    }
}
