//! Property tests of the HTTP front end's V2 JSON decoding: arbitrary bytes
//! and mutated real bodies never panic, and whatever a body asks for, its
//! decoding holds at most five times the body's size (an 8-byte INT64 per
//! two-byte `0,`, plus the body itself) plus 64 KiB, measured by a counting
//! allocator on the decoding thread. A generic JSON value tree would hold
//! about fifteen times.

#[path = "common/alloc.rs"]
mod alloc;

use alloc::peak_of;
use kiln::api::http::v2::parse_request;
use proptest::prelude::*;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

fn within_bound(body: &[u8], header: Option<usize>) -> Result<(), TestCaseError> {
    let (_, peak) = peak_of(|| {
        let _ = parse_request("m", "", body, header);
    });
    let bound = 5 * body.len() + 64 * 1024;
    prop_assert!(peak <= bound, "{} body bytes took {peak} bytes to decode (bound {bound})", body.len());
    Ok(())
}

fn request(datatype: &str, shape: &[i64], data: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"p","parameters":{{"timeout":5}},"inputs":[{{"name":"x","shape":{shape:?},"datatype":"{datatype}","data":{data}}}],"outputs":[{{"name":"y","parameters":{{"binary_data":true}}}}]}}"#
    )
    .into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..4096), header in proptest::option::of(0usize..5000)) {
        within_bound(&body, header)?;
    }

    #[test]
    fn mutated_requests_never_panic(
        n in 1usize..2000,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
    ) {
        let data = format!("[{}]", vec!["0"; n].join(","));
        let mut body = request("FP32", &[1, n as i64], &data);
        for (at, byte) in flips {
            let i = at % body.len();
            body[i] = byte;
        }
        body.truncate(cut % (body.len() + 1));
        within_bound(&body, None)?;
    }

    #[test]
    fn the_densest_bodies_stay_within_the_bound_whatever_shape_they_claim(
        n in 1usize..50_000,
        claimed in prop_oneof![Just(None), (1i64..i64::MAX).prop_map(Some)],
        datatype in prop_oneof![Just("INT64"), Just("FP64"), Just("FP32"), Just("INT32"), Just("BYTES")],
    ) {
        let element = if datatype == "BYTES" { "\"\"" } else { "0" };
        let data = format!("[{}]", vec![element; n].join(","));
        let shape = [claimed.unwrap_or(n as i64)];
        let body = request(datatype, &shape, &data);
        within_bound(&body, None)?;
        if claimed.is_none() {
            let (message, _) = parse_request("m", "", &body, None).expect("a well-formed body parses");
            let per = if datatype == "BYTES" { 4 } else if datatype.ends_with("64") { 8 } else { 4 };
            prop_assert_eq!(message.raw_input_contents[0].len(), n * per);
        }
    }

    #[test]
    fn nested_arrays_flatten_in_row_major_order(rows in 1usize..20, cols in 1usize..20) {
        let values: Vec<Vec<f32>> = (0..rows).map(|r| (0..cols).map(|c| (r * cols + c) as f32).collect()).collect();
        let data = serde_json::to_string(&values).expect("json");
        let body = request("FP32", &[rows as i64, cols as i64], &data);
        let (message, _) = parse_request("m", "", &body, None).expect("parses");
        let flat: Vec<f32> = message.raw_input_contents[0].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        prop_assert_eq!(flat, (0..rows * cols).map(|i| i as f32).collect::<Vec<_>>());
    }
}
