//! Turns a V2 `ModelInferRequest` into the pipeline's first stage: reads
//! each input's elements from its typed or raw contents (the gRPC wire's
//! own forms) and hands them to the pipeline's validator, which checks them
//! against the model's declared interface.

use std::collections::HashMap;

use crate::api::pb::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use crate::error::InferError;
use crate::model::{DataType, ModelSpec, TensorData, TensorSpec};
use crate::pipeline::Decoded;
use crate::pipeline::params::{ParamValue, RequestParams};
use crate::pipeline::validate::{SentInput, Validator};

fn invalid(msg: impl Into<String>) -> InferError {
    InferError::InvalidArgument(msg.into())
}

/// A V2 parameter as the pipeline reads it.
fn param_value(p: &InferParameter) -> ParamValue {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => ParamValue::Bool(*b),
        Some(ParameterChoice::Int64Param(v)) => ParamValue::Int64(*v),
        Some(ParameterChoice::Uint64Param(v)) => ParamValue::Uint64(*v),
        Some(ParameterChoice::DoubleParam(v)) => ParamValue::Double(*v),
        Some(ParameterChoice::StringParam(s)) => ParamValue::String(s.clone()),
        None => ParamValue::Empty,
    }
}

/// Reads and type-checks Kiln's request parameters.
pub fn params(parameters: &HashMap<String, InferParameter>) -> Result<RequestParams, InferError> {
    RequestParams::parse(parameters.iter().map(|(k, v)| (k.as_str(), param_value(v))))
}

/// A V2 message, from gRPC or built from an HTTP body, as the release
/// controls take it: decodable against any version of its model.
pub(crate) struct V2Request(pub ModelInferRequest);

impl crate::pipeline::controls::FrontRequest for V2Request {
    fn model(&self) -> &str {
        &self.0.model_name
    }

    fn version(&self) -> &str {
        &self.0.model_version
    }

    /// The `routing_key` parameter, else the request id, else nothing in
    /// common with any other request (a random key).
    fn routing_key(&self) -> Vec<u8> {
        use crate::api::pb::infer_parameter::ParameterChoice;
        match self.0.parameters.get("routing_key").and_then(|p| p.parameter_choice.as_ref()) {
            Some(ParameterChoice::StringParam(key)) => key.as_bytes().to_vec(),
            Some(ParameterChoice::Int64Param(key)) => key.to_le_bytes().to_vec(),
            _ if !self.0.id.is_empty() => self.0.id.as_bytes().to_vec(),
            _ => rand::random::<[u8; 8]>().to_vec(),
        }
    }

    fn decode(&self, version: &crate::repository::ServedVersion) -> Result<Decoded, InferError> {
        decode(&self.0, &version.spec, version.config.max_batch_size)
    }
}

/// Reads `req`'s inputs from its typed or raw contents and validates the
/// request against `spec`, building the pipeline's first stage.
pub fn decode(req: &ModelInferRequest, spec: &ModelSpec, max_rows: usize) -> Result<Decoded, InferError> {
    let params = params(&req.parameters)?;
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries but the request has {} inputs: one entry per input, in input order",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let mut validator = Validator::new(spec, max_rows);
    for (i, input) in req.inputs.iter().enumerate() {
        let sent = SentInput { name: &input.name, datatype: &input.datatype, shape: &input.shape };
        let accepted = validator.accept(sent)?;
        let data = if raw {
            if input.contents.as_ref().is_some_and(has_contents) {
                return Err(invalid(format!(
                    "input '{}' has typed contents but the request also has raw_input_contents: use one form",
                    input.name
                )));
            }
            from_raw(accepted.declared, &req.raw_input_contents[i], accepted.count)?
        } else {
            from_typed(accepted.declared, input.contents.as_ref(), accepted.count)?
        };
        validator.put(accepted, data)?;
    }
    validator.finish(req.id.clone(), req.outputs.iter().map(|o| o.name.as_str()), params)
}

fn has_contents(c: &crate::api::pb::InferTensorContents) -> bool {
    !(c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.int64_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty()
        && c.bytes_contents.is_empty())
}

