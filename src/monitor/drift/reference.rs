//! Reference profiles: what a version's inputs and outputs looked like when
//! it was trusted (its training data, or its first requests), as quantile
//! histograms, rates and an embedding centroid; and the PSI that compares
//! live traffic against them.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::layout::{BatchSample, Layout};

/// Bins per histogram: ten quantile bins are the usual PSI choice; more
/// bins make the statistic noisier at the same sample size.
pub const BINS: usize = 10;

/// Bin edges and the reference's share of values in each bin. A value `x`
/// falls in bin `i` where `edges[i-1] <= x < edges[i]`; the end bins are
/// open, so values beyond the reference's range land in them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub proportions: Vec<f64>,
}

impl Histogram {
    /// Quantile edges of `values` (finite ones; the rest are ignored) and
    /// the proportions they give. Repeated quantiles (discrete data) are
    /// merged, so a bin is never empty by construction.
    pub fn from_values(values: &[f64], bins: usize) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = Vec::new();
        if !sorted.is_empty() {
            for i in 1..bins {
                let edge = sorted[(i * sorted.len() / bins).min(sorted.len() - 1)];
                // An edge at the minimum would leave the first bin empty.
                if edge > sorted[0] && edges.last() != Some(&edge) {
                    edges.push(edge);
                }
            }
        }
        let mut counts = vec![0u64; edges.len() + 1];
        for v in &sorted {
            counts[bin_of(&edges, *v)] += 1;
        }
        let n = sorted.len().max(1) as f64;
        Self { proportions: counts.iter().map(|c| *c as f64 / n).collect(), edges }
    }

    /// Integer counts (request units): adds a bin above the largest value
    /// seen, so that requests bigger than any in the reference fall apart
    /// from them (with a one-row-per-request reference, every request
    /// would otherwise share one bin and no change could show).
    pub fn from_counts(values: &[f64], bins: usize) -> Self {
        let mut h = Self::from_values(values, bins);
        if let Some(max) = values.iter().copied().filter(|v| v.is_finite()).reduce(f64::max) {
            h.edges.push(max + 0.5);
            h.proportions.push(0.0);
        }
        h
    }

    /// The bin `x` falls in.
    pub fn bin(&self, x: f64) -> usize {
        bin_of(&self.edges, x)
    }

    pub fn bins(&self) -> usize {
        self.edges.len() + 1
    }

    fn check(&self, what: &str) -> Result<(), String> {
        if self.proportions.len() != self.edges.len() + 1 {
            return Err(format!("{what}: {} edges need {} proportions", self.edges.len(), self.edges.len() + 1));
        }
        if self.edges.windows(2).any(|w| w[0] >= w[1]) || self.edges.iter().any(|e| !e.is_finite()) {
            return Err(format!("{what}: edges must be finite and increasing"));
        }
        if self.proportions.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return Err(format!("{what}: proportions must be in [0, 1]"));
        }
        Ok(())
    }
}

fn bin_of(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|e| *e <= x)
}

/// Population stability index of live counts against reference
/// proportions taken from `reference_rows` rows:
/// `sum (live - ref) * ln(live / ref)` over bins.
///
/// Both sides get half a count added to every bin (additive smoothing), so
/// an empty bin gives a large but finite term instead of infinity, and a
/// small sample is pulled towards uniform rather than towards zero.
pub fn psi(reference: &[f64], reference_rows: u64, live: &[u64]) -> f64 {
    let k = reference.len() as f64;
    let live_n: u64 = live.iter().sum();
    let smooth = |count: f64, n: f64| (count + 0.5) / (n + 0.5 * k);
    reference
        .iter()
        .zip(live)
        .map(|(p, c)| {
            let r = smooth(p * reference_rows as f64, reference_rows as f64);
            let l = smooth(*c as f64, live_n as f64);
            (l - r) * (l / r).ln()
        })
        .sum()
}

/// Cosine distance `1 - cos` between two vectors (1 when either is zero).
pub fn cosine_distance(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 { 1.0 } else { 1.0 - dot / (na * nb) }
}

