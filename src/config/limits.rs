//! `[limits]` of the server config: what one client may hold of the
//! server (bytes in flight, connections, streams, time) before it is
//! refused. Every value is range-checked at start-up.

use std::time::Duration;

use serde::Deserialize;

/// Bounds on connections and in-flight requests, with defaults a shared
/// machine can live with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Request bytes held by all calls at once, reserved as body frames
    /// arrive and released when the answer is sent; beyond it a call is
    /// refused at once with RESOURCE_EXHAUSTED.
    pub max_inflight_bytes: u64,
    /// Longest a call may take to deliver its request body.
    pub body_timeout_ms: u64,
    /// Open connections per listener; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams (calls) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Largest header block of one call.
    pub max_header_list_bytes: u32,
    /// HTTP/2 flow-control window of one stream: what a client may send
    /// ahead of the server reading it.
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window of a whole connection.
    pub connection_window_bytes: u32,
    /// Time from accept to the HTTP/2 preface (or an HTTP/1 request's first
    /// byte); a connection that says nothing is closed.
    pub handshake_timeout_ms: u64,
    /// A connection with no call open this long is closed (GOAWAY).
    pub idle_timeout_ms: u64,
    /// HTTP/2 PING interval; a peer that does not answer within
    /// `keepalive_timeout_ms` is dropped. 0 turns pings off.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// Connections older than this are asked to go away (GOAWAY) so that
    /// load balancers can rebalance; none by default.
    pub max_connection_age_ms: Option<u64>,
    /// A write that makes no progress for this long ends the connection
    /// (a client that never reads its answers).
    pub write_timeout_ms: u64,
    /// Text requests waiting for a tokenizer thread; beyond it they are
    /// refused with RESOURCE_EXHAUSTED.
    pub prepare_queue: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_inflight_bytes: 256 << 20,
            body_timeout_ms: 10_000,
            max_connections: 1024,
            max_concurrent_streams: 256,
            max_header_list_bytes: 16 << 10,
            stream_window_bytes: 1 << 20,
            connection_window_bytes: 4 << 20,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 20_000,
            max_connection_age_ms: None,
            write_timeout_ms: 30_000,
            prepare_queue: 256,
        }
    }
}

/// Longest any configured duration may be: past it `Duration` arithmetic
/// on `Instant` can overflow, and no sane setting is longer.
pub const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

impl LimitsConfig {
    /// Checks every value's range; the message names the field.
    pub fn check(&self, max_message_bytes: usize) -> Result<(), String> {
        let durations = [
            ("body_timeout_ms", self.body_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("max_connection_age_ms", self.max_connection_age_ms.unwrap_or(1)),
        ];
        for (field, value) in durations {
            if !(1..=MAX_DURATION_MS).contains(&value) {
                return Err(format!(
                    "field `limits.{field}`: must be 1 to {MAX_DURATION_MS} milliseconds, got {value}"
                ));
            }
        }
        if self.keepalive_interval_ms > MAX_DURATION_MS {
            return Err(format!(
                "field `limits.keepalive_interval_ms`: must be 0 (off) to {MAX_DURATION_MS}, got {}",
                self.keepalive_interval_ms
            ));
        }
        if self.max_inflight_bytes < max_message_bytes as u64 {
            return Err(format!(
                "field `limits.max_inflight_bytes`: {} is less than max_message_bytes {max_message_bytes}, so the \
                 largest allowed message could never be admitted",
                self.max_inflight_bytes
            ));
        }
        let counts = [
            ("max_connections", self.max_connections as u64, 1 << 20),
            ("max_concurrent_streams", u64::from(self.max_concurrent_streams), 1 << 16),
            ("prepare_queue", self.prepare_queue as u64, 1 << 20),
            // HTTP/2 limits (RFC 9113 §6.9.1: windows up to 2^31 - 1).
            ("max_header_list_bytes", u64::from(self.max_header_list_bytes), 1 << 24),
            ("stream_window_bytes", u64::from(self.stream_window_bytes), (1 << 31) - 1),
            ("connection_window_bytes", u64::from(self.connection_window_bytes), (1 << 31) - 1),
        ];
        for (field, value, max) in counts {
            if !(1..=max).contains(&value) {
                return Err(format!("field `limits.{field}`: must be 1 to {max}, got {value}"));
            }
        }
        // HTTP/2's smallest legal window.
        if self.stream_window_bytes < 65_535 || self.connection_window_bytes < 65_535 {
            return Err("fields `limits.stream_window_bytes` and `limits.connection_window_bytes`: at least 65535 \
                        (the HTTP/2 default window)"
                .into());
        }
        Ok(())
    }

    pub fn body_timeout(&self) -> Duration {
        ms(self.body_timeout_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        ms(self.handshake_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        ms(self.idle_timeout_ms)
    }
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.keepalive_interval_ms > 0).then(|| ms(self.keepalive_interval_ms))
    }
    pub fn keepalive_timeout(&self) -> Duration {
        ms(self.keepalive_timeout_ms)
    }
    pub fn max_connection_age(&self) -> Option<Duration> {
        self.max_connection_age_ms.map(ms)
    }
    pub fn write_timeout(&self) -> Duration {
        ms(self.write_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_each_range_is_named() {
        assert_eq!(LimitsConfig::default().check(4 << 20), Ok(()));
        let zero = LimitsConfig { idle_timeout_ms: 0, ..Default::default() };
        assert!(zero.check(1).unwrap_err().contains("`limits.idle_timeout_ms`"));
        let huge = LimitsConfig { body_timeout_ms: u64::MAX, ..Default::default() };
        assert!(huge.check(1).unwrap_err().contains("`limits.body_timeout_ms`"));
        let small = LimitsConfig { max_inflight_bytes: 10, ..Default::default() };
        assert!(small.check(4 << 20).unwrap_err().contains("max_message_bytes"));
        let window = LimitsConfig { stream_window_bytes: 100, ..Default::default() };
        assert!(window.check(1).unwrap_err().contains("stream_window_bytes"));
    }
}
