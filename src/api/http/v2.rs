//! The KServe V2 REST binding's inference messages, and Triton's binary
//! tensor extension. A request body is a JSON header, optionally followed
//! by raw tensor bytes (`Inference-Header-Content-Length` says where the
//! JSON ends; an input's `binary_data_size` parameter says how many of the
//! following bytes are its own). It becomes the same V2 message the gRPC
//! front end decodes, so both share one validation.
//!
//! JSON is decoded into typed structs, never a generic value tree: an
//! input's `data` is borrowed unparsed, then read element by element into
//! raw little-endian bytes of its declared type, stopping at the count its
//! shape declares. A body of `n` bytes costs at most about `4n` decoded
//! (an 8-byte INT64 per two-byte `0,`), whatever the request claims.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::pb;
use crate::error::InferError;
use crate::model::{DataType, Tensor, TensorData};
use crate::pipeline::controls::{AnswerParam, Served};

/// The header naming where the JSON part of a body ends.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

fn invalid(message: String) -> InferError {
    InferError::InvalidArgument(message)
}

/// A request parameter: a scalar, as the V2 protocol allows.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for Param {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ParamVisitor;
        impl Visitor<'_> for ParamVisitor {
            type Value = Param;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean, number or string")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Param, E> {
                Ok(Param::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Param, E> {
                Ok(Param::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Param, E> {
                i64::try_from(v).map(Param::Int).map_err(|_| E::custom(format!("{v} is past int64")))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Param, E> {
                Ok(Param::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Param, E> {
                Ok(Param::Str(v.to_string()))
            }
        }
        // Anything else (an array, an object) is refused by the visitor
        // without being read into memory first.
        d.deserialize_any(ParamVisitor)
    }
}

type Params = BTreeMap<String, Param>;

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Params,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Params,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Params,
}

/// Which outputs the caller wants as binary data, by name; `all` when the
/// request's `binary_data_output` parameter says so.
#[derive(Debug, Default, Clone)]
pub struct BinaryOutputs {
    all: bool,
    names: Vec<String>,
}

impl BinaryOutputs {
    fn wants(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n == name)
    }
}

fn param_to_pb(p: &Param) -> pb::InferParameter {
    use pb::infer_parameter::ParameterChoice;
    let choice = match p {
        Param::Bool(b) => ParameterChoice::BoolParam(*b),
        Param::Int(i) => ParameterChoice::Int64Param(*i),
        Param::Float(f) => ParameterChoice::DoubleParam(*f),
        Param::Str(s) => ParameterChoice::StringParam(s.clone()),
    };
    pb::InferParameter { parameter_choice: Some(choice) }
}

/// The body of `POST /v2/models/{model}[/versions/{version}]/infer` as the
/// V2 message, with the outputs wanted in binary. `header_length` is the
/// `Inference-Header-Content-Length` header's value, when sent.
pub fn parse_request(
    model: &str,
    version: &str,
    body: &[u8],
    header_length: Option<usize>,
) -> Result<(pb::ModelInferRequest, BinaryOutputs), InferError> {
    let (json, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(invalid(format!(
                "header '{HEADER_LENGTH}': {n} bytes of JSON, but the body holds only {}",
                body.len()
            )));
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let request: RequestJson =
        serde_json::from_slice(json).map_err(|e| invalid(format!("request body: not a V2 inference request: {e}")))?;
    let mut message = pb::ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: request.id.unwrap_or_default(),
        parameters: request
            .parameters
            .iter()
            .filter(|(k, _)| k.as_str() != "binary_data_output")
            .map(|(k, v)| (k.clone(), param_to_pb(v)))
            .collect(),
        ..Default::default()
    };
    for input in &request.inputs {
        let raw = match (input.parameters.get("binary_data_size"), input.data) {
            (Some(Param::Int(size)), None) => {
                let size = usize::try_from(*size).map_err(|_| {
                    invalid(format!("input '{}': parameter 'binary_data_size' must not be negative", input.name))
                })?;
                if size > binary.len() {
                    return Err(invalid(format!(
                        "input '{}': binary_data_size {size} is past the {} binary bytes left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                mine.to_vec()
            }
            (Some(_), None) => {
                return Err(invalid(format!(
                    "input '{}': parameter 'binary_data_size' must be an integer",
                    input.name
                )));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "input '{}': has both `data` and binary_data_size: send one form",
                    input.name
                )));
            }
            (None, Some(data)) => data_to_raw(&input.name, &input.datatype, &input.shape, data)?,
            (None, None) => {
                return Err(invalid(format!("input '{}': no `data` and no binary_data_size parameter", input.name)));
            }
        };
        message.inputs.push(pb::model_infer_request::InferInputTensor {
            name: input.name.clone(),
            datatype: input.datatype.clone(),
            shape: input.shape.clone(),
            ..Default::default()
        });
        message.raw_input_contents.push(raw);
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "request body: {} binary bytes after the JSON that no input's binary_data_size claims",
            binary.len()
        )));
    }
    let mut wanted = BinaryOutputs {
        all: matches!(request.parameters.get("binary_data_output"), Some(Param::Bool(true))),
        names: Vec::new(),
    };
    for output in &request.outputs {
        if matches!(output.parameters.get("binary_data"), Some(Param::Bool(true))) {
            wanted.names.push(output.name.clone());
        }
        message.outputs.push(pb::model_infer_request::InferRequestedOutputTensor {
            name: output.name.clone(),
            ..Default::default()
        });
    }
    Ok((message, wanted))
}

