//! Checks a request against its version's declared interface, whatever
//! front end decoded it: input names, datatypes, shapes, the batch
//! dimension, element values (finite, in range, non-empty UTF-8 text) and
//! the requested outputs. A front end extracts each input's elements from
//! its own wire form and hands them here; what it builds is [`Decoded`].
//! Every refusal names the input (or feature and row) and what was
//! expected.

use super::Decoded;
use super::params::RequestParams;
use crate::error::InferError;
use crate::model::{ModelSpec, Tensor, TensorData, TensorSpec};

fn invalid(msg: impl Into<String>) -> InferError {
    InferError::InvalidArgument(msg.into())
}

/// One input as sent, before its elements are read.
#[derive(Debug, Clone, Copy)]
pub struct SentInput<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    pub shape: &'a [i64],
}

/// An input whose header passed: where it goes and how many elements its
/// shape holds (what the front end must read).
#[derive(Debug)]
pub struct Accepted<'s> {
    /// Its index among the declared inputs.
    pub slot: usize,
    pub declared: &'s TensorSpec,
    pub shape: Vec<usize>,
    /// Elements its shape holds.
    pub count: usize,
}

/// Builds a [`Decoded`] request input by input.
pub struct Validator<'s> {
    spec: &'s ModelSpec,
    max_rows: usize,
    slots: Vec<Option<Tensor>>,
    /// The batch dimension, and the input that set it.
    rows: Option<(usize, String)>,
}

impl<'s> Validator<'s> {
    /// For `spec`'s inputs, at most `max_rows` rows.
    pub fn new(spec: &'s ModelSpec, max_rows: usize) -> Self {
        Self { spec, max_rows, slots: vec![None; spec.inputs.len()], rows: None }
    }

    /// Checks an input's name (declared, not repeated), datatype and shape
    /// (rank, fixed dimensions, rows within the batch limit and equal to
    /// the other inputs').
    pub fn accept(&mut self, input: SentInput<'_>) -> Result<Accepted<'s>, InferError> {
        let spec = self.spec;
        let Some(slot) = spec.inputs.iter().position(|s| s.name == input.name) else {
            let expected: Vec<&str> = spec.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(invalid(format!(
                "unknown input '{}' for model '{}'; expected inputs: {}",
                input.name,
                spec.name,
                expected.join(", ")
            )));
        };
        if self.slots[slot].is_some() {
            return Err(invalid(format!("input '{}' appears more than once", input.name)));
        }
        let declared = &spec.inputs[slot];
        let shape = check_shape(declared, input.datatype, input.shape, self.max_rows)?;
        if let Some((r, other)) = &self.rows
            && *r != shape[0]
        {
            return Err(invalid(format!(
                "input '{}' has {} rows but input '{other}' has {r}: every input needs the same batch dimension",
                input.name, shape[0]
            )));
        }
        self.rows = Some((shape[0], input.name.to_string()));
        let count = shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| invalid(format!("input '{}': shape {:?} is too large", input.name, input.shape)))?;
        Ok(Accepted { slot, declared, shape, count })
    }

    /// Checks an accepted input's elements and keeps them.
    pub fn put(&mut self, accepted: Accepted<'s>, data: TensorData) -> Result<(), InferError> {
        check_values(accepted.declared, &data).map_err(|e| match e {
            // Which declared input it was, so drift can count the feature.
            InferError::NonFinite { message, column, .. } => {
                InferError::NonFinite { message, input: accepted.slot, column }
            }
            other => other,
        })?;
        self.slots[accepted.slot] = Some(Tensor { shape: accepted.shape, data });
        Ok(())
    }

    /// The request, once every declared input was given; `outputs` names
    /// the outputs asked for (none: all, in declared order).
    pub fn finish<'o>(
        self,
        id: String,
        outputs: impl ExactSizeIterator<Item = &'o str>,
        params: RequestParams,
    ) -> Result<Decoded, InferError> {
        let spec = self.spec;
        let mut inputs = Vec::with_capacity(self.slots.len());
        for (declared, slot) in spec.inputs.iter().zip(self.slots) {
            inputs.push(slot.ok_or_else(|| {
                invalid(format!(
                    "missing input '{}' ({} {:?}) for model '{}'",
                    declared.name, declared.datatype, declared.shape, spec.name
                ))
            })?);
        }
        let outputs = requested_outputs(spec, outputs)?;
        let rows = self.rows.map(|(r, _)| r).unwrap_or(0);
        Ok(Decoded { id, inputs, rows, outputs, params })
    }
}

