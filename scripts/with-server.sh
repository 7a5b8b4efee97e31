#!/usr/bin/env bash
# Runs a command against a freshly started `kiln serve` (built-in repository)
# on free loopback ports, exported as KILN_URL and KILN_METRICS_URL; stops
# the server afterwards whatever happens.
#   scripts/with-server.sh CMD [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
kiln=${KILN_BIN:-target/debug/kiln}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
metrics_port=$(free_port)
log=$(mktemp)
"$kiln" serve --grpc "127.0.0.1:$grpc_port" --metrics "127.0.0.1:$metrics_port" ${KILN_SERVE_ARGS:-} >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
ready=false
for _ in $(seq 1 300); do
  if grep -q "kiln listening" "$log" && python3 -c "import socket; socket.create_connection(('127.0.0.1', $grpc_port), 1)" 2>/dev/null; then
    ready=true
    break
  fi
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "kiln serve exited" >&2; exit 1; }
  sleep 0.1
done
if ! $ready; then
  tail -n 40 "$log" >&2
  echo "kiln serve was not listening after 30 s" >&2
  exit 1
fi
export KILN_PID=$pid KILN_URL="127.0.0.1:$grpc_port" KILN_METRICS_URL="http://127.0.0.1:$metrics_port/metrics"
"$@"
