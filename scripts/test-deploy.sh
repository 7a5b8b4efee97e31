#!/usr/bin/env bash
# Checks deploy/: Prometheus config and rules (promtool check, and a unit
# test per alert), every Kubernetes and KServe manifest against pinned
# schemas, the Dockerfile lint, the pod's kiln.toml and probe command
# against a live server, then a real Prometheus against a live Kiln (drift
# alert, every dashboard query, every adapter rule) and the runtime image
# where a container engine runs. Called by scripts/test after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
kiln=${KILN_BIN:-target/debug/kiln}
scripts/deploy-env.sh
kubectl=$(command -v kubectl || echo .tools/kubernetes-client/usr/bin/kubectl)

echo "-- promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules.test.yml

echo "-- manifests against pinned schemas, with the overlay kiln plan --emit k8s writes"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$kiln" plan --model risk --budget-ms 20 --rate 20000 --sim-requests 2000 --emit k8s --out "$work/plan" \
  >/dev/null 2>&1
.venv/bin/python scripts/check-manifests.py --kubectl "$kubectl" --also "$work/plan"

echo "-- Dockerfile lint (hadolint)"
.venv/bin/hadolint deploy/Dockerfile deploy/Dockerfile.cuda

echo "-- the pod's kiln.toml and probe command, with TLS and API keys"
"$kiln" certs dev --out "$work" --client ci >/dev/null
"$kiln" keys new --tenant ci | tail -n +2 >"$work/keys.toml"
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$work/admin-token"
sed -e "s#/etc/kiln/tls/tls.crt#$work/server.pem#; s#/etc/kiln/tls/tls.key#$work/server.key#; s#/etc/kiln/auth/#$work/#" \
  deploy/k8s/base/kiln.toml >"$work/kiln.toml"
# The Deployment's probe, word for word but for the certificate's path.
probe=$(python3 - "$work" <<'PYEOF'
import sys, yaml
d = yaml.safe_load(open("deploy/k8s/base/deployment.yaml"))
command = d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
print(" ".join(a.replace("/etc/kiln/tls/ca.crt", sys.argv[1] + "/ca.pem") for a in command[1:]))
PYEOF
)
# shellcheck disable=SC2016 # expanded by the inner shell
PROBE="$probe" KILN="$kiln" KILN_SERVE_ARGS="--config $work/kiln.toml" scripts/with-server.sh bash -c \
  '$KILN ${PROBE//localhost:8001/localhost:${KILN_URL##*:}}'
echo "ok   readiness probe answered SERVING over TLS with the pod's kiln.toml"

echo "-- a real Prometheus against a live Kiln"
repo="$work/repo"
mkdir -p "$repo/risk/1"
cp models/risk/1/model.safetensors models/risk/1/reference.json "$repo/risk/1/"
{ cat models/risk/model.toml
  printf '\n[drift]\nwindow_seconds = 60\nwindow_intervals = 120\nmin_samples = 500\nhysteresis = 2\n'
} >"$repo/risk/model.toml"
KILN_SERVE_ARGS="--repo $repo" scripts/with-server.sh .venv/bin/python tests/deploy/test_prometheus.py

echo "-- runtime image"
scripts/test-image.sh