fn from_raw(declared: &TensorSpec, bytes: &[u8], count: usize) -> Result<TensorData, InferError> {
    let name = &declared.name;
    let dt = declared.datatype;
    if let Some(size) = dt.element_bytes() {
        let expected = count.saturating_mul(size);
        if bytes.len() != expected {
            return Err(invalid(format!(
                "input '{name}': raw contents hold {} bytes, expected {expected} ({count} {dt} elements of {size} bytes)",
                bytes.len()
            )));
        }
    }
    fn le<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect()
    }
    Ok(match dt {
        DataType::Fp32 => TensorData::Fp32(le(bytes, f32::from_le_bytes)),
        DataType::Fp64 => TensorData::Fp64(le(bytes, f64::from_le_bytes)),
        DataType::Int32 => TensorData::Int32(le(bytes, i32::from_le_bytes)),
        DataType::Int64 => TensorData::Int64(le(bytes, i64::from_le_bytes)),
        DataType::Bytes => {
            let mut items = Vec::with_capacity(count.min(bytes.len() / 4));
            let mut rest = bytes;
            while !rest.is_empty() {
                // Counted as parsed: zero-length elements cost 4 wire bytes
                // but a whole Vec each, so stop at the shape's count.
                if items.len() == count {
                    return Err(invalid(format!(
                        "input '{name}': raw contents hold more than the {count} BYTES elements its shape declares"
                    )));
                }
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(invalid(format!(
                        "input '{name}': raw BYTES element {} has a truncated 4-byte length",
                        items.len()
                    )));
                };
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(invalid(format!(
                        "input '{name}': raw BYTES element {} declares {len} bytes but {} remain",
                        items.len(),
                        tail.len()
                    )));
                }
                items.push(tail[..len].to_vec());
                rest = &tail[len..];
            }
            if items.len() != count {
                return Err(invalid(format!(
                    "input '{name}': raw contents hold {} BYTES elements, expected {count}",
                    items.len()
                )));
            }
            TensorData::Bytes(items)
        }
    })
}

