//! `kiln infer`: one request from JSON (features by name, or arrays) or
//! CSV rows, on the command line or standard input; outputs printed as JSON.

use std::io::Write;

use anyhow::{Context, Result, bail};
use kiln::api::pb;
use kiln::client::{self, Client};

use super::{Target, status_error};

#[derive(clap::Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub target: Target,
    /// A JSON object of named features (or an array of them, one per row),
    /// a JSON array of numbers, or CSV rows of numbers in feature order.
    /// Read from standard input when absent or `-`.
    // A CSV row may start with a negative number; it is not a flag.
    #[arg(allow_hyphen_values = true)]
    pub input: Option<String>,
}

pub fn run(args: InferArgs) -> Result<()> {
    super::current_thread()?.block_on(infer(args))
}

async fn infer(args: InferArgs) -> Result<()> {
    let text = match args.input.as_deref() {
        None | Some("-") => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
        Some(t) => t.to_string(),
    };
    let target = &args.target;
    let mut client = Client::connect_with(&target.url, &target.security.credentials(None)?).await?;
    let config = client
        .raw
        .model_config(pb::ModelConfigRequest { name: target.model.clone(), version: target.version.clone() })
        .await
        .map_err(status_error)?
        .into_inner()
        .config
        .context("server sent no model config")?;
    let input = config.input.first().context("model declares no input")?;
    let names: Option<Vec<String>> = config
        .parameters
        .get(&format!("{}.feature_names", input.name))
        .and_then(|p| serde_json::from_str(&p.string_value).ok());
    let rows = parse_rows(&text, names.as_deref())?;
    let mut request = client::fp32_request(&target.model, &input.name, &rows);
    request.model_version = target.version.clone();
    let response = client.raw.model_infer(request).await.map_err(status_error)?.into_inner();
    let mut outputs = serde_json::Map::new();
    for (i, out) in response.outputs.iter().enumerate() {
        let values = client::output_fp32(&response, i).context("output is not FP32")?;
        let width = (out.shape.get(1).copied().unwrap_or(1).max(1)) as usize;
        let rows: Vec<&[f32]> = values.chunks(width).collect();
        outputs.insert(out.name.clone(), serde_json::json!(rows));
    }
    let mut params = serde_json::Map::new();
    for k in response.parameters.keys() {
        let v = client::int_parameter(&response, k)
            .map(serde_json::Value::from)
            .or_else(|| client::string_parameter(&response, k).map(serde_json::Value::from));
        if let Some(v) = v {
            params.insert(k.clone(), v);
        }
    }
    let report = serde_json::json!({
        "model": response.model_name,
        "version": response.model_version,
        "outputs": outputs,
        "parameters": params,
    });
    // A reader that stops early (`| head`) is not an error.
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Rows of features from JSON (objects by feature name, or arrays) or CSV.
fn parse_rows(text: &str, names: Option<&[String]>) -> Result<Vec<Vec<f32>>> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let value: serde_json::Value = serde_json::from_str(trimmed).context("input is not valid JSON")?;
        let items = match value {
            serde_json::Value::Array(items) if items.iter().all(|v| v.is_object() || v.is_array()) => items,
            other => vec![other],
        };
        return items.iter().map(|item| json_row(item, names)).collect();
    }
    trimmed
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            line.split(',')
                .map(|v| v.trim().parse::<f32>().with_context(|| format!("CSV value {v:?} is not a number")))
                .collect()
        })
        .collect()
}

fn json_row(item: &serde_json::Value, names: Option<&[String]>) -> Result<Vec<f32>> {
    let number = |v: &serde_json::Value, what: &str| -> Result<f32> {
        v.as_f64().map(|x| x as f32).with_context(|| format!("{what}: {v} is not a number"))
    };
    match item {
        serde_json::Value::Array(values) => {
            values.iter().enumerate().map(|(i, v)| number(v, &format!("element {i}"))).collect()
        }
        serde_json::Value::Object(map) => {
            let names = names.context("the model publishes no feature names; send an array in feature order")?;
            if let Some(unknown) = map.keys().find(|k| !names.contains(k)) {
                bail!("unknown feature {unknown:?}; the model's features are: {}", names.join(", "));
            }
            let missing: Vec<&str> = names.iter().filter(|n| !map.contains_key(*n)).map(String::as_str).collect();
            if !missing.is_empty() {
                bail!("missing features: {}", missing.join(", "));
            }
            names.iter().map(|n| number(&map[n], n)).collect()
        }
        other => bail!("expected a JSON object or array per row, got {other}"),
    }
}