/// One input feature (or output score) in the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureReference {
    pub name: String,
    #[serde(flatten)]
    pub histogram: Histogram,
    /// Smallest and largest value seen: live values outside are counted as
    /// out of range (only the model's `valid_range` refuses them).
    pub training_range: [f64; 2],
    /// Share of rows where the value was missing (an empty CSV cell, NaN,
    /// or the feature's `missing_value`).
    pub missing_rate: f64,
}

/// Output class rates: the share of rows per predicted class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReference {
    pub names: Vec<String>,
    pub rates: Vec<f64>,
}

/// Text models: token lengths, unknown tokens and the embedding centroid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextReference {
    pub token_lengths: Histogram,
    /// Unknown tokens over all tokens.
    pub unknown_rate: f64,
    /// Mean embedding.
    pub centroid: Vec<f64>,
    /// The 99th percentile of the cosine distance between the centroids of
    /// two random halves of the reference: how far apart samples of the
    /// same traffic land by chance (the bootstrap the thresholds scale from).
    pub split_distance_p99: f64,
}

/// A version's drift reference, as `reference.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Where it came from (the data file, or the first requests).
    pub source: String,
    pub rows: u64,
    pub features: Vec<FeatureReference>,
    pub outputs: Vec<FeatureReference>,
    pub classes: Option<ClassReference>,
    pub text: Option<TextReference>,
    /// Units per request (rows, or tokens for text): what cost is made of.
    pub request_units: Histogram,
}

/// Raw values a reference is built from, column by column.
#[derive(Debug, Default, Clone)]
pub struct ProfileData {
    /// Per tracked feature; NaN marks a missing value.
    pub features: Vec<Vec<f64>>,
    /// Per tracked output column.
    pub outputs: Vec<Vec<f64>>,
    /// Rows per predicted class.
    pub class_counts: Vec<u64>,
    /// Text: tokens per row, unknown tokens in all, embeddings per row.
    pub token_lengths: Vec<f64>,
    pub unknown_tokens: u64,
    pub embeddings: Vec<Vec<f32>>,
    /// Per request.
    pub request_units: Vec<f64>,
    pub rows: u64,
}

impl ProfileData {
    pub fn new(layout: &Layout) -> Self {
        Self {
            features: vec![Vec::new(); layout.features.len()],
            outputs: vec![Vec::new(); layout.outputs.len()],
            class_counts: vec![0; layout.class_names.len()],
            ..Default::default()
        }
    }

    /// Adds one batch's sample: a feature's `missing_value` becomes NaN,
    /// so that it counts as missing.
    pub fn add(&mut self, layout: &Layout, sample: &BatchSample) {
        self.rows += sample.rows as u64;
        let nf = layout.features.len();
        if nf > 0 {
            for row in sample.features.chunks(nf) {
                for ((x, column), f) in row.iter().zip(&mut self.features).zip(&layout.features) {
                    column.push(if f.is_missing(*x) { f64::NAN } else { *x as f64 });
                }
            }
        }
        let no = layout.outputs.len();
        if no > 0 {
            let class_columns = layout.class_columns();
            for row in sample.scores.chunks(no) {
                for (x, column) in row.iter().zip(&mut self.outputs) {
                    column.push(*x as f64);
                }
                if let Some(slot) = self.class_counts.get_mut(layout.class_of(&row[..class_columns])) {
                    *slot += 1;
                }
            }
        }
        if let Some(text) = &sample.text {
            self.token_lengths.extend(text.token_lengths.iter().map(|l| *l as f64));
            self.unknown_tokens += text.unknown_tokens;
            let rows = text.token_lengths.len().max(1);
            let hidden = text.embeddings.len() / rows;
            if hidden > 0 {
                self.embeddings.extend(text.embeddings.chunks(hidden).map(<[f32]>::to_vec));
            }
        }
        self.request_units.extend(sample.request_units.iter().map(|u| *u as f64));
    }
}

/// Halves drawn for the embedding bootstrap.
const SPLITS: usize = 200;