fn from_typed(
    declared: &TensorSpec,
    contents: Option<&crate::api::pb::InferTensorContents>,
    count: usize,
) -> Result<TensorData, InferError> {
    let name = &declared.name;
    let dt = declared.datatype;
    let empty = crate::api::pb::InferTensorContents::default();
    let c = contents.unwrap_or(&empty);
    let (data, field) = match dt {
        DataType::Fp32 => (TensorData::Fp32(c.fp32_contents.clone()), "fp32_contents"),
        DataType::Fp64 => (TensorData::Fp64(c.fp64_contents.clone()), "fp64_contents"),
        DataType::Int32 => (TensorData::Int32(c.int_contents.clone()), "int_contents"),
        DataType::Int64 => (TensorData::Int64(c.int64_contents.clone()), "int64_contents"),
        DataType::Bytes => (TensorData::Bytes(c.bytes_contents.clone()), "bytes_contents"),
    };
    if data.len() != count {
        return Err(invalid(format!(
            "input '{name}': {field} holds {} values, expected {count} for its shape (no contents at all? send contents or raw_input_contents)",
            data.len()
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::InferTensorContents;
    use crate::api::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use crate::model::FeatureSpec;

    fn spec() -> ModelSpec {
        let features = vec![
            FeatureSpec { name: "a".into(), valid_range: Some((0.0, 10.0)), missing_value: None },
            FeatureSpec { name: "b".into(), valid_range: None, missing_value: None },
        ];
        ModelSpec::in_memory(
            "m",
            vec![TensorSpec { features, ..TensorSpec::fp32("x", 2) }],
            vec![TensorSpec::fp32("y", 1)],
        )
    }

    fn request(values: Vec<f32>, shape: Vec<i64>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape,
                contents: Some(InferTensorContents { fp32_contents: values, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn error(req: &ModelInferRequest) -> String {
        match decode(req, &spec(), 8) {
            Err(InferError::InvalidArgument(m)) => m,
            Err(InferError::NonFinite { message, .. }) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn typed_and_raw_forms_decode_alike() {
        let typed = request(vec![1.0, 2.0, 3.0, 4.0], vec![2, 2]);
        let mut raw = typed.clone();
        raw.inputs[0].contents = None;
        raw.raw_input_contents = vec![[1f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect()];
        let a = decode(&typed, &spec(), 8).expect("valid");
        let b = decode(&raw, &spec(), 8).expect("valid");
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.rows, 2);
    }

    #[test]
    fn out_of_range_names_feature_and_row() {
        let msg = error(&request(vec![1.0, 2.0, 11.0, 0.0], vec![2, 2]));
        assert!(msg.contains("row 1 feature 'a'") && msg.contains("valid_range"), "{msg}");
    }

    #[test]
    fn nan_is_refused() {
        let msg = error(&request(vec![1.0, f32::NAN], vec![1, 2]));
        assert!(msg.contains("feature 'b'") && msg.contains("NaN"), "{msg}");
        let located = decode(&request(vec![1.0, f32::NAN], vec![1, 2]), &spec(), 8);
        assert!(matches!(located, Err(InferError::NonFinite { input: 0, column: 1, .. })), "{located:?}");
    }

    #[test]
    fn rows_over_max_batch_are_refused() {
        let msg = error(&request(vec![1.0; 18], vec![9, 2]));
        assert!(msg.contains("max_batch_size 8"), "{msg}");
    }

    #[test]
    fn unknown_output_is_named() {
        let mut req = request(vec![1.0, 2.0], vec![1, 2]);
        req.outputs = vec![InferRequestedOutputTensor { name: "z".into(), ..Default::default() }];
        assert!(error(&req).contains("unknown requested output 'z'"));
    }

    #[test]
    fn kiln_parameter_of_wrong_type_is_refused() {
        let mut req = request(vec![1.0, 2.0], vec![1, 2]);
        req.parameters.insert(
            "timeout".into(),
            InferParameter { parameter_choice: Some(ParameterChoice::StringParam("1s".into())) },
        );
        assert!(error(&req).contains("parameter 'timeout'"));
    }

    #[test]
    fn unknown_parameters_are_ignored() {
        let mut req = request(vec![1.0, 2.0], vec![1, 2]);
        req.parameters.insert(
            "triton_enable_empty_final_response".into(),
            InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) },
        );
        assert!(decode(&req, &spec(), 8).is_ok());
    }

    #[test]
    fn fp64_int32_and_int64_inputs_decode_alike_from_typed_and_raw_contents() {
        let declared =
            |name: &str, datatype| TensorSpec { name: name.into(), datatype, shape: vec![-1, 2], features: vec![] };
        let spec = ModelSpec::in_memory(
            "m",
            vec![declared("f64", DataType::Fp64), declared("i32", DataType::Int32), declared("i64", DataType::Int64)],
            vec![TensorSpec::fp32("y", 1)],
        );
        let expected = [
            TensorData::Fp64(vec![0.5, -1.25, 3.0, 1e300]),
            TensorData::Int32(vec![1, -2, i32::MAX, i32::MIN]),
            TensorData::Int64(vec![7, -8, i64::MAX, i64::MIN]),
        ];
        let contents = [
            InferTensorContents { fp64_contents: vec![0.5, -1.25, 3.0, 1e300], ..Default::default() },
            InferTensorContents { int_contents: vec![1, -2, i32::MAX, i32::MIN], ..Default::default() },
            InferTensorContents { int64_contents: vec![7, -8, i64::MAX, i64::MIN], ..Default::default() },
        ];
        let input = |name: &str, datatype: &str, contents: Option<InferTensorContents>| InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![2, 2],
            contents,
            ..Default::default()
        };
        let names = [("f64", "FP64"), ("i32", "INT32"), ("i64", "INT64")];
        let typed = ModelInferRequest {
            model_name: "m".into(),
            inputs: names.iter().zip(&contents).map(|((n, d), c)| input(n, d, Some(c.clone()))).collect(),
            ..Default::default()
        };
        let raw = ModelInferRequest {
            model_name: "m".into(),
            inputs: names.iter().map(|(n, d)| input(n, d, None)).collect(),
            raw_input_contents: expected.iter().map(TensorData::to_raw).collect(),
            ..Default::default()
        };
        for request in [typed, raw] {
            let decoded = decode(&request, &spec, 8).expect("valid");
            let data: Vec<&TensorData> = decoded.inputs.iter().map(|t| &t.data).collect();
            assert_eq!(data, expected.iter().collect::<Vec<_>>());
            assert!(decoded.inputs.iter().all(|t| t.shape == [2, 2]));
        }
        // The wrong typed field for the declared type is named.
        let mut wrong = ModelInferRequest { model_name: "m".into(), ..Default::default() };
        wrong.inputs = names.iter().map(|(n, d)| input(n, d, Some(contents[0].clone()))).collect();
        let err = decode(&wrong, &spec, 8).unwrap_err().to_string();
        assert!(err.contains("input 'i32': int_contents holds 0 values, expected 4"), "{err}");
    }

    #[test]
    fn raw_bytes_elements_parse_and_truncation_is_caught() {
        let declared = TensorSpec { name: "s".into(), datatype: DataType::Bytes, shape: vec![-1], features: vec![] };
        let good = TensorData::Bytes(vec![b"hi".to_vec(), b"".to_vec()]).to_raw();
        assert_eq!(from_raw(&declared, &good, 2).expect("valid"), TensorData::Bytes(vec![b"hi".to_vec(), vec![]]));
        assert!(from_raw(&declared, &good[..5], 2).is_err());
    }
}
