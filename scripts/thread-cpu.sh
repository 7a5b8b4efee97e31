#!/usr/bin/env bash
# Where a server's CPU goes, per thread, for the three batching settings
# side by side: serves the repositories scripts/compare-batching.sh left in
# OUTDIR (repo-zero, repo-fixed, repo-adaptive), drives each in turn with
# `kiln bench` at CLIENTS closed-loop clients for SECONDS, and prints each
# server thread's CPU time (user + system, from /proc) per 1000 requests,
# REPS interleaved repetitions. Linux only; not a CI step.
#   scripts/thread-cpu.sh OUTDIR MODEL CLIENTS [SECONDS] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(cd "${1:?OUTDIR of scripts/compare-batching.sh}" && pwd)
model=${2:?MODEL}
clients=${3:?CLIENTS}
seconds=${4:-4}
reps=${5:-3}
settings=(zero fixed adaptive)
cargo build --release --quiet --bin kiln
kiln=$(pwd)/target/release/kiln
hz=$(getconf CLK_TCK)

source scripts/serve-settings.sh
serve_settings "$out" cpu-serve

# Clock ticks of each thread, as "name ticks" lines.
ticks() {
  for t in /proc/"$1"/task/*; do
    echo "$(tr -d ' ' <"$t/comm") $(awk '{print $14 + $15}' "$t/stat")"
  done
}
for rep in $(seq 1 "$reps"); do
  for s in "${settings[@]}"; do
    ticks "${pid[$s]}" >"$out/cpu-before"
    "$kiln" bench --url "${url[$s]}" --model "$model" --concurrency "$clients" --duration "$seconds" \
      --json "$out/cpu-bench.json" >/dev/null
    ticks "${pid[$s]}" >"$out/cpu-after"
    python3 - "$out/cpu-before" "$out/cpu-after" "$out/cpu-bench.json" "$hz" "$s" "$rep" <<'PY'
import json, sys
from collections import Counter
def read(path):
    # Threads of one name (the runtime's workers) are summed.
    by_name = Counter()
    for line in open(path):
        name, ticks = line.split()
        by_name[name] += int(ticks)
    return by_name
before, after = read(sys.argv[1]), read(sys.argv[2])
sent = json.load(open(sys.argv[3]))["steps"][0]["sent"]
hz = float(sys.argv[4])
spent = {k: (v - before.get(k, 0)) * 1e3 / hz * 1e3 / max(sent, 1) for k, v in after.items()}
print(f"{sys.argv[5]:>8} rep {sys.argv[6]}, {sent} requests; CPU ms per 1000 requests: "
      + " ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items()) if v > 0))
PY
  done
done
