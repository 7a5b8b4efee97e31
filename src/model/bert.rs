//! The `bert` kind: a Hugging Face BERT-family folder (`config.json`,
//! `tokenizer.json`, `model.safetensors`) run with candle-transformers,
//! pooled per sentence (mean over real tokens, or CLS) and L2-normalised.
//! Input: BYTES strings `[-1]`; output: FP32 `[-1, hidden]`.

use candle_core::{DType, Device, Tensor as CTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use super::{DataType, ModelError, PrepareOptions, Prepared, Tensor, TensorData, TensorSpec};
use crate::config::ConfigError;
use serde::Deserialize;

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

/// `[bert]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertSection {
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
        }
    }
}

/// A loaded BERT encoder with its tokenizer.
pub struct Bert {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    hidden: usize,
    /// The model's own token limit per text, special tokens included.
    max_tokens: usize,
    /// Whether a text over the limit is cut (else refused) by default.
    truncate: bool,
    /// Longest text in bytes; longer ones are refused before tokenizing.
    max_text_bytes: usize,
    /// Special tokens the post-processor adds to one text ([CLS], [SEP]).
    added: usize,
    unknown_id: Option<u32>,
    /// The input's declared name, for messages.
    input: String,
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
        if section.max_tokens > config.max_position_embeddings {
            return Err(config_err(format!(
                "field `bert.max_tokens`: {} is more than the model's {} positions",
                section.max_tokens, config.max_position_embeddings
            )));
        }
        let tokenizer_json = files.get("tokenizer.json")?;
        let mut tokenizer =
            Tokenizer::from_bytes(tokenizer_json).map_err(|e| ModelError::Weights(format!("tokenizer.json: {e}")))?;
        // Packaged tokenizers often pad every input to a fixed length (128
        // for MiniLM), which multiplies the cost of short sentences; Kiln
        // pads per batch to the longest instead. Truncation is Kiln's too:
        // per request, and refusable.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| ModelError::Weights(format!("tokenizer.json: truncation: {e}")))?;
        let added = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if section.max_tokens <= added {
            return Err(config_err(format!(
                "field `bert.max_tokens`: {} leaves no room for text after {added} special tokens",
                section.max_tokens
            )));
        }
        let unknown_id = serde_json::from_slice::<serde_json::Value>(tokenizer_json)
            .ok()
            .and_then(|v| v["model"]["unk_token"].as_str().and_then(|t| tokenizer.token_to_id(t)));
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
            max_tokens: section.max_tokens,
            truncate: section.truncate,
            max_text_bytes: section.text_bytes_limit(),
            added,
            unknown_id,
            input: input.name.clone(),
            device: device.clone(),
        })
    }

    /// Tokenizes `texts` under `options`, with special tokens, unpadded.
    pub fn tokenize(&self, texts: &[&str], options: &PrepareOptions) -> Result<(Vec<Vec<u32>>, Prepared), ModelError> {
        let limit = options.max_tokens.map_or(self.max_tokens, |m| m.min(self.max_tokens));
        let truncate = options.truncate.unwrap_or(self.truncate);
        if limit <= self.added {
            return Err(ModelError::Input(format!(
                "parameter 'max_tokens': {limit} leaves no room for text: the model adds {} special tokens to each",
                self.added
            )));
        }
        let mut rows = Vec::with_capacity(texts.len());
        let mut found = Prepared { longest: 1, units: 0, truncated: 0, unknown: 0 };
        for (row, text) in texts.iter().enumerate() {
            let cannot = |e: tokenizers::Error| {
                ModelError::Input(format!("input '{}' element {row}: cannot tokenize: {e}", self.input))
            };
            // When cutting, only a prefix long enough for the limit is
            // tokenized; when refusing, the whole (byte-bounded) text is, so
            // the message can say how long it was.
            let mut encoding = if truncate {
                self.encode_prefix(text, limit - self.added).map_err(cannot)?
            } else {
                self.tokenizer.encode(*text, false).map_err(cannot)?
            };
            let count = encoding.len() + self.added;
            if count > limit {
                if !truncate {
                    return Err(ModelError::Input(format!(
                        "input '{}' element {row}: {count} tokens, more than max_tokens {limit}; send \
                         truncate=true to cut it to {limit}, or shorten the text",
                        self.input
                    )));
                }
                encoding.truncate(limit - self.added, 0, TruncationDirection::Right);
                found.truncated += 1;
            }
            let encoding = self.tokenizer.post_process(encoding, None, true).map_err(|e| {
                ModelError::Input(format!("input '{}' element {row}: cannot tokenize: {e}", self.input))
            })?;
            let ids = encoding.get_ids().to_vec();
            found.longest = found.longest.max(ids.len());
            found.units += ids.len();
            found.unknown += self.unknown_id.map_or(0, |u| ids.iter().filter(|id| **id == u).count());
            rows.push(ids);
        }
        Ok((rows, found))
    }

    /// Tokens of `text` without special tokens, enough to hold more than
    /// `keep` when the whole text has more. Prefixes end at whitespace, so
    /// every word in one is whole and tokenizes as in the whole text (the
    /// normalizer and pre-tokenizer work per character and per word); a
    /// prefix with more than `keep` tokens thus starts with the whole
    /// text's first `keep`. Prefixes grow fourfold until one suffices.
    fn encode_prefix(&self, text: &str, keep: usize) -> tokenizers::Result<tokenizers::Encoding> {
        let mut bytes = keep.saturating_mul(16).max(256);
        while bytes < text.len() {
            let mut cut = bytes;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            if let Some(space) = text[..cut].rfind(char::is_whitespace) {
                let encoding = self.tokenizer.encode(&text[..space], false)?;
                if encoding.len() > keep {
                    return Ok(encoding);
                }
            }
            bytes = bytes.saturating_mul(4);
        }
        self.tokenizer.encode(text, false)
    }

    /// Embeds tokenized rows, padding the batch to its longest row.
    pub fn embed(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>, ModelError> {
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

/// The texts of a BYTES tensor; validation admitted only UTF-8.
fn texts(items: &[Vec<u8>]) -> Result<Vec<&str>, ModelError> {
    items
        .iter()
        .enumerate()
        .map(|(i, b)| std::str::from_utf8(b).map_err(|e| ModelError::Input(format!("element {i} is not UTF-8: {e}"))))
        .collect()
}

impl super::Model for Bert {
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let [input] = inputs else {
            return Err(ModelError::Compute(format!("expected one input tensor, got {}", inputs.len())));
        };
        let values = match &input.data {
            TensorData::Tokens(rows) => self.embed(rows)?,
            // In-process callers may pass text; the server prepares it first.
            TensorData::Bytes(items) => self.embed(&self.tokenize(&texts(items)?, &PrepareOptions::default())?.0)?,
            _ => return Err(ModelError::Compute("input is neither text nor tokens".into())),
        };
        Ok(vec![Tensor { shape: vec![input.rows(), self.hidden], data: TensorData::Fp32(values) }])
    }

    fn prepares(&self) -> bool {
        true
    }

    fn check_size(&self, inputs: &[Tensor]) -> Result<(), ModelError> {
        let Some(TensorData::Bytes(items)) = inputs.first().map(|t| &t.data) else { return Ok(()) };
        match items.iter().enumerate().find(|(_, text)| text.len() > self.max_text_bytes) {
            Some((row, text)) => Err(ModelError::Input(format!(
                "input '{}' element {row}: {} bytes of text, more than max_text_bytes {}; it is refused before \
                 tokenizing whatever truncate says: cut it before sending",
                self.input,
                text.len(),
                self.max_text_bytes
            ))),
            None => Ok(()),
        }
    }

    fn prepare(&self, inputs: &mut [Tensor], options: &PrepareOptions) -> Result<Prepared, ModelError> {
        let [input] = inputs else {
            return Err(ModelError::Compute(format!("expected one input tensor, got {}", inputs.len())));
        };
        let TensorData::Bytes(items) = &input.data else {
            return Err(ModelError::Compute("input is not BYTES text".into()));
        };
        let (rows, found) = self.tokenize(&texts(items)?, options)?;
        input.data = TensorData::Tokens(rows);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use candle_nn::VarMap;

    use super::*;
    use crate::model::{Model, VersionFiles};

    const WORDS: &[&str] = &["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "##s"];
    const HIDDEN: usize = 16;

    /// A WordPiece tokenizer over `WORDS` with BERT's [CLS] … [SEP] template.
    fn tokenizer_json() -> String {
        let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
        let vocab: serde_json::Map<String, serde_json::Value> =
            specials.iter().chain(WORDS).enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
            "added_tokens": [],
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                           "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {
                    "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                    "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
                }
            },
            "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}
        })
        .to_string()
    }

    /// A two-layer BERT with random weights, written the way a Hugging Face
    /// folder holds it.
    fn tiny(pooling: Pooling, max_tokens: usize) -> Bert {
        let config = serde_json::json!({
            "vocab_size": 4 + WORDS.len(), "hidden_size": HIDDEN, "num_hidden_layers": 2,
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
                (crate::model::WEIGHTS_FILE.to_string(), std::fs::read(&path).expect("weights")),
            ]
            .into(),
        };
        let spec =
            |name: &str, datatype, shape: Vec<i64>| TensorSpec { name: name.into(), datatype, shape, features: vec![] };
        let section = BertSection { pooling, normalize: true, max_tokens, truncate: true, max_text_bytes: None };
        Bert::load(
            "tiny/model.toml",
            &[spec("text", DataType::Bytes, vec![-1])],
            &[spec("embedding", DataType::Fp32, vec![-1, HIDDEN as i64])],
            &section,
            &files,
            &Device::Cpu,
        )
        .expect("loads")
    }

    fn embed(model: &Bert, texts: &[&str]) -> Vec<Vec<f32>> {
        let input = Tensor {
            shape: vec![texts.len()],
            data: TensorData::Bytes(texts.iter().map(|t| t.as_bytes().to_vec()).collect()),
        };
        let out = model.run(&[input]).expect("runs");
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
    fn mean_pooling_averages_the_token_states_and_cls_takes_the_first() {
        let mut model = tiny(Pooling::Mean, 32);
        let text = "the cat sat on the mat";
        let (rows, _) = model.tokenize(&[text], &PrepareOptions::default()).expect("tokenizes");
        let n = rows[0].len();
        let ids = CTensor::from_vec(rows[0].clone(), (1, n), &Device::Cpu).expect("ids");
        let states = model.model.forward(&ids, &ids.zeros_like().expect("types"), None).expect("forward");
        let states: Vec<Vec<f32>> = states.squeeze(0).expect("squeeze").to_vec2().expect("states");
        let unit = |v: Vec<f32>| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
        };
        let mean = unit((0..HIDDEN).map(|j| states.iter().map(|s| s[j]).sum::<f32>() / n as f32).collect());
        assert!(max_diff(&embed(&model, &[text])[0], &mean) < 1e-5, "mean pooling");
        model.pooling = Pooling::Cls;
        assert!(max_diff(&embed(&model, &[text])[0], &unit(states[0].clone())) < 1e-5, "CLS pooling");
    }

    #[test]
    fn tokens_carry_the_template_and_the_packaged_padding_is_off() {
        let model = tiny(Pooling::Mean, 32);
        let (rows, found) = model.tokenize(&["the cats", "zebra"], &PrepareOptions::default()).expect("tokenizes");
        // [CLS] the cat ##s [SEP]; the tokenizer file pads to 32, Kiln does not.
        assert_eq!(rows[0], vec![2, 4, 5, 14, 3]);
        assert_eq!(rows[1], vec![2, 1, 3]);
        assert_eq!(found, Prepared { longest: 5, units: 8, truncated: 0, unknown: 1 });
    }

    #[test]
    fn a_prefix_is_tokenized_when_cutting_with_the_same_tokens_as_the_whole_text() {
        let model = tiny(Pooling::Mean, 6);
        // Long enough that several prefixes are tried, with runs of spaces
        // and a word cut at each prefix boundary.
        let words = ["the", "cats", "sat", "on", "a", "mat", "far", "away", "zebra"];
        let long: String = (0..2000).map(|i| format!("{}{}", words[i % words.len()], " ".repeat(1 + i % 7))).collect();
        for keep in [1, 4, 40, 400] {
            let whole = model.tokenizer.encode(long.as_str(), false).expect("whole");
            let prefix = model.encode_prefix(&long, keep).expect("prefix");
            assert!(
                prefix.len() > keep && prefix.len() < whole.len(),
                "keep {keep}: {} of {}",
                prefix.len(),
                whole.len()
            );
            assert_eq!(&prefix.get_ids()[..keep], &whole.get_ids()[..keep], "keep {keep}");
        }
        // No whitespace to cut at: the whole text, still correct.
        let one_word = "cats".repeat(500);
        let whole = model.tokenizer.encode(one_word.as_str(), false).expect("whole");
        assert_eq!(model.encode_prefix(&one_word, 4).expect("prefix").get_ids(), whole.get_ids());
    }

    #[test]
    fn text_over_max_text_bytes_is_refused_before_tokenizing() {
        let mut model = tiny(Pooling::Mean, 6);
        model.max_text_bytes = 10;
        let input =
            |t: &str| Tensor { shape: vec![2], data: TensorData::Bytes(vec![b"ok".to_vec(), t.as_bytes().to_vec()]) };
        assert!(model.check_size(&[input("the cat")]).is_ok());
        let Err(ModelError::Input(message)) = model.check_size(&[input("the cat sat on")]) else { panic!("refused") };
        assert!(message.contains("element 1") && message.contains("max_text_bytes 10"), "{message}");
    }

    #[test]
    fn over_the_limit_is_cut_or_refused_as_asked() {
        let model = tiny(Pooling::Mean, 6);
        let long = "the cat sat on the mat";
        let (rows, found) = model.tokenize(&[long], &PrepareOptions::default()).expect("cut by default");
        assert_eq!(rows[0], vec![2, 4, 5, 6, 7, 3], "four words and the template");
        assert_eq!(found.truncated, 1);
        let tighter = PrepareOptions { max_tokens: Some(4), truncate: Some(true) };
        assert_eq!(model.tokenize(&[long], &tighter).expect("cut").0[0], vec![2, 4, 5, 3]);
        let refuse = PrepareOptions { max_tokens: None, truncate: Some(false) };
        match model.tokenize(&["ok", long], &refuse) {
            Err(ModelError::Input(m)) => assert!(m.contains("element 1: 8 tokens, more than max_tokens 6"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A request cannot raise the model's own limit.
        let higher = PrepareOptions { max_tokens: Some(100), truncate: Some(true) };
        assert_eq!(model.tokenize(&[long], &higher).expect("cut").0[0].len(), 6);
        let no_room = PrepareOptions { max_tokens: Some(2), truncate: Some(true) };
        assert!(matches!(model.tokenize(&[long], &no_room), Err(ModelError::Input(_))));
    }
}
