//! Builds V2 responses from Kiln's types: inference answers (always in
//! `raw_output_contents`), model metadata and Triton's `ModelConfig`.

use std::collections::HashMap;

use crate::api::pb::{
    self, InferParameter, ModelConfig, ModelInferResponse, ModelMetadataResponse, infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor, model_metadata_response::TensorMetadata,
};
use crate::config::ModelToml;
use crate::model::{DataType, ModelSpec, TensorSpec};
use crate::pipeline::controls::{AnswerParam, Served};
use crate::repository::ServedModel;

fn int_param(v: u64) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v.min(i64::MAX as u64) as i64)) }
}

fn string_param(v: &str) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::StringParam(v.to_string())) }
}

/// The V2 answer for a served request, with the parameters every answer
/// carries ([`Served::parameters`]).
pub fn infer_response(served: Served) -> ModelInferResponse {
    let parameters: HashMap<String, InferParameter> = served
        .parameters()
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                AnswerParam::Int(v) => int_param(v),
                AnswerParam::Str(v) => string_param(&v),
            };
            (name.to_string(), value)
        })
        .collect();
    let Served { version, answer, .. } = served;
    let (spec, id) = (&version.spec, answer.id);
    let (meta, raw) = answer
        .outputs
        .iter()
        .zip(answer.response.outputs)
        .map(|(&o, tensor)| {
            let declared = &spec.outputs[o];
            let meta = InferOutputTensor {
                name: declared.name.clone(),
                datatype: declared.datatype.as_v2().to_string(),
                shape: tensor.shape.iter().map(|d| *d as i64).collect(),
                ..Default::default()
            };
            (meta, tensor.data.to_raw())
        })
        .unzip();
    ModelInferResponse {
        model_name: spec.name.clone(),
        model_version: spec.version.to_string(),
        id,
        parameters,
        outputs: meta,
        raw_output_contents: raw,
    }
}

/// `version_policy` as Triton's model config names it.
fn version_policy(policy: &crate::repository::policy::VersionPolicy) -> pb::ModelVersionPolicy {
    use crate::repository::policy::VersionPolicy;
    use pb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let choice = match policy {
        VersionPolicy::Latest(n) => PolicyChoice::Latest(Latest { num_versions: *n }),
        VersionPolicy::All(_) => PolicyChoice::All(All {}),
        VersionPolicy::Specific(v) => PolicyChoice::Specific(Specific {
            versions: v.iter().map(|v| i64::try_from(*v).unwrap_or(i64::MAX)).collect(),
        }),
    };
    pb::ModelVersionPolicy { policy_choice: Some(choice) }
}

fn tensor_metadata(t: &TensorSpec) -> TensorMetadata {
    TensorMetadata { name: t.name.clone(), datatype: t.datatype.as_v2().to_string(), shape: t.shape.clone() }
}

/// `ModelMetadata`: shapes include the batch dimension as -1.
pub fn model_metadata(model: &ServedModel, spec: &ModelSpec) -> ModelMetadataResponse {
    ModelMetadataResponse {
        name: model.name.clone(),
        versions: model.versions.keys().map(u64::to_string).collect(),
        platform: spec.platform.clone(),
        inputs: spec.inputs.iter().map(tensor_metadata).collect(),
        outputs: spec.outputs.iter().map(tensor_metadata).collect(),
        kiln_parameters: {
            let mut p = HashMap::from([
                ("model_version".to_string(), string_param(&spec.version.to_string())),
                ("weights_sha256".to_string(), string_param(&spec.weights_sha256)),
            ]);
            // Each feature's hard limits, so clients (kiln bench) can make
            // inputs the model accepts.
            for input in spec.inputs.iter().filter(|i| !i.features.is_empty()) {
                let ranges: Vec<Option<[f64; 2]>> =
                    input.features.iter().map(|f| f.valid_range.map(|(lo, hi)| [lo, hi])).collect();
                let json = serde_json::to_string(&ranges).unwrap_or_default();
                p.insert(format!("{}.valid_ranges", input.name), string_param(&json));
            }
            p
        },
    }
}

fn config_type(dt: DataType) -> i32 {
    (match dt {
        DataType::Fp32 => pb::DataType::TypeFp32,
        DataType::Fp64 => pb::DataType::TypeFp64,
        DataType::Int32 => pb::DataType::TypeInt32,
        DataType::Int64 => pb::DataType::TypeInt64,
        DataType::Bytes => pb::DataType::TypeString,
    }) as i32
}

/// Triton's `ModelConfig` as clients read it. Dims exclude the batch
/// dimension (max_batch_size > 0). Feature names and valid ranges go in
/// `parameters` as JSON so clients can discover them.
pub fn model_config(spec: &ModelSpec, config: &ModelToml) -> ModelConfig {
    let mut parameters = HashMap::new();
    let mut put = |k: String, v: String| {
        parameters.insert(k, pb::ModelParameter { string_value: v });
    };
    put("weights_sha256".into(), spec.weights_sha256.clone());
    put("device".into(), spec.device.clone());
    put("description".into(), spec.description.clone());
    put("latency_budget_ms".into(), config.latency_budget_ms.to_string());
    if let Some(cap) = config.max_cost_us {
        put("max_cost_us".into(), cap.to_string());
    }
    for input in spec.inputs.iter().filter(|i| !i.features.is_empty()) {
        let names: Vec<&str> = input.features.iter().map(|f| f.name.as_str()).collect();
        let ranges: Vec<Option<[f64; 2]>> = input.features.iter().map(|f| f.valid_range.map(|(l, h)| [l, h])).collect();
        put(format!("{}.feature_names", input.name), serde_json::json!(names).to_string());
        put(format!("{}.valid_ranges", input.name), serde_json::json!(ranges).to_string());
    }
    let kind = if spec.device.starts_with("cuda") {
        pb::model_instance_group::Kind::Gpu
    } else {
        pb::model_instance_group::Kind::Cpu
    };
    ModelConfig {
        name: spec.name.clone(),
        platform: spec.platform.clone(),
        backend: "kiln".into(),
        version_policy: Some(version_policy(&config.version_policy)),
        max_batch_size: config.max_batch_size.min(i32::MAX as usize) as i32,
        input: spec
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: config_type(t.datatype),
                dims: t.shape[1..].to_vec(),
                ..Default::default()
            })
            .collect(),
        output: spec
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: config_type(t.datatype),
                dims: t.shape[1..].to_vec(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
            max_queue_delay_microseconds: (config.max_queue_delay_ms * 1000.0).round() as u64,
            priority_levels: config.priority_levels as u64,
            default_priority_level: config.default_priority_level() as u64,
            default_queue_policy: Some(pb::ModelQueuePolicy {
                max_queue_size: config.max_queue.min(u32::MAX as usize) as u32,
                default_timeout_microseconds: (config.default_timeout_ms * 1000.0).round() as u64,
                allow_timeout_override: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
        instance_group: vec![pb::ModelInstanceGroup {
            name: format!("{}_{}", spec.name, spec.device),
            kind: kind as i32,
            count: config.instances.min(i32::MAX as usize) as i32,
            ..Default::default()
        }],
        parameters,
        model_transaction_policy: Some(pb::ModelTransactionPolicy { decoupled: false }),
        response_cache: Some(pb::ModelResponseCache { enable: false }),
        ..Default::default()
    }
}
