//! What `kiln bench` sends: requests built from the model's declared
//! schema (values inside each feature's valid range, sentences for text)
//! or read from a file (CSV rows of numbers, or one text per line).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};

use crate::api::pb::{self, ModelInferRequest, model_infer_request::InferInputTensor};

/// Sentences of about 14 tokens (data/sentences.txt), for text models.
pub fn sentences() -> impl Iterator<Item = &'static str> {
    include_str!("../../data/sentences.txt").lines().map(str::trim).filter(|l| !l.is_empty())
}

/// Why inputs could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("model '{0}': kiln bench generates inputs for one FP32 [-1, N] or BYTES [-1] input, not {1}")]
    Unsupported(String, String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// A fixed pool of requests, sent round-robin.
pub struct RequestPool {
    requests: Vec<ModelInferRequest>,
}

impl RequestPool {
    pub fn get(&self, i: usize) -> ModelInferRequest {
        self.requests[i % self.requests.len()].clone()
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Builds `count` distinct requests of `rows` rows each for the model
    /// `metadata` describes; `file` replaces generated values.
    pub fn new(
        metadata: &pb::ModelMetadataResponse,
        version: &str,
        rows: usize,
        file: Option<&std::path::Path>,
        count: usize,
    ) -> Result<Self, InputError> {
        let unsupported = || {
            let shapes: Vec<String> =
                metadata.inputs.iter().map(|i| format!("{} {} {:?}", i.name, i.datatype, i.shape)).collect();
            InputError::Unsupported(metadata.name.clone(), shapes.join(", "))
        };
        let [input] = metadata.inputs.as_slice() else { return Err(unsupported()) };
        let text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| InputError::File { path: path.display().to_string(), message: e.to_string() })?,
            ),
            None => None,
        };
        let path = file.map(|p| p.display().to_string()).unwrap_or_default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let (datatype, shape, raw_rows): (&str, Vec<i64>, Vec<Vec<u8>>) =
            match (input.datatype.as_str(), &input.shape[..]) {
                ("BYTES", [-1]) => {
                    let lines: Vec<&str> = match text.as_deref() {
                        Some(t) => t.lines().map(str::trim).filter(|l| !l.is_empty()).collect(),
                        None => sentences().collect(),
                    };
                    if lines.is_empty() {
                        return Err(InputError::File { path, message: "no text lines".into() });
                    }
                    let rows = lines
                        .iter()
                        .map(|l| {
                            let mut raw = (l.len() as u32).to_le_bytes().to_vec();
                            raw.extend_from_slice(l.as_bytes());
                            raw
                        })
                        .collect();
                    ("BYTES", vec![], rows)
                }
                ("FP32", [-1, width]) if *width > 0 => {
                    let width = *width as usize;
                    let values: Vec<Vec<f32>> = match &text {
                        Some(text) => csv_rows(text, width, &path)?,
                        None => {
                            let ranges = valid_ranges(metadata, &input.name, width);
                            (0..count.max(1) * rows)
                                .map(|_| {
                                    ranges
                                        .iter()
                                        .map(|r| match r {
                                            Some((lo, hi)) => rng.random_range(*lo..=*hi) as f32,
                                            None => rng.random_range(-1.0..1.0),
                                        })
                                        .collect()
                                })
                                .collect()
                        }
                    };
                    let rows = values.iter().map(|r| r.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
                    ("FP32", vec![width as i64], rows)
                }
                _ => return Err(unsupported()),
            };
        let requests = (0..count.max(1))
            .map(|i| {
                let raw: Vec<u8> = (0..rows).flat_map(|r| raw_rows[(i * rows + r) % raw_rows.len()].clone()).collect();
                let mut dims = vec![rows as i64];
                dims.extend(&shape);
                ModelInferRequest {
                    model_name: metadata.name.clone(),
                    model_version: version.to_string(),
                    id: String::new(),
                    inputs: vec![InferInputTensor {
                        name: input.name.clone(),
                        datatype: datatype.into(),
                        shape: dims,
                        parameters: HashMap::new(),
                        contents: None,
                    }],
                    raw_input_contents: vec![raw],
                    ..Default::default()
                }
            })
            .collect();
        Ok(Self { requests })
    }
}

/// Rows of `width` numbers; a header line is skipped.
fn csv_rows(text: &str, width: usize, path: &str) -> Result<Vec<Vec<f32>>, InputError> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if line.trim().is_empty() || (n == 0 && fields[0].parse::<f32>().is_err()) {
            continue;
        }
        let values: Result<Vec<f32>, _> = fields.iter().take(width).map(|f| f.parse::<f32>()).collect();
        match values {
            Ok(v) if v.len() == width => rows.push(v),
            _ => {
                return Err(InputError::File {
                    path: path.into(),
                    message: format!("line {}: expected at least {width} numbers", n + 1),
                });
            }
        }
    }
    if rows.is_empty() {
        return Err(InputError::File { path: path.into(), message: "no rows".into() });
    }
    Ok(rows)
}

/// The `valid_range` of each feature, as the server publishes it in
/// `kiln_parameters` (`INPUT.valid_ranges`, a JSON array).
fn valid_ranges(metadata: &pb::ModelMetadataResponse, input: &str, width: usize) -> Vec<Option<(f64, f64)>> {
    let key = format!("{input}.valid_ranges");
    let parsed: Option<Vec<Option<[f64; 2]>>> =
        match metadata.kiln_parameters.get(&key).and_then(|p| p.parameter_choice.as_ref()) {
            Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => serde_json::from_str(s).ok(),
            _ => None,
        };
    let mut ranges: Vec<Option<(f64, f64)>> =
        parsed.unwrap_or_default().into_iter().map(|r| r.map(|[lo, hi]| (lo, hi))).collect();
    ranges.resize(width, None);
    ranges
}
