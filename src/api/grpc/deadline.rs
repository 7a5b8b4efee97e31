//! The gRPC deadline (`grpc-timeout` header). tonic's server would enforce
//! it itself and answer CANCELLED "Timeout expired"; Kiln moves the header
//! into a request extension before tonic sees it, so that the deadline joins
//! the others and expiry answers DEADLINE_EXCEEDED.

use std::time::{Duration, Instant};

/// The call's deadline as the client set it, or why the header was bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcDeadline {
    At(Instant),
    Invalid,
}

const HEADER: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value: up to 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), per the gRPC HTTP/2 spec.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Removes `grpc-timeout` from the request and records it as a
/// [`GrpcDeadline`] extension measured from now.
pub fn take_grpc_timeout<B>(mut request: http::Request<B>) -> http::Request<B> {
    if let Some(value) = request.headers_mut().remove(HEADER) {
        let deadline = value
            .to_str()
            .ok()
            .and_then(parse_timeout)
            .and_then(|d| Instant::now().checked_add(d))
            .map_or(GrpcDeadline::Invalid, GrpcDeadline::At);
        request.extensions_mut().insert(deadline);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse() {
        assert_eq!(parse_timeout("5m"), Some(Duration::from_millis(5)));
        assert_eq!(parse_timeout("250u"), Some(Duration::from_micros(250)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in ["", "m", "5", "5x", "123456789m", "-5m", "5.0m"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_moves_into_an_extension() {
        let request = http::Request::builder().header("grpc-timeout", "10m").body(()).expect("request");
        let request = take_grpc_timeout(request);
        assert!(request.headers().get("grpc-timeout").is_none());
        assert!(matches!(request.extensions().get::<GrpcDeadline>(), Some(GrpcDeadline::At(_))));
    }
}
