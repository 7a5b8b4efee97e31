"""Compatibility over HTTP: Triton's own HTTP client (tritonclient[http]
from PyPI) talks to Kiln's V2 REST listener unchanged, with JSON and binary
tensors, and gets the gRPC answers. Run by scripts/test against a live
server ($KILN_HTTP_URL and $KILN_URL), in plain text and
(KILN_SECURE=1 scripts/with-server.sh) over mutual TLS with an API key."""

import csv
import json
import os
import pathlib

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ROOT = pathlib.Path(__file__).resolve().parents[2]
tls_dir = os.environ.get("KILN_TLS_DIR")
headers = {}
if tls_dir:
    tls = pathlib.Path(tls_dir)
    client = httpclient.InferenceServerClient(
        url=os.environ["KILN_HTTP_URL"],
        ssl=True,
        ssl_options={"keyfile": str(tls / "client.key"), "certfile": str(tls / "client.pem"), "ca_certs": str(tls / "ca.pem")},
        insecure=False,
    )
    grpc = grpcclient.InferenceServerClient(
        url=os.environ["KILN_URL"], ssl=True, root_certificates=str(tls / "ca.pem"),
        private_key=str(tls / "client.key"), certificate_chain=str(tls / "client.pem"),
    )
    headers = {"authorization": f"Bearer {os.environ['KILN_API_KEY']}"}
else:
    client = httpclient.InferenceServerClient(url=os.environ["KILN_HTTP_URL"])
    grpc = grpcclient.InferenceServerClient(url=os.environ["KILN_URL"])

assert client.is_server_live()
assert client.is_server_ready()
assert client.is_model_ready("risk", headers=headers)
meta = client.get_server_metadata(headers=headers)
assert meta["name"] == "kiln", meta
model = client.get_model_metadata("risk", headers=headers)
assert model["inputs"][0] == {"name": "features", "datatype": "FP32", "shape": [-1, 30]}, model
config = client.get_model_config("risk", headers=headers)
assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [30], config

with open(ROOT / "data" / "wdbc.csv") as f:
    rows = list(csv.reader(f))[1:]
heldout = json.load(open(ROOT / "data" / "wdbc-split.json"))["heldout_rows"][:40]
x = np.array([[float(v) for v in rows[i][:30]] for i in heldout], dtype=np.float32)

g = grpcclient.InferInput("features", list(x.shape), "FP32")
g.set_data_from_numpy(x)
expected = grpc.infer("risk", [g], headers=headers).as_numpy("probability")

for binary in (False, True):
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probability", binary_data=binary)
    result = client.infer("risk", [inp], outputs=[out], request_id=f"http-{binary}", headers=headers)
    p = result.as_numpy("probability")
    assert p.shape == (40, 1), p.shape
    assert np.max(np.abs(p - expected)) <= 1e-6, np.max(np.abs(p - expected))
    response = result.get_response()
    assert response["id"] == f"http-{binary}" and response["model_version"] == "1", response

bad = httpclient.InferInput("features", [1, 29], "FP32")
bad.set_data_from_numpy(np.zeros((1, 29), dtype=np.float32))
try:
    client.infer("risk", [bad], headers=headers)
    raise AssertionError("a wrong shape was accepted")
except InferenceServerException as e:
    assert "400" in str(e.status()), e.status()
    assert "dimension 1 must be 30" in e.message(), e.message()

stats = client.get_inference_statistics("risk", headers=headers)
assert int(stats["model_stats"][0]["inference_count"]) >= 80, stats
if tls_dir:
    try:
        client.infer("risk", [inp], headers={"authorization": "Bearer kiln_00000000_00"})
        raise AssertionError("a wrong key was accepted")
    except InferenceServerException as e:
        assert "401" in str(e.status()), e.status()
print(f"tritonclient.http compatibility{' over mutual TLS' if tls_dir else ''}: ok (JSON and binary tensors equal gRPC's)")
