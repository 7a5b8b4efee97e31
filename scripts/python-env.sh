#!/usr/bin/env bash
# Makes .venv with the Python clients the compatibility tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import tritonclient.grpc, tritonclient.http, openai, numpy' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet 'tritonclient[grpc,http]' openai numpy
fi
