//! The `bert` kind: a Hugging Face BERT-family folder (`config.json`,
//! `tokenizer.json`, `model.safetensors`), pooled per sentence (mean over
//! real tokens, or CLS) and L2-normalised. On the CPU it runs Kiln's packed
//! encoder (`packed.rs`: no padding, fused layers); on CUDA, or with
//! `engine = "candle"`, candle-transformers' BERT.
//! Input: BYTES strings `[-1]`; output: FP32 `[-1, hidden]`.

use candle_core::{DType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, HiddenAct};

use super::compute;
use super::packed::{Dims, PackedBert};
use crate::model::registry::{Kind, SectionFacts, section};
use crate::model::tokenize::{TextLimits, TextTokenizer, TokenizerError};
use crate::model::{Backend, DataType, Inputs, LoadContext, Loaded, ModelError, Tensor, TensorData};
use serde::Deserialize;

/// The files of a bert version: weights first (they identify it).
const WEIGHTS_FILE: &str = "model.safetensors";

/// The `bert` kind in the registry.
pub static KIND: Kind = Kind {
    name: "bert",
    platform: "kiln_bert",
    files: &[WEIGHTS_FILE, "config.json", "tokenizer.json"],
    section: |value| {
        let section = parse_section(value)?;
        Ok(SectionFacts { max_tokens: Some(section.max_tokens) })
    },
    load,
};

fn parse_section(value: Option<&toml::Value>) -> Result<BertSection, String> {
    let section: BertSection = section("bert", value)?;
    if !(1..=1 << 20).contains(&section.max_tokens) {
        return Err(format!("field `bert.max_tokens`: must be 1 to {}, got {}", 1 << 20, section.max_tokens));
    }
    if let Some(bytes) = section.max_text_bytes
        && !(1..=1 << 30).contains(&bytes)
    {
        return Err(format!("field `bert.max_text_bytes`: must be 1 to {}, got {bytes}", 1 << 30));
    }
    Ok(section)
}

fn load(context: &LoadContext<'_>) -> Result<Loaded, ModelError> {
    let section = parse_section(context.section).map_err(|m| context.config_error(m))?;
    let device = super::select_device(context.device, context.file)?;
    let (bert, tokenizer) = Bert::load(context, &section, &device)?;
    Ok(Loaded { backend: Box::new(bert), tokenizer: Some(tokenizer), device: super::device_name(&device) })
}

/// How a sentence embedding is pooled from the token states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the real (unpadded) tokens, as sentence-transformers.
    #[default]
    Mean,
    /// The first token's state.
    Cls,
}

/// Which implementation computes the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Packed on the CPU (when the model's activation is exact GELU),
    /// candle on CUDA.
    #[default]
    Auto,
    /// Kiln's packed CPU encoder.
    Packed,
    /// candle-transformers' BERT (padded batches), for comparison.
    Candle,
}

/// `[bert]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertSection {
    /// The encoder's implementation (`auto`, `packed`, `candle`).
    #[serde(default)]
    pub engine: Engine,
    #[serde(default)]
    pub pooling: Pooling,
    /// L2-normalise each embedding (cosine similarity becomes a dot product).
    #[serde(default = "crate::config::defaults::normalize")]
    pub normalize: bool,
    /// Most tokens per text, special tokens included; requests may lower
    /// it with the `max_tokens` parameter.
    #[serde(default = "crate::config::defaults::max_tokens")]
    pub max_tokens: usize,
    /// A longer text is cut to the limit (true, as sentence-transformers
    /// does) or refused with INVALID_ARGUMENT (false); requests may choose
    /// with the `truncate` parameter.
    #[serde(default = "crate::config::defaults::truncate")]
    pub truncate: bool,
    /// Longest text in bytes, checked before tokenizing: a longer one is
    /// refused whatever `truncate` says, so no client can make the
    /// tokenizer chew on megabytes. Default: `max_tokens` ×
    /// [`TEXT_BYTES_PER_TOKEN`].
    pub max_text_bytes: Option<usize>,
}

/// Bytes of text allowed per token of `max_tokens` when `max_text_bytes`
/// is not set: English runs about 4-5 bytes a token, so this leaves room
/// for a text to be truncated while bounding what is tokenized.
pub const TEXT_BYTES_PER_TOKEN: usize = 64;

