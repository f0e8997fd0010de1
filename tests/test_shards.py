"""Shards: a memory split into shards that share its trained index answers, merged, what the unsharded memory
answers (FAISS's own IndexShards as the reference for the index, the served Memory for the whole search)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.memory import ops
from models.memory.scale import SynthConfig, exact_search, synth
from models.memory.shards import shard
from service.app import create_app
from service.artifacts import INDEX, ArtifactError, read_manifest
from service.core.batch import Computed, Job
from service.core.cache import Entry
from service.core.pipeline import Pipeline
from service.memory.shards import Answer, At, FilterSpec, LocalShards, Shard, ShardsUnavailable, merge
from service.memory.store import Memory
from service.memory.versions import sharded
from service.metrics import Metrics
from service.settings import Settings
from tests.helpers import same_shards

SIZE = 20_000


@pytest.fixture(scope="module", params=["IVF-PQ", "IVF-Flat"])
def memory_dir(
    request: pytest.FixtureRequest, synthetic_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("shards") / request.param
    pq_above = 10_000 if request.param == "IVF-PQ" else 10**9
    synth(synthetic_artifacts, out, SynthConfig(size=SIZE, pq_above=pq_above, pq_m=8, chunk=4096, recall_queries=0))
    return out


def queries(d: int, n: int = 64) -> np.ndarray:
    z = np.random.default_rng(5).standard_normal((n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_shard_indexes_equal_index_shards_and_the_unsharded_index(memory_dir: Path, tmp_path: Path) -> None:
    dirs = shard(memory_dir, tmp_path / "sharded", 3)
    nprobe, k = 8, 10
    whole = faiss.read_index(str(memory_dir / INDEX))
    reference = faiss.IndexShards(whole.d, False, False)  # type: ignore[call-arg]  # not threaded, global ids
    parts = [faiss.read_index(str(d / INDEX)) for d in dirs]
    assert sum(p.ntotal for p in parts) == whole.ntotal == SIZE
    for index in (whole, *parts):
        faiss.extract_index_ivf(index).nprobe = nprobe
    for p in parts:
        reference.add_shard(p)
    z = queries(whole.d)
    want_d, want_i = whole.search(z, k)
    ref_d, ref_i = reference.search(z, k)
    np.testing.assert_array_equal(ref_i, want_i)
    np.testing.assert_allclose(ref_d, want_d, rtol=0, atol=1e-6)
    # The merge the ingress does, over each shard's raw top k:
    answers = [Answer(*p.search(z, k), np.zeros((len(z), k, 0), np.float16)) for p in parts]
    merged = merge(answers, k)
    np.testing.assert_array_equal(merged.ids, want_i)
    np.testing.assert_allclose(merged.sims, want_d, rtol=0, atol=1e-6)


def test_sharded_search_answers_as_the_served_memory(memory_dir: Path, tmp_path: Path) -> None:
    """Through Shard (re-ranking inside each shard where the index is quantized) and merge: the same neighbours,
    exact similarities and values as the unsharded served memory."""
    dirs = shard(memory_dir, tmp_path / "sharded", 2)
    k, nprobe = 20, 8
    memory = Memory(memory_dir, nprobe)
    shards = [Shard(d, nprobe) for d in dirs]
    z = queries(memory.dim)
    merged = merge([s.search(z, k) for s in shards], k)
    sims, ids = memory.search(z, k)
    _, want_values = memory.gather(merged.ids, keys=False, values=True)
    np.testing.assert_array_equal(merged.values, want_values)
    exact = np.einsum("qkd,qd->qk", memory.keys[merged.ids].astype(np.float32), z)
    np.testing.assert_allclose(merged.sims, exact, rtol=0, atol=1e-6)
    if not memory.rerank:  # exact codes: identical answers
        np.testing.assert_array_equal(merged.ids, ids)
        np.testing.assert_allclose(merged.sims, sims, rtol=0, atol=1e-6)
    else:  # each shard re-ranks its own 4k candidates: a superset of the unsharded 4k, never worse
        _, truth = exact_search(memory.keys, z, k)

        def recall(found: np.ndarray) -> float:
            return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth, strict=True)]))

        assert recall(merged.ids) >= recall(ids) - 1e-9
        assert (merged.ids == ids).mean() > 0.95


def test_pipeline_over_shards_answers_as_over_the_memory(memory_dir: Path, tmp_path: Path) -> None:
    """The whole pipeline with its memory in shards (what the Ray ingress runs, in one process here): the same
    neighbours, similarities and probabilities as over the unsharded memory, searched or from the cache."""
    sharded_dir = tmp_path / "sharded"
    dirs = shard(memory_dir, sharded_dir, 3)
    nprobe = read_manifest(memory_dir).index.nprobe
    settings = Settings(artifacts=memory_dir, max_batch=16, verify_checksums=False)
    whole = Pipeline(settings, Metrics())
    split = Pipeline(
        settings.model_copy(update={"artifacts": sharded_dir}),
        Metrics(),
        sharded(LocalShards([Shard(d, nprobe) for d in dirs])),
    )
    size = whole.spec.size
    pixels = np.random.default_rng(1).standard_normal((12, 3, size, size)).astype(np.float32)
    want = answered(whole, [Job(None, None, whole.version, neighbors=1, pixels=p) for p in pixels])
    got = answered(split, [Job(None, None, split.version, neighbors=1, pixels=p) for p in pixels])
    same = np.mean([np.array_equal(w.entry.ids, g.entry.ids) for w, g in zip(want, got, strict=True)])
    assert same == 1.0 if not whole.version.memory.rerank else same >= 0.75
    for w, g in zip(want, got, strict=True):
        if np.array_equal(w.entry.ids, g.entry.ids):
            np.testing.assert_allclose(g.entry.sims, w.entry.sims, rtol=0, atol=1e-6)
            np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-5)
            np.testing.assert_array_equal(g.neighbors.ids, w.neighbors.ids)
    # Cache hits (values gathered from the shards by id) mixed with misses in one batch:
    jobs = [Job(None, Entry(w.entry.z, w.entry.ids, w.entry.sims), split.version) for w in want[:6]]
    jobs += [Job(None, None, split.version, pixels=p) for p in pixels[6:]]
    again = answered(split, jobs)
    for w, a in zip(want[:6], again[:6], strict=True):  # the values of the unsharded memory's neighbours
        np.testing.assert_array_equal(a.entry.ids, w.entry.ids)
        np.testing.assert_allclose(a.scores, w.scores, rtol=0, atol=1e-5)
    for a, g in zip(again[6:], got[6:], strict=True):
        np.testing.assert_array_equal(a.entry.ids, g.entry.ids)


def test_removing_from_a_sharded_memory_equals_removing_then_sharding(memory_dir: Path, tmp_path: Path) -> None:
    """Shard by shard, each IVF index loses the ids it holds (the shared quantizer untouched)."""
    shard(memory_dir, tmp_path / "split", 3)
    gone = np.random.default_rng(2).choice(SIZE, 500, replace=False)
    (tmp_path / "gone.txt").write_text(" ".join(map(str, gone)))
    ops.remove(tmp_path / "split", tmp_path / "split-v2", tmp_path / "gone.txt")
    ops.remove(memory_dir, tmp_path / "whole-v2", tmp_path / "gone.txt")
    shard(tmp_path / "whole-v2", tmp_path / "resharded", 3)
    same_shards(tmp_path / "split-v2", tmp_path / "resharded")


def test_a_shard_nobody_answers_or_of_another_version_is_a_503(memory_dir: Path, tmp_path: Path) -> None:
    """Every replica of a shard down (the Ray client gave up): the request answers 503 with the reason, and the
    service answers again once the shard is back. A shard of another memory version (a rolling update of the
    shard deployments under way) answers nothing: 503 naming the versions, never an answer mixing the two."""
    sharded_dir = tmp_path / "sharded"
    nprobe = read_manifest(memory_dir).index.nprobe

    class Flaky(LocalShards):
        down = False

        def search(self, z: np.ndarray, k: int, every_list: bool, spec: FilterSpec | None, at: At) -> list[Answer]:
            if self.down:
                raise ShardsUnavailable("shard-1: no replica answered")
            return super().search(z, k, every_list, spec, at)

    client = Flaky([Shard(d, nprobe) for d in shard(memory_dir, sharded_dir, 2)])
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(png, "PNG")
    files = {"image": ("x.png", png.getvalue(), "image/png")}
    with TestClient(create_app(Settings(artifacts=sharded_dir), open_memory=sharded(client))) as http:
        client.down = True
        refused = http.post("/classify", files=files)
        assert refused.status_code == 503 and "shard-1" in refused.json()["detail"]
        client.down = False
        assert http.post("/classify", files=files).status_code == 200
        (tmp_path / "gone.txt").write_text("7")
        newer = ops.remove(memory_dir, tmp_path / "v2", tmp_path / "gone.txt")
        client.shards[1] = Shard(shard(tmp_path / "v2", tmp_path / "v2-sharded", 2)[1], nprobe)
        other = {"image": ("y.png", png.getvalue() + b"\0", "image/png")}  # not cached: searched
        stale = http.post("/classify", files=other)
        assert stale.status_code == 503 and f"holds memory version {newer.memory_version}" in stale.json()["detail"]


def test_shards_that_do_not_make_up_the_memory_are_refused(memory_dir: Path, tmp_path: Path) -> None:
    sharded_dir = tmp_path / "sharded"
    shards = [Shard(d, 8) for d in shard(memory_dir, sharded_dir, 3)]
    manifest = read_manifest(sharded_dir)
    settings = Settings(artifacts=sharded_dir)  # checksums on: the copied encoder, head and items check out
    version = sharded(LocalShards(shards))(sharded_dir, settings, None, manifest.encoder.dim)
    assert version.memory.size == SIZE and version.id == manifest.memory_version
    with pytest.raises(ArtifactError, match="do not cover"):
        sharded(LocalShards(shards[::2]))(sharded_dir, settings, None, manifest.encoder.dim)
    shards[1].info = shards[1].info._replace(memory_version="0123456789ab")
    with pytest.raises(ArtifactError, match="0123456789ab"):
        sharded(LocalShards(shards))(sharded_dir, settings, None, manifest.encoder.dim)


def answered(pipeline: Pipeline, jobs: list[Job]) -> list[Computed]:
    """run_batch's outputs, every one an answer (these jobs hold pixels: none can fail to decode)."""
    out = pipeline.run_batch(jobs)
    assert all(isinstance(o, Computed) for o in out)
    return cast(list[Computed], out)


