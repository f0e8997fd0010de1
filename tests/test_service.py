"""The whole HTTP stack in-process over a synthetic artifact directory: answers, batching, caching, limits,
bad input, overload and artifact checks."""

from __future__ import annotations

import gc
import os
import re
import subprocess
from base64 import b64encode
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware
from fastapi.testclient import TestClient

from service.api.plain import PlainRoute, Service
from service.app import create_app
from service.artifacts import ENCODER, HEAD, KEYS, VALUES, ArtifactError, read_manifest
from service.core.decode import InputSpec, decode
from service.core.encode import Encoder
from service.metrics import _forget_dead_processes
from service.settings import Settings
from tests.helpers import classify, client, png_header_only, tampered
from tests.synthetic import CLASSES, png


@pytest.fixture(scope="module")
def api(synthetic_artifacts: Path) -> Iterator[TestClient]:
    with client(synthetic_artifacts, max_batch=8, max_wait_ms=20) as c:
        yield c


def test_an_answer_has_predictions_neighbours_and_timings(api: TestClient) -> None:
    assert len(classify(api, png(11), top_k=5)["predictions"]) == 3  # top_k is at most: all 3 classes
    out = classify(api, png(1), top_k=2, neighbors=4)
    probs = [p["probability"] for p in out["predictions"]]
    assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert {p["label"] for p in out["predictions"]} <= set(CLASSES)
    weights = [n["attention"] for n in out["neighbors"]]
    assert len(weights) == 4 and weights == sorted(weights, reverse=True)
    assert all(n["text"].startswith("a ") and n["source"] == "external" for n in out["neighbors"])
    assert out["memory_version"] == "synthetic1" and out["cached"] is False
    assert set(out["timings_ms"]) == {"decode", "queue", "encode", "search", "head", "total"}


def test_answers_match_a_reference_computed_without_the_service(api: TestClient, synthetic_artifacts: Path) -> None:
    """decode -> ONNX encoder -> exact numpy search -> scripted head, by hand."""
    manifest = read_manifest(synthetic_artifacts)
    data = png(2)
    x = decode(data, InputSpec.from_dict(manifest.encoder.input), 10**6)
    z = Encoder(synthetic_artifacts / ENCODER, "cpu")(x[None])  # (1, d)
    keys = np.load(synthetic_artifacts / KEYS).astype(np.float32)
    values = np.load(synthetic_artifacts / VALUES).astype(np.float32)
    scores = z @ np.load(synthetic_artifacts / KEYS).astype(np.float32).T
    k = manifest.index.k
    ids = np.argsort(-scores[0])[:k]
    head = torch.jit.load(str(synthetic_artifacts / HEAD))
    with torch.no_grad():
        logits, _ = head(
            torch.from_numpy(z),
            torch.from_numpy(scores[:, ids]),
            torch.from_numpy(keys[ids][None]),
            torch.from_numpy(values[ids][None]),
        )
    want = torch.softmax(logits, -1)[0].numpy()
    got = classify(api, data, top_k=3, neighbors=k)
    assert np.allclose([p["probability"] for p in got["predictions"]], np.sort(want)[::-1], atol=1e-5)
    assert {n["id"] for n in got["neighbors"]} == set(ids.tolist())


def test_batched_and_unbatched_answers_agree(api: TestClient, synthetic_artifacts: Path) -> None:
    """Cache misses batched together, and batches mixing hits and misses, answer as each image alone does
    (alone: a server that never batches, with a cache of its own)."""
    seen, new = [png(100 + i) for i in range(12)], [png(200 + i) for i in range(24)]
    with client(synthetic_artifacts, max_batch=1, max_wait_ms=0) as solo:
        alone = [classify(solo, data, top_k=3, neighbors=3) for data in seen + new]
    for data in seen:
        classify(api, data)  # into the cache
    mixed = [image for pair in zip(seen, new[12:], strict=True) for image in pair]
    before = _batches(api)
    with ThreadPoolExecutor(12) as pool:
        misses = list(pool.map(lambda d: classify(api, d, top_k=3, neighbors=3), new[:12]))
        both = list(pool.map(lambda d: classify(api, d, top_k=3, neighbors=3), mixed))
    assert _batches(api) - before < 36  # concurrent requests really shared batches
    assert [a["cached"] for a in misses + both] == [False] * 12 + [True, False] * 12
    reference = dict(zip(seen + new, alone, strict=True))
    for data, answer in zip(new[:12] + mixed, misses + both, strict=True):
        assert _same_answer(reference[data], answer)