impl BertSection {
    /// The text byte limit in force.
    pub fn text_bytes_limit(&self) -> usize {
        self.max_text_bytes.unwrap_or(self.max_tokens.saturating_mul(TEXT_BYTES_PER_TOKEN))
    }
}

impl Default for BertSection {
    fn default() -> Self {
        Self {
            pooling: Pooling::Mean,
            normalize: true,
            max_tokens: crate::config::defaults::max_tokens(),
            truncate: true,
            max_text_bytes: None,
            engine: Engine::Auto,
        }
    }
}

/// The encoder behind a loaded model.
enum Encoder {
    Candle(BertModel),
    Packed(PackedBert),
}

/// A loaded BERT encoder; its tokenizer is the tokenization service's.
pub struct Bert {
    encoder: Encoder,
    pooling: Pooling,
    normalize: bool,
    hidden: usize,
    device: Device,
}

impl Bert {
    /// Loads the model and its tokenizer and checks them against the
    /// declared interface: one BYTES input `[-1]` and one FP32 output
    /// `[-1, hidden]`.
    fn load(
        context: &LoadContext<'_>,
        section: &BertSection,
        device: &Device,
    ) -> Result<(Self, TextTokenizer), ModelError> {
        let config_err = |m: String| context.config_error(m);
        let ([input], [output]) = (context.inputs, context.outputs) else {
            return Err(config_err("fields `inputs`/`outputs`: a bert model has one input and one output".into()));
        };
        if input.datatype != DataType::Bytes || input.shape != [-1] {
            return Err(config_err(format!(
                "field `inputs`: a bert model takes BYTES [-1], got {} {:?}",
                input.datatype, input.shape
            )));
        }
        let files = context.files;
        let config: Config = serde_json::from_slice(files.get("config.json")?)
            .map_err(|e| ModelError::Weights(format!("config.json: {e}")))?;
        let hidden = config.hidden_size;
        if output.datatype != DataType::Fp32 || output.shape != [-1, hidden as i64] {
            return Err(config_err(format!(
                "field `outputs`: this model embeds into FP32 [-1, {hidden}], declared {} {:?}",
                output.datatype, output.shape
            )));
        }
        if section.max_tokens > config.max_position_embeddings {
            return Err(config_err(format!(
                "field `bert.max_tokens`: {} is more than the model's {} positions",
                section.max_tokens, config.max_position_embeddings
            )));
        }
        let limits = TextLimits {
            max_tokens: section.max_tokens,
            truncate: section.truncate,
            max_text_bytes: section.text_bytes_limit(),
        };
        let tokenizer =
            TextTokenizer::from_json(files.get("tokenizer.json")?, limits, &input.name).map_err(|e| match e {
                TokenizerError::NoRoom { .. } => config_err(format!("field `bert.max_tokens`: {e}")),
                TokenizerError::File(m) => ModelError::Weights(format!("tokenizer.json: {m}")),
            })?;
        let weights = files.get(WEIGHTS_FILE)?.to_vec();
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)
            .map_err(|e| ModelError::Weights(format!("{WEIGHTS_FILE}: {e}")))?;
        let weights_err = |e: candle_core::Error| ModelError::Weights(format!("BERT weights: {e}"));
        let packed = match section.engine {
            Engine::Candle => false,
            Engine::Packed => true,
            Engine::Auto => device.is_cpu() && config.hidden_act == HiddenAct::Gelu,
        };
        if packed && (config.hidden_act != HiddenAct::Gelu || config.num_attention_heads == 0) {
            return Err(config_err(
                "field `bert.engine`: the packed engine computes exact GELU (hidden_act = \"gelu\") only".into(),
            ));
        }
        let encoder = if packed {
            let dims = Dims {
                hidden,
                heads: config.num_attention_heads,
                intermediate: config.intermediate_size,
                layers: config.num_hidden_layers,
                max_positions: config.max_position_embeddings,
                eps: config.layer_norm_eps as f32,
            };
            Encoder::Packed(PackedBert::load(vb, dims, config.vocab_size, config.type_vocab_size).map_err(weights_err)?)
        } else {
            Encoder::Candle(BertModel::load(vb, &config).map_err(weights_err)?)
        };
        let bert =
            Self { encoder, pooling: section.pooling, normalize: section.normalize, hidden, device: device.clone() };
        Ok((bert, tokenizer))
    }

    /// Embeds tokenized rows.
    pub fn embed(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>, ModelError> {
        match &self.encoder {
            Encoder::Candle(model) => self.embed_candle(model, rows).map_err(compute),
            Encoder::Packed(model) => {
                let states = model.forward(rows).map_err(ModelError::Compute)?;
                Ok(self.pool_packed(rows, &states))
            }
        }
    }

    /// Pools and normalises packed token states (rows end to end).
    fn pool_packed(&self, rows: &[Vec<u32>], states: &[f32]) -> Vec<f32> {
        let h = self.hidden;
        let mut out = vec![0f32; rows.len() * h];
        let mut start = 0;
        for (row, pooled) in rows.iter().zip(out.chunks_exact_mut(h)) {
            let tokens = &states[start * h..(start + row.len()) * h];
            match self.pooling {
                Pooling::Cls => pooled.copy_from_slice(&tokens[..h.min(tokens.len())]),
                Pooling::Mean => {
                    for token in tokens.chunks_exact(h) {
                        for (p, v) in pooled.iter_mut().zip(token) {
                            *p += v;
                        }
                    }
                    let n = row.len().max(1) as f32;
                    pooled.iter_mut().for_each(|p| *p /= n);
                }
            }
            if self.normalize {
                let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                pooled.iter_mut().for_each(|p| *p /= norm);
            }
            start += row.len();
        }
        out
    }

    /// candle's BERT over the batch padded to its longest row.
    fn embed_candle(&self, model: &BertModel, rows: &[Vec<u32>]) -> candle_core::Result<Vec<f32>> {
        let n = rows.len();
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * longest];
        let mut mask = vec![0u32; n * longest];
        for (row, tokens) in rows.iter().enumerate() {
            ids[row * longest..row * longest + tokens.len()].copy_from_slice(tokens);
            mask[row * longest..row * longest + tokens.len()].fill(1);
        }
        let ids = CTensor::from_vec(ids, (n, longest), &self.device)?;
        let mask = CTensor::from_vec(mask, (n, longest), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = model.forward(&ids, &types, Some(&mask))?;
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
        pooled.flatten_all()?.to_vec1::<f32>()
    }
}

