//! OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models`,
//! as TEI and Infinity serve them, so the `openai` client and the
//! frameworks built on it call a Kiln text model unchanged. A request
//! becomes the V2 message a text model takes (one BYTES input), and goes
//! through the same pipeline as every other.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::api::pb;
use crate::error::InferError;
use crate::model::{DataType, ModelSpec, TensorData};
use crate::pipeline::Answer;

fn invalid(message: String) -> InferError {
    InferError::InvalidArgument(message)
}

/// `input`: one text or a list of texts. Token arrays (lists of integers)
/// are refused by name: Kiln tokenizes with the model's own tokenizer.
#[derive(Debug, PartialEq)]
pub struct Texts(pub Vec<String>);

impl<'de> Deserialize<'de> for Texts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextsVisitor;
        impl<'de> Visitor<'de> for TextsVisitor {
            type Value = Texts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E>(self, v: &str) -> Result<Texts, E> {
                Ok(Texts(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Texts, A::Error> {
                let mut texts = Vec::new();
                while let Some(Text(t)) = seq.next_element()? {
                    texts.push(t);
                }
                Ok(Texts(texts))
            }
        }
        d.deserialize_any(TextsVisitor)
    }
}

struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Err(E::custom(TOKENS_REFUSED))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Err(E::custom(TOKENS_REFUSED))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Text, A::Error> {
                Err(de::Error::custom(TOKENS_REFUSED))
            }
        }
        d.deserialize_any(TextVisitor)
    }
}

const TOKENS_REFUSED: &str = "token arrays are not accepted: send text (a string or a list of strings); Kiln tokenizes with the model's own tokenizer";

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    pub input: Texts,
    pub model: String,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// Accepted and ignored, as OpenAI's own is for a caller's end user.
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// How the vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<EmbeddingsRequest, InferError> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("request body: not an embeddings request: {e}")))
}

/// The text input and the embedding output of a text model: what the
/// endpoint needs a model to have.
pub fn text_interface(spec: &ModelSpec) -> Option<(&str, &str, usize)> {
    let input = spec.inputs.iter().find(|i| i.datatype == DataType::Bytes)?;
    let output = spec.outputs.iter().find(|o| o.datatype == DataType::Fp32 && o.shape.len() == 2)?;
    let width = usize::try_from(*output.shape.get(1)?).ok()?;
    (spec.inputs.len() == 1).then_some((input.name.as_str(), output.name.as_str(), width))
}

/// The request as the model's V2 message, and how to write its vectors.
pub fn to_v2(request: &EmbeddingsRequest, spec: &ModelSpec) -> Result<(pb::ModelInferRequest, Encoding), InferError> {
    let (input, output, width) = text_interface(spec).ok_or_else(|| {
        invalid(format!(
            "field 'model': '{}' is not a text embedding model (one BYTES input, an FP32 [-1, D] output)",
            spec.name
        ))
    })?;
    let encoding = match request.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(invalid(format!("field 'encoding_format': expected \"float\" or \"base64\", got \"{other}\"")));
        }
    };
    if let Some(d) = request.dimensions.filter(|d| *d as usize != width) {
        return Err(invalid(format!(
            "field 'dimensions': model '{}' gives {width}-dimensional embeddings and cannot shorten them (asked for {d})",
            spec.name
        )));
    }
    if request.input.0.is_empty() {
        return Err(invalid("field 'input': an empty list; send at least one text".into()));
    }
    let mut raw = Vec::new();
    for text in &request.input.0 {
        raw.extend_from_slice(&(text.len() as u32).to_le_bytes());
        raw.extend_from_slice(text.as_bytes());
    }
    let message = pb::ModelInferRequest {
        model_name: spec.name.clone(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: input.to_string(),
            datatype: "BYTES".into(),
            shape: vec![request.input.0.len() as i64],
            ..Default::default()
        }],
        outputs: vec![pb::model_infer_request::InferRequestedOutputTensor {
            name: output.to_string(),
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    };
    Ok((message, encoding))
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct Embedding<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<Embedding<'a>>,
    model: &'a str,
    usage: Usage,
}

/// The answer as OpenAI's embeddings response; `usage` counts the real
/// (unpadded) tokens the model computed.
pub fn encode(model: &str, answer: &Answer, encoding: Encoding) -> Result<Vec<u8>, InferError> {
    let tensor = answer
        .response
        .outputs
        .first()
        .ok_or_else(|| InferError::Unavailable("the model answered without an embedding".into()))?;
    let TensorData::Fp32(values) = &tensor.data else {
        return Err(InferError::Unavailable("the model's embedding is not FP32".into()));
    };
    let width = tensor.row_len().max(1);
    let data = values
        .chunks(width)
        .enumerate()
        .map(|(index, row)| Embedding {
            object: "embedding",
            index,
            embedding: match encoding {
                Encoding::Float => Vector::Float(row),
                Encoding::Base64 => Vector::Base64(
                    base64::engine::general_purpose::STANDARD
                        .encode(row.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
                ),
            },
        })
        .collect();
    let response = EmbeddingsResponse {
        object: "list",
        data,
        model,
        usage: Usage { prompt_tokens: answer.units, total_tokens: answer.units },
    };
    serde_json::to_vec(&response).map_err(|e| InferError::Unavailable(format!("encoding the answer: {e}")))
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

/// `GET /v1/models`: the text models served.
pub fn models<'a>(names: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let data = names.map(|id| ModelEntry { id, object: "model", created: 0, owned_by: "kiln" }).collect();
    serde_json::to_vec(&ModelList { object: "list", data }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_a_string_or_a_list_of_strings_and_token_arrays_are_refused() {
        let one = parse(br#"{"input":"hello","model":"minilm"}"#).expect("one text");
        assert_eq!(one.input, Texts(vec!["hello".into()]));
        let many = parse(br#"{"input":["a","b"],"model":"minilm","encoding_format":"base64"}"#).expect("texts");
        assert_eq!(many.input, Texts(vec!["a".into(), "b".into()]));
        for tokens in [&br#"{"input":[1,2,3],"model":"m"}"#[..], br#"{"input":[[1,2],[3]],"model":"m"}"#] {
            let err = parse(tokens).err().expect("refused").to_string();
            assert!(err.contains("token arrays are not accepted"), "{err}");
        }
        let err = parse(br#"{"model":"m"}"#).err().expect("refused").to_string();
        assert!(err.contains("missing field `input`"), "{err}");
    }
}
