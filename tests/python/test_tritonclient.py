"""Compatibility: Triton's own Python client (tritonclient[grpc] from PyPI)
talks to Kiln unchanged. Run by scripts/test against a live server at
$KILN_URL, in plain text and (KILN_SECURE=1 scripts/with-server.sh) over
mutual TLS with $KILN_TLS_DIR's certificates and the API key $KILN_API_KEY."""

import csv
import json
import os
import pathlib

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

ROOT = pathlib.Path(__file__).resolve().parents[2]
url = os.environ["KILN_URL"]
tls_dir = os.environ.get("KILN_TLS_DIR")
if tls_dir:
    tls = pathlib.Path(tls_dir)
    client = grpcclient.InferenceServerClient(
        url=url,
        ssl=True,
        root_certificates=str(tls / "ca.pem"),
        private_key=str(tls / "client.key"),
        certificate_chain=str(tls / "client.pem"),
    )
else:
    client = grpcclient.InferenceServerClient(url=url)

assert client.is_server_live()
assert client.is_server_ready()
assert client.is_model_ready("risk")

meta = client.get_server_metadata()
assert meta.name == "kiln", meta
assert "statistics" in meta.extensions

model = client.get_model_metadata("risk")
assert model.inputs[0].name == "features" and model.inputs[0].datatype == "FP32"
assert list(model.inputs[0].shape) == [-1, 30]
assert model.outputs[0].name == "probability"

config = client.get_model_config("risk").config
assert config.max_batch_size == 64, config.max_batch_size
assert list(config.input[0].dims) == [30]
names = json.loads(config.parameters["features.feature_names"].string_value)
assert names[0] == "radius_mean" and len(names) == 30

# Held-out rows from the data set; the answers must classify them well.
with open(ROOT / "data" / "wdbc.csv") as f:
    rows = list(csv.reader(f))[1:]
heldout = json.load(open(ROOT / "data" / "wdbc-split.json"))["heldout_rows"][:40]
x = np.array([[float(v) for v in rows[i][:30]] for i in heldout], dtype=np.float32)
y = np.array([float(rows[i][30]) for i in heldout])

inp = grpcclient.InferInput("features", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
out = grpcclient.InferRequestedOutput("probability")
result = client.infer("risk", [inp], outputs=[out], request_id="py-1", priority=0, timeout=1_000_000)
p = result.as_numpy("probability")
assert p.shape == (40, 1), p.shape
assert np.all((p >= 0) & (p <= 1))
accuracy = float(np.mean((p[:, 0] >= 0.5) == (y == 1)))
assert accuracy >= 0.9, accuracy
response = result.get_response()
assert response.id == "py-1"
assert response.model_version == "1"

# Errors come back as Triton clients expect them: a status and a message.
bad = grpcclient.InferInput("features", [1, 29], "FP32")
bad.set_data_from_numpy(np.zeros((1, 29), dtype=np.float32))
try:
    client.infer("risk", [bad])
    raise AssertionError("a wrong shape was accepted")
except InferenceServerException as e:
    assert "INVALID_ARGUMENT" in str(e.status()), e.status()
    assert "dimension 1 must be 30" in e.message(), e.message()

stats = client.get_inference_statistics("risk")
assert int(stats.model_stats[0].inference_count) >= 40

print(f"tritonclient compatibility: ok (held-out accuracy on 40 rows {accuracy:.3f})")

if tls_dir:
    # The API key works from tritonclient's per-call headers; a wrong one is
    # refused even on a verified connection.
    key = os.environ["KILN_API_KEY"]
    ok = client.infer("risk", [inp], headers={"authorization": f"Bearer {key}"})
    assert ok.as_numpy("probability").shape == (40, 1)
    try:
        client.infer("risk", [inp], headers={"authorization": "Bearer kiln_00000000_00"})
        raise AssertionError("a wrong key was accepted")
    except InferenceServerException as e:
        assert "UNAUTHENTICATED" in str(e.status()), e
        assert "kiln_00000000" not in e.message(), e.message()
    # A plaintext client on the TLS port is told what is wrong, at once.
    plain = grpcclient.InferenceServerClient(url=url)
    try:
        plain.is_server_live()
        raise AssertionError("plaintext was served on a TLS port")
    except InferenceServerException as e:
        assert "accepts TLS only" in e.message(), e.message()
    print("tritonclient over mutual TLS: ok")

# Explicit model control (the built-in repository's default): only the admin
# may unload and load; an unloaded model is not ready and its calls say why.
admin_token = pathlib.Path(os.environ["KILN_ADMIN_TOKEN_FILE"]).read_text().strip()
admin = {"authorization": f"Bearer {admin_token}"}
try:
    client.unload_model("risk")
    raise AssertionError("unload without admin credentials was accepted")
except InferenceServerException as e:
    # Over mutual TLS the client certificate names a caller who is no admin.
    expected = "PERMISSION_DENIED" if tls_dir else "UNAUTHENTICATED"
    assert expected in str(e.status()), e.status()
client.unload_model("risk", headers=admin)
assert not client.is_model_ready("risk")
index = client.get_model_repository_index(as_json=True)["models"]
states = {(m["name"], m.get("version", "")): m.get("state") for m in index}
assert states[("risk", "1")] in ("UNLOADING", "UNAVAILABLE"), index
try:
    client.infer("risk", [inp])
    raise AssertionError("an unloaded model answered")
except InferenceServerException as e:
    assert "unloaded by the admin token" in e.message(), e.message()
client.load_model("risk", headers=admin)
assert client.is_model_ready("risk")
again = client.infer("risk", [inp])
assert again.as_numpy("probability").shape == (40, 1)
print("tritonclient load_model / unload_model (admin only): ok")
