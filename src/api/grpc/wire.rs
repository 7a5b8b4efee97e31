//! A pass over a `ModelInferRequest`'s wire bytes before prost builds any
//! struct from them. prost materialises every repeated entry as a whole
//! struct: two wire bytes (an empty `inputs` entry) become a ~300-byte
//! `InferInputTensor`, and one-byte packed varints become 8-byte integers.
//! This pass counts each repeated field against the model's declared
//! interface and adds up what decoding would allocate, so a request whose
//! decoded form would outgrow its wire size is refused while it is still
//! bytes. Nothing is allocated here but a few counters.

use std::mem::size_of;

use crate::api::pb::{InferParameter, ModelInferRequest, model_infer_request as req};
use crate::model::ModelSpec;

/// Most entries in one `parameters` map. Kiln reads six names; clients
/// such as perf_analyzer add a handful of their own.
pub const MAX_PARAMETERS: usize = 64;
/// Inputs and outputs a request may list beyond what the model declares,
/// so that one unknown name is still answered by validation, by name.
pub const NAME_MARGIN: usize = 4;
/// Decoding may allocate this much beyond the wire size (structs, map
/// buckets) before the request is refused.
pub const DECODE_SLACK_BYTES: usize = 1 << 20;

/// What one model version accepts, as counts of wire entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireLimits {
    /// Entries of `inputs`, and of `raw_input_contents`.
    pub max_inputs: usize,
    /// Entries of `outputs`.
    pub max_outputs: usize,
    /// Entries of one input's `shape`.
    pub max_rank: usize,
    /// Entries of any one `parameters` map.
    pub max_parameters: usize,
    /// Values in any one typed `contents` field of one input: the largest
    /// declared input at `max_batch_size` rows.
    pub max_elements: usize,
}

impl WireLimits {
    /// The limits for `spec` served with batches of at most `max_rows`.
    pub fn for_model(spec: &ModelSpec, max_rows: usize) -> Self {
        let max_elements = spec.inputs.iter().map(|t| max_rows.saturating_mul(t.row_len().max(1))).max().unwrap_or(0);
        Self {
            max_inputs: spec.inputs.len() + NAME_MARGIN,
            max_outputs: spec.outputs.len() + NAME_MARGIN,
            max_rank: spec.inputs.iter().map(|t| t.shape.len()).max().unwrap_or(1),
            max_parameters: MAX_PARAMETERS,
            max_elements,
        }
    }
}

/// Why the bytes were refused, naming the field and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("request is not a valid ModelInferRequest: {0}")]
    Malformed(String),
    #[error("field '{field}': {count} entries, more than the {limit} this model accepts{hint}")]
    TooMany { field: String, count: usize, limit: usize, hint: &'static str },
    #[error(
        "raw_input_contents has {raw} entries but the request has {inputs} inputs: one entry per input, in input \
         order"
    )]
    RawCount { raw: usize, inputs: usize },
    #[error(
        "request would take {decoded} bytes once decoded from its {wire} wire bytes (at most wire size + {slack}); \
         packed integers of one byte each, or many empty entries, expand that much: send raw_input_contents"
    )]
    Expands { decoded: usize, wire: usize, slack: usize },
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// One field read from the wire.
enum Value<'a> {
    Varint,
    Fixed,
    Bytes(&'a [u8]),
}

/// Reads `(field number, wire type, value)` triples from a message.
struct Fields<'a> {
    rest: &'a [u8],
}

