#!/usr/bin/env bash
# Soak test, run by hand (not by CI): a release `kiln serve` with the
# built-in model, driven for a few minutes at about 70 % of its measured
# capacity with good, malformed, oversized, amplifying, expiring and
# cancelled requests plus silent and half-open connections, all on
# 127.0.0.1. Prints the server's RSS, open descriptors and threads after
# warm-up and at the end, and the answers by gRPC code; exits non-zero
# unless RSS stays within +10 % and descriptors and threads are unchanged.
#   scripts/soak.sh [SOAK_SECONDS]     (default 180; SOAK_WARMUP=30)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-180}
warmup=${SOAK_WARMUP:-30}
cargo build --release --quiet --bin kiln --example soak
config=$(mktemp --suffix=.toml)
trap 'rm -f "$config"' EXIT
# Short connection timeouts so that the silent and half-open connections
# the soak opens are closed within its run.
cat >"$config" <<'TOML'
[limits]
handshake_timeout_ms = 1000
idle_timeout_ms = 2000
TOML
KILN_BIN=target/release/kiln KILN_SERVE_ARGS="--config $config" scripts/with-server.sh bash -c '
  set -euo pipefail
  report=$(mktemp)
  target/release/kiln bench --url "$KILN_URL" --model risk --concurrency 32 --duration 10 --json "$report" >/dev/null
  capacity=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[\"steps\"][0][\"throughput\"])" "$report")
  rm -f "$report"
  rate=$(python3 -c "print(round(0.7 * $capacity))")
  echo "measured capacity: $capacity req/s (closed loop, 32 clients); soaking at $rate req/s"
  target/release/examples/soak --url "$KILN_URL" --pid "$KILN_PID" --rate "$rate" --warmup '"$warmup"' --duration '"$duration"'
'
