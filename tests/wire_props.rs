//! Property tests of the wire pass in front of prost: arbitrary bytes, real
//! requests mutated, and well-formed messages built from the proto never
//! panic, and whatever the pass admits decodes within twice its wire size
//! plus 1 MiB, measured by a counting allocator on the decoding thread.

use kiln::api::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use kiln::api::pb::{InferParameter, InferTensorContents, ModelInferRequest, infer_parameter::ParameterChoice};
use kiln::api::wire::{WireLimits, check_infer_request};
use kiln::model::{DataType, ModelSpec, TensorSpec};
use proptest::prelude::*;
use prost::Message;

#[path = "common/alloc.rs"]
mod alloc;

use alloc::peak_of;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

fn risk_limits() -> WireLimits {
    let spec = ModelSpec::in_memory("risk", vec![TensorSpec::fp32("features", 30)], vec![TensorSpec::fp32("p", 1)]);
    WireLimits::for_model(&spec, 64)
}

fn text_limits() -> WireLimits {
    let text = TensorSpec { name: "text".into(), datatype: DataType::Bytes, shape: vec![-1], features: vec![] };
    WireLimits::for_model(&ModelSpec::in_memory("minilm", vec![text], vec![TensorSpec::fp32("e", 384)]), 64)
}

/// The pass never panics; what it admits decodes within the bound.
fn holds(wire: &[u8], limits: &WireLimits) -> Result<(), TestCaseError> {
    if check_infer_request(wire, limits).is_err() {
        return Ok(());
    }
    let (decoded, peak) = peak_of(|| ModelInferRequest::decode(wire));
    drop(decoded);
    let bound = 2 * wire.len() + (1 << 20);
    prop_assert!(peak <= bound, "admitted {} wire bytes that decoded into a {peak}-byte peak", wire.len());
    Ok(())
}

/// Real requests as the tests and clients send them.
fn seeds() -> Vec<Vec<u8>> {
    let row = vec![0.5f32; 30];
    let mut typed = kiln::client::fp32_request_typed("risk", "features", &[row.clone(), row.clone()]);
    typed
        .parameters
        .insert("timeout".into(), InferParameter { parameter_choice: Some(ParameterChoice::Uint64Param(5)) });
    typed.outputs.push(InferRequestedOutputTensor { name: "p".into(), ..Default::default() });
    vec![
        kiln::client::fp32_request("risk", "features", &[row]).encode_to_vec(),
        typed.encode_to_vec(),
        kiln::client::text_request("minilm", "text", &["a short sentence", "another one"]).encode_to_vec(),
    ]
}

/// A seed with bytes flipped, inserted, cut and a slice repeated.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4, 0usize..2000), 1..8);
    (prop::sample::select(seeds()), edits).prop_map(|(mut wire, edits)| {
        for (at, byte, kind, n) in edits {
            if wire.is_empty() {
                break;
            }
            let i = at.index(wire.len());
            match kind {
                0 => wire[i] ^= byte,
                1 => wire.insert(i, byte),
                2 => wire.truncate(i),
                _ => {
                    let end = (i + 1 + n % 8).min(wire.len());
                    let slice = wire[i..end].to_vec();
                    for _ in 0..n {
                        wire.splice(i..i, slice.iter().copied());
                    }
                }
            }
        }
        wire
    })
}

fn parameter() -> impl Strategy<Value = (String, InferParameter)> {
    ("[a-z]{0,6}", any::<i64>())
        .prop_map(|(k, v)| (k, InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v)) }))
}

fn input() -> impl Strategy<Value = InferInputTensor> {
    (
        "[a-z]{0,8}",
        prop::collection::vec(-3i64..100, 0..6),
        prop::collection::hash_map("[a-z]{0,4}", Just(InferParameter::default()), 0..80),
        prop::collection::vec(any::<i64>(), 0..3000),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3), 0..3000),
        prop::collection::vec(any::<f32>(), 0..500),
    )
        .prop_map(|(name, shape, parameters, int64, bytes, fp32)| InferInputTensor {
            name,
            datatype: "FP32".into(),
            shape,
            parameters,
            contents: Some(InferTensorContents {
                int64_contents: int64,
                bytes_contents: bytes,
                fp32_contents: fp32,
                ..Default::default()
            }),
        })
}

/// Well-formed messages of every shape the proto allows, many entries wide.
fn message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(input(), 0..12),
        prop::collection::vec(
            "[a-z]{0,3}".prop_map(|name| InferRequestedOutputTensor { name, ..Default::default() }),
            0..300,
        ),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..300),
        prop::collection::vec(parameter(), 0..100),
        "[a-z0-9]{0,40}",
    )
        .prop_map(|(inputs, outputs, raw_input_contents, parameters, id)| {
            ModelInferRequest {
                model_name: "risk".into(),
                model_version: String::new(),
                id,
                parameters: parameters.into_iter().collect(),
                inputs,
                outputs,
                raw_input_contents,
            }
            .encode_to_vec()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(wire in prop::collection::vec(any::<u8>(), 0..4096)) {
        holds(&wire, &risk_limits())?;
        holds(&wire, &text_limits())?;
    }

    #[test]
    fn mutated_real_requests_never_panic_and_stay_bounded(wire in mutated()) {
        holds(&wire, &risk_limits())?;
        holds(&wire, &text_limits())?;
    }

    #[test]
    fn well_formed_messages_stay_bounded(wire in message()) {
        holds(&wire, &risk_limits())?;
        holds(&wire, &text_limits())?;
    }
}

#[test]
fn the_seeds_are_admitted() {
    for wire in seeds() {
        let limits = if wire.windows(6).any(|w| w == b"minilm") { text_limits() } else { risk_limits() };
        assert_eq!(check_infer_request(&wire, &limits), Ok(()));
    }
}

#[test]
fn the_allocator_sees_what_prost_builds() {
    // The measurement can fail: 10k empty inputs decode to megabytes.
    let wire = [0x2au8, 0x00].repeat(10_000);
    let (_, peak) = peak_of(|| ModelInferRequest::decode(wire.as_slice()));
    assert!(peak > 2 * wire.len() + (1 << 20), "{peak}");
}