fn varint(rest: &mut &[u8]) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let Some((&byte, tail)) = rest.split_first() else {
            return Err(WireError::Malformed("truncated varint".into()));
        };
        *rest = tail;
        if shift == 63 && byte > 1 {
            return Err(WireError::Malformed("varint overflows 64 bits".into()));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Malformed("varint longer than 10 bytes".into()))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if rest.len() < n {
        return Err(WireError::Malformed(format!("field declares {n} bytes but {} remain", rest.len())));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, u8, Value<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.read())
    }
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn read(&mut self) -> Result<(u32, u8, Value<'a>), WireError> {
        let key = varint(&mut self.rest)?;
        let wire_type = (key & 7) as u8;
        let field = u32::try_from(key >> 3).map_err(|_| WireError::Malformed("field number too large".into()))?;
        if field == 0 {
            return Err(WireError::Malformed("field number 0".into()));
        }
        let value = match wire_type {
            VARINT => varint(&mut self.rest).map(|_| Value::Varint)?,
            FIXED64 => take(&mut self.rest, 8).map(|_| Value::Fixed)?,
            FIXED32 => take(&mut self.rest, 4).map(|_| Value::Fixed)?,
            LEN => {
                let len = varint(&mut self.rest)?;
                let len = usize::try_from(len).map_err(|_| WireError::Malformed("length too large".into()))?;
                Value::Bytes(take(&mut self.rest, len)?)
            }
            // Groups (3, 4) were never part of proto3; prost would refuse
            // them in a known field anyway.
            other => return Err(WireError::Malformed(format!("field {field}: wire type {other} is not accepted"))),
        };
        Ok((field, wire_type, value))
    }
}

/// The model name and version a request asks for (the last occurrence
/// wins, as in protobuf), without decoding the rest.
pub fn model_and_version(wire: &[u8]) -> Result<(String, String), WireError> {
    let (mut name, mut version) = (&[][..], &[][..]);
    for field in Fields::new(wire) {
        match field? {
            (1, _, Value::Bytes(b)) => name = b,
            (2, _, Value::Bytes(b)) => version = b,
            _ => {}
        }
    }
    let text = |b: &[u8], field: &str| {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| WireError::Malformed(format!("field '{field}' is not valid UTF-8")))
    };
    Ok((text(name, "model_name")?, text(version, "model_version")?))
}

/// Counts entries and decoded bytes while walking one message.
struct Tally<'l> {
    limits: &'l WireLimits,
    decoded: usize,
}

fn too_many(field: impl Into<String>, count: usize, limit: usize, hint: &'static str) -> WireError {
    WireError::TooMany { field: field.into(), count, limit, hint }
}

impl Tally<'_> {
    fn add(&mut self, bytes: usize) {
        self.decoded = self.decoded.saturating_add(bytes);
    }

    /// A `map<string, InferParameter>` entry; `count` is the map's size so far.
    fn parameter(&mut self, field: &str, count: usize) -> Result<(), WireError> {
        if count > self.limits.max_parameters {
            return Err(too_many(field, count, self.limits.max_parameters, ""));
        }
        // The entry's strings are counted by the caller as its wire bytes;
        // the bucket is twice the entry at worst (hashbrown's growth).
        self.add(2 * size_of::<(String, InferParameter)>() + 1);
        Ok(())
    }

    fn input(&mut self, bytes: &[u8], index: usize) -> Result<(), WireError> {
        let (mut rank, mut parameters) = (0usize, 0usize);
        for field in Fields::new(bytes) {
            match field? {
                (3, wire_type, value) => {
                    rank += count_scalars(wire_type, &value, VARINT)?;
                    if rank > self.limits.max_rank {
                        return Err(too_many(
                            format!("inputs[{index}].shape"),
                            rank,
                            self.limits.max_rank,
                            " (its declared rank)",
                        ));
                    }
                    self.add(packed_len(&value) * 8);
                }
                (4, _, Value::Bytes(entry)) => {
                    parameters += 1;
                    self.parameter(&format!("inputs[{index}].parameters"), parameters)?;
                    self.add(entry.len());
                }
                (5, _, Value::Bytes(contents)) => self.contents(contents, index)?,
                (1 | 2, _, Value::Bytes(text)) => self.add(text.len()),
                // prost skips unknown fields: they stay wire bytes.
                _ => {}
            }
        }
        Ok(())
    }

    fn contents(&mut self, bytes: &[u8], index: usize) -> Result<(), WireError> {
        const NAMES: [&str; 8] = [
            "bool_contents",
            "int_contents",
            "int64_contents",
            "uint_contents",
            "uint64_contents",
            "fp32_contents",
            "fp64_contents",
            "bytes_contents",
        ];
        // Element size in memory and the scalar wire type of each field.
        const LAYOUT: [(usize, u8); 8] =
            [(1, VARINT), (4, VARINT), (8, VARINT), (4, VARINT), (8, VARINT), (4, FIXED32), (8, FIXED64), (0, LEN)];
        let mut counts = [0usize; 8];
        for field in Fields::new(bytes) {
            let (number, wire_type, value) = field?;
            let Some(slot) = (number as usize).checked_sub(1).filter(|s| *s < 8) else { continue };
            let (element_bytes, scalar) = LAYOUT[slot];
            let found = if slot == 7 {
                let Value::Bytes(b) = &value else {
                    return Err(WireError::Malformed(format!("inputs[{index}].contents.bytes_contents: not bytes")));
                };
                self.add(size_of::<Vec<u8>>() + b.len());
                1
            } else {
                let n = count_scalars(wire_type, &value, scalar)?;
                self.add(n * element_bytes);
                n
            };
            counts[slot] += found;
            if counts[slot] > self.limits.max_elements {
                return Err(too_many(
                    format!("inputs[{index}].contents.{}", NAMES[slot]),
                    counts[slot],
                    self.limits.max_elements,
                    " (max_batch_size rows of its largest input)",
                ));
            }
        }
        Ok(())
    }
}