impl Backend for Bert {
    fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError> {
        let rows = inputs.tokens()?;
        let values = self.embed(rows)?;
        Ok(vec![Tensor { shape: vec![rows.len(), self.hidden], data: TensorData::Fp32(values) }])
    }

    fn set_threads(&self, threads: usize) -> bool {
        match &self.encoder {
            Encoder::Packed(model) => {
                model.set_threads(threads);
                true
            }
            Encoder::Candle(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_nn::VarMap;

    use super::*;
    use crate::model::tokenize::TokenizeOptions;
    use crate::model::tokenize::tests::{HIDDEN_WORDS, tokenizer_json};
    use crate::model::{DeviceChoice, TensorSpec, VersionFiles};

    const HIDDEN: usize = 16;

    /// A two-layer BERT with random weights, written the way a Hugging Face
    /// folder holds it.
    pub(crate) fn tiny(pooling: Pooling, max_tokens: usize) -> (Bert, TextTokenizer) {
        tiny_with(pooling, max_tokens, Engine::Auto)
    }

    fn tiny_with(pooling: Pooling, max_tokens: usize, engine: Engine) -> (Bert, TextTokenizer) {
        tiny_engines(pooling, max_tokens, &[engine]).pop().expect("one")
    }

    /// The same random weights loaded once per engine.
    fn tiny_engines(pooling: Pooling, max_tokens: usize, engines: &[Engine]) -> Vec<(Bert, TextTokenizer)> {
        let config = serde_json::json!({
            "vocab_size": HIDDEN_WORDS, "hidden_size": HIDDEN, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "max_position_embeddings": 64, "type_vocab_size": 2,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0
        });
        let parsed: Config = serde_json::from_value(config.clone()).expect("config");
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        BertModel::load(vb, &parsed).expect("random weights");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        varmap.save(&path).expect("save");
        let files = VersionFiles {
            folder: "tiny/1".into(),
            files: [
                ("config.json".to_string(), config.to_string().into_bytes()),
                ("tokenizer.json".to_string(), tokenizer_json().into_bytes()),
                (WEIGHTS_FILE.to_string(), std::fs::read(&path).expect("weights")),
            ]
            .into(),
        };
        let spec =
            |name: &str, datatype, shape: Vec<i64>| TensorSpec { name: name.into(), datatype, shape, features: vec![] };
        let context = LoadContext {
            file: "tiny/model.toml",
            inputs: &[spec("text", DataType::Bytes, vec![-1])],
            outputs: &[spec("embedding", DataType::Fp32, vec![-1, HIDDEN as i64])],
            section: None,
            files: &files,
            device: DeviceChoice::Cpu,
        };
        engines
            .iter()
            .map(|&engine| {
                let section =
                    BertSection { pooling, normalize: true, max_tokens, truncate: true, max_text_bytes: None, engine };
                Bert::load(&context, &section, &Device::Cpu).expect("loads")
            })
            .collect()
    }

    fn embed(model: &(Bert, TextTokenizer), texts: &[&str]) -> Vec<Vec<f32>> {
        let (rows, _) = model.1.tokenize(texts, &TokenizeOptions::default()).expect("tokenizes");
        let out = model.0.run(&Inputs::Tokens(rows)).expect("runs");
        assert_eq!(out[0].shape, vec![texts.len(), HIDDEN]);
        let TensorData::Fp32(values) = &out[0].data else { panic!("fp32 out") };
        values.chunks(HIDDEN).map(<[f32]>::to_vec).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn embeddings_are_unit_length_one_row_per_text() {
        let model = tiny(Pooling::Mean, 32);
        let rows = embed(&model, &["the cat sat", "a dog ran far away", "cats"]);
        for row in &rows {
            let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        assert!(max_diff(&rows[0], &rows[1]) > 1e-3, "different texts embed differently");
    }

    #[test]
    fn padding_to_a_longer_batch_member_changes_nothing() {
        for pooling in [Pooling::Mean, Pooling::Cls] {
            let model = tiny(pooling, 32);
            let alone = embed(&model, &["the cat"]);
            let padded = embed(&model, &["the cat", "the dog sat on a mat far far away the cat sat"]);
            let d = max_diff(&alone[0], &padded[0]);
            assert!(d < 1e-5, "{pooling:?}: padding moved the embedding by {d}");
        }
    }

    #[test]
    fn the_packed_engine_computes_what_candle_computes() {
        for pooling in [Pooling::Mean, Pooling::Cls] {
            let mut both = tiny_engines(pooling, 32, &[Engine::Packed, Engine::Candle]);
            let (candle, packed) = (both.pop().expect("candle"), both.pop().expect("packed"));
            assert!(matches!(packed.0.encoder, Encoder::Packed(_)) && matches!(candle.0.encoder, Encoder::Candle(_)));
            let texts = ["the cat", "the dog sat on a mat far far away the cat sat", "cats", "a dog ran"];
            for (a, b) in embed(&packed, &texts).iter().zip(embed(&candle, &texts)) {
                let d = max_diff(a, &b);
                assert!(d < 1e-5, "{pooling:?}: the engines differ by {d}");
            }
        }
    }

    #[test]
    fn mean_pooling_averages_the_token_states_and_cls_takes_the_first() {
        let mut model = tiny_with(Pooling::Mean, 32, Engine::Candle);
        let text = "the cat sat on the mat";
        let (rows, _) = model.1.tokenize(&[text], &TokenizeOptions::default()).expect("tokenizes");
        let n = rows[0].len();
        let ids = CTensor::from_vec(rows[0].clone(), (1, n), &Device::Cpu).expect("ids");
        let Encoder::Candle(encoder) = &model.0.encoder else { panic!("candle engine") };
        let states = encoder.forward(&ids, &ids.zeros_like().expect("types"), None).expect("forward");
        let states: Vec<Vec<f32>> = states.squeeze(0).expect("squeeze").to_vec2().expect("states");
        let unit = |v: Vec<f32>| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
        };
        let mean = unit((0..HIDDEN).map(|j| states.iter().map(|s| s[j]).sum::<f32>() / n as f32).collect());
        assert!(max_diff(&embed(&model, &[text])[0], &mean) < 1e-5, "mean pooling");
        model.0.pooling = Pooling::Cls;
        assert!(max_diff(&embed(&model, &[text])[0], &unit(states[0].clone())) < 1e-5, "CLS pooling");
    }
}