impl Reference {
    /// Builds a reference from collected values. Deterministic: the
    /// bootstrap uses a fixed seed.
    pub fn build(layout: &Layout, data: &ProfileData, source: String) -> Self {
        let column = |name: &str, values: &[f64]| {
            let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
            let (low, high) =
                finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)));
            FeatureReference {
                name: name.to_string(),
                histogram: Histogram::from_values(&finite, BINS),
                training_range: if finite.is_empty() { [0.0, 0.0] } else { [low, high] },
                missing_rate: (values.len() - finite.len()) as f64 / values.len().max(1) as f64,
            }
        };
        let features = layout.features.iter().zip(&data.features).map(|(f, v)| column(&f.name, v)).collect();
        let outputs = layout.outputs.iter().zip(&data.outputs).map(|(o, v)| column(&o.name, v)).collect();
        let classes = (!layout.class_names.is_empty()).then(|| {
            let n = data.class_counts.iter().sum::<u64>().max(1) as f64;
            ClassReference {
                names: layout.class_names.clone(),
                rates: data.class_counts.iter().map(|c| *c as f64 / n).collect(),
            }
        });
        let text = layout.text.then(|| {
            let tokens: f64 = data.token_lengths.iter().sum();
            TextReference {
                token_lengths: Histogram::from_counts(&data.token_lengths, BINS),
                unknown_rate: data.unknown_tokens as f64 / tokens.max(1.0),
                centroid: centroid(data.embeddings.iter().map(Vec::as_slice)),
                split_distance_p99: split_distance_p99(&data.embeddings),
            }
        });
        Self {
            source,
            rows: data.rows,
            features,
            outputs,
            classes,
            text,
            request_units: Histogram::from_counts(&data.request_units, BINS),
        }
    }

    /// Checks a reference read from a file against the model it is for.
    pub fn check(&self, layout: &Layout) -> Result<(), String> {
        let names = |list: &[FeatureReference]| list.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
        let expected: Vec<String> = layout.features.iter().map(|f| f.name.clone()).collect();
        if names(&self.features) != expected {
            return Err(format!(
                "field `features`: names {:?}, but the model's are {expected:?}",
                names(&self.features)
            ));
        }
        let expected: Vec<String> = layout.outputs.iter().map(|o| o.name.clone()).collect();
        if names(&self.outputs) != expected {
            return Err(format!("field `outputs`: names {:?}, but the model's are {expected:?}", names(&self.outputs)));
        }
        for f in self.features.iter().chain(&self.outputs) {
            f.histogram.check(&format!("feature `{}`", f.name))?;
        }
        self.request_units.check("field `request_units`")?;
        if let Some(c) = &self.classes
            && c.names.len() != c.rates.len()
        {
            return Err("field `classes`: names and rates differ in length".into());
        }
        match (&self.text, layout.text) {
            (Some(t), true) => t.token_lengths.check("field `text.token_lengths`")?,
            (None, true) => return Err("field `text`: a text model's reference needs it".into()),
            (Some(_), false) => return Err("field `text`: only text models have it".into()),
            (None, false) => {}
        }
        if self.rows == 0 {
            return Err("field `rows`: a reference needs at least one row".into());
        }
        Ok(())
    }
}

/// Mean of the vectors (empty when there are none).
pub fn centroid<'a>(rows: impl Iterator<Item = &'a [f32]>) -> Vec<f64> {
    let mut sum: Vec<f64> = Vec::new();
    let mut n = 0usize;
    for row in rows {
        if sum.is_empty() {
            sum = vec![0.0; row.len()];
        }
        for (s, x) in sum.iter_mut().zip(row) {
            *s += *x as f64;
        }
        n += 1;
    }
    sum.iter().map(|s| s / n.max(1) as f64).collect()
}

