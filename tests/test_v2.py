"""The Open Inference Protocol, end to end: a real `python -m service` (two processes) over a quick artifact
directory, spoken to by the unmodified tritonclient (HTTP and gRPC) and by hand, checked against POST /classify."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from fastapi.testclient import TestClient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtests.drivers import GRPC_LOAD, v2_grpc
from loadtests.server import exposition, free_port, serving
from service.app import create_app
from service.settings import Settings
from tests.helpers import Served, sample, unavailable, wait_until
from tests.synthetic import CLASSES, png

pytestmark = pytest.mark.slow
OUTPUTS = ["PROBABILITIES", "LABELS", "NEIGHBOR_IDS", "NEIGHBOR_SIMILARITIES", "NEIGHBOR_ATTENTION"]
NEIGHBOR_FIELDS = {"NEIGHBOR_IDS": "id", "NEIGHBOR_SIMILARITIES": "similarity", "NEIGHBOR_ATTENTION": "attention"}
TOP_K, NEIGHBORS = 3, 5


@dataclass
class Server(Served):  # images: the build's example images
    classes: list[str]


@pytest.fixture(scope="module")
def server(quick_artifacts: Path) -> Iterator[Server]:
    manifest = json.loads((quick_artifacts / "manifest.json").read_text())
    images = [(quick_artifacts / e["file"]).read_bytes() for e in manifest["examples"]]
    port = free_port()
    with serving(quick_artifacts, RAC_WORKERS="2", RAC_GRPC_PORT=str(port)) as url:
        yield Server(url, f"127.0.0.1:{port}", images, manifest["classes"])


@pytest.fixture(scope="module")
def reference(server: Server) -> dict[str, np.ndarray]:
    """What POST /classify answers for each example image, as the v2 outputs would hold it."""
    want: dict[str, list[list[object]]] = {name: [] for name in OUTPUTS}
    for data in server.images:
        r = httpx.post(
            f"{server.url}/classify",
            files={"image": ("x.png", data, "image/png")},
            params={"top_k": len(server.classes), "neighbors": NEIGHBORS},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        answer = r.json()
        probs: list[object] = [0.0] * len(server.classes)
        for p in answer["predictions"]:
            probs[p["index"]] = p["probability"]
        want["PROBABILITIES"].append(probs)
        want["LABELS"].append([p["label"] for p in answer["predictions"][:TOP_K]])
        for name, key in (
            ("NEIGHBOR_IDS", "id"),
            ("NEIGHBOR_SIMILARITIES", "similarity"),
            ("NEIGHBOR_ATTENTION", "attention"),
        ):
            want[name].append([n[key] for n in answer["neighbors"]])
    return {name: np.array(rows) for name, rows in want.items()}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Equal to float32 precision (a batch of ten may round differently from ten batches of one)."""
    assert set(got) == set(OUTPUTS)
    assert got["PROBABILITIES"].dtype == np.float32 and got["NEIGHBOR_IDS"].dtype == np.int64
    labels = [[x.decode() if isinstance(x, bytes) else x for x in row] for row in got["LABELS"]]
    assert labels == want["LABELS"].tolist()
    assert np.array_equal(got["NEIGHBOR_IDS"], want["NEIGHBOR_IDS"])
    for name in ("PROBABILITIES", "NEIGHBOR_SIMILARITIES", "NEIGHBOR_ATTENTION"):
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def http_infer(server: Server, images: list[bytes], binary: bool, **kwargs: object) -> th.InferResult:
    client = th.InferenceServerClient(server.http)
    tensor = th.InferInput("IMAGE", [len(images)], "BYTES")
    elements = images if binary else [base64.b64encode(d) for d in images]  # JSON strings must be text
    tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
    outputs = [th.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    params = {"top_k": TOP_K, "neighbors": NEIGHBORS}
    return client.infer("rac", [tensor], outputs=outputs, parameters=params, **kwargs)


def grpc_infer(server: Server, images: list[bytes], model: str = "rac", **params: int) -> tg.InferResult:
    client = tg.InferenceServerClient(server.grpc)
    tensor = tg.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return client.infer(model, [tensor], parameters={"top_k": TOP_K, "neighbors": NEIGHBORS} | params)


def as_dict(result: th.InferResult | tg.InferResult) -> dict[str, np.ndarray]:
    return {name: result.as_numpy(name) for name in OUTPUTS if result.as_numpy(name) is not None}


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_batch_answers_as_classify_does(server: Server, reference: dict[str, np.ndarray], binary: bool) -> None:
    result = http_infer(server, server.images, binary)
    response = result.get_response()
    assert response["model_name"] == "rac" and response["parameters"]["memory_version"]
    assert all(("data" in o) != binary for o in response["outputs"])  # the encoding asked for came back
    assert_same(as_dict(result), reference)


def test_http_gzip_request_and_single_image(server: Server, reference: dict[str, np.ndarray]) -> None:
    result = http_infer(server, server.images[3:4], True, request_compression_algorithm="gzip")
    assert_same(as_dict(result), {k: v[3:4] for k, v in reference.items()})


def test_grpc_batch_answers_as_classify_does(server: Server, reference: dict[str, np.ndarray]) -> None:
    result = grpc_infer(server, server.images)
    assert result.get_response().parameters["memory_version"].string_param
    assert_same(as_dict(result), reference)


def test_grpc_bytes_contents_and_chosen_outputs(server: Server, reference: dict[str, np.ndarray]) -> None:
    """The other place the protocol allows BYTES data (contents.bytes_contents), through the generated stub."""
    request = service_pb2.ModelInferRequest(model_name="rac", id="req-7")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(server.images[:2])
    request.parameters["top_k"].int64_param = TOP_K
    request.outputs.add(name="LABELS")
    with grpc.insecure_channel(server.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.id == "req-7" and [o.name for o in response.outputs] == ["LABELS"]
    assert list(response.outputs[0].shape) == [2, TOP_K]
    result = tg.InferResult(response)
    assert [[x.decode() for x in row] for row in result.as_numpy("LABELS")] == reference["LABELS"][:2].tolist()


def test_http_answers_only_the_outputs_asked_for(server: Server, reference: dict[str, np.ndarray]) -> None:
    body = {
        "id": "x1",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(server.images[0]).decode()]}
        ],
        "outputs": [{"name": "NEIGHBOR_IDS"}],
        "parameters": {"neighbors": NEIGHBORS},
    }
    r = httpx.post(f"{server.url}/v2/models/rac/versions/1/infer", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["id"] == "x1" and [o["name"] for o in answer["outputs"]] == ["NEIGHBOR_IDS"]
    assert answer["outputs"][0]["shape"] == [1, NEIGHBORS]
    assert answer["outputs"][0]["data"] == reference["NEIGHBOR_IDS"][0].tolist()


# ---------------------------------------------------------------- metadata and health


def test_metadata_and_readiness_over_http_and_grpc(server: Server) -> None:
    h, g = th.InferenceServerClient(server.http), tg.InferenceServerClient(server.grpc)
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("rac") and h.is_model_ready("rac", "1")
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("rac")
    assert not h.is_model_ready("other")
    # Artifacts without zero-shot parts have no model rac-zero-shot (tests/test_v2_zeroshot.py: with them).
    assert not h.is_model_ready("rac-zero-shot")
    with pytest.raises(InferenceServerException, match="unknown model 'rac-zero-shot': these artifacts have no"):
        g.get_model_metadata("rac-zero-shot")
    with pytest.raises(InferenceServerException, match="unknown model"):
        g.is_model_ready("other")
    for meta in (h.get_server_metadata(), g.get_server_metadata(as_json=True)):
        assert meta["name"] == "rac" and "binary_tensor_data" in meta["extensions"]
    http_meta, grpc_meta = h.get_model_metadata("rac"), g.get_model_metadata("rac", as_json=True)
    assert http_meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in http_meta["outputs"]] == OUTPUTS
    assert http_meta["outputs"][0]["shape"] == [-1, len(server.classes)]
    # MessageToJson writes int64 as strings
    assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in grpc_meta["outputs"]] == [
        (o["name"], o["datatype"], o["shape"]) for o in http_meta["outputs"]
    ]


