"""Model `rac-zero-shot` of the Open Inference Protocol, end to end: a real `python -m service` over a quick
`--zero-shot` build, spoken to by the unmodified tritonclient (HTTP, JSON and binary, and gRPC), checked against
POST /classify/zero-shot for the same images and labels; its refusals; and the model going away with a swap."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from loadtests.server import free_port, serving
from tests.helpers import Served, root_without_zero_shot, wait_until
from tests.synthetic import png

pytestmark = pytest.mark.slow
MODEL = "rac-zero-shot"
OUTPUTS = ["PROBABILITIES", "LABEL", "NEIGHBOR_IDS", "NEIGHBOR_SIMILARITIES"]
NEIGHBORS = 3
TEMPLATE = "a picture of a {}, a kind of clothing."


@dataclass
class Server(Served):
    labels: list[str]


@pytest.fixture(scope="module")
def server(zs_artifacts: Path) -> Iterator[Server]:
    manifest = json.loads((zs_artifacts / "manifest.json").read_text())
    images = [(zs_artifacts / e["file"]).read_bytes() for e in manifest["examples"][:4]]
    labels = [c.lower() for c in manifest["classes"]][::-1]  # not the manifest's order
    port = free_port()
    with serving(zs_artifacts, RAC_WORKERS="1", RAC_GRPC_PORT=str(port)) as url:
        yield Server(url, f"127.0.0.1:{port}", images, labels)


def reference(server: Server, template: str | None) -> dict[str, np.ndarray]:
    """What POST /classify/zero-shot answers for each image, as the v2 outputs would hold it."""
    rows: dict[str, list[object]] = {name: [] for name in OUTPUTS}
    for image in server.images:
        files: list[tuple[str, tuple[str | None, bytes] | tuple[str | None, bytes, str]]] = [
            ("image", ("x.png", image, "image/png"))
        ]
        files += [("labels", (None, label.encode())) for label in server.labels]
        files += [("template", (None, template.encode()))] if template else []
        r = httpx.post(f"{server.url}/classify/zero-shot", files=files, params={"neighbors": NEIGHBORS}, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        probability = {p["label"]: p["probability"] for p in answer["predictions"]}
        rows["PROBABILITIES"].append([probability[label] for label in server.labels])
        rows["LABEL"].append(answer["predictions"][0]["label"])
        rows["NEIGHBOR_IDS"].append([n["id"] for n in answer["neighbors"]])
        rows["NEIGHBOR_SIMILARITIES"].append([n["similarity"] for n in answer["neighbors"]])
    return {name: np.array(values) for name, values in rows.items()}


def assert_same(result: th.InferResult | tg.InferResult, want: dict[str, np.ndarray]) -> None:
    got = {name: result.as_numpy(name) for name in OUTPUTS}
    assert got["PROBABILITIES"].dtype == np.float32 and got["NEIGHBOR_IDS"].dtype == np.int64
    assert got["PROBABILITIES"].shape == want["PROBABILITIES"].shape  # (B, L)
    np.testing.assert_allclose(got["PROBABILITIES"], want["PROBABILITIES"], atol=1e-5)
    np.testing.assert_allclose(got["PROBABILITIES"].sum(1), 1, atol=1e-5)
    assert [x.decode() if isinstance(x, bytes) else x for x in got["LABEL"]] == want["LABEL"].tolist()
    assert got["NEIGHBOR_IDS"].shape == (len(want["LABEL"]), NEIGHBORS)
    assert np.array_equal(got["NEIGHBOR_IDS"], want["NEIGHBOR_IDS"])
    np.testing.assert_allclose(got["NEIGHBOR_SIMILARITIES"], want["NEIGHBOR_SIMILARITIES"], atol=1e-5)


def http_inputs(images: list[bytes], labels: list[str], binary: bool) -> list[th.InferInput]:
    image = th.InferInput("IMAGE", [len(images)], "BYTES")
    elements = images if binary else [base64.b64encode(d) for d in images]  # JSON strings must be text
    image.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    label = th.InferInput("LABELS", [len(labels)], "BYTES")  # in JSON: the labels as they are
    label.set_data_from_numpy(np.array([x.encode() for x in labels], dtype=object), binary_data=binary)
    return [image, label]


def grpc_inputs(images: list[bytes], labels: list[str]) -> list[tg.InferInput]:
    image, label = tg.InferInput("IMAGE", [len(images)], "BYTES"), tg.InferInput("LABELS", [len(labels)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=object))
    label.set_data_from_numpy(np.array([x.encode() for x in labels], dtype=object))
    return [image, label]


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("binary", "template"), [(True, None), (False, TEMPLATE)], ids=["binary-default-template", "json-own-template"]
)
def test_http_batch_answers_as_the_zero_shot_route_does(server: Server, binary: bool, template: str | None) -> None:
    want = reference(server, template)
    client = th.InferenceServerClient(server.http)
    outputs = [th.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    params: dict[str, object] = {"neighbors": NEIGHBORS} | ({"template": template} if template else {})
    result = client.infer(MODEL, http_inputs(server.images, server.labels, binary), outputs=outputs, parameters=params)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1"
    assert response["parameters"]["memory_version"]
    assert all(("data" in o) != binary for o in response["outputs"])  # the encoding asked for came back
    assert_same(result, want)


def test_grpc_batch_answers_as_the_zero_shot_route_does(server: Server) -> None:
    want = reference(server, TEMPLATE)
    client = tg.InferenceServerClient(server.grpc)
    params = {"neighbors": NEIGHBORS, "template": TEMPLATE}
    result = client.infer(MODEL, grpc_inputs(server.images, server.labels), parameters=params)
    assert result.get_response().model_name == MODEL
    assert_same(result, want)


def test_only_the_outputs_asked_for_each_in_its_encoding(server: Server) -> None:
    want = reference(server, None)
    client = th.InferenceServerClient(server.http)
    outputs = [th.InferRequestedOutput("LABEL", binary_data=False), th.InferRequestedOutput("PROBABILITIES")]
    result = client.infer(MODEL, http_inputs(server.images[:1], server.labels, True), outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["LABEL", "PROBABILITIES"]
    assert response["outputs"][0]["data"] == want["LABEL"][:1].tolist() and "data" not in response["outputs"][1]
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), want["PROBABILITIES"][:1], atol=1e-5)
    g = tg.InferenceServerClient(server.grpc)
    asked = [tg.InferRequestedOutput("NEIGHBOR_IDS")]
    result = g.infer(MODEL, grpc_inputs(server.images[1:3], server.labels), outputs=asked, parameters={"neighbors": 2})
    assert [o.name for o in result.get_response().outputs] == ["NEIGHBOR_IDS"]
    assert np.array_equal(result.as_numpy("NEIGHBOR_IDS"), want["NEIGHBOR_IDS"][1:3, :2])


def test_metadata_and_readiness_describe_the_model(server: Server) -> None:
    h, g = th.InferenceServerClient(server.http), tg.InferenceServerClient(server.grpc)
    assert h.is_model_ready(MODEL) and h.is_model_ready(MODEL, "1") and g.is_model_ready(MODEL)
    http_meta, grpc_meta = h.get_model_metadata(MODEL), g.get_model_metadata(MODEL, as_json=True)
    assert http_meta["name"] == MODEL and http_meta["versions"] == ["1"]
    assert http_meta["inputs"] == [
        {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
        {"name": "LABELS", "datatype": "BYTES", "shape": [-1]},
    ]
    outputs = [(o["name"], o["datatype"], len(o["shape"])) for o in http_meta["outputs"]]
    assert outputs == [
        ("PROBABILITIES", "FP32", 2),
        ("LABEL", "BYTES", 1),
        ("NEIGHBOR_IDS", "INT64", 2),
        ("NEIGHBOR_SIMILARITIES", "FP32", 2),
    ]
    assert [(o["name"], o["datatype"]) for o in grpc_meta["outputs"]] == [(n, t) for n, t, _ in outputs]
    # The shapes as answers have them: [B, L], [B], [B, n].
    result = h.infer(MODEL, http_inputs(server.images[:2], server.labels[:3], True), parameters={"neighbors": 1})
    assert [result.as_numpy(n).shape for n in OUTPUTS] == [(2, 3), (2,), (2, 1), (2, 1)]
    with pytest.raises(InferenceServerException, match="unknown model 'rac-zero'"):
        g.get_model_metadata("rac-zero")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("labels", "params", "words"),
    [
        (["cat", ""], {}, "label 1 is empty"),
        (["cat", "x" * 101], {}, "label 1 is 101 characters; the limit is 100"),
        (["cat", "dog", "cat"], {}, "distinct"),
        ([f"label {i}" for i in range(65)], {}, "the limit is 64"),
        (["cat"], {"template": "no slot"}, "template"),
        (["cat"], {"neighbors": 10_000}, "'neighbors'"),
    ],
)
def test_bad_labels_and_parameters_are_400_over_http_and_grpc(
    server: Server, labels: list[str], params: dict[str, object], words: str
) -> None:
    h, g = th.InferenceServerClient(server.http), tg.InferenceServerClient(server.grpc)
    for binary in (True, False):
        with pytest.raises(InferenceServerException) as e:
            h.infer(MODEL, http_inputs(server.images[:1], labels, binary), parameters=params)
        assert e.value.status() == "400" and words in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        g.infer(MODEL, grpc_inputs(server.images[:1], labels), parameters=params)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and words in e.value.message()


def test_other_refusals_in_the_protocols_error_shape(server: Server) -> None:
    images = [server.images[0], server.images[1][:60]]  # the second one truncated
    with pytest.raises(InferenceServerException) as e:
        tg.InferenceServerClient(server.grpc).infer(MODEL, grpc_inputs(images, server.labels))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "IMAGE[1]" in e.value.message()
    image = base64.b64encode(server.images[0]).decode()

    def post(inputs: list[dict[str, object]]) -> httpx.Response:
        return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json={"inputs": inputs}, timeout=60)

    only_image: list[dict[str, object]] = [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [image]}]
    r = post(only_image)
    assert r.status_code == 400 and "takes exactly the inputs 'IMAGE', 'LABELS'" in r.json()["error"]
    r = post([*only_image, {"name": "LABELS", "datatype": "BYTES", "shape": [0], "data": []}])
    assert r.status_code == 400 and "'LABELS' has shape [0]" in r.json()["error"]
    r = post([*only_image, {"name": "LABELS", "datatype": "BYTES", "shape": [1], "data": [7]}])
    assert r.status_code == 400 and "must be a string" in r.json()["error"]
    r = httpx.get(f"{server.url}/v2/models/{MODEL}/versions/2")
    assert r.status_code == 404 and "version '2'" in r.json()["error"]


def test_absent_without_zero_shot_parts_and_after_a_swap_that_drops_them(zs_artifacts: Path, tmp_path: Path) -> None:
    """A memory version without zero-shot parts (here: a derived one whose manifest lost its section): once it
    is served, the model is unknown over REST and gRPC (404, saying why) while model `rac` goes on."""
    from models.memory import ops
    from tests.helpers import client

    root = root_without_zero_shot(zs_artifacts, tmp_path)
    port = free_port()
    with client(root, memory_poll_s=0.05, max_wait_ms=20, grpc_port=port) as c:
        g = tg.InferenceServerClient(f"127.0.0.1:{port}")
        assert c.get(f"/v2/models/{MODEL}/ready").status_code == 200 and g.is_model_ready(MODEL)
        ops.publish(root / "v2", root)
        wait_until(lambda: c.get(f"/v2/models/{MODEL}/ready").status_code == 404, 20, "the swap")
        r = c.get(f"/v2/models/{MODEL}")
        assert (
            r.status_code == 404 and "unknown model" in r.json()["error"] and "no zero-shot parts" in r.json()["error"]
        )
        body = {"inputs": [{"name": "LABELS", "datatype": "BYTES", "shape": [1], "data": ["cat"]}]}
        assert c.post(f"/v2/models/{MODEL}/infer", json=body).status_code == 404
        with pytest.raises(InferenceServerException) as e:
            g.infer(MODEL, grpc_inputs([png(1)], ["cat"]))
        assert e.value.status() == "StatusCode.NOT_FOUND" and "no zero-shot parts" in e.value.message()
        r = c.get("/v2/models/other")
        assert r.status_code == 404 and r.json()["error"] == "unknown model 'other': this server serves 'rac'"
        assert c.get("/v2/models/rac/ready").status_code == 200


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_docs_client_example_runs(server: Server, zs_artifacts: Path, protocol: str) -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    section = page.split("## Model `rac-zero-shot`", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n")[1].split("```", 1)[0]
    assert '"rac-zero-shot"' in code
    code = code.replace("/tmp/zs", str(zs_artifacts))
    if protocol == "http":  # what the example's first comment says to change
        code = code.replace("tritonclient.grpc", "tritonclient.http").replace("127.0.0.1:8101", server.http)
    code = code.replace("127.0.0.1:8101", server.grpc)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("'")[1] in ("sneaker", "ankle boot", "sandal")
