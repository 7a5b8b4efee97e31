#!/usr/bin/env bash
# Served MiniLM embeddings side by side in one run: Kiln's packed encoder
# with --model-threads auto (the defaults), the packed encoder on one
# thread, and candle-transformers' BERT on one thread (`engine = "candle"`,
# the engine and thread count of earlier releases). Each is served by its
# own `kiln serve` on loopback ports and driven by `kiln bench` at 1, 8 and
# 32 clients with the sentences of data/sentences.txt, the servers taking
# turns so that machine noise falls on all of them alike. Prints the
# texts per second and p99 of each, and the ratios to the candle engine.
#   scripts/compare-embeddings.sh [SECONDS_PER_STEP]   (about 3 × 3 × that)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
cargo build --release --quiet --bin kiln
kiln=target/release/kiln
[ -f models/minilm/1/model.safetensors ] || scripts/fetch-minilm.sh
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# name|engine|--model-threads
setups=("packed-auto|packed|auto" "packed-1|packed|1" "candle-1|candle|1")
declare -A url
for setup in "${setups[@]}"; do
  IFS='|' read -r name engine threads <<<"$setup"
  repo=$work/$name/minilm
  mkdir -p "$repo/1"
  sed "s/^\[bert\]$/[bert]\nengine = \"$engine\"/" models/minilm/model.toml >"$repo/model.toml"
  for f in model.safetensors config.json tokenizer.json; do ln -s "$(pwd)/models/minilm/1/$f" "$repo/1/$f"; done
  port=$(free_port)
  "$kiln" serve --repo "$work/$name" --grpc "127.0.0.1:$port" --metrics "127.0.0.1:$(free_port)" --http 127.0.0.1:0 \
    --model-threads "$threads" >"$work/$name.log" 2>&1 &
  pids+=($!)
  url[$name]=127.0.0.1:$port
done
for setup in "${setups[@]}"; do
  name=${setup%%|*}
  for _ in $(seq 1 300); do grep -q "kiln listening" "$work/$name.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "kiln listening" "$work/$name.log" || { cat "$work/$name.log"; exit 1; }
  grep -o "model threads chosen.*" "$work/$name.log" | sed 's/\x1b\[[0-9;]*m//g' || true
done
for c in 1 8 32; do
  for setup in "${setups[@]}"; do
    name=${setup%%|*}
    "$kiln" bench --url "${url[$name]}" --model minilm --concurrency "$c" --duration "$seconds" \
      --input-file data/sentences.txt --csv "$work/$name-$c.csv" >/dev/null 2>&1
  done
done
python3 - "$work" <<'PY'
import csv, sys, pathlib
work = pathlib.Path(sys.argv[1])
def row(name, c):
    with open(work / f"{name}-{c}.csv") as f:
        r = list(csv.DictReader(f))[-1]
    return float(r["throughput"]), float(r["p99_ms"])
print(f"{'clients':>7} {'setup':>12} {'texts/s':>9} {'p99 ms':>8} {'vs candle-1':>11}")
for c in (1, 8, 32):
    base = row("candle-1", c)[0]
    for name in ("packed-auto", "packed-1", "candle-1"):
        t, p = row(name, c)
        print(f"{c:>7} {name:>12} {t:>9.1f} {p:>8.1f} {t / base:>10.2f}x")
PY