def test_batch_endpoint_answers_in_order_and_fails_only_bad_entries(api: TestClient) -> None:
    files = [
        ("images", ("a.png", png(7), "image/png")),
        ("images", ("b.txt", b"no image", "text/plain")),
        ("images", ("c.png", png(8), "image/png")),
        ("images", ("d.png", b"", "image/png")),
    ]
    r = api.post("/classify/batch", files=files, params={"top_k": 1})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [e["status"] for e in results] == [200, 415, 200, 400]
    assert "PNG, JPEG or WebP" in results[1]["detail"] and "empty" in results[3]["detail"]
    for entry, data in ((results[0], png(7)), (results[2], png(8))):
        assert _same_answer(entry["result"], classify(api, data, top_k=1))


def test_cached_and_uncached_answers_agree(api: TestClient) -> None:
    first = classify(api, png(9), top_k=3, neighbors=5)
    second = classify(api, png(9), top_k=3, neighbors=5)
    assert not first["cached"] and second["cached"]
    assert second["timings_ms"]["encode"] == 0 and second["timings_ms"]["search"] == 0
    assert _same_answer(first, second, exact=True)


@pytest.mark.parametrize(
    ("files", "content", "status", "words"),
    [
        ({"image": ("x.txt", b"certainly not an image", "text/plain")}, None, 415, "PNG, JPEG or WebP"),
        ({"image": ("x.png", png(3)[:40], "image/png")}, None, 400, "truncated"),
        ({"image": ("x.png", b"", "image/png")}, None, 400, "empty"),
        ({"image": ("x.png", png_header_only(30_000, 30_000), "image/png")}, None, 413, "pixels"),
        ({"picture": ("x.png", png(3), "image/png")}, None, 422, "field 'image'"),
        (None, ("text/plain", b"hello"), 415, "multipart/form-data"),
        (None, ("multipart/form-data; boundary=zz", b"--zz\r\nbroken"), 400, "multipart"),
        (None, ("multipart/form-data", b"--zz\r\n"), 400, "boundary"),
    ],
)
def test_bad_input_gets_a_clear_4xx(api: TestClient, files, content, status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    if files is not None:
        r = api.post("/classify", files=files)
    else:
        r = api.post("/classify", content=content[1], headers={"content-type": content[0]})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize("params", [{"top_k": 0}, {"neighbors": -1}, {"neighbors": 11}, {"top_k": "x"}])
def test_bad_query_values_get_422(api: TestClient, params: dict[str, Any]) -> None:
    r = api.post("/classify", files={"image": ("x.png", png(4), "image/png")}, params=params)
    assert r.status_code == 422 and r.json()["detail"]


def test_raw_image_bodies_are_accepted_too(api: TestClient) -> None:
    r = api.post("/classify", content=png(5), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["predictions"] == classify(api, png(5))["predictions"]


def test_byte_limits_are_enforced_while_reading(synthetic_artifacts: Path) -> None:
    big = png(6, size=96)  # about 28 kB of incompressible pixels
    with client(synthetic_artifacts, max_image_bytes=4000, max_batch_images=2) as c:
        r = c.post("/classify", files={"image": ("x.png", big, "image/png")})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: only counting while reading can stop it
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        r = c.post("/classify", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413
        r = c.post("/classify/batch", files=[("images", ("a.png", png(1), "image/png"))] * 3)
        assert r.status_code == 413 and "3 images" in r.json()["detail"]


def test_overload_gets_503_at_once_and_the_server_stays_ready(synthetic_artifacts: Path) -> None:
    limits = {"max_pending": 2, "max_waiting": 0}  # no waiting at the door: refused at once
    with client(synthetic_artifacts, **limits, max_batch=1, max_wait_ms=0) as c, ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(lambda i: c.post("/classify", files={"image": ("x.png", png(300 + i), "image/png")}), range(64))
        )
        codes = [r.status_code for r in statuses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
        refused = next(r for r in statuses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["detail"]
        assert c.get("/readyz").status_code == 200
        assert classify(c, png(999))["predictions"]
        metrics = c.get("/metrics").text
        assert f"rac_refused_total {float(codes.count(503))}" in metrics


def test_health_info_and_metrics(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    info = api.get("/info").json()
    assert info["classes"] == CLASSES and info["memory"]["size"] == 300 and info["index"]["k"] == 10
    assert info["encoder"]["providers"] == ["CPUExecutionProvider"] and info["cache"] == "memory"
    classify(api, png(10))
    text = api.get("/metrics").text
    for series in (
        'rac_stage_seconds_count{stage="encode"}',
        'rac_requests_total{route="/classify",status="200"}',
        'rac_cache_total{result="miss"}',
        "rac_batch_size_count",
        "rac_queue_depth",
        'rac_gc_cpu_seconds_total{generation="2"}',
    ):
        assert series in text
    # The app's young generation, and its passes counted (none, or some with their CPU time, by now)
    assert gc.get_threshold()[0] == Settings.model_fields["gc_young_objects"].default
    assert any(callback.__qualname__.startswith("Metrics.collections") for callback in gc.callbacks)
    assert "/openapi.json" in api.get("/docs").text
    schema = api.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/classify"]["post"]["requestBody"]["content"]


@pytest.mark.parametrize(
    ("change", "file", "words"),
    [
        ({"encoder.dim": 99}, None, "encoder outputs 16-d, manifest says 99"),
        ({"memory.value_dim": 5}, None, "values are (300, 8), expected (300, 5)"),
        ({"memory.size": 301}, None, "index holds 300 items, manifest says 301"),
        ({"classes": ["a", "b"]}, None, "head gives 3 classes, manifest names 2"),
        ({"index.k": 1000}, None, "k=1000 with 300 memory items"),
        ({"format_version": 0}, None, "format version 0"),
        (None, VALUES, "values.npy does not match the checksum"),
    ],
)
def test_mismatched_artifacts_refuse_to_start(synthetic_artifacts: Path, tmp_path: Path, change, file, words) -> None:  # type: ignore[no-untyped-def]
    bad = tampered(synthetic_artifacts, tmp_path / "bad", change, file)
    app = create_app(Settings(artifacts=bad))
    with pytest.raises(ArtifactError, match=re.escape(words)), TestClient(app):
        pass


def _batches(c: TestClient) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("rac_batch_size_count"):
            return float(line.split()[1])
    raise AssertionError("no batch counter")


def _same_answer(a: dict, b: dict, exact: bool = False) -> bool:
    pa = [(p["index"], p["probability"]) for p in a["predictions"]]
    pb = [(p["index"], p["probability"]) for p in b["predictions"]]
    na = [(n["id"], n["attention"]) for n in a["neighbors"]]
    nb = [(n["id"], n["attention"]) for n in b["neighbors"]]
    if exact:
        return pa == pb and na == nb
    return (
        [i for i, _ in pa] == [i for i, _ in pb]
        and np.allclose([p for _, p in pa], [p for _, p in pb], atol=1e-5)
        and [i for i, _ in na] == [i for i, _ in nb]
    )


def test_a_killed_workers_live_gauge_leaves_the_sum(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        (tmp_path / f"gauge_livesum_{pid}.db").write_bytes(b"")
    (tmp_path / f"counter_{gone.pid}.db").write_bytes(b"")
    _forget_dead_processes(str(tmp_path))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"counter_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db"])  # counters stay counted


def test_plainly_served_routes_answer_as_fastapis_own(
    api: TestClient, synthetic_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routes served by Starlette's Route in front of FastAPI's (service/api/plain.py), by the short way in,
    are those whose endpoint takes the Request (and at most its path's parameters, as strings) and returns a
    Response; an app without them (FastAPI's routes only, through FastAPI's whole stack) gives the same
    answers, refusals and statuses."""
    routes = cast(FastAPI, api.app).router.routes
    plain = {(r.path, m) for r in routes if isinstance(r, PlainRoute) for m in r.methods or ()}
    model = "/v2/models/{model_name}"
    gets = {"/", "/readyz", "/v2/health/ready", "/static/{name}", f"{model}/versions/{{model_version}}"}
    gets.add(f"{model}/versions/{{model_version}}/ready")
    posts = {"/classify", "/classify/batch", f"{model}/infer", f"{model}/versions/{{model_version}}/infer"}
    assert plain == {(p, "GET") for p in gets} | {(p, "POST") for p in posts}
    with client(synthetic_artifacts, max_batch=8, max_wait_ms=20) as reference:
        app = cast(FastAPI, reference.app)
        app.router.routes[:] = [r for r in app.router.routes if not isinstance(r, PlainRoute)]
        cast(Service, app).plain.clear()
        cast(Service, app).templated.clear()
        app.middleware_stack = None
        image, files = png(12), {"image": ("x.png", png(12), "image/png")}

        def same(method: str, path: str, **kw: Any) -> None:
            got, want = api.request(method, path, **kw), reference.request(method, path, **kw)
            kinds = got.headers.get("content-type"), want.headers.get("content-type")
            assert (got.status_code, kinds[0]) == (want.status_code, kinds[1]), path
            assert unmeasured(got.json() if got.content else None) == unmeasured(want.json() if want.content else None)

        same("POST", "/classify", files=files, params={"top_k": 2})
        same("POST", "/classify", content=image, headers={"content-type": "image/png"})
        same("POST", "/classify/batch", files=[("images", ("a.png", image, "image/png"))] * 2)
        same("POST", "/classify", content=b"hello", headers={"content-type": "text/plain"})
        same("POST", "/classify", files=files, params={"neighbors": 11})
        same("GET", "/classify")
        same("GET", "/readyz")
        same("HEAD", "/readyz")
        infer = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [b64encode(image).decode()]}]}
        for _ in range(2):  # the second time, a path with parameters is found by its match kept from the first
            same("POST", "/v2/models/rac/infer", json=infer)
            same("POST", "/v2/models/rac/versions/1/infer", json=infer)
            same("POST", "/v2/models/rac/versions/7/infer", json=infer)
            same("POST", "/v2/models/resnet/infer", json=infer)
            same("POST", "/v2/models/rac/infer", json={"inputs": []})
            same("GET", "/v2/models/rac/versions/1")
            same("GET", "/v2/models/rac/versions/1/ready")
            same("GET", "/v2/models/rac/versions/1/infer")
        assert ("POST", "/v2/models/rac/versions/7/infer") in cast(Service, api.app).matched
    text = api.get("/metrics").text
    assert re.search(r'rac_requests_total\{route="/readyz",status="200"\} [1-9]', text)
    # The short way in: a plain route's request skips FastAPI's own layers (its exit stack among them), others not.
    through: list[str] = []
    stacked = AsyncExitStackMiddleware.__call__

    async def seen(self: AsyncExitStackMiddleware, scope: Any, receive: Any, send: Any) -> None:
        through.append(scope["path"])
        await stacked(self, scope, receive, send)

    monkeypatch.setattr(AsyncExitStackMiddleware, "__call__", seen)
    assert api.post("/classify", files=files).status_code == 200
    assert api.post("/classify", content=b"hello", headers={"content-type": "text/plain"}).status_code == 415
    assert api.post("/v2/models/rac/infer", json=infer).status_code == 200
    assert api.get("/info").status_code == 200
    assert api.get("/v2/models/rac").status_code == 200
    assert through == ["/info", "/v2/models/rac"]


def unmeasured(doc: Any) -> Any:
    """An answer without what differs between two runs of the same request: its timings and cache flag."""
    if isinstance(doc, dict):
        return {k: unmeasured(v) for k, v in doc.items() if k not in ("timings_ms", "cached")}
    return [unmeasured(v) for v in doc] if isinstance(doc, list) else doc
