//! The `test` kind, built only with the `test-backends` feature (the test
//! suite's build; never a release). It proves the registry (a kind with its
//! own file, section and loader, registered in one place) and lets tests
//! break the server on purpose.
//!
//! It computes `y = scale × Σ x` per row (FP32 `[-1, N]` in, `[-1, 1]`
//! out), `scale` read from `scale.json` in the version folder. Its
//! `[test]` section can slow every batch (`delay_ms`) or, for a row holding
//! `break_on`, return an output shorter than its shape claims: splitting it
//! then panics in the executor, outside the backend's guard; a batch
//! holding `fail_on` fails with the model's own error.

use serde::Deserialize;

use super::registry::{Kind, SectionFacts, section};
use super::{Backend, DataType, Inputs, LoadContext, Loaded, ModelError, Tensor, TensorData};

/// The file that identifies a version: `{"scale": 2.0}`.
pub const SCALE_FILE: &str = "scale.json";

/// The `test` kind in the registry.
pub static KIND: Kind = Kind {
    name: "test",
    platform: "kiln_test",
    files: &[SCALE_FILE],
    section: |value| section::<TestSection>("test", value).map(|_| SectionFacts::default()),
    load,
};

/// `[test]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSection {
    /// Milliseconds every batch takes at least.
    #[serde(default)]
    pub delay_ms: u64,
    /// A row holding this value gets a malformed output.
    pub break_on: Option<f32>,
    /// A batch holding this value fails (the model's own error).
    pub fail_on: Option<f32>,
}

#[derive(Deserialize)]
struct ScaleFile {
    scale: f32,
}

struct TestBackend {
    scale: f32,
    width: usize,
    section: TestSection,
}

fn load(context: &LoadContext<'_>) -> Result<Loaded, ModelError> {
    let section: TestSection = section("test", context.section).map_err(|m| context.config_error(m))?;
    let ([input], [output]) = (context.inputs, context.outputs) else {
        return Err(context.config_error("fields `inputs`/`outputs`: a test model has one input and one output"));
    };
    if input.datatype != DataType::Fp32 || input.shape.len() != 2 || output.shape != [-1, 1] {
        return Err(context.config_error("a test model takes FP32 [-1, N] and gives FP32 [-1, 1]"));
    }
    let file: ScaleFile = serde_json::from_slice(context.files.get(SCALE_FILE)?)
        .map_err(|e| ModelError::Weights(format!("{SCALE_FILE}: {e}")))?;
    let backend = TestBackend { scale: file.scale, width: input.row_len(), section };
    Ok(Loaded { backend: Box::new(backend), tokenizer: None, device: "cpu".into() })
}

impl Backend for TestBackend {
    fn run(&self, inputs: &Inputs) -> Result<Vec<Tensor>, ModelError> {
        let [input] = inputs.tensors()? else {
            return Err(ModelError::Compute("expected one input".into()));
        };
        let TensorData::Fp32(values) = &input.data else {
            return Err(ModelError::Compute("input is not FP32".into()));
        };
        std::thread::sleep(std::time::Duration::from_millis(self.section.delay_ms));
        if let Some(bad) = self.section.fail_on
            && values.contains(&bad)
        {
            return Err(ModelError::Compute(format!("fail_on {bad} (test kind)")));
        }
        let rows = input.rows();
        let mut out: Vec<f32> = values.chunks(self.width).map(|row| self.scale * row.iter().sum::<f32>()).collect();
        if let Some(bad) = self.section.break_on
            && values.contains(&bad)
        {
            out.clear();
        }
        Ok(vec![Tensor { shape: vec![rows, 1], data: TensorData::Fp32(out) }])
    }
}
