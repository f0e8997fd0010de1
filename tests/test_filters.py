"""Filtered search: the k nearest among the items a filter lets through, found by the search itself. Answers
equal a brute-force reference (exact search over the items that pass, then the head), for a flat and an IVF
index, over REST and the Open Inference Protocol, here and over shards; the filter is part of the cache key;
refusals name what exists."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.memory.shards import shard
from service.app import create_app
from service.artifacts import ENCODER, HEAD, IDS, KEYS, VALUES, read_manifest
from service.core.decode import InputSpec, decode
from service.core.encode import Encoder
from service.core.head import Head
from service.memory.filters import Filter
from service.memory.items import ItemTable
from service.memory.shards import LocalShards, Shard
from service.memory.store import Memory
from service.memory.versions import sharded
from service.settings import Settings
from tests.helpers import client
from tests.synthetic import make_artifacts, png

K = 10


@pytest.fixture(scope="module", params=["Flat", "IVF8,Flat"])
def tagged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tagged") / request.param.split(",")[0]
    make_artifacts(out, n_items=300, k=K, index=request.param, filters=True)
    return out


@pytest.fixture(scope="module")
def api(tagged: Path) -> Iterator[TestClient]:
    with client(tagged, max_wait_ms=5) as c:
        yield c


def passing(artifacts: Path, f: Filter) -> np.ndarray:
    """The ids that pass `f`, read from the item table the slow way: row by row."""
    table = ItemTable(artifacts / "items.sqlite")
    try:
        items = table.items(list(range(table.size)))
    finally:
        table.close()
    return np.asarray(
        sorted(
            i
            for i, item in items.items()
            if (not f.sources or item.source in f.sources)
            and (not f.tags or set(item.tags) & set(f.tags))
            and item.key not in f.exclude_keys
        ),
        np.int64,
    )


def reference(artifacts: Path, image: bytes, f: Filter) -> tuple[np.ndarray, np.ndarray]:
    """Exact search over the items that pass `f`, then the head: (neighbour ids best first, probabilities)."""
    m = read_manifest(artifacts)
    z = Encoder(artifacts / ENCODER, "cpu")(decode(image, InputSpec.from_dict(m.encoder.input), 10**7)[None])
    ids, keys, values = np.load(artifacts / IDS), np.load(artifacts / KEYS), np.load(artifacts / VALUES)
    rows = np.flatnonzero(np.isin(ids, passing(artifacts, f)))
    sims = (keys[rows].astype(np.float32) @ z[0]).astype(np.float32)
    top = np.argsort(-sims, kind="stable")[: min(K, len(rows))]
    chosen = rows[top]
    probs, _ = Head(artifacts / HEAD)(z, sims[top][None], keys[chosen][None], values[chosen][None])
    return ids[chosen], probs[0]


FILTERS = [
    Filter.of(sources=["downstream"]),
    Filter.of(tags=["even"]),
    Filter.of(tags=["third", "rare"]),  # any of them
    Filter.of(sources=["external"], tags=["even"]),  # both
    Filter.of(tags=["even"], exclude_keys=["item-0", "item-2", "item-404"]),  # a key the memory lacks: nothing
    Filter.of(tags=["rare"], sources=["downstream"]),  # 4 items pass: fewer than k
]


def params(f: Filter) -> list[tuple[str, str | int | float | bool | None]]:
    query: list[tuple[str, str | int | float | bool | None]] = [("source", s) for s in f.sources]
    return query + [("tag", t) for t in f.tags] + [("exclude_key", k) for k in f.exclude_keys]


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: json.dumps([f.sources, f.tags, f.exclude_keys]))
def test_filtered_answers_equal_exact_search_over_the_items_that_pass(api: TestClient, tagged: Path, f: Filter) -> None:
    for seed in range(3):
        image = png(100 + seed)
        want_ids, want_probs = reference(tagged, image, f)
        query = [*params(f), ("neighbors", str(K)), ("top_k", "3")]
        r = api.post("/classify", files={"image": ("x.png", image, "image/png")}, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        got = [n["id"] for n in body["neighbors"]]
        assert body["neighbors_used"] == len(want_ids) and sorted(got) == sorted(want_ids.tolist())
        assert set(got) <= set(passing(tagged, f).tolist())
        probs = {p["index"]: p["probability"] for p in body["predictions"]}
        for c, p in probs.items():  # the reference's similarities come from the float16 keys, the index's from float32
            assert abs(p - want_probs[c]) < 1e-4
        if f.tags == ("rare",):
            assert body["neighbors_used"] == 4 < K


def test_the_filter_is_part_of_the_cache_key(api: TestClient) -> None:
    image = png(7)

    def cached(**query: str) -> bool:
        r = api.post("/classify", files={"image": ("x.png", image, "image/png")}, params=query)
        assert r.status_code == 200, r.text
        return bool(r.json()["cached"])

    assert cached() is False and cached() is True
    assert cached(tag="even") is False and cached(tag="even") is True  # its own entry, not the unfiltered one
    assert cached(tag="third") is False
    assert cached() is True  # the unfiltered entry is still there


def test_unknown_names_are_422_naming_what_exists(api: TestClient) -> None:
    files = {"image": ("x.png", png(1), "image/png")}
    r = api.post("/classify", files=files, params={"source": "web"})
    assert r.status_code == 422 and "unknown source 'web'" in r.json()["detail"]
    assert "downstream, external" in r.json()["detail"]
    r = api.post("/classify", files=files, params={"tag": "odd"})
    assert r.status_code == 422 and "unknown tag 'odd'" in r.json()["detail"] and "even" in r.json()["detail"]
    r = api.post("/classify", files=files, params=[("tag", "rare"), *(("exclude_key", f"item-{i}") for i in range(15))])
    assert r.status_code == 422 and "no item" in r.json()["detail"]
    info = api.get("/info").json()["memory"]
    assert info["sources"] == {"downstream": 75, "external": 225} and info["tags"] == 3


def test_batch_and_the_protocol_take_the_same_filter(api: TestClient, tagged: Path) -> None:
    f = Filter.of(tags=["third"], exclude_keys=["item-3"])
    images = [png(40 + i) for i in range(3)]
    r = api.post(
        "/classify/batch",
        files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)],
        params=[*params(f), ("neighbors", str(K))],
    )
    batch = [e["result"] for e in r.json()["results"]]
    for image, answer in zip(images, batch, strict=True):
        want_ids, _ = reference(tagged, image, f)
        assert sorted(n["id"] for n in answer["neighbors"]) == sorted(want_ids.tolist())
    doc = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [3], "data": [base64.b64encode(b).decode() for b in images]}
        ],
        "parameters": {"tag": "third", "exclude_key": json.dumps(["item-3"]), "neighbors": K},
        "outputs": [{"name": "NEIGHBOR_IDS"}],
    }
    r = api.post("/v2/models/rac/infer", json=doc)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = np.asarray(out["outputs"][0]["data"]).reshape(3, K)
    for row, answer in zip(ids, batch, strict=True):
        assert row.tolist() == [n["id"] for n in answer["neighbors"]]
    assert out["parameters"]["neighbors_used"] == K
    doc["parameters"] = {"source": "nowhere"}
    r = api.post("/v2/models/rac/infer", json=doc)
    assert r.status_code == 422 and "unknown source" in r.json()["error"]


def test_sharded_memory_answers_the_same_filtered_neighbours(tagged: Path, tmp_path: Path) -> None:
    dirs = shard(tagged, tmp_path / "sharded", 3)
    nprobe = read_manifest(tagged).index.nprobe
    open_sharded = sharded(LocalShards([Shard(d, nprobe) for d in dirs]))
    whole = Memory(tagged, nprobe)
    split = open_sharded(tmp_path / "sharded", Settings(artifacts=tmp_path / "sharded"), None, whole.dim).memory
    z = np.random.default_rng(3).standard_normal((6, whole.dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    for f in FILTERS:
        want_sims, want_ids = whole.search(z, K, whole.select(f))
        got_sims, got_ids, _ = split.lookup(z, K, False, split.select(f))
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_sims, want_sims, atol=1e-6)
    with TestClient(create_app(Settings(artifacts=tmp_path / "sharded"), open_memory=open_sharded)) as http:
        for f in FILTERS[:3]:
            query = [*params(f), ("neighbors", str(K))]
            r = http.post("/classify", files={"image": ("x.png", png(5), "image/png")}, params=query)
            want_ids, _ = reference(tagged, png(5), f)
            assert sorted(n["id"] for n in r.json()["neighbors"]) == sorted(want_ids.tolist())
