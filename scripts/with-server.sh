#!/usr/bin/env bash
# Runs a command against a freshly started `kiln serve` (built-in repository)
# on free loopback ports, exported as KILN_URL, KILN_HTTP_URL (host:port)
# and KILN_METRICS_URL; stops
# the server afterwards whatever happens.
#   scripts/with-server.sh CMD [ARGS...]
#   KILN_SECURE=1 scripts/with-server.sh CMD [ARGS...]
# With KILN_SECURE=1 the server runs mutual TLS with throwaway certificates
# (`kiln certs dev`), client certificates naming their tenant, and an API
# key (`kiln keys new`); KILN_TLS_DIR (ca.pem, client.pem, client.key) and
# KILN_API_KEY are exported for the command. Every run has an admin token,
# in the file KILN_ADMIN_TOKEN_FILE names.
set -euo pipefail
cd "$(dirname "$0")/.."
kiln=${KILN_BIN:-target/debug/kiln}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
metrics_port=$(free_port)
http_port=$(free_port)
log=$(mktemp)
secure=()
tls_dir=""
# An admin token for the command (load and unload are admin calls).
admin_dir=$(mktemp -d)
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$admin_dir/admin-token"
chmod 600 "$admin_dir/admin-token"
if [ "${KILN_SECURE:-0}" = 1 ]; then
  tls_dir=$(mktemp -d)
  "$kiln" certs dev --out "$tls_dir" --client ci >/dev/null
  keys=$("$kiln" keys new --tenant ci)
  KILN_API_KEY=$(printf '%s\n' "$keys" | head -n 1)
  printf '%s\n' "$keys" | tail -n +2 >"$tls_dir/keys.toml"
  cat >"$tls_dir/kiln.toml" <<EOF
[tls]
cert = "$tls_dir/server.pem"
key = "$tls_dir/server.key"
client_ca = "$tls_dir/ca.pem"
[auth]
keys_file = "$tls_dir/keys.toml"
tenant_from_client_cert = true
EOF
  secure=(--config "$tls_dir/kiln.toml")
  export KILN_TLS_DIR=$tls_dir KILN_API_KEY
fi
"$kiln" serve --grpc "127.0.0.1:$grpc_port" --metrics "127.0.0.1:$metrics_port" --http "127.0.0.1:$http_port" --admin-token-file "$admin_dir/admin-token" "${secure[@]}" ${KILN_SERVE_ARGS:-} >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"; rm -rf "$admin_dir"; [ -n "$tls_dir" ] && rm -rf "$tls_dir"' EXIT
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
scheme=http
[ -n "$tls_dir" ] && scheme=https
export KILN_ADMIN_TOKEN_FILE="$admin_dir/admin-token"
export KILN_PID=$pid KILN_URL="127.0.0.1:$grpc_port" KILN_METRICS_URL="$scheme://127.0.0.1:$metrics_port/metrics"
export KILN_HTTP_URL="127.0.0.1:$http_port"
"$@"
