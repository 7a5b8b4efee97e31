//! Tokenization, a service of its own (as in TEI's `core/src/tokenization.rs`):
//! a text model declares a [`TextTokenizer`] (a Hugging Face
//! `tokenizer.json` with the model's limits); the server runs it on the
//! [`Tokenization`] service's threads before a request queues, so the
//! batcher plans with token counts and the backend only computes on the
//! token rows it is given.

mod pool;

use std::sync::Arc;
use std::time::Instant;

use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use crate::model::{ModelError, Prepared, Tensor, TensorData};
pub use pool::{PrepareError, PreparePool};

/// A request's own limits on tokenizing its text (request parameters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Most tokens per text, below the model's own limit.
    pub max_tokens: Option<usize>,
    /// Cut longer texts to the limit (true) or refuse them (false); `None`
    /// takes the model's default.
    pub truncate: Option<bool>,
}

/// A text model's own limits, from its `model.toml` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimits {
    /// Most tokens per text, special tokens included.
    pub max_tokens: usize,
    /// Whether a longer text is cut (else refused) by default.
    pub truncate: bool,
    /// Longest text in bytes; longer ones are refused before tokenizing.
    pub max_text_bytes: usize,
}

/// A loaded tokenizer with its model's limits.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    limits: TextLimits,
    /// Special tokens the post-processor adds to one text ([CLS], [SEP]).
    added: usize,
    unknown_id: Option<u32>,
    /// The input's declared name, for messages.
    input: String,
}

impl TextTokenizer {
    /// Reads a `tokenizer.json` for the text input named `input`. A limit
    /// that leaves no room for text is a config error, returned as the
    /// message to name the field with.
    pub fn from_json(json: &[u8], limits: TextLimits, input: &str) -> Result<Self, TokenizerError> {
        let mut tokenizer = Tokenizer::from_bytes(json).map_err(|e| TokenizerError::File(e.to_string()))?;
        // Packaged tokenizers often pad every input to a fixed length (128
        // for MiniLM), which multiplies the cost of short sentences; Kiln
        // pads per batch to the longest instead. Truncation is Kiln's too:
        // per request, and refusable.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| TokenizerError::File(format!("truncation: {e}")))?;
        let added = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if limits.max_tokens <= added {
            return Err(TokenizerError::NoRoom { max_tokens: limits.max_tokens, added });
        }
        let unknown_id = serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v["model"]["unk_token"].as_str().and_then(|t| tokenizer.token_to_id(t)));
        Ok(Self { tokenizer, limits, added, unknown_id, input: input.to_string() })
    }

    /// Cheap checks that must pass before any tokenizer time is spent: a
    /// text's byte length.
    pub fn check_size(&self, inputs: &[Tensor]) -> Result<(), ModelError> {
        let Some(TensorData::Bytes(items)) = inputs.first().map(|t| &t.data) else { return Ok(()) };
        let limit = self.limits.max_text_bytes;
        match items.iter().enumerate().find(|(_, text)| text.len() > limit) {
            Some((row, text)) => Err(ModelError::Input(format!(
                "input '{}' element {row}: {} bytes of text, more than max_text_bytes {limit}; it is refused before \
                 tokenizing whatever truncate says: cut it before sending",
                self.input,
                text.len(),
            ))),
            None => Ok(()),
        }
    }

    /// Tokenizes the text input of a request (its one BYTES tensor).
    pub fn tokenize_tensors(
        &self,
        inputs: &[Tensor],
        options: &TokenizeOptions,
    ) -> Result<(Vec<Vec<u32>>, Prepared), ModelError> {
        let [input] = inputs else {
            return Err(ModelError::Compute(format!("expected one text input, got {} tensors", inputs.len())));
        };
        let TensorData::Bytes(items) = &input.data else {
            return Err(ModelError::Compute("the text input is not BYTES".into()));
        };
        let texts = items
            .iter()
            .enumerate()
            .map(|(i, b)| {
                std::str::from_utf8(b).map_err(|e| ModelError::Input(format!("element {i} is not UTF-8: {e}")))
            })
            .collect::<Result<Vec<&str>, _>>()?;
        self.tokenize(&texts, options)
    }

    /// Tokenizes `texts` under `options`, with special tokens, unpadded.
    pub fn tokenize(&self, texts: &[&str], options: &TokenizeOptions) -> Result<(Vec<Vec<u32>>, Prepared), ModelError> {
        let limit = options.max_tokens.map_or(self.limits.max_tokens, |m| m.min(self.limits.max_tokens));
        let truncate = options.truncate.unwrap_or(self.limits.truncate);
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
            let encoding = self.tokenizer.post_process(encoding, None, true).map_err(cannot)?;
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
}

/// Why a `tokenizer.json` cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer.json: {0}")]
    File(String),
    #[error("{max_tokens} tokens leave no room for text after {added} special tokens")]
    NoRoom { max_tokens: usize, added: usize },
}