/// The length of a packed payload (0 for a single unpacked value).
fn packed_len(value: &Value<'_>) -> usize {
    match value {
        Value::Bytes(b) => b.len(),
        _ => 1,
    }
}

/// Values in one occurrence of a repeated scalar field: one when unpacked,
/// else as many as the packed payload holds.
fn count_scalars(wire_type: u8, value: &Value<'_>, scalar: u8) -> Result<usize, WireError> {
    match (value, scalar) {
        (Value::Bytes(packed), VARINT) => Ok(packed.iter().filter(|b| **b & 0x80 == 0).count()),
        (Value::Bytes(packed), FIXED32) if packed.len() % 4 == 0 => Ok(packed.len() / 4),
        (Value::Bytes(packed), FIXED64) if packed.len() % 8 == 0 => Ok(packed.len() / 8),
        (Value::Bytes(_), _) => Err(WireError::Malformed("packed fixed-width values of a partial length".into())),
        _ if wire_type == scalar => Ok(1),
        _ => Err(WireError::Malformed(format!("wire type {wire_type} where {scalar} was expected"))),
    }
}

/// Checks a `ModelInferRequest`'s wire bytes against `limits` and refuses
/// it, naming the field and the limit, when any repeated field holds more
/// than the model accepts or decoding would allocate more than the wire
/// size plus [`DECODE_SLACK_BYTES`].
pub fn check_infer_request(wire: &[u8], limits: &WireLimits) -> Result<(), WireError> {
    let mut tally = Tally { limits, decoded: size_of::<ModelInferRequest>() };
    let (mut inputs, mut outputs, mut raw, mut parameters) = (0usize, 0usize, 0usize, 0usize);
    for field in Fields::new(wire) {
        match field? {
            (4, _, Value::Bytes(entry)) => {
                parameters += 1;
                tally.parameter("parameters", parameters)?;
                tally.add(entry.len());
            }
            (5, _, Value::Bytes(input)) => {
                inputs += 1;
                if inputs > limits.max_inputs {
                    return Err(too_many("inputs", inputs, limits.max_inputs, " (its declared inputs)"));
                }
                tally.add(size_of::<req::InferInputTensor>());
                tally.input(input, inputs - 1)?;
            }
            (6, _, Value::Bytes(output)) => {
                outputs += 1;
                if outputs > limits.max_outputs {
                    return Err(too_many("outputs", outputs, limits.max_outputs, " (its declared outputs)"));
                }
                tally.add(size_of::<req::InferRequestedOutputTensor>());
                let mut output_parameters = 0;
                for field in Fields::new(output) {
                    match field? {
                        (1, _, Value::Bytes(name)) => tally.add(name.len()),
                        (2, _, Value::Bytes(entry)) => {
                            output_parameters += 1;
                            tally.parameter(&format!("outputs[{}].parameters", outputs - 1), output_parameters)?;
                            tally.add(entry.len());
                        }
                        _ => {}
                    }
                }
            }
            (7, _, Value::Bytes(contents)) => {
                raw += 1;
                if raw > limits.max_inputs {
                    return Err(too_many("raw_input_contents", raw, limits.max_inputs, " (one per input)"));
                }
                tally.add(size_of::<Vec<u8>>() + contents.len());
            }
            (1..=3, _, Value::Bytes(text)) => tally.add(text.len()),
            // prost skips unknown fields: they stay wire bytes.
            _ => {}
        }
    }
    if raw > inputs {
        return Err(WireError::RawCount { raw, inputs });
    }
    // Each byte of data was counted once where it lands; the excess over
    // the wire size is what decoding adds on top of the buffer.
    let excess = tally.decoded.saturating_sub(wire.len());
    if excess > DECODE_SLACK_BYTES {
        return Err(WireError::Expands { decoded: tally.decoded, wire: wire.len(), slack: DECODE_SLACK_BYTES });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::{InferTensorContents, infer_parameter::ParameterChoice};
    use crate::model::TensorSpec;
    use prost::Message;

    fn limits() -> WireLimits {
        WireLimits::for_model(
            &ModelSpec::in_memory("m", vec![TensorSpec::fp32("x", 30)], vec![TensorSpec::fp32("y", 1)]),
            64,
        )
    }

    fn good() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            model_version: "1".into(),
            inputs: vec![req::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2, 30],
                contents: Some(InferTensorContents { fp32_contents: vec![0.5; 60], ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn limits_follow_the_declared_interface() {
        let l = limits();
        assert_eq!((l.max_inputs, l.max_outputs, l.max_rank, l.max_elements), (5, 5, 2, 64 * 30));
    }

    #[test]
    fn a_real_request_passes_and_names_its_model() {
        let wire = good().encode_to_vec();
        assert_eq!(check_infer_request(&wire, &limits()), Ok(()));
        assert_eq!(model_and_version(&wire), Ok(("m".into(), "1".into())));
    }

    #[test]
    fn empty_inputs_are_counted_before_any_struct_is_built() {
        let mut wire = b"\x0a\x01m".to_vec();
        for _ in 0..1000 {
            wire.extend_from_slice(&[0x2a, 0x00]);
        }
        let err = check_infer_request(&wire, &limits()).unwrap_err();
        assert!(err.to_string().contains("field 'inputs': 6 entries, more than the 5"), "{err}");
    }

    #[test]
    fn each_repeated_field_has_its_limit() {
        let mut shape = good();
        shape.inputs[0].shape = vec![1; 3];
        let mut raw = good();
        raw.inputs[0].contents = None;
        raw.raw_input_contents = vec![vec![], vec![]];
        let mut params = good();
        for i in 0..65 {
            params
                .parameters
                .insert(format!("p{i}"), InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) });
        }
        let mut outputs = good();
        outputs.outputs = vec![req::InferRequestedOutputTensor::default(); 6];
        let mut values = good();
        values.inputs[0].contents =
            Some(InferTensorContents { int64_contents: vec![0; 64 * 30 + 1], ..Default::default() });
        for (request, field) in [
            (shape, "inputs[0].shape"),
            (raw, "raw_input_contents"),
            (params, "field 'parameters'"),
            (outputs, "field 'outputs'"),
            (values, "inputs[0].contents.int64_contents"),
        ] {
            let err = check_infer_request(&request.encode_to_vec(), &limits()).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn expansion_beyond_the_slack_is_refused() {
        // Within every count limit, but a million one-byte varints would
        // be eight megabytes of i64.
        let generous = WireLimits { max_elements: usize::MAX, ..limits() };
        let mut request = good();
        request.inputs[0].contents =
            Some(InferTensorContents { int64_contents: vec![1; 1 << 20], ..Default::default() });
        let err = check_infer_request(&request.encode_to_vec(), &generous).unwrap_err();
        assert!(matches!(err, WireError::Expands { .. }), "{err}");
    }

    #[test]
    fn truncated_and_odd_bytes_are_malformed_not_panics() {
        let wire = good().encode_to_vec();
        for cut in 0..wire.len() {
            let _ = check_infer_request(&wire[..cut], &limits());
        }
        assert!(matches!(check_infer_request(&[0x0b], &limits()), Err(WireError::Malformed(_))));
        assert!(matches!(check_infer_request(&[0xff; 11], &limits()), Err(WireError::Malformed(_))));
    }
}
