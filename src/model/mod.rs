//! The seam between serving and compute: what a model declares (its spec),
//! the [`Backend`] trait that runs one batch, and [`load`], which finds the
//! model's kind in the [`registry`]. A backend sees Kiln's own tensors and
//! token rows only: no candle, file-format or config types cross the seam,
//! and models know nothing of gRPC.
//!
//! Each kind lives in its own folder with its `model.toml` section and the
//! files it needs (`candle/mlp.rs`, `candle/bert.rs`); `registry` is the one
//! place that lists them.

pub mod candle;
pub mod registry;
pub mod tensor;
#[cfg(feature = "test-backends")]
pub mod test_backend;
pub mod threads;
pub mod tokenize;

pub use tensor::{DataType, Tensor, TensorData};

use std::sync::Arc;

use crate::config::{ConfigError, ModelToml, TensorToml};
use crate::model::tokenize::TextTokenizer;

/// One named column of a 2-D input, with its hard limits.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSpec {
    pub name: String,
    pub valid_range: Option<(f64, f64)>,
    /// The upstream's "not known" value, counted as missing by drift.
    pub missing_value: Option<f64>,
}

/// An input or output as the model declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    /// Batch dimension first, as -1.
    pub shape: Vec<i64>,
    pub features: Vec<FeatureSpec>,
}

impl TensorSpec {
    /// Elements in one row (the product of the non-batch dimensions).
    pub fn row_len(&self) -> usize {
        self.shape[1..].iter().map(|d| *d as usize).product()
    }

    /// A `[-1, width]` FP32 tensor with no named features.
    pub fn fp32(name: &str, width: usize) -> Self {
        Self { name: name.into(), datatype: DataType::Fp32, shape: vec![-1, width as i64], features: vec![] }
    }

    fn from_toml(t: &TensorToml) -> Self {
        Self {
            name: t.name.clone(),
            datatype: DataType::from_v2(&t.datatype).expect("checked when model.toml was parsed"),
            shape: t.shape.clone(),
            features: t
                .features
                .iter()
                .map(|f| FeatureSpec {
                    name: f.name.clone(),
                    valid_range: f.valid_range.map(|[lo, hi]| (lo, hi)),
                    missing_value: f.missing_value,
                })
                .collect(),
        }
    }
}

/// Everything the serving side knows about one model version.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub version: u64,
    /// Shown as `platform` in metadata, the kind's (`kiln_mlp`, `kiln_bert`).
    pub platform: String,
    pub description: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Hex sha256 of the weights file, so an answer traces to what made it.
    pub weights_sha256: String,
    /// The device the model really runs on (`cpu`, `cuda:0`).
    pub device: String,
}

impl ModelSpec {
    /// A CPU spec with no description or weights hash, for models built in
    /// memory (tests, benches).
    pub fn in_memory(name: &str, inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> Self {
        Self {
            name: name.into(),
            version: 1,
            platform: "in_memory".into(),
            description: String::new(),
            inputs,
            outputs,
            weights_sha256: String::new(),
            device: "cpu".into(),
        }
    }
}

/// Why a model could not load or could not run a batch.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("weights: {0}")]
    Weights(String),
    #[error("model computation failed: {0}")]
    Compute(String),
    /// The client's input cannot be prepared (a text over its token
    /// limit); the message names the input, row and counts.
    #[error("{0}")]
    Input(String),
}

/// The files of one version folder, by name.
#[derive(Debug, Default)]
pub struct VersionFiles {
    /// Shown in errors: the version folder.
    pub folder: String,
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

impl VersionFiles {
    /// A file the kind needs; the repository checked it is there.
    pub fn get(&self, name: &str) -> Result<&[u8], ModelError> {
        self.files
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| ModelError::Weights(format!("{}/{name} is missing", self.folder)))
    }
}

