//! Shadow traffic's comparison: a candidate version's answer to a copied
//! request against the primary's, exported (never returned). A one-column
//! score is a class (at or above 0.5), compared for agreement; a wider
//! FP32 output is an embedding, compared by cosine distance.

use crate::api::pb::ModelInferResponse;
use crate::monitor::metrics::{SHADOW_COMPARED, SHADOW_DISTANCE, SHADOW_DROPPED, SHADOW_DURATION};

/// What comparing one output found.
#[derive(Debug, PartialEq)]
pub enum Comparison {
    /// Rows whose class agreed, and rows compared.
    Classes { agreed: usize, rows: usize },
    /// Cosine distance per row.
    Distances(Vec<f64>),
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Compares the outputs the two answers share by name (FP32 only).
pub fn compare(primary: &ModelInferResponse, shadow: &ModelInferResponse) -> Vec<(String, Comparison)> {
    let mut out = Vec::new();
    for (i, p) in primary.outputs.iter().enumerate() {
        let Some(j) = shadow.outputs.iter().position(|s| s.name == p.name && s.datatype == p.datatype) else {
            continue;
        };
        let (Some(a), Some(b)) = (primary.raw_output_contents.get(i), shadow.raw_output_contents.get(j)) else {
            continue;
        };
        if p.datatype != "FP32" || a.len() != b.len() {
            continue;
        }
        let (a, b) = (floats(a), floats(b));
        let rows = p.shape.first().copied().unwrap_or(1).max(1) as usize;
        let width = a.len() / rows;
        if width == 0 {
            continue;
        }
        let comparison = if width == 1 {
            let agreed = a.iter().zip(&b).filter(|(x, y)| (**x >= 0.5) == (**y >= 0.5)).count();
            Comparison::Classes { agreed, rows: a.len() }
        } else {
            Comparison::Distances(a.chunks(width).zip(b.chunks(width)).map(|(x, y)| cosine_distance(x, y)).collect())
        };
        out.push((p.name.clone(), comparison));
    }
    out
}

fn cosine_distance(x: &[f32], y: &[f32]) -> f64 {
    let dot: f64 = x.iter().zip(y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
    let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
    let denominator = norm(x) * norm(y);
    if denominator == 0.0 { 0.0 } else { (1.0 - dot / denominator).max(0.0) }
}

/// Exports one comparison of `model`'s shadow `version`, and its time.
pub fn record(model: &str, version: u64, seconds: f64, comparisons: &[(String, Comparison)]) {
    let (m, v) = (model.to_string(), version.to_string());
    metrics::histogram!(SHADOW_DURATION, "model" => m.clone(), "version" => v.clone()).record(seconds);
    for (_, comparison) in comparisons {
        match comparison {
            Comparison::Classes { agreed, rows } => {
                let counter = |agree: &'static str| metrics::counter!(SHADOW_COMPARED, "model" => m.clone(), "version" => v.clone(), "agree" => agree);
                counter("true").increment(*agreed as u64);
                counter("false").increment((rows - agreed) as u64);
            }
            Comparison::Distances(distances) => {
                let histogram = metrics::histogram!(SHADOW_DISTANCE, "model" => m.clone(), "version" => v.clone());
                for d in distances {
                    histogram.record(*d);
                }
            }
        }
    }
}

/// Counts a copy that was not compared, and why.
pub fn dropped(model: &str, reason: &'static str) {
    metrics::counter!(SHADOW_DROPPED, "model" => model.to_string(), "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::model_infer_response::InferOutputTensor;

    fn answer(values: &[f32], rows: i64) -> ModelInferResponse {
        let width = values.len() as i64 / rows;
        ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "y".into(),
                datatype: "FP32".into(),
                shape: vec![rows, width],
                ..Default::default()
            }],
            raw_output_contents: vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        }
    }

    #[test]
    fn scores_compare_as_classes_and_vectors_by_cosine() {
        let classes = compare(&answer(&[0.9, 0.2, 0.6], 3), &answer(&[0.8, 0.7, 0.4], 3));
        assert_eq!(classes, vec![("y".to_string(), Comparison::Classes { agreed: 1, rows: 3 })]);
        let vectors = compare(&answer(&[1.0, 0.0, 0.0, 1.0], 2), &answer(&[1.0, 0.0, 1.0, 0.0], 2));
        let Comparison::Distances(d) = &vectors[0].1 else { panic!("{vectors:?}") };
        assert!(d[0].abs() < 1e-12 && (d[1] - 1.0).abs() < 1e-12, "{d:?}");
    }
}
