"""The README's tritonclient MiniLM example, run as written against a live
server at $KILN_URL serving --repo models (risk and minilm). The code block
is read from README.md, so the README cannot drift from what works."""

import os
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
readme = (ROOT / "README.md").read_text()
blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
example = next(b for b in blocks if 'c.infer("minilm"' in b)
assert '"127.0.0.1:8001"' in example, example
code = example.replace('"127.0.0.1:8001"', repr(os.environ["KILN_URL"]))

scope = {}
exec(compile(code, "README.md (MiniLM example)", "exec"), scope)
e = scope["e"]
assert e.shape == (2, 384), e.shape
assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4), np.linalg.norm(e, axis=1)
similarity = float(e[0] @ e[1])
assert similarity > 0.3, f"'The cat sits.' and 'A feline rests.' should be close: {similarity}"
print(f"README MiniLM example: ok (cosine similarity {similarity:.3f})")
