#!/usr/bin/env bash
# Drives Kiln with Triton's perf_analyzer over gRPC, then over HTTP (V2 REST
# with binary tensors, perf_analyzer's default) when KILN_HTTP_URL is set,
# feeding real held-out feature rows (--input-data). Without KILN_URL it
# starts a server itself.
#
#   scripts/perf-analyzer.sh                         # a short run, as CI does
#   KILN_URL=host:8001 scripts/perf-analyzer.sh --concurrency-range 1:32:2
#   scripts/perf-analyzer.sh --install-only        # fetch it and the input, run nothing
#   KILN_SECURE=1 scripts/perf-analyzer.sh          # over mutual TLS (with-server.sh)
#
# perf_analyzer's PyPI wheel (2.60.0, platform manylinux_2_38) needs glibc
# 2.38, newer than Debian bookworm's. It runs through Debian trixie's
# loader: libc6, libstdc++6 and libgcc-s1 are fetched with `apt-get
# download` under a private apt configuration (from the Debian mirror the
# machine's own apt sources name) and unpacked with `dpkg -x` into .tools/
# (git-ignored); the system is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
install_only=false
[ "${1:-}" = "--install-only" ] && install_only=true
if [ -z "${KILN_URL:-}" ] && ! $install_only; then
  exec scripts/with-server.sh "$0" "$@"
fi

tools=$(pwd)/.tools/perf_analyzer
pa=$tools/wheel/perf_analyzer/bin/perf_analyzer
libs=$tools/trixie/usr/lib/x86_64-linux-gnu
mkdir -p "$tools"

if [ ! -x "$pa" ]; then
  rm -rf "$tools/wheel" "$tools/dl"
  pip download --quiet perf-analyzer==2.60.0 --platform manylinux_2_38_x86_64 \
    --only-binary=:all: --no-deps -d "$tools/dl"
  python3 -m zipfile -e "$tools"/dl/perf_analyzer-*.whl "$tools/wheel"
  chmod +x "$pa"
fi

if [ ! -e "$libs/ld-linux-x86-64.so.2" ]; then
  apt=$tools/apt
  rm -rf "$apt" "$tools/trixie"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  # The mirror this machine's own apt uses for Debian's main archive (not
  # security updates), so that the repository names no package host.
  mirror=$(python3 - <<'PY'
import glob, re
uris = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
        suites = fields.get("Suites", "").split()
        if "deb" in fields.get("Types", "").split() and not any(s.endswith("-security") for s in suites):
            uris += fields.get("URIs", "").split()
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
        if m and not m.group(2).endswith("-security"):
            uris.append(m.group(1))
debian = [u for u in uris if u.rstrip("/").endswith("/debian")]
print((debian or uris or [""])[0])
PY
)
  if [ -z "$mirror" ]; then
    echo "perf-analyzer: no Debian mirror found in this machine's apt sources" >&2
    exit 1
  fi
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$apt/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
        -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" -qq update
  (cd "$apt/debs" && apt-get "${opts[@]}" -qq download libc6 libstdc++6 libgcc-s1)
  for deb in "$apt"/debs/*.deb; do dpkg -x "$deb" "$tools/trixie"; done
fi

# Held-out rows of the data set, one per request (batch dimension 1).
input=$tools/risk-input.json
python3 - "$input" <<'PY'
import csv, json, sys
rows = list(csv.reader(open("data/wdbc.csv")))[1:]
heldout = json.load(open("data/wdbc-split.json"))["heldout_rows"]
data = [{"features": {"content": [float(v) for v in rows[i][:30]], "shape": [30]}} for i in heldout]
json.dump({"data": data}, open(sys.argv[1], "w"))
PY
$install_only && exit 0

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  # A few seconds, as CI runs it: two concurrency levels, one-second
  # windows. On a shared 2-core machine windows vary widely, so stability is
  # not demanded here (perf_analyzer fails a run it deems unstable); pass
  # your own arguments for capacity curves.
  args=(--concurrency-range 1:8:4 --measurement-interval 1000 --stability-percentage 10000 --max-trials 3)
fi
run() {
  "$libs/ld-linux-x86-64.so.2" --library-path "$libs:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
    "$pa" -m risk --input-data "$input" "$@" "${args[@]}"
}
grpc_tls=()
http_tls=()
if [ -n "${KILN_TLS_DIR:-}" ]; then
  # perf_analyzer's own TLS options; the client certificate names the tenant.
  grpc_tls=(--ssl-grpc-use-ssl --ssl-grpc-root-certifications-file "$KILN_TLS_DIR/ca.pem"
    --ssl-grpc-private-key-file "$KILN_TLS_DIR/client.key"
    --ssl-grpc-certificate-chain-file "$KILN_TLS_DIR/client.pem")
  http_tls=(--ssl-https-verify-peer 1 --ssl-https-verify-host 2
    --ssl-https-ca-certificates-file "$KILN_TLS_DIR/ca.pem"
    --ssl-https-client-certificate-file "$KILN_TLS_DIR/client.pem"
    --ssl-https-private-key-file "$KILN_TLS_DIR/client.key")
fi
run -u "$KILN_URL" -i grpc -f "$tools/last-run.csv" "${grpc_tls[@]}"
echo "perf_analyzer: gRPC results in $tools/last-run.csv"
if [ -n "${KILN_HTTP_URL:-}" ]; then
  scheme=""
  [ -n "${KILN_TLS_DIR:-}" ] && scheme="https://"
  run -u "$scheme$KILN_HTTP_URL" -i http -f "$tools/last-run-http.csv" "${http_tls[@]}"
  echo "perf_analyzer: HTTP results in $tools/last-run-http.csv"
fi