/// What preparing one request found: the size the batcher plans with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Length of its longest row: tokens for text, 1 for everything else.
    pub longest: usize,
    /// Real (unpadded) units across its rows: tokens for text, else rows.
    pub units: usize,
    /// Rows that were cut to the token limit.
    pub truncated: usize,
    /// Tokens the vocabulary did not know.
    pub unknown: usize,
}

impl Prepared {
    /// Row models: every row is one unit.
    pub fn rows(rows: usize) -> Self {
        Self { longest: 1, units: rows, truncated: 0, unknown: 0 }
    }
}

/// What a backend computes on: the request's tensors as sent, or, for a
/// text model, the token rows its tokenizer made of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// One tensor per declared input, in declared order, rows stacked.
    Tensors(Vec<Tensor>),
    /// One row of token ids per text, unpadded (the batch pads to its
    /// longest row), special tokens included.
    Tokens(Vec<Vec<u32>>),
}

impl Inputs {
    /// Rows along the batch dimension.
    pub fn rows(&self) -> usize {
        match self {
            Self::Tensors(t) => t.first().map_or(0, Tensor::rows),
            Self::Tokens(rows) => rows.len(),
        }
    }

    /// Stacks requests' inputs along the batch dimension; `None` when they
    /// are not of one form and row shape (validation guarantees they are).
    pub fn concat(parts: &[&Inputs]) -> Option<Inputs> {
        match parts.first()? {
            Self::Tensors(first) => (0..first.len())
                .map(|i| {
                    let column: Option<Vec<&Tensor>> = parts
                        .iter()
                        .map(|p| match p {
                            Self::Tensors(t) => t.get(i),
                            Self::Tokens(_) => None,
                        })
                        .collect();
                    Tensor::concat_rows(&column?)
                })
                .collect::<Option<Vec<_>>>()
                .map(Self::Tensors),
            Self::Tokens(_) => {
                let mut rows = Vec::with_capacity(parts.iter().map(|p| p.rows()).sum());
                for part in parts {
                    let Self::Tokens(r) = part else { return None };
                    rows.extend(r.iter().cloned());
                }
                Some(Self::Tokens(rows))
            }
        }
    }

    /// The tensors, for a backend that takes them.
    pub fn tensors(&self) -> Result<&[Tensor], ModelError> {
        match self {
            Self::Tensors(t) => Ok(t),
            Self::Tokens(_) => Err(ModelError::Compute("this model takes tensors, not token rows".into())),
        }
    }

    /// The token rows, for a backend that takes them.
    pub fn tokens(&self) -> Result<&[Vec<u32>], ModelError> {
        match self {
            Self::Tokens(rows) => Ok(rows),
            Self::Tensors(_) => Err(ModelError::Compute("this model takes token rows: tokenize its text first".into())),
        }
    }
}

/// A loaded model on its device: runs one batch and returns every declared
/// output with one row per input row.
pub trait Backend: Send + Sync {
    fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError>;

    /// Sets the threads one computation uses, for a backend that chooses
    /// them itself; `false` when it follows `RAYON_NUM_THREADS` instead
    /// (see [`threads`]).
    fn set_threads(&self, _threads: usize) -> bool {
        false
    }
}

/// A loaded version: its spec, its backend and, for text models, the
/// tokenizer that turns its text into the token rows the backend takes.
pub struct Model {
    pub spec: Arc<ModelSpec>,
    pub backend: Arc<dyn Backend>,
    pub tokenizer: Option<Arc<TextTokenizer>>,
}

impl Model {
    /// Turns tensors into what the backend takes, tokenizing text with
    /// `options` (in-process callers: warm-up, profile, plan, benches; the
    /// server tokenizes on its tokenization service instead).
    pub fn prepare(
        &self,
        inputs: Vec<Tensor>,
        options: &crate::model::tokenize::TokenizeOptions,
    ) -> Result<(Inputs, Prepared), ModelError> {
        match &self.tokenizer {
            None => {
                let rows = inputs.first().map_or(0, Tensor::rows);
                Ok((Inputs::Tensors(inputs), Prepared::rows(rows)))
            }
            Some(tokenizer) => {
                let (rows, size) = tokenizer.tokenize_tensors(&inputs, options)?;
                Ok((Inputs::Tokens(rows), size))
            }
        }
    }