/// Splits the embeddings into random halves `SPLITS` times and returns the
/// 99th percentile of the distance between the halves' centroids.
fn split_distance_p99(embeddings: &[Vec<f32>]) -> f64 {
    if embeddings.len() < 4 {
        return 0.0;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6e);
    let mut order: Vec<usize> = (0..embeddings.len()).collect();
    let half = embeddings.len() / 2;
    let mut distances: Vec<f64> = (0..SPLITS)
        .map(|_| {
            order.shuffle(&mut rng);
            let a = centroid(order[..half].iter().map(|i| embeddings[*i].as_slice()));
            let b = centroid(order[half..2 * half].iter().map(|i| embeddings[*i].as_slice()));
            cosine_distance(&a, &b)
        })
        .collect();
    distances.sort_by(f64::total_cmp);
    distances[(distances.len() * 99 / 100).min(distances.len() - 1)]
}

/// Embedding-centroid thresholds `(warn, alert)` for a live window of
/// `live_rows` against a reference of `reference_rows`.
///
/// The chance distance between two centroids grows with the variance of
/// their difference, `1/m + 1/n` for samples of m and n rows (the cosine
/// distance is quadratic in the angle, the angle linear in the standard
/// error); the reference's split halves measured it at `4/n`. Warn at the
/// scaled 99th percentile, alert at 2.5 times it (the PSI ratio 0.25/0.1).
pub fn centroid_thresholds(text: &TextReference, reference_rows: u64, live_rows: u64) -> (f64, f64) {
    let n = reference_rows.max(2) as f64;
    let m = live_rows.max(1) as f64;
    let warn = text.split_distance_p99 * (1.0 / m + 1.0 / n) / (4.0 / n);
    (warn, warn * 2.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_edges_split_evenly() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let h = Histogram::from_values(&values, 10);
        assert_eq!(h.edges.len(), 9);
        for p in &h.proportions {
            assert!((p - 0.1).abs() < 1e-9, "{:?}", h.proportions);
        }
        assert_eq!(h.bin(-5.0), 0);
        assert_eq!(h.bin(1e9), 9);
    }

    #[test]
    fn discrete_values_merge_edges_and_leave_no_empty_bin() {
        let values: Vec<f64> = (0..100).map(|i| (i % 3) as f64).collect();
        let h = Histogram::from_values(&values, 10);
        assert_eq!(h.bins(), 3, "{h:?}");
        assert!(h.proportions.iter().all(|p| *p > 0.3));
    }

    #[test]
    fn psi_is_zero_for_identical_and_finite_for_empty_bins() {
        let reference = [0.25, 0.25, 0.25, 0.25];
        assert!(psi(&reference, 1000, &[250, 250, 250, 250]).abs() < 1e-12);
        let shifted = psi(&reference, 1000, &[0, 0, 0, 1000]);
        assert!(shifted.is_finite() && shifted > 1.0, "{shifted}");
    }

    #[test]
    fn psi_matches_the_formula_on_a_known_shift() {
        // Large counts make smoothing negligible: 0.5/0.5 against 0.6/0.4.
        let value = psi(&[0.5, 0.5], 1_000_000, &[600_000, 400_000]);
        let expected = 0.1 * (0.6f64 / 0.5).ln() + (-0.1) * (0.4f64 / 0.5).ln();
        assert!((value - expected).abs() < 1e-5, "{value} vs {expected}");
    }

    #[test]
    fn cosine_distance_basics() {
        assert!(cosine_distance(&[1.0, 0.0], &[2.0, 0.0]).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 1.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn centroid_thresholds_shrink_with_more_live_rows() {
        let text = TextReference {
            token_lengths: Histogram::from_values(&[1.0], 10),
            unknown_rate: 0.0,
            centroid: vec![1.0],
            split_distance_p99: 0.01,
        };
        let (small, _) = centroid_thresholds(&text, 1000, 100);
        let (large, alert) = centroid_thresholds(&text, 1000, 10_000);
        assert!(small > large);
        assert!((alert / large - 2.5).abs() < 1e-12);
        // Live window of half the reference: exactly the split distance.
        let (half, _) = centroid_thresholds(&text, 1000, 500);
        assert!((half - 0.0075).abs() < 1e-12, "{half}");
    }
}
