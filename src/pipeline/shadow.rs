//! Shadow traffic's comparison: a candidate version's answer to a copied
//! request against the primary's, exported (never returned). A one-column
//! score is a class (at or above 0.5), compared for agreement; a wider
//! FP32 output is an embedding, compared by cosine distance.

use super::Answer;
use crate::model::{ModelSpec, TensorData};
use crate::monitor::metrics::{SHADOW_COMPARED, SHADOW_DISTANCE, SHADOW_DROPPED, SHADOW_DURATION};

/// What comparing one output found.
#[derive(Debug, PartialEq)]
pub enum Comparison {
    /// Rows whose class agreed, and rows compared.
    Classes { agreed: usize, rows: usize },
    /// Cosine distance per row.
    Distances(Vec<f64>),
}

/// One answer's FP32 outputs by name, with their rows.
fn fp32_outputs<'a>(spec: &'a ModelSpec, answer: &'a Answer) -> impl Iterator<Item = (&'a str, &'a [f32], usize)> {
    answer.outputs.iter().zip(&answer.response.outputs).filter_map(|(&o, tensor)| match &tensor.data {
        TensorData::Fp32(values) => Some((spec.outputs.get(o)?.name.as_str(), values.as_slice(), tensor.rows())),
        _ => None,
    })
}

/// Compares the FP32 outputs the two answers share by name, each answer
/// with the spec of the version that gave it.
pub fn compare(primary: (&ModelSpec, &Answer), shadow: (&ModelSpec, &Answer)) -> Vec<(String, Comparison)> {
    let mut out = Vec::new();
    for (name, a, rows) in fp32_outputs(primary.0, primary.1) {
        let Some((_, b, _)) = fp32_outputs(shadow.0, shadow.1).find(|(n, _, _)| *n == name) else {
            continue;
        };
        if a.len() != b.len() {
            continue;
        }
        let width = a.len() / rows.max(1);
        if width == 0 {
            continue;
        }
        let comparison = if width == 1 {
            let agreed = a.iter().zip(b).filter(|(x, y)| (**x >= 0.5) == (**y >= 0.5)).count();
            Comparison::Classes { agreed, rows: a.len() }
        } else {
            Comparison::Distances(a.chunks(width).zip(b.chunks(width)).map(|(x, y)| cosine_distance(x, y)).collect())
        };
        out.push((name.to_string(), comparison));
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
    use crate::model::{DataType, Tensor, TensorSpec};
    use crate::request::{InferResponse, Timing};

    fn spec() -> ModelSpec {
        let y = TensorSpec { name: "y".into(), datatype: DataType::Fp32, shape: vec![-1, -1], features: vec![] };
        ModelSpec::in_memory("m", vec![], vec![y])
    }

    fn answer(values: &[f32], rows: usize) -> Answer {
        let tensor = Tensor { shape: vec![rows, values.len() / rows], data: TensorData::Fp32(values.to_vec()) };
        Answer {
            id: String::new(),
            outputs: vec![0],
            response: InferResponse { outputs: vec![tensor], timing: Timing::default() },
            server_us: 0,
            units: rows,
        }
    }

    #[test]
    fn scores_compare_as_classes_and_vectors_by_cosine() {
        let spec = spec();
        let classes = compare((&spec, &answer(&[0.9, 0.2, 0.6], 3)), (&spec, &answer(&[0.8, 0.7, 0.4], 3)));
        assert_eq!(classes, vec![("y".to_string(), Comparison::Classes { agreed: 1, rows: 3 })]);
        let vectors = compare((&spec, &answer(&[1.0, 0.0, 0.0, 1.0], 2)), (&spec, &answer(&[1.0, 0.0, 1.0, 0.0], 2)));
        let Comparison::Distances(d) = &vectors[0].1 else { panic!("{vectors:?}") };
        assert!(d[0].abs() < 1e-12 && (d[1] - 1.0).abs() < 1e-12, "{d:?}");
    }
}
