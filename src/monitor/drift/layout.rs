//! Which parts of a model's inputs and outputs drift watches, and the
//! compact per-batch sample the executor hands over after each batch.

use crate::model::{DataType, Inputs, ModelSpec, Tensor, TensorData};

/// Widest 2-D numeric input whose columns are watched one by one; wider
/// inputs (images, raw vectors) have no per-column meaning to profile.
const MAX_FEATURE_COLUMNS: usize = 1024;
/// Widest output watched as scores; wider ones are embeddings.
const MAX_SCORE_COLUMNS: usize = 16;

/// One watched input column.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackedFeature {
    pub name: String,
    pub input: usize,
    pub column: usize,
    pub missing_value: Option<f64>,
}

impl TrackedFeature {
    /// True for the feature's "not known" value. Compared in f32, the
    /// precision values arrive in, so a sentinel like 0.1 still matches.
    pub fn is_missing(&self, x: f32) -> bool {
        self.missing_value.is_some_and(|m| m as f32 == x)
    }
}

/// One watched output column (a score).
#[derive(Debug, Clone, PartialEq)]
pub struct TrackedOutput {
    pub name: String,
    pub output: usize,
    pub column: usize,
}

/// What drift watches for one model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    pub features: Vec<TrackedFeature>,
    pub outputs: Vec<TrackedOutput>,
    /// Classes of the first watched output: below/above the threshold for
    /// one column, the arg-max column otherwise.
    pub class_names: Vec<String>,
    pub class_threshold: f64,
    /// A text model: input 0 is text, output 0 its embedding.
    pub text: bool,
}

impl Layout {
    /// The watched parts of `spec`; `text` for models that tokenize.
    pub fn of(spec: &ModelSpec, text: bool, class_threshold: f64) -> Self {
        let mut layout = Self { text, class_threshold, ..Self::default() };
        if text {
            return layout;
        }
        for (i, input) in spec.inputs.iter().enumerate() {
            let width = input.row_len();
            if input.datatype == DataType::Bytes || input.shape.len() != 2 || width > MAX_FEATURE_COLUMNS {
                continue;
            }
            for column in 0..width {
                let declared = input.features.get(column);
                layout.features.push(TrackedFeature {
                    name: declared.map_or_else(|| format!("{}[{column}]", input.name), |f| f.name.clone()),
                    input: i,
                    column,
                    missing_value: declared.and_then(|f| f.missing_value),
                });
            }
        }
        for (i, output) in spec.outputs.iter().enumerate() {
            let width = output.row_len();
            if output.datatype == DataType::Bytes || output.shape.len() != 2 || width > MAX_SCORE_COLUMNS {
                continue;
            }
            if layout.outputs.is_empty() {
                layout.class_names = if width == 1 {
                    vec![format!("below_{class_threshold}"), format!("at_or_above_{class_threshold}")]
                } else {
                    (0..width).map(|c| c.to_string()).collect()
                };
            }
            for column in 0..width {
                let name = if width == 1 {
                    format!("output:{}", output.name)
                } else {
                    format!("output:{}[{column}]", output.name)
                };
                layout.outputs.push(TrackedOutput { name, output: i, column });
            }
        }
        layout
    }

    /// The class of one row's first watched output.
    pub fn class_of(&self, scores: &[f32]) -> usize {
        let width = self.class_names.len();
        if width == 2 && scores.len() == 1 {
            return usize::from(scores[0] as f64 >= self.class_threshold);
        }
        scores
            .iter()
            .take(width)
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, s)| if *s > best.1 { (i, *s) } else { best })
            .0
    }

    /// Columns of the first watched output (the ones classes come from).
    pub fn class_columns(&self) -> usize {
        self.outputs.iter().take_while(|o| o.output == self.outputs[0].output).count()
    }

    /// The compact sample of one computed batch: copies of the watched
    /// values only, so the drift task never touches the batch itself.
    pub fn sample(&self, inputs: &Inputs, outputs: &[Tensor], request_units: Vec<u32>, unknown: u64) -> BatchSample {
        let rows = inputs.rows();
        let features = match inputs {
            Inputs::Tensors(tensors) => rows_of(tensors, &tracked(self.features.iter().map(|f| f.input)), rows),
            Inputs::Tokens(_) => Vec::new(),
        };
        let scores = rows_of(outputs, &tracked(self.outputs.iter().map(|o| o.output)), rows);
        let text = self.text.then(|| TextSample {
            token_lengths: match inputs {
                Inputs::Tokens(ids) => ids.iter().map(|r| r.len() as u32).collect(),
                Inputs::Tensors(_) => Vec::new(),
            },
            unknown_tokens: unknown,
            embeddings: match outputs.first().map(|t| &t.data) {
                Some(TensorData::Fp32(values)) => values.clone(),
                _ => Vec::new(),
            },
        });
        BatchSample { rows, features, scores, request_units, text }
    }
}

/// The distinct tensors watched, in order (every column of each is).
fn tracked(indices: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for i in indices {
        if out.last() != Some(&i) {
            out.push(i);
        }
    }
    out
}

/// The watched tensors' values as f32, row-major across them: row 0 of
/// each, then row 1 of each, ... One tensor is copied whole.
fn rows_of(tensors: &[Tensor], watched: &[usize], rows: usize) -> Vec<f32> {
    if let [only] = watched
        && let Some(TensorData::Fp32(values)) = tensors.get(*only).map(|t| &t.data)
    {
        return values.clone();
    }
    let width: usize = watched.iter().filter_map(|i| tensors.get(*i)).map(Tensor::row_len).sum();
    let mut out = Vec::with_capacity(rows * width);
    for row in 0..rows {
        for t in watched.iter().filter_map(|i| tensors.get(*i)) {
            let range = row * t.row_len()..(row + 1) * t.row_len();
            match &t.data {
                TensorData::Fp32(v) => out.extend_from_slice(&v[range]),
                TensorData::Fp64(v) => out.extend(v[range].iter().map(|x| *x as f32)),
                TensorData::Int32(v) => out.extend(v[range].iter().map(|x| *x as f32)),
                TensorData::Int64(v) => out.extend(v[range].iter().map(|x| *x as f32)),
                TensorData::Bytes(_) => out.extend(std::iter::repeat_n(f32::NAN, range.len())),
            }
        }
    }
    out
}

/// Text parts of a batch sample.
#[derive(Debug, Clone, Default)]
pub struct TextSample {
    pub token_lengths: Vec<u32>,
    pub unknown_tokens: u64,
    /// Rows × hidden, row-major.
    pub embeddings: Vec<f32>,
}

/// What drift learns from one batch.
#[derive(Debug, Clone, Default)]
pub struct BatchSample {
    pub rows: usize,
    /// Rows × watched features, row-major.
    pub features: Vec<f32>,
    /// Rows × watched outputs, row-major.
    pub scores: Vec<f32>,
    /// Units of each request in the batch.
    pub request_units: Vec<u32>,
    pub text: Option<TextSample>,
}
