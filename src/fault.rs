//! Fault injection for tests, compiled only into test builds and builds
//! with the `test-backends` feature (never into a release): a request whose
//! id names a point makes the server panic there, so tests can prove that
//! what supervises that point recovers.

/// The request id that makes `point` panic: `kiln-fault-<point>`.
pub fn request_id(point: &str) -> String {
    format!("kiln-fault-{point}")
}

/// Panics when `request_id` asks for a fault at `point`.
pub fn inject(point: &str, request_id: &str) {
    if request_id.strip_prefix("kiln-fault-") == Some(point) {
        panic!("fault injected at {point} (test build)");
    }
}