    /// Prepares and runs `inputs` in one go.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ModelError> {
        let (inputs, _) = self.prepare(inputs, &Default::default())?;
        self.backend.run(&inputs)
    }
}

/// Inputs of `rows` rows for `spec`, for warm-up and measurement: zeros for
/// numbers, `text(i)` for the i-th BYTES element.
pub fn sample_inputs(spec: &ModelSpec, rows: usize, text: &dyn Fn(usize) -> Vec<u8>) -> Vec<Tensor> {
    spec.inputs
        .iter()
        .map(|input| {
            let count = rows * input.row_len();
            let data = match input.datatype {
                DataType::Fp32 => TensorData::Fp32(vec![0.0; count]),
                DataType::Fp64 => TensorData::Fp64(vec![0.0; count]),
                DataType::Int32 => TensorData::Int32(vec![0; count]),
                DataType::Int64 => TensorData::Int64(vec![0; count]),
                DataType::Bytes => TensorData::Bytes((0..count).map(text).collect()),
            };
            let mut shape = vec![rows];
            shape.extend(input.shape[1..].iter().map(|d| *d as usize));
            Tensor { shape, data }
        })
        .collect()
}

/// The device a model asks for in `model.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when there is one, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

/// What a kind's loader is given: the declared interface, its own
/// `model.toml` section, the version's files and the device asked for.
pub struct LoadContext<'a> {
    /// The `model.toml` path, for errors.
    pub file: &'a str,
    pub inputs: &'a [TensorSpec],
    pub outputs: &'a [TensorSpec],
    /// The kind's own `[section]`, as written (absent: its defaults).
    pub section: Option<&'a toml::Value>,
    pub files: &'a VersionFiles,
    pub device: DeviceChoice,
}

impl LoadContext<'_> {
    /// A config error naming the `model.toml`.
    pub fn config_error(&self, message: impl Into<String>) -> ModelError {
        ModelError::Config(ConfigError::new(self.file, message))
    }
}

/// What a kind's loader returns.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    /// Text models: the tokenizer their text goes through first.
    pub tokenizer: Option<TextTokenizer>,
    /// The device it really runs on (`cpu`, `cuda:0`).
    pub device: String,
}

/// Builds a model version from its config and files through its kind's
/// loader. `file` names the config for errors.
pub fn load(
    name: &str,
    version: u64,
    file: &str,
    config: &ModelToml,
    files: &VersionFiles,
) -> Result<Model, ModelError> {
    let kind = registry::find(&config.kind)
        .ok_or_else(|| ModelError::Config(ConfigError::new(file, registry::unknown(&config.kind))))?;
    let device = config.device_choice().map_err(|m| ConfigError::new(file, m))?;
    let inputs: Vec<TensorSpec> = config.inputs.iter().map(TensorSpec::from_toml).collect();
    let outputs: Vec<TensorSpec> = config.outputs.iter().map(TensorSpec::from_toml).collect();
    let context =
        LoadContext { file, inputs: &inputs, outputs: &outputs, section: config.section.as_ref(), files, device };
    let loaded = (kind.load)(&context)?;
    let spec = ModelSpec {
        name: name.to_string(),
        version,
        platform: kind.platform.into(),
        description: config.description.clone(),
        inputs,
        outputs,
        weights_sha256: sha256_hex(files.get(kind.identity())?),
        device: loaded.device,
    };
    Ok(Model { spec: Arc::new(spec), backend: Arc::from(loaded.backend), tokenizer: loaded.tokenizer.map(Arc::new) })
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
