#!/usr/bin/env bash
# Batching side by side, in one run on this machine: three settings of the
# same model.toml served at once by a release build,
#   zero      queue_delay = "fixed", max_queue_delay_ms = 0
#   fixed     queue_delay = "fixed", the shipped max_queue_delay_ms
#   adaptive  queue_delay = "adaptive", the shipped max_queue_delay_ms as its bound
# driven at 1, 2, 4, 8, 16, 32 and 64 clients, three interleaved
# repetitions, medians: the risk model with perf_analyzer, MiniLM with
# `kiln bench`; the server's queue and compute medians at one client. Then
# `kiln plan` against `kiln bench --find-max-rate` for the shipped settings
# (adaptive) of both. Prints the ratios; writes the raw readings
# to OUTDIR (default target/compare-batching). Not a CI step: it takes
# about a quarter of an hour.
#   scripts/compare-batching.sh [OUTDIR]
# REPS (default 3), LEVELS ("1 2 4 8 16 32 64") and MODELS ("risk minilm")
# narrow or widen it; PLAN=0 leaves out the planner comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/compare-batching}
mkdir -p "$out"
out=$(cd "$out" && pwd)
read -ra levels <<<"${LEVELS:-1 2 4 8 16 32 64}"
read -ra models <<<"${MODELS:-risk minilm}"
reps=${REPS:-3}
settings=(zero fixed adaptive)

cargo build --release --quiet --bin kiln
kiln=$(pwd)/target/release/kiln
scripts/fetch-minilm.sh >/dev/null
# perf_analyzer and its loader, installed by its own script.
scripts/perf-analyzer.sh --install-only
tools=$(pwd)/.tools/perf_analyzer
libs=$tools/trixie/usr/lib/x86_64-linux-gnu
pa() { "$libs/ld-linux-x86-64.so.2" --library-path "$libs:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
  "$tools/wheel/perf_analyzer/bin/perf_analyzer" "$@"; }

# One repository per setting, each holding both models.
for s in "${settings[@]}"; do
  repo=$out/repo-$s
  rm -rf "$repo"
  mkdir -p "$repo"
  cp -r models/risk "$repo/risk"
  mkdir -p "$repo/minilm"
  cp models/minilm/model.toml "$repo/minilm/"
  ln -s "$(pwd)/models/minilm/1" "$repo/minilm/1"
  for m in risk minilm; do
    toml=$repo/$m/model.toml
    case $s in
      zero) sed -i 's/^max_queue_delay_ms = .*/max_queue_delay_ms = 0/; s/^kind = .*/&\nqueue_delay = "fixed"/' "$toml" ;;
      fixed) sed -i 's/^kind = .*/&\nqueue_delay = "fixed"/' "$toml" ;;
      adaptive) sed -i 's/^kind = .*/&\nqueue_delay = "adaptive"/' "$toml" ;;
    esac
  done
done

source scripts/serve-settings.sh
serve_settings "$out" serve

input=$tools/risk-input.json
readings=$out/readings.csv
split=$out/split.csv
echo "model,setting,clients,rep,throughput,p50_us" >"$readings"
echo "model,setting,rep,queue_p50_us,compute_p50_us" >"$split"
# The server's own queue and compute medians at one client (kiln bench
# reads them from every answer).
one_client() {
  "$kiln" bench --url "$2" --model "$1" --concurrency 1 --duration 3 --json "$out/one.json" >/dev/null
  python3 - "$out/one.json" "$1" "$3" "$4" >>"$split" <<'PY'
import json, sys
server = json.load(open(sys.argv[1]))["steps"][0]["server"]
print(f"{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{server['queue_p50_us']},{server['compute_p50_us']}")
PY
}
measure_risk() {
  pa -m risk -u "${url[$1]}" -i grpc --input-data "$input" --concurrency-range "$2:$2" \
    --measurement-interval 1000 --stability-percentage 10000 --max-trials 3 \
    -f "$out/pa.csv" >/dev/null 2>&1
  python3 - "$out/pa.csv" "$1" "$2" "$3" >>"$readings" <<'PY'
import csv, sys
row = next(csv.DictReader(open(sys.argv[1])))
print(f"risk,{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{row['Inferences/Second']},{row['p50 latency']}")
PY
}
measure_minilm() {
  "$kiln" bench --url "${url[$1]}" --model minilm --concurrency "$2" --duration 5 \
    --json "$out/bench.json" >/dev/null
  python3 - "$out/bench.json" "$1" "$2" "$3" >>"$readings" <<'PY'
import json, sys
step = json.load(open(sys.argv[1]))["steps"][0]
print(f"minilm,{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{step['throughput']},{step['latency_ms']['p50'] * 1000}")
PY
}
turn=0
for rep in $(seq 1 "$reps"); do
  for s in "${settings[@]}"; do
    for m in "${models[@]}"; do one_client "$m" "${url[$s]}" "$s" "$rep"; done
  done
  for c in "${levels[@]}"; do
    # A cell's three settings run back to back, in an order that rotates
    # from cell to cell, so that none is always measured first or last.
    turn=$((turn + 1))
    order=("${settings[@]:turn%3}" "${settings[@]:0:turn%3}")
    for s in "${order[@]}"; do
      for m in "${models[@]}"; do "measure_$m" "$s" "$c" "$rep"; done
    done
  done