fn check_shape(
    declared: &TensorSpec,
    datatype: &str,
    shape: &[i64],
    max_rows: usize,
) -> Result<Vec<usize>, InferError> {
    let name = &declared.name;
    if datatype != declared.datatype.as_v2() {
        return Err(invalid(format!("input '{name}': datatype {datatype:?}, expected {}", declared.datatype)));
    }
    if shape.len() != declared.shape.len() {
        return Err(invalid(format!(
            "input '{name}': shape {shape:?}, expected {:?} (rank {})",
            declared.shape,
            declared.shape.len()
        )));
    }
    if shape.iter().any(|d| *d < 0) {
        return Err(invalid(format!("input '{name}': shape {shape:?} has a negative dimension")));
    }
    if shape[0] == 0 {
        return Err(invalid(format!("input '{name}': zero rows; send at least one")));
    }
    if shape[0] as u64 > max_rows as u64 {
        return Err(invalid(format!(
            "input '{name}': {} rows, more than the model's max_batch_size {max_rows}; split the request",
            shape[0]
        )));
    }
    for (d, (got, want)) in shape.iter().zip(&declared.shape).enumerate().skip(1) {
        if *want >= 0 && got != want {
            return Err(invalid(format!(
                "input '{name}': shape {shape:?}, expected {:?} (dimension {d} must be {want})",
                declared.shape
            )));
        }
    }
    Ok(shape.iter().map(|d| *d as usize).collect())
}

fn check_values(declared: &TensorSpec, data: &TensorData) -> Result<(), InferError> {
    // BYTES inputs are text for every kind Kiln has.
    if let TensorData::Bytes(items) = data {
        for (i, item) in items.iter().enumerate() {
            if item.is_empty() {
                return Err(invalid(format!("input '{}' element {i} is an empty string", declared.name)));
            }
            if let Err(e) = std::str::from_utf8(item) {
                return Err(invalid(format!("input '{}' element {i} is not valid UTF-8 ({e})", declared.name)));
            }
        }
        return Ok(());
    }
    let values: Box<dyn Iterator<Item = f64> + '_> = match data {
        TensorData::Fp32(v) => Box::new(v.iter().map(|x| *x as f64)),
        TensorData::Fp64(v) => Box::new(v.iter().copied()),
        _ => return Ok(()),
    };
    let row_len = declared.row_len().max(1);
    for (i, x) in values.enumerate() {
        let (row, col) = (i / row_len, i % row_len);
        let feature = declared.features.get(col);
        let label = match feature {
            Some(f) => format!("input '{}' row {row} feature '{}'", declared.name, f.name),
            None => format!("input '{}' element {i}", declared.name),
        };
        if !x.is_finite() {
            return Err(InferError::NonFinite {
                message: format!("{label} is {x}: NaN and infinity are not accepted"),
                input: 0,
                column: col,
            });
        }
        if let Some((low, high)) = feature.and_then(|f| f.valid_range)
            && !(low..=high).contains(&x)
        {
            return Err(invalid(format!("{label} = {x} is outside its valid_range [{low}, {high}]")));
        }
    }
    Ok(())
}

fn requested_outputs<'o>(
    spec: &ModelSpec,
    names: impl ExactSizeIterator<Item = &'o str>,
) -> Result<Vec<usize>, InferError> {
    if names.len() == 0 {
        return Ok((0..spec.outputs.len()).collect());
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Some(idx) = spec.outputs.iter().position(|s| s.name == name) else {
            let known: Vec<&str> = spec.outputs.iter().map(|s| s.name.as_str()).collect();
            return Err(invalid(format!(
                "unknown requested output '{name}'; model '{}' has outputs: {}",
                spec.name,
                known.join(", ")
            )));
        };
        if out.contains(&idx) {
            return Err(invalid(format!("requested output '{name}' appears more than once")));
        }
        out.push(idx);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DataType;

    #[test]
    fn text_must_be_non_empty_utf8() {
        let declared = TensorSpec { name: "text".into(), datatype: DataType::Bytes, shape: vec![-1], features: vec![] };
        let empty = check_values(&declared, &TensorData::Bytes(vec![b"ok".to_vec(), vec![]]));
        assert!(matches!(empty, Err(InferError::InvalidArgument(m)) if m.contains("element 1 is an empty string")));
        let bad = check_values(&declared, &TensorData::Bytes(vec![vec![0xff, 0xfe]]));
        assert!(matches!(bad, Err(InferError::InvalidArgument(m)) if m.contains("not valid UTF-8")));
    }
}