def zero_shot(client: TestClient, image: bytes, labels: list[str]) -> dict[str, Any]:
    form = [("labels", (None, label.encode())) for label in labels]
    r = client.post("/classify/zero-shot?neighbors=5", files=[("image", ("x.png", image, "image/png")), *form])
    assert r.status_code == 200, r.text
    return cast(dict[str, Any], r.json())


def same_predictions(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    for g, w in zip(got["predictions"], want["predictions"], strict=True):
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)


@pytest.mark.slow
def test_a_zero_shot_build_over_shards_answers_as_unsharded(zs_artifacts: Path, tmp_path: Path) -> None:
    """A flat-index build with zero-shot parts, in 2 shards behind the app (what the Ray ingress serves, in one
    process here): /classify and /classify/zero-shot answer as the unsharded service does."""
    sharded_dir = tmp_path / "sharded"
    dirs = shard(zs_artifacts, sharded_dir, 2)
    manifest = read_manifest(zs_artifacts)
    assert manifest.index.type == "Flat" and sum(Memory(d, 0).size for d in dirs) == manifest.memory.size
    open_sharded = sharded(LocalShards([Shard(d, manifest.index.nprobe) for d in dirs]))
    labels = [c.lower() for c in manifest.classes]
    images = [(zs_artifacts / str(e["file"])).read_bytes() for e in manifest.examples[:4]]
    with (
        TestClient(create_app(Settings(artifacts=zs_artifacts))) as whole,
        TestClient(create_app(Settings(artifacts=sharded_dir), open_memory=open_sharded)) as split,
    ):
        for image in images:
            want, got = zero_shot(whole, image, labels), zero_shot(split, image, labels)
            assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in want["neighbors"]]
            same_predictions(got, want)
            files = {"image": ("x.png", image, "image/png")}
            want, got = (c.post("/classify?neighbors=5", files=files).json() for c in (whole, split))
            assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in want["neighbors"]]
            same_predictions(got, want)
