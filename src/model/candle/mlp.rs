//! The `mlp` kind: a feed-forward network loaded from `model.safetensors`.
//!
//! Weights layout: optional `input.mean` and `input.std` (feature scaling is
//! part of the artifact, so clients send raw values), then `layers.N.weight`
//! `[out, in]` and `layers.N.bias` `[out]` for N = 0, 1, ...

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor as CTensor};
use candle_nn::Linear;

use super::compute;
use crate::model::registry::{Kind, SectionFacts, section};
use crate::model::{Backend, Inputs, LoadContext, Loaded, ModelError, Tensor, TensorData};
use serde::Deserialize;

/// The file holding an mlp version's weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The `mlp` kind in the registry.
pub static KIND: Kind = Kind {
    name: "mlp",
    platform: "kiln_mlp",
    files: &[WEIGHTS_FILE],
    section: |value| section::<MlpSection>("mlp", value).map(|_| SectionFacts::default()),
    load,
};

fn load(context: &LoadContext<'_>) -> Result<Loaded, ModelError> {
    let section: MlpSection = section("mlp", context.section).map_err(|m| context.config_error(m))?;
    let device = super::select_device(context.device, context.file)?;
    let weights = context.files.get(WEIGHTS_FILE)?;
    let mlp = Mlp::load(context, &section, weights, &device)?;
    Ok(Loaded { backend: Box::new(mlp), tokenizer: None, device: super::device_name(&device) })
}

/// Activation functions an MLP may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Sigmoid,
    None,
}

/// `[mlp]` section: how the layers in the weights file are joined.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MlpSection {
    /// Between hidden layers.
    #[serde(default)]
    pub activation: Activation,
    /// After the last layer (`sigmoid` for a probability).
    #[serde(default = "none_activation")]
    pub output_activation: Activation,
}

fn none_activation() -> Activation {
    Activation::None
}

/// A loaded feed-forward network on one device.
pub struct Mlp {
    scaling: Option<(CTensor, CTensor)>,
    layers: Vec<Linear>,
    activation: Activation,
    output_activation: Activation,
    in_features: usize,
    device: Device,
}

impl Mlp {
    /// Loads and checks the weights against the declared interface: one
    /// FP32 input `[-1, in]` and one FP32 output `[-1, out]`.
    fn load(
        context: &LoadContext<'_>,
        section: &MlpSection,
        weights: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config_err = |m: String| context.config_error(m);
        let [input] = context.inputs else {
            return Err(config_err("field `inputs`: an mlp has exactly one input".into()));
        };
        let [output] = context.outputs else {
            return Err(config_err("field `outputs`: an mlp has exactly one output".into()));
        };
        for (field, t) in [("inputs", input), ("outputs", output)] {
            if t.datatype != crate::model::DataType::Fp32 || t.shape.len() != 2 {
                return Err(config_err(format!(
                    "field `{field}`: an mlp takes FP32 [-1, N], got {} {:?}",
                    t.datatype, t.shape
                )));
            }
        }
        let mut tensors: HashMap<String, CTensor> = candle_core::safetensors::load_buffer(weights, device)
            .map_err(|e| ModelError::Weights(format!("cannot read safetensors: {e}")))?;
        let mut take = |name: &str| -> Option<Result<CTensor, ModelError>> {
            tensors
                .remove(name)
                .map(|t| t.to_dtype(DType::F32).map_err(|e| ModelError::Weights(format!("{name}: {e}"))))
        };
        let in_features = input.row_len();
        let scaling = match (take("input.mean"), take("input.std")) {
            (Some(mean), Some(std)) => {
                let (mean, std) = (mean?, std?);
                for (name, t) in [("input.mean", &mean), ("input.std", &std)] {
                    if t.dims() != [in_features] {
                        return Err(ModelError::Weights(format!(
                            "{name}: shape {:?}, expected [{in_features}]",
                            t.dims()
                        )));
                    }
                }
                Some((mean, std))
            }
            (None, None) => None,
            _ => {
                return Err(ModelError::Weights("input.mean and input.std come together".into()));
            }
        };
        let mut layers = Vec::new();
        let mut width = in_features;
        while let Some(weight) = take(&format!("layers.{}.weight", layers.len())) {
            let i = layers.len();
            let weight = weight?;
            let bias = take(&format!("layers.{i}.bias"))
                .ok_or_else(|| ModelError::Weights(format!("layers.{i}.bias is missing")))??;
            let (out, inp) =
                weight.dims2().map_err(|_| ModelError::Weights(format!("layers.{i}.weight must be 2-D")))?;
            if inp != width || bias.dims() != [out] {
                return Err(ModelError::Weights(format!(
                    "layers.{i}: weight {:?} and bias {:?} do not follow a layer of width {width}",
                    weight.dims(),
                    bias.dims()
                )));
            }
            width = out;
            layers.push(Linear::new(weight, Some(bias)));
        }
        if layers.is_empty() {
            return Err(ModelError::Weights("no layers.0.weight: not an mlp weights file".into()));
        }
        if width != output.row_len() {
            return Err(config_err(format!(
                "field `outputs`: the last layer has {width} units but `{}` declares {}",
                output.name,
                output.row_len()
            )));
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(ModelError::Weights(format!("unexpected tensor `{extra}`")));
        }
        Ok(Self {
            scaling,
            layers,
            activation: section.activation,
            output_activation: section.output_activation,
            in_features,
            device: device.clone(),
        })
    }

    /// Runs the network on `rows` rows of raw features, returning the output
    /// rows flattened.
    pub fn forward(&self, features: Vec<f32>, rows: usize) -> Result<Vec<f32>, ModelError> {
        self.forward_candle(features, rows).map_err(compute)
    }

    fn forward_candle(&self, features: Vec<f32>, rows: usize) -> candle_core::Result<Vec<f32>> {
        let mut x = CTensor::from_vec(features, (rows, self.in_features), &self.device)?;
        if let Some((mean, std)) = &self.scaling {
            x = x.broadcast_sub(mean)?.broadcast_div(std)?;
        }
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            x = activate(x, if i == last { self.output_activation } else { self.activation })?;
        }
        x.flatten_all()?.to_vec1::<f32>()
    }
}

fn activate(x: CTensor, activation: Activation) -> candle_core::Result<CTensor> {
    match activation {
        Activation::Relu => x.relu(),
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => candle_nn::ops::sigmoid(&x),
        Activation::None => Ok(x),
    }
}

impl Backend for Mlp {
    fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError> {
        let tensors = inputs.tensors()?;
        let [input] = tensors else {
            return Err(ModelError::Compute(format!("expected one input tensor, got {}", tensors.len())));
        };
        let TensorData::Fp32(features) = &input.data else {
            return Err(ModelError::Compute("input is not FP32".into()));
        };
        let rows = input.rows();
        let out = self.forward(features.clone(), rows)?;
        let width = out.len() / rows.max(1);
        Ok(vec![Tensor { shape: vec![rows, width], data: TensorData::Fp32(out) }])
    }
}
