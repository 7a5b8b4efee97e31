//! The seam between serving and compute: what a model declares (its spec)
//! and the trait that runs one batch. Models know nothing of gRPC.

pub mod bert;
pub mod mlp;
pub mod tensor;

pub use tensor::{DataType, Tensor, TensorData};

use crate::config::{ConfigError, DeviceChoice, ModelKind, ModelToml, TensorToml};

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
    /// Shown as `platform` in metadata, e.g. `kiln_mlp`.
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
            platform: "kiln_mlp".into(),
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

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Compute(e.to_string())
    }
}

/// The file holding a version's weights; its sha256 identifies the version.
pub const WEIGHTS_FILE: &str = "model.safetensors";

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

/// A request's own limits on preparing its inputs (request parameters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Most tokens per text, below the model's own limit.
    pub max_tokens: Option<usize>,
    /// Cut longer texts to the limit (true) or refuse them (false); `None`
    /// takes the model's default.
    pub truncate: Option<bool>,
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

/// A loaded model: runs one batch of inputs (in declared order, rows
/// stacked) and returns every declared output with the same rows.
pub trait Model: Send + Sync {
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError>;

    /// True when `prepare` does real work (tokenizing), which then runs on
    /// the preparation pool rather than inline.
    fn prepares(&self) -> bool {
        false
    }

    /// Cheap checks of a request's raw size that must pass before any
    /// preparation work is spent on it (a text's byte length).
    fn check_size(&self, _inputs: &[Tensor]) -> Result<(), ModelError> {
        Ok(())
    }

    /// Turns one request's validated inputs into the form `run` takes,
    /// before it is queued, so the executor thread only computes.
    fn prepare(&self, inputs: &mut [Tensor], _options: &PrepareOptions) -> Result<Prepared, ModelError> {
        Ok(Prepared::rows(inputs.first().map_or(0, Tensor::rows)))
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

/// Picks the candle device for a `device` setting. `file` names the config
/// in errors; `auto` falls back to the CPU with a log line.
pub fn select_device(choice: DeviceChoice, file: &str) -> Result<candle_core::Device, ConfigError> {
    match choice {
        DeviceChoice::Cpu => Ok(candle_core::Device::Cpu),
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available()
                && let Ok(device) = candle_core::Device::new_cuda(0)
            {
                return Ok(device);
            }
            tracing::info!(file, "device = \"auto\": no CUDA device in this build or machine, running on the CPU");
            Ok(candle_core::Device::Cpu)
        }
        DeviceChoice::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(ConfigError::new(
                    file,
                    format!(
                        "field `device`: \"cuda:{ordinal}\" needs a build with CUDA \
                         (cargo build --release --features cuda); use \"auto\" or \"cpu\""
                    ),
                ));
            }
            candle_core::Device::new_cuda(ordinal)
                .map_err(|e| ConfigError::new(file, format!("field `device`: cuda:{ordinal}: {e}")))
        }
    }
}

fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Builds a model version from its config and weights bytes. `file` names
/// the config for errors.
pub fn load(
    name: &str,
    version: u64,
    file: &str,
    config: &ModelToml,
    files: &VersionFiles,
) -> Result<(ModelSpec, Box<dyn Model>), ModelError> {
    let weights = files.get(WEIGHTS_FILE)?;
    let choice = config.device_choice().map_err(|m| ConfigError::new(file, m))?;
    let device = select_device(choice, file)?;
    let inputs: Vec<TensorSpec> = config.inputs.iter().map(TensorSpec::from_toml).collect();
    let outputs: Vec<TensorSpec> = config.outputs.iter().map(TensorSpec::from_toml).collect();
    let model: Box<dyn Model> = match config.kind {
        ModelKind::Mlp => Box::new(mlp::Mlp::load(
            file,
            &inputs,
            &outputs,
            &config.mlp.clone().unwrap_or_default(),
            weights,
            &device,
        )?),
        ModelKind::Bert => Box::new(bert::Bert::load(
            file,
            &inputs,
            &outputs,
            &config.bert.clone().unwrap_or_default(),
            files,
            &device,
        )?),
    };
    let spec = ModelSpec {
        name: name.to_string(),
        version,
        platform: match config.kind {
            ModelKind::Mlp => "kiln_mlp".into(),
            ModelKind::Bert => "kiln_bert".into(),
        },
        description: config.description.clone(),
        inputs,
        outputs,
        weights_sha256: sha256_hex(weights),
        device: device_name(&device),
    };
    Ok((spec, model))
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