# ---------------------------------------------------------------- refusals


def test_a_bad_image_fails_the_request_naming_the_item(server: Server) -> None:
    images = [server.images[0], server.images[1][:60], server.images[2]]  # the second one truncated
    with pytest.raises(InferenceServerException) as http_error:
        http_infer(server, images, True)
    assert http_error.value.status() == "400" and "IMAGE[1]" in http_error.value.message()
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_infer(server, images)
    assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT" and "IMAGE[1]" in grpc_error.value.message()


def test_an_unknown_model_is_404_in_the_protocols_error_shape(server: Server) -> None:
    r = httpx.post(f"{server.url}/v2/models/resnet/infer", json={"inputs": []})
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'resnet': this server serves 'rac'"}
    r = httpx.get(f"{server.url}/v2/models/rac/versions/2")
    assert r.status_code == 404 and "version '2'" in r.json()["error"]
    with pytest.raises(InferenceServerException) as e:
        grpc_infer(server, server.images[:1], model="resnet")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image_json(shape: list[int], datatype: str = "BYTES", name: str = "IMAGE", n: int = 2) -> dict[str, object]:
    data: list[object] = [b64(b"x")] * n if datatype == "BYTES" else [0.5] * n
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_image_json([2], "FP32"), "datatype FP32"),
        (_image_json([1, 2]), "shape [1, 2]"),
        (_image_json([3]), "holds 2 elements"),
        (_image_json([2], name="PIXELS"), "exactly one input"),
        (_image_json([1], n=1) | {"parameters": {"neighbors": 10_000}}, "'neighbors'"),
        (_image_json([1], n=1) | {"outputs": [{"name": "LOGITS"}]}, "unknown outputs"),
        ({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "not base64"),
        ({"inputs": "IMAGE"}, "list of 'inputs'"),
        ({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [["eA=="]]}]}, "base64 string"),
        (_image_json([1], n=1) | {"outputs": [{"name": "LABELS", "parameters": [1]}]}, "parameters an object"),
        (_image_json([40], n=40), "holds 40 elements; the limit is 32"),
    ],
)
def test_wrong_requests_get_400_in_the_error_shape(server: Server, body: dict[str, object], words: str) -> None:
    r = httpx.post(f"{server.url}/v2/models/rac/infer", json=body, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_wrong_datatype_and_shape_over_grpc(server: Server) -> None:
    client = tg.InferenceServerClient(server.grpc)
    wrong_type = tg.InferInput("IMAGE", [2], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(2, np.float32))
    wrong_shape = tg.InferInput("IMAGE", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([server.images[:2]], dtype=object))
    for tensor, words in ((wrong_type, "datatype FP32"), (wrong_shape, "shape [1, 2]")):
        with pytest.raises(InferenceServerException) as e:
            client.infer("rac", [tensor])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and words in e.value.message()


def test_binary_data_that_does_not_add_up_is_400(server: Server) -> None:
    def post(size: int, data: bytes) -> httpx.Response:
        tensor = {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}
        head = json.dumps({"inputs": [tensor]}).encode()
        length = {"Inference-Header-Content-Length": str(len(head))}
        return httpx.post(f"{server.url}/v2/models/rac/infer", content=head + data, headers=length)

    r = post(50, (10).to_bytes(4, "little") + b"short")  # claims 50 bytes, holds 9
    assert r.status_code == 400 and "binary_data_size 50" in r.json()["error"]
    r = post(9, (10).to_bytes(4, "little") + b"short")  # an element that claims 10 bytes, holds 5
    assert r.status_code == 400 and "claims 10 bytes" in r.json()["error"]
    empty = (0).to_bytes(4, "little") * 10_000  # ten thousand empty elements: refused after the 32nd
    r = post(len(empty), empty)
    assert r.status_code == 400 and "more than 32 elements" in r.json()["error"]


# ---------------------------------------------------------------- the pipeline behind both


def test_grpc_reaches_every_process_and_counts_in_the_same_metrics(server: Server) -> None:
    """Both server processes listen on the gRPC port (SO_REUSEPORT); separate connections spread over them;
    a gRPC inference goes through the same pipeline and counters as HTTP."""
    port = int(server.grpc.rsplit(":", 1)[1])

    def processes(status: str) -> set[int]:
        return {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == status}

    assert len(processes(psutil.CONN_LISTEN)) == 2
    before = exposition(server.url)
    channels = [grpc.insecure_channel(server.grpc, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(16)]
    try:
        stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]
        for stub in stubs:
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
        wait_until(lambda: len(processes(psutil.CONN_ESTABLISHED)) == 2, 5, "connections in both processes")
    finally:
        for c in channels:
            c.close()
    grpc_infer(server, server.images[:4])
    after = exposition(server.url)

    route = {"route": "/inference.GRPCInferenceService/ModelInfer", "status": "200"}
    assert sample(after, "rac_requests_total", **route) - sample(before, "rac_requests_total", **route) == 1
    images = sum(
        sample(after, "rac_images_total", outcome=o, memory="default")
        - sample(before, "rac_images_total", outcome=o, memory="default")
        for o in ("hit", "miss")
    )
    assert images == 4


@pytest.mark.parametrize("processes", [0, 1], ids=["native", "python"])
def test_the_grpc_load_drivers_count_what_the_server_answered(server: Server, tmp_path: Path, processes: int) -> None:
    """The gRPC load drivers `rac bench` and loadtests/protocols.py use (0: loadtests/grpc_load.cc, 1: one
    grpc.aio process): every call answered OK, and the calls they count (plus one warm-up call per connection)
    are the ModelInfer calls the server counted."""
    if processes == 0 and not GRPC_LOAD.exists():
        unavailable(f"{GRPC_LOAD} is not built (make grpc-load, which make test runs)", "RAC_REQUIRE_GRPC_LOAD")
    route = {"route": "/inference.GRPCInferenceService/ModelInfer", "status": "200"}
    before = sample(exposition(server.url), "rac_requests_total", **route)
    stats = v2_grpc(server.grpc, server.images, 4, 1.0, tmp_path, processes)
    after = sample(exposition(server.url), "rac_requests_total", **route)
    assert stats["non_ok"] == 0 and stats["requests"] > 4
    assert after - before == stats["requests"] + 4
    assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"] and stats["client_cores"] > 0
    assert sum(stats["connections_per_process"]) >= 4  # each caller's connection, held by some server process


def test_one_process_does_not_share_a_taken_grpc_port(quick_artifacts: Path) -> None:
    """Only several processes of one server share the gRPC port; a lone process whose port another program
    holds (even one that allows sharing) stops at start-up, naming the setting."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {"RAC_GRPC_PORT": str(port), "RAC_WORKERS": "1"}
        with pytest.raises(RuntimeError, match="RAC_GRPC_PORT"), serving(quick_artifacts, **env):
            pass


def test_overload_and_byte_limits_in_the_protocols_shape(synthetic_artifacts: Path) -> None:
    """In-process over a synthetic artifact directory: more images than the server admits get 503 /
    UNAVAILABLE at once, and bodies over the byte limit 413, compressed or not."""
    port = free_port()
    limits = {"max_pending": 2, "max_image_bytes": 4000, "max_batch_images": 4}
    settings = Settings(artifacts=synthetic_artifacts, grpc_port=port, **limits)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as c:
        wait_until(lambda: c.get("/v2/health/ready").status_code == 200, 10, "ready")
        r = c.post("/v2/models/rac/infer", json=_image_json([3], n=3))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]
        client = tg.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tg.InferInput("IMAGE", [3], "BYTES")
        tensor.set_data_from_numpy(np.array([png(i) for i in range(3)], dtype=object))
        with pytest.raises(InferenceServerException) as e:
            client.infer("rac", [tensor])
        assert e.value.status() == "StatusCode.UNAVAILABLE" and "overloaded" in e.value.message()
        assert client.infer("rac", [tensor_of(png(1))]).as_numpy("PROBABILITIES").shape == (1, len(CLASSES))
        big = json.dumps(_image_json([1], n=1)).encode() + b" " * 100_000
        r = c.post("/v2/models/rac/infer", content=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = c.post("/v2/models/rac/infer", content=gzip.compress(big), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        r = c.post("/v2/models/rac/infer", content=big[:100], headers={"Content-Encoding": "br"})
        assert r.status_code == 415


def tensor_of(data: bytes) -> tg.InferInput:
    tensor = tg.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return tensor


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_docs_client_example_runs(server: Server, quick_artifacts: Path, protocol: str) -> None:
    section = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    code = code.replace("artifacts/demo", str(quick_artifacts))
    if protocol == "grpc":  # what the example's first comment says to change
        code = code.replace("tritonclient.http", "tritonclient.grpc").replace("127.0.0.1:8000", server.grpc)
    code = code.replace("127.0.0.1:8000", server.http)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    labels = (quick_artifacts / "manifest.json").read_text()
    assert done.stdout.startswith("[[b'") and done.stdout.split("'")[1] in labels