done

# Two readings of each cell: the ratio of the settings' medians, and the
# same after dividing each repetition's three readings by their geometric
# mean (paired): a repetition's settings ran back to back, so this cancels
# the machine's drift between repetitions, often larger than the effect
# measured. Both compare with the better fixed setting, which favours the
# fixed settings by the noise of picking the luckier of two.
python3 - "$readings" <<'PY'
import csv, math, statistics, sys
from collections import defaultdict
cell = defaultdict(dict)
for r in csv.DictReader(open(sys.argv[1])):
    cell[(r["model"], int(r["clients"]))].setdefault(r["setting"], {})[r["rep"]] = (
        float(r["throughput"]), float(r["p50_us"]))
settings = ("zero", "fixed", "adaptive")
def ratios(by, i, reps, norm):
    scale = {k: math.exp(statistics.fmean(math.log(by[s][k][i]) for s in settings)) if norm else 1.0 for k in reps}
    med = {s: statistics.median(by[s][k][i] / scale[k] for k in reps) for s in settings}
    better = max if i == 0 else min
    return med, med["adaptive"] / better(med["zero"], med["fixed"])
for model in ("risk", "minilm"):
    levels = sorted(c for (m, c) in cell if m == model)
    if not levels:
        continue
    print(f"\n{model}: medians of the repetitions; adaptive against the better fixed setting, "
          "as a ratio of medians and paired within each repetition")
    print(f"{'clients':>7} {'zero/s':>8} {'fixed/s':>8} {'adapt/s':>8} {'thr':>5} {'paired':>6}   "
          f"{'zero p50':>9} {'fixed p50':>9} {'adapt p50':>9} {'p50':>5} {'paired':>6}")
    for c in levels:
        by = cell[(model, c)]
        reps = sorted(set.intersection(*(set(by.get(s, {})) for s in settings)))
        if not reps:
            continue
        t, tr = ratios(by, 0, reps, False)
        p, pr = ratios(by, 1, reps, False)
        tp, pp = ratios(by, 0, reps, True)[1], ratios(by, 1, reps, True)[1]
        missed = [name for name, ok in (("medians", tr >= 0.95 and pr <= 1.1), ("paired", tp >= 0.95 and pp <= 1.1))
                  if not ok]
        flag = f"  <- goal missed ({', '.join(missed)})" if missed else ""
        print(f"{c:>7} {t['zero']:>8.0f} {t['fixed']:>8.0f} {t['adaptive']:>8.0f} {tr:>5.2f} {tp:>6.2f}   "
              f"{p['zero']:>8.0f}µ {p['fixed']:>8.0f}µ {p['adaptive']:>8.0f}µ {pr:>5.2f} {pp:>6.2f}{flag}")
PY

python3 - "$split" <<'PY'
import csv, statistics, sys
from collections import defaultdict
cell = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    cell[(r["model"], r["setting"])].append((float(r["queue_p50_us"]), float(r["compute_p50_us"])))
print("\none client: the server's queue and compute medians (medians of the repetitions); goal: queue <= 2 % of compute")
print(f"{'model':>7} {'setting':>9} {'queue':>9} {'compute':>9} {'share':>7}")
for (model, setting), xs in sorted(cell.items()):
    q = statistics.median(x[0] for x in xs)
    c = statistics.median(x[1] for x in xs)
    share = q / c if c else float("inf")
    flag = "  <- goal missed" if setting == "adaptive" and share > 0.02 else ""
    print(f"{model:>7} {setting:>9} {q:>8.0f}µ {c:>8.0f}µ {100 * share:>6.1f}%{flag}")
PY

# The planner against the measured ceiling, shipped settings.
[ "${PLAN:-1}" = 0 ] && models=()
for m in "${models[@]}"; do
  budget=$([ "$m" = risk ] && echo 10 || echo 500)
  # A plan that finds no answer (its serving-path readings are as noisy
  # as the machine) is reported, and the other model still compared.
  if ! "$kiln" plan --model-threads "$(nproc)" --repo "$out/repo-adaptive" --model "$m" --budget-ms "$budget" --json "$out/plan-$m.json" >/dev/null; then
    echo "$m: kiln plan gave no answer (its error above)"
    continue
  fi
  "$kiln" bench --url "${url[adaptive]}" --model "$m" --find-max-rate --p99-ms "$budget" --duration 2 \
    --rate "$([ "$m" = risk ] && echo 1000 || echo 20)" --json "$out/find-$m.json" >/dev/null
  python3 - "$m" "$out/plan-$m.json" "$out/find-$m.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[2]))
found = json.load(open(sys.argv[3]))["found"]
planned = plan["current"]["max_rate"]
measured = found["rate"] or 0.0
ratio = planned / measured if measured else float("inf")
print(f"\n{sys.argv[1]}: kiln plan predicts {planned:.0f} req/s at the shipped settings; "
      f"--find-max-rate measured {measured:.0f} (failed at {found['failed_at']}); plan/measured {ratio:.2f}")
PY
done
echo "raw readings in $readings"