/// One input's JSON `data` (flat or nested arrays) as raw little-endian
/// bytes of `datatype` (BYTES: each element's u32 length, then its bytes).
fn data_to_raw(name: &str, datatype: &str, shape: &[i64], data: &RawValue) -> Result<Vec<u8>, InferError> {
    let dt = DataType::from_v2(datatype)
        .ok_or_else(|| invalid(format!("input '{name}': datatype '{datatype}' is not one Kiln serves")))?;
    let declared = shape.iter().try_fold(1usize, |n, d| usize::try_from(*d).ok().and_then(|d| n.checked_mul(d)));
    let declared = declared.ok_or_else(|| {
        invalid(format!("input '{name}': shape {shape:?} must be non-negative dimensions of a countable size"))
    })?;
    let text = data.get();
    // No reservation past what the body could hold: two bytes per element.
    let element = dt.element_bytes().unwrap_or(4);
    let mut out = Vec::with_capacity(declared.min(text.len() / 2 + 1).saturating_mul(element));
    let mut count = 0usize;
    let seed = DataSeed { dt, out: &mut out, count: &mut count, max: declared, name };
    let mut de = serde_json::Deserializer::from_str(text);
    seed.deserialize(&mut de).map_err(|e| invalid(format!("input '{name}': data: {e}")))?;
    if count != declared {
        return Err(invalid(format!(
            "input '{name}': data holds {count} elements but shape {shape:?} declares {declared}"
        )));
    }
    Ok(out)
}

/// Reads nested arrays of scalars into raw bytes, counting elements.
struct DataSeed<'o> {
    dt: DataType,
    out: &'o mut Vec<u8>,
    count: &'o mut usize,
    max: usize,
    name: &'o str,
}

