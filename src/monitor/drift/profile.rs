//! `kiln profile`: writes a version's drift reference by running the real
//! model over a data file (CSV with a header for row models, one text per
//! line for text models), so output scores and embeddings in the reference
//! come from the same weights that serve.

use std::path::Path;

use super::layout::Layout;
use super::reference::{ProfileData, Reference};
use crate::model::tokenize::TokenizeOptions;
use crate::model::{DataType, Inputs, Model, ModelSpec, Tensor, TensorData};

/// Rows run through the model at once while profiling.
const PROFILE_BATCH: usize = 32;

/// Why a profile could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{file}: {message}")]
    Data { file: String, message: String },
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
}

/// Reads `data` and runs `model` over it; the reference's `source` names
/// the file.
pub fn profile(model: &Model, layout: &Layout, data: &Path) -> Result<Reference, ProfileError> {
    let spec = &model.spec;
    let file = data.display().to_string();
    let fail = |message: String| ProfileError::Data { file: file.clone(), message };
    let text = std::fs::read_to_string(data).map_err(|e| fail(format!("cannot read: {e}")))?;
    let batches = if layout.text { text_batches(&text) } else { row_batches(&text, spec, layout).map_err(fail)? };
    if batches.is_empty() {
        return Err(fail("no rows".into()));
    }
    let mut collected = ProfileData::new(layout);
    for inputs in batches {
        let (inputs, prepared) = model.prepare(inputs, &TokenizeOptions { max_tokens: None, truncate: Some(true) })?;
        let outputs = model.backend.run(&inputs)?;
        let request_units = match &inputs {
            Inputs::Tokens(rows) => rows.iter().map(|r| r.len() as u32).collect(),
            Inputs::Tensors(_) => vec![1; inputs.rows()],
        };
        collected.add(layout, &layout.sample(&inputs, &outputs, request_units, prepared.unknown as u64));
    }
    Ok(Reference::build(layout, &collected, format!("kiln profile --data {file}")))
}

fn text_batches(text: &str) -> Vec<Vec<Tensor>> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines
        .chunks(PROFILE_BATCH)
        .map(|chunk| {
            let data = TensorData::Bytes(chunk.iter().map(|l| l.as_bytes().to_vec()).collect());
            vec![Tensor { shape: vec![chunk.len()], data }]
        })
        .collect()
}

/// CSV rows as input tensors. Columns are found by feature name (others
/// are ignored); an empty cell takes the feature's `missing_value`, which
/// is what the upstream sends for it.
fn row_batches(text: &str, spec: &ModelSpec, layout: &Layout) -> Result<Vec<Vec<Tensor>>, String> {
    let watched_columns: usize = layout.features.len();
    let needed: usize = spec.inputs.iter().map(|i| i.row_len()).sum();
    if watched_columns != needed {
        return Err(format!(
            "model '{}' has inputs drift does not profile column by column (text, images); profile needs 2-D \
             numeric inputs",
            spec.name
        ));
    }
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or("empty file")?.split(',').map(str::trim).collect();
    let positions: Vec<usize> = layout
        .features
        .iter()
        .map(|f| {
            header
                .iter()
                .position(|h| *h == f.name)
                .ok_or_else(|| format!("no column named '{}' in the header", f.name))
        })
        .collect::<Result<_, _>>()?;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let row = layout
            .features
            .iter()
            .zip(&positions)
            .map(|(f, p)| match cells.get(*p).copied().unwrap_or("") {
                "" => f.missing_value.ok_or_else(|| {
                    format!("row {} column '{}' is empty and the feature declares no missing_value", n + 1, f.name)
                }),
                cell => cell
                    .parse::<f64>()
                    .map_err(|_| format!("row {} column '{}': {cell:?} is not a number", n + 1, f.name)),
            })
            .collect::<Result<Vec<f64>, String>>()?;
        rows.push(row);
    }
    Ok(rows
        .chunks(PROFILE_BATCH)
        .map(|chunk| {
            spec.inputs
                .iter()
                .enumerate()
                .map(|(i, input)| {
                    let values = chunk
                        .iter()
                        .flat_map(|row| layout.features.iter().zip(row).filter(|(f, _)| f.input == i).map(|(_, v)| *v));
                    let data = match input.datatype {
                        DataType::Fp64 => TensorData::Fp64(values.collect()),
                        DataType::Int32 => TensorData::Int32(values.map(|v| v as i32).collect()),
                        DataType::Int64 => TensorData::Int64(values.map(|v| v as i64).collect()),
                        _ => TensorData::Fp32(values.map(|v| v as f32).collect()),
                    };
                    Tensor { shape: vec![chunk.len(), input.row_len()], data }
                })
                .collect()
        })
        .collect())
}
