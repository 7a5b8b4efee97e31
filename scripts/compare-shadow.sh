#!/usr/bin/env bash
# The primary's latency with and without shadow traffic, side by side on
# one server: risk versions 1 and 2 served, version 2 the default, an
# open-loop `kiln bench` at a fixed rate with shadow off and with every
# request copied to version 1 (sample 1.0), interleaved, three rounds.
# Prints each round's p50 and p99 and the median ratios (shadow / none).
#   scripts/compare-shadow.sh [RATE] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
seconds=${2:-5}
kiln=${KILN_BIN:-target/release/kiln}
[ -x "$kiln" ] || cargo build --release --quiet
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/repo/risk/1" "$work/repo/risk/2"
{ echo 'version_policy = { all = true }'; cat models/risk/model.toml; } >"$work/repo/risk/model.toml"
cp models/risk/1/model.safetensors "$work/repo/risk/1/"
cp models/risk/1/model.safetensors "$work/repo/risk/2/"
python3 -c 'import secrets; print(secrets.token_hex(16))' >"$work/token"
"$kiln" serve --repo "$work/repo" --grpc "127.0.0.1:$port" --metrics 127.0.0.1:0 --http 127.0.0.1:0 \
  --admin-token-file "$work/token" >"$work/serve.log" 2>&1 &
pid=$!
export KILN_URL="127.0.0.1:$port" KILN_ADMIN_TOKEN_FILE="$work/token"
for _ in $(seq 1 100); do "$kiln" admin status risk >/dev/null 2>&1 && break; sleep 0.1; done
bench() { "$kiln" bench --model risk --rate "$rate" --duration "$seconds" --json "$work/$1.json" >/dev/null; }
for round in 1 2 3; do
  "$kiln" admin shadow risk >/dev/null 2>&1 || true
  bench "none-$round"
  "$kiln" admin shadow risk 1 --sample 1.0 --max-inflight 64 >/dev/null
  bench "shadow-$round"
done
python3 - "$work" <<'PY'
import json, statistics, sys, pathlib
work = pathlib.Path(sys.argv[1])
def step(name):
    report = json.loads((work / f"{name}.json").read_text())
    latency = report["steps"][0]["latency_ms"]
    return latency["p50"], latency["p99"]
rows = []
for r in (1, 2, 3):
    (n50, n99), (s50, s99) = step(f"none-{r}"), step(f"shadow-{r}")
    rows.append((n50, s50, n99, s99))
    print(f"round {r}: p50 {n50:.3f} ms without shadow, {s50:.3f} ms with; p99 {n99:.3f} / {s99:.3f} ms")
ratio50 = statistics.median(s / n for n, s, _, _ in rows)
ratio99 = statistics.median(s / n for _, _, n, s in rows)
print(f"primary p50 with shadow / without: {ratio50:.2f}; p99: {ratio99:.2f}")
PY
