//! Triton's JSON for a model's configuration (`/config`) and statistics
//! (`/stats`), which tritonclient.http and `perf_analyzer -i http` read:
//! the same messages the gRPC side answers, written as Triton writes them
//! (enum names as strings, 64-bit counts as numbers).

use serde_json::{Value, json};

use crate::api::pb;

fn data_type(value: i32) -> &'static str {
    pb::DataType::try_from(value).map_or("TYPE_INVALID", |t| t.as_str_name())
}

fn tensor(name: &str, datatype: i32, dims: &[i64]) -> Value {
    json!({ "name": name, "data_type": data_type(datatype), "dims": dims })
}

/// A model configuration as Triton's `GET /v2/models/{name}/config`.
pub fn config(c: &pb::ModelConfig) -> Value {
    let mut out = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|t| tensor(&t.name, t.data_type, &t.dims)).collect::<Vec<_>>(),
        "output": c.output.iter().map(|t| tensor(&t.name, t.data_type, &t.dims)).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({
            "name": g.name,
            "kind": pb::model_instance_group::Kind::try_from(g.kind).map_or("KIND_AUTO", |k| k.as_str_name()),
            "count": g.count,
        })).collect::<Vec<_>>(),
    });
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(d)) = &c.scheduling_choice {
        let policy = d.default_queue_policy.unwrap_or_default();
        out["dynamic_batching"] = json!({
            "max_queue_delay_microseconds": d.max_queue_delay_microseconds,
            "priority_levels": d.priority_levels,
            "default_priority_level": d.default_priority_level,
            "default_queue_policy": {
                "max_queue_size": policy.max_queue_size,
                "default_timeout_microseconds": policy.default_timeout_microseconds,
                "allow_timeout_override": policy.allow_timeout_override,
            },
        });
    }
    out
}

fn duration(d: &Option<pb::StatisticDuration>) -> Value {
    let d = d.unwrap_or_default();
    json!({ "count": d.count, "ns": d.ns })
}

/// Statistics as Triton's `GET /v2/models[/{name}[/versions/{v}]]/stats`.
pub fn statistics(stats: &[pb::ModelStatistics]) -> Value {
    let models: Vec<Value> = stats
        .iter()
        .map(|s| {
            let i = s.inference_stats.unwrap_or_default();
            json!({
                "name": s.name,
                "version": s.version,
                "last_inference": s.last_inference,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": duration(&i.success),
                    "fail": duration(&i.fail),
                    "queue": duration(&i.queue),
                    "compute_input": duration(&i.compute_input),
                    "compute_infer": duration(&i.compute_infer),
                    "compute_output": duration(&i.compute_output),
                    "cache_hit": duration(&i.cache_hit),
                    "cache_miss": duration(&i.cache_miss),
                },
                "batch_stats": s.batch_stats.iter().map(|b| json!({
                    "batch_size": b.batch_size,
                    "compute_input": duration(&b.compute_input),
                    "compute_infer": duration(&b.compute_infer),
                    "compute_output": duration(&b.compute_output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "model_stats": models })
}
