"""The official `openai` Python client, unchanged, against Kiln's
/v1/embeddings (server at $KILN_HTTP_URL serving --repo models): its
embeddings equal the gRPC ones (tritonclient at $KILN_URL) within 1e-6."""

import os

import numpy as np
import openai
import tritonclient.grpc as grpcclient

texts = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue grew."]
client = openai.OpenAI(base_url=f"http://{os.environ['KILN_HTTP_URL']}/v1", api_key="unused-without-auth")
response = client.embeddings.create(model="minilm", input=texts)
got = np.array([d.embedding for d in response.data], dtype=np.float64)
assert got.shape == (3, 384), got.shape
assert response.usage.prompt_tokens > len(" ".join(texts).split()), response.usage
assert [m.id for m in client.models.list().data] == ["minilm"]

grpc = grpcclient.InferenceServerClient(url=os.environ["KILN_URL"])
inp = grpcclient.InferInput("text", [len(texts)], "BYTES")
inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
expected = grpc.infer("minilm", [inp]).as_numpy("embedding").astype(np.float64)
worst = float(np.max(np.abs(got - expected)))
assert worst <= 1e-6, worst

# The client's default asks for base64; float was asked above explicitly by
# reading .embedding, and both decode to the same vectors.
one = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
assert np.max(np.abs(np.array(one.data[0].embedding) - expected[0])) <= 1e-6
try:
    client.embeddings.create(model="minilm", input=[[101, 2023, 102]])
    raise AssertionError("token arrays were accepted")
except openai.BadRequestError as e:
    assert "token arrays are not accepted" in str(e), e
print(f"openai client /v1/embeddings: ok (largest difference from gRPC {worst:.1e})")
