# Sourced by scripts/compare-batching.sh and scripts/thread-cpu.sh: serves
# OUT/repo-SETTING for each of $settings from $kiln on free local ports,
# logs to OUT/PREFIX-SETTING.log, and waits until all are ready (models
# loaded and warmed up: a server listens before that, and three loading at
# once would share the cores with the first readings). Sets `url`
# and `pid` (by setting) and `pids`; stops the servers when the script exits.
#   serve_settings OUT PREFIX
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
declare -A url pid
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
serve_settings() {
  local s port ready
  declare -A http
  for s in "${settings[@]}"; do
    port=$(free_port)
    http[$s]=$(free_port)
    # One thread count for all: their warm-up measurements, taken at the
    # same moment on the same cores, would otherwise disagree.
    "$kiln" serve --model-threads "$(nproc)" --repo "$1/repo-$s" --grpc "127.0.0.1:$port" --metrics 127.0.0.1:0 \
      --http "127.0.0.1:${http[$s]}" >"$1/$2-$s.log" 2>&1 &
    pids+=($!)
    pid[$s]=$!
    url[$s]=127.0.0.1:$port
  done
  for s in "${settings[@]}"; do
    ready=$(python3 - "${http[$s]}" <<'PY'
import sys, time, urllib.request
for _ in range(1200):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=1) as r:
            if r.status == 200:
                print("ready")
                break
    except OSError:
        time.sleep(0.1)
PY
    )
    [ "$ready" = ready ] || { cat "$1/$2-$s.log" >&2; echo "the $s server was not ready after 2 minutes" >&2; exit 1; }
  done
}
