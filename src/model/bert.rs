//! The `bert` kind: a Hugging Face BERT-family folder (`config.json`,
//! `tokenizer.json`, `model.safetensors`) run with candle-transformers,
//! pooled per sentence (mean over real tokens, or CLS) and L2-normalised.
//! Input: BYTES strings `[-1]`; output: FP32 `[-1, hidden]`.

use candle_core::{DType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use super::{DataType, ModelError, Tensor, TensorData, TensorSpec};
use crate::config::{BertSection, ConfigError, Pooling};

/// A loaded BERT encoder with its tokenizer.
pub struct Bert {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    hidden: usize,
    device: Device,
}

impl Bert {
    /// Loads the model and checks it against the declared interface: one
    /// BYTES input `[-1]` and one FP32 output `[-1, hidden]`.
    pub fn load(
        file: &str,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        section: &BertSection,
        files: &super::VersionFiles,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config_err = |m: String| ModelError::Config(ConfigError::new(file, m));
        let ([input], [output]) = (inputs, outputs) else {
            return Err(config_err("fields `inputs`/`outputs`: a bert model has one input and one output".into()));
        };
        if input.datatype != DataType::Bytes || input.shape != [-1] {
            return Err(config_err(format!(
                "field `inputs`: a bert model takes BYTES [-1], got {} {:?}",
                input.datatype, input.shape
            )));
        }
        let config: Config = serde_json::from_slice(files.get("config.json")?)
            .map_err(|e| ModelError::Weights(format!("config.json: {e}")))?;
        let hidden = config.hidden_size;
        if output.datatype != DataType::Fp32 || output.shape != [-1, hidden as i64] {
            return Err(config_err(format!(
                "field `outputs`: this model embeds into FP32 [-1, {hidden}], declared {} {:?}",
                output.datatype, output.shape
            )));
        }
        let mut tokenizer = Tokenizer::from_bytes(files.get("tokenizer.json")?)
            .map_err(|e| ModelError::Weights(format!("tokenizer.json: {e}")))?;
        // Packaged tokenizers often pad every input to a fixed length (128
        // for MiniLM), which multiplies the cost of short sentences; Kiln
        // pads per batch to the longest instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: section.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Weights(format!("tokenizer.json: truncation: {e}")))?;
        let weights = files.get(super::WEIGHTS_FILE)?.to_vec();
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", super::WEIGHTS_FILE)))?;
        let model = BertModel::load(vb, &config).map_err(|e| ModelError::Weights(format!("BERT weights: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            pooling: section.pooling,
            normalize: section.normalize,
            hidden,
            device: device.clone(),
        })
    }

    /// Embeds `texts`, padding the batch to its longest sequence.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>, ModelError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Compute(format!("tokenizing: {e}")))?;
        let n = encodings.len();
        let longest = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * longest];
        let mut mask = vec![0u32; n * longest];
        for (row, e) in encodings.iter().enumerate() {
            for (j, id) in e.get_ids().iter().enumerate() {
                ids[row * longest + j] = *id;
                mask[row * longest + j] = 1;
            }
        }
        let ids = CTensor::from_vec(ids, (n, longest), &self.device)?;
        let mask = CTensor::from_vec(mask, (n, longest), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                // Mean over real tokens only: padding must not move it.
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                summed.broadcast_div(&mask.sum(1)?)?
            }
        };
        let pooled = if self.normalize {
            let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl super::Model for Bert {
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let [input] = inputs else {
            return Err(ModelError::Compute(format!("expected one input tensor, got {}", inputs.len())));
        };
        let TensorData::Bytes(items) = &input.data else {
            return Err(ModelError::Compute("input is not BYTES".into()));
        };
        // Validation admitted only valid UTF-8.
        let texts: Vec<&str> = items.iter().map(|b| std::str::from_utf8(b).unwrap_or_default()).collect();
        let values = self.embed(&texts)?;
        Ok(vec![Tensor { shape: vec![texts.len(), self.hidden], data: TensorData::Fp32(values) }])
    }
}