impl DataSeed<'_> {
    fn push<E: de::Error>(&mut self, f: impl FnOnce(DataType, &mut Vec<u8>) -> Result<(), String>) -> Result<(), E> {
        if *self.count == self.max {
            return Err(E::custom(format!("more elements than the {} its shape declares", self.max)));
        }
        *self.count += 1;
        f(self.dt, &mut *self.out).map_err(|m| E::custom(format!("element {}: {m}", *self.count - 1)))
    }

    fn number<E: de::Error>(&mut self, v: f64, exact_int: Option<i128>) -> Result<(), E> {
        self.push(|dt, out| {
            match dt {
                DataType::Fp32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
                DataType::Fp64 => out.extend_from_slice(&v.to_le_bytes()),
                DataType::Int32 => {
                    let i = exact_int.and_then(|i| i32::try_from(i).ok()).ok_or("expected an INT32 integer")?;
                    out.extend_from_slice(&i.to_le_bytes());
                }
                DataType::Int64 => {
                    let i = exact_int.and_then(|i| i64::try_from(i).ok()).ok_or("expected an INT64 integer")?;
                    out.extend_from_slice(&i.to_le_bytes());
                }
                DataType::Bytes => return Err("expected a string (BYTES)".into()),
            }
            Ok(())
        })
    }
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} elements of input '{}' in (nested) arrays", self.dt, self.name)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let DataSeed { dt, out, count, max, name } = self;
        while seq.next_element_seed(DataSeed { dt, out: &mut *out, count: &mut *count, max, name })?.is_some() {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        self.number(v, None)
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.number(v as f64, Some(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.number(v as f64, Some(i128::from(v)))
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        self.push(|dt, out| match dt {
            DataType::Bytes => {
                let len = u32::try_from(v.len()).map_err(|_| "a BYTES element past 4 GiB".to_string())?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(v.as_bytes());
                Ok(())
            }
            other => Err(format!("expected a number ({other}), got a string")),
        })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(format!("expected {} elements, got a boolean", self.dt)))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum DataOut<'a> {
    Fp32(&'a [f32]),
    Fp64(&'a [f64]),
    Int32(&'a [i32]),
    Int64(&'a [i64]),
    Bytes(Vec<std::borrow::Cow<'a, str>>),
}

#[derive(Serialize)]
struct OutputOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<&'static str, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<DataOut<'a>>,
}

#[derive(Serialize)]
struct ResponseOut<'a> {
    model_name: &'a str,
    model_version: String,
    id: &'a str,
    parameters: BTreeMap<&'static str, AnswerParam>,
    outputs: Vec<OutputOut<'a>>,
}

fn data_out(tensor: &Tensor) -> DataOut<'_> {
    match &tensor.data {
        TensorData::Fp32(v) => DataOut::Fp32(v),
        TensorData::Fp64(v) => DataOut::Fp64(v),
        TensorData::Int32(v) => DataOut::Int32(v),
        TensorData::Int64(v) => DataOut::Int64(v),
        TensorData::Bytes(v) => DataOut::Bytes(v.iter().map(|b| String::from_utf8_lossy(b)).collect()),
    }
}

/// The answer as a V2 REST body: JSON, then the raw bytes of each output
/// wanted in binary, in order. Returns the body and the JSON part's length
/// when binary data follows it.
pub fn encode_response(served: &Served, binary: &BinaryOutputs) -> (Vec<u8>, Option<usize>) {
    let (spec, answer) = (&served.version.spec, &served.answer);
    let mut raw = Vec::new();
    let outputs = answer
        .outputs
        .iter()
        .zip(&answer.response.outputs)
        .map(|(&o, tensor)| {
            let declared = &spec.outputs[o];
            let mut out = OutputOut {
                name: &declared.name,
                datatype: declared.datatype.as_v2(),
                shape: &tensor.shape,
                parameters: None,
                data: None,
            };
            if binary.wants(&declared.name) {
                let bytes = tensor.data.to_raw();
                out.parameters = Some(BTreeMap::from([("binary_data_size", bytes.len() as u64)]));
                raw.push(bytes);
            } else {
                out.data = Some(data_out(tensor));
            }
            out
        })
        .collect();
    let response = ResponseOut {
        model_name: &spec.name,
        model_version: spec.version.to_string(),
        id: &answer.id,
        parameters: served.parameters().into_iter().collect(),
        outputs,
    };
    let mut body = serde_json::to_vec(&response).unwrap_or_default();
    if raw.is_empty() {
        return (body, None);
    }
    let json_length = body.len();
    for bytes in raw {
        body.extend_from_slice(&bytes);
    }
    (body, Some(json_length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_f32(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn json_data_becomes_raw_bytes_of_the_declared_type_flat_or_nested() {
        let body = br#"{"id":"a","parameters":{"timeout":500,"binary_data_output":true},
            "inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,-4]]},
                      {"name":"t","shape":[2],"datatype":"BYTES","data":["hi",""]},
                      {"name":"i","shape":[1],"datatype":"INT64","data":[-7]}],
            "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let (m, binary) = parse_request("risk", "", body, None).expect("parses");
        assert_eq!(m.id, "a");
        assert_eq!(m.raw_input_contents[0], raw_f32(&[1.0, 2.5, 3.0, -4.0]));
        assert_eq!(m.raw_input_contents[1], [2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0]);
        assert_eq!(m.raw_input_contents[2], (-7i64).to_le_bytes());
        assert!(m.parameters.contains_key("timeout") && !m.parameters.contains_key("binary_data_output"));
        assert!(binary.wants("y") && binary.wants("anything"), "binary_data_output covers every output");
        assert_eq!(m.outputs[0].name, "y");
    }

    #[test]
    fn binary_inputs_take_their_bytes_after_the_json_header() {
        let json = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend(raw_f32(&[0.5, 1.5]));
        let (m, _) = parse_request("risk", "1", &body, Some(json.len())).expect("parses");
        assert_eq!(m.raw_input_contents[0], raw_f32(&[0.5, 1.5]));
        body.extend([0u8; 3]);
        let err = parse_request("risk", "1", &body, Some(json.len())).unwrap_err();
        assert!(err.to_string().contains("3 binary bytes after the JSON"), "{err}");
        let err = parse_request("risk", "1", &body, Some(body.len() + 1)).unwrap_err();
        assert!(err.to_string().contains("inference-header-content-length"), "{err}");
    }

    #[test]
    fn data_is_refused_past_its_shape_and_in_the_wrong_type_naming_the_input() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2,3]}]}"#, "more elements than the 2"),
            (br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, "holds 2 elements but shape"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":[1.5]}]}"#, "expected an INT32 integer"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#, "got a string"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[1]}]}"#, "'UINT8' is not one"),
            (br#"{"parameters":{"p":[1,2]},"inputs":[]}"#, "a boolean, number or string"),
        ];
        for (body, expected) in cases {
            let err = parse_request("m", "", body, None).unwrap_err().to_string();
            assert!(err.contains(expected), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_huge_claimed_shape_reserves_nothing_past_the_body() {
        let body = br#"{"inputs":[{"name":"x","shape":[1000000000000],"datatype":"FP64","data":[1]}]}"#;
        let err = parse_request("m", "", body, None).unwrap_err().to_string();
        assert!(err.contains("holds 1 elements but shape"), "{err}");
    }
}