/// Why a request's text was not tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The text itself (too long, not UTF-8): the client's to fix.
    #[error("{0}")]
    Input(String),
    /// The service refused or failed it (queue full, deadline, panic).
    #[error(transparent)]
    Service(#[from] PrepareError),
    #[error("{0}")]
    Failed(String),
}

/// The tokenization service: a few OS threads behind a bounded queue, so
/// the async runtime keeps answering calls and the executors only compute.
pub struct Tokenization {
    pool: PreparePool,
}

impl Tokenization {
    pub fn new(pool: PreparePool) -> Self {
        Self { pool }
    }

    /// Tokenizes a request's text input on the service's threads, or
    /// refuses it at once when the queue is full. Work whose caller has
    /// gone or whose `deadline` passed while it waited is skipped.
    pub async fn encode(
        &self,
        tokenizer: &Arc<TextTokenizer>,
        inputs: Vec<Tensor>,
        options: TokenizeOptions,
        deadline: Instant,
    ) -> Result<(Vec<Vec<u32>>, Prepared), TokenizeError> {
        let tokenizer = tokenizer.clone();
        let outcome = self.pool.run(deadline, move || tokenizer.tokenize_tensors(&inputs, &options)).await?;
        outcome.map_err(|e| match e {
            ModelError::Input(message) => TokenizeError::Input(message),
            other => TokenizeError::Failed(other.to_string()),
        })
    }

    /// Stops the threads once the queued work is done.
    pub fn close(&self) {
        self.pool.close();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const WORDS: &[&str] = &["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "##s"];
    /// The vocabulary's size: four special tokens and `WORDS`.
    pub(crate) const HIDDEN_WORDS: usize = 4 + WORDS.len();

    /// A WordPiece tokenizer over `WORDS` with BERT's [CLS] … [SEP] template.
    pub(crate) fn tokenizer_json() -> String {
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

    fn tiny(max_tokens: usize) -> TextTokenizer {
        let limits = TextLimits { max_tokens, truncate: true, max_text_bytes: max_tokens * 64 };
        TextTokenizer::from_json(tokenizer_json().as_bytes(), limits, "text").expect("loads")
    }

    #[test]
    fn tokens_carry_the_template_and_the_packaged_padding_is_off() {
        let model = tiny(32);
        let (rows, found) = model.tokenize(&["the cats", "zebra"], &TokenizeOptions::default()).expect("tokenizes");
        // [CLS] the cat ##s [SEP]; the tokenizer file pads to 32, Kiln does not.
        assert_eq!(rows[0], vec![2, 4, 5, 14, 3]);
        assert_eq!(rows[1], vec![2, 1, 3]);
        assert_eq!(found, Prepared { longest: 5, units: 8, truncated: 0, unknown: 1 });
    }

    #[test]
    fn a_prefix_is_tokenized_when_cutting_with_the_same_tokens_as_the_whole_text() {
        let model = tiny(6);
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
        let mut model = tiny(6);
        model.limits.max_text_bytes = 10;
        let input =
            |t: &str| Tensor { shape: vec![2], data: TensorData::Bytes(vec![b"ok".to_vec(), t.as_bytes().to_vec()]) };
        assert!(model.check_size(&[input("the cat")]).is_ok());
        let Err(ModelError::Input(message)) = model.check_size(&[input("the cat sat on")]) else { panic!("refused") };
        assert!(message.contains("element 1") && message.contains("max_text_bytes 10"), "{message}");
    }

    #[test]
    fn over_the_limit_is_cut_or_refused_as_asked() {
        let model = tiny(6);
        let long = "the cat sat on the mat";
        let (rows, found) = model.tokenize(&[long], &TokenizeOptions::default()).expect("cut by default");
        assert_eq!(rows[0], vec![2, 4, 5, 6, 7, 3], "four words and the template");
        assert_eq!(found.truncated, 1);
        let tighter = TokenizeOptions { max_tokens: Some(4), truncate: Some(true) };
        assert_eq!(model.tokenize(&[long], &tighter).expect("cut").0[0], vec![2, 4, 5, 3]);
        let refuse = TokenizeOptions { max_tokens: None, truncate: Some(false) };
        match model.tokenize(&["ok", long], &refuse) {
            Err(ModelError::Input(m)) => assert!(m.contains("element 1: 8 tokens, more than max_tokens 6"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A request cannot raise the model's own limit.
        let higher = TokenizeOptions { max_tokens: Some(100), truncate: Some(true) };
        assert_eq!(model.tokenize(&[long], &higher).expect("cut").0[0].len(), 6);
        let no_room = TokenizeOptions { max_tokens: Some(2), truncate: Some(true) };
        assert!(matches!(model.tokenize(&[long], &no_room), Err(ModelError::Input(_))));
    }
}
