"""End to end: `rac build --quick` with the real encoder, served by a real uvicorn process, over real HTTP,
with the neighbour cache in a real Redis."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import pytest
import redis
import torch

from loadtests.server import exposition, free_port, serving
from models.build.artifact import config_from_manifest, prepare
from models.memory.make import search
from service.artifacts import ENCODER, HEAD, INDEX, KEYS, VALUES, read_manifest
from tests.helpers import unavailable, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(quick_artifacts: Path) -> Iterator[str]:
    with serving(quick_artifacts) as url:
        yield url


def post(url: str, data: bytes, **params: Any) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": ("x.png", data, "image/png")}, params=params, timeout=30)


def test_the_example_images_classify_as_the_build_predicted(server: str, quick_artifacts: Path) -> None:
    manifest = read_manifest(quick_artifacts)
    assert len(manifest.examples) == 10
    for ex in manifest.examples:
        r = post(server, (quick_artifacts / str(ex["file"])).read_bytes(), top_k=10)
        assert r.status_code == 200
        got = {p["label"]: p["probability"] for p in r.json()["predictions"]}
        want = dict(zip(manifest.classes, ex["probabilities"], strict=True))
        assert r.json()["predictions"][0]["label"] == ex["predicted"]
        assert all(abs(got[c] - want[c]) < 1e-4 for c in manifest.classes)


def test_service_agrees_with_the_offline_path_on_the_test_split(
    server: str, quick_artifacts: Path, tmp_path: Path
) -> None:
    """Offline: array -> embedding (models.features) -> FAISS search (models.memory.make) -> head.
    Online: PNG bytes over HTTP -> decode -> onnxruntime -> memory-mapped index -> head."""
    manifest = read_manifest(quick_artifacts)
    assert manifest.build["seconds"] > 0  # the build's own duration, recorded beside its configuration
    cfg = config_from_manifest(manifest, quick_artifacts, tmp_path / "cache")
    prep = prepare(cfg, quick_artifacts / ENCODER, exported=manifest.encoder)
    test = prep.splits.test
    z = prep.emb[test.pool][test.index][:60]
    index = faiss.read_index(str(quick_artifacts / INDEX))
    sims, ids = search(index, z, manifest.index.k)
    values = np.load(quick_artifacts / VALUES).astype(np.float32)[ids]
    keys = (
        np.load(quick_artifacts / KEYS).astype(np.float32)[ids]
        if manifest.head.uses_keys
        else np.empty((60, 0, 0), np.float32)
    )
    head = torch.jit.load(str(quick_artifacts / HEAD))
    with torch.no_grad():
        offline = torch.softmax(head(*(torch.from_numpy(a) for a in (z, sims, keys, values)))[0], -1).numpy()
    pool = prep.dataset.pools[test.pool]
    agree = 0
    for row, i in enumerate(test.index[:60]):
        buf = io.BytesIO()
        pool.image(int(i)).save(buf, "PNG")
        online = post(server, buf.getvalue(), top_k=10).json()["predictions"]
        probs = np.zeros(len(manifest.classes))
        for p in online:
            probs[p["index"]] = p["probability"]
        assert np.abs(probs - offline[row]).max() < 1e-4
        agree += int(probs.argmax() == offline[row].argmax())
    assert agree == 60


def test_neighbours_show_the_memory_and_the_attention(server: str, quick_artifacts: Path) -> None:
    example = read_manifest(quick_artifacts).examples[0]
    out = post(server, (quick_artifacts / str(example["file"])).read_bytes(), neighbors=5).json()
    assert len(out["neighbors"]) == 5
    assert {n["source"] for n in out["neighbors"]} <= {"downstream", "external"}
    weights = [n["attention"] for n in out["neighbors"]]
    assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1


def test_metrics_count_every_process(quick_artifacts: Path) -> None:
    """Two server processes share the port; whichever answers /metrics reports the sum over both."""
    examples = sorted((quick_artifacts / "examples").glob("*.png"))
    with serving(quick_artifacts, RAC_WORKERS="2") as url:

        def send(n: int) -> int:
            return sum(post(url, examples[(n + i) % 10].read_bytes()).status_code == 200 for i in range(10))

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(send, range(8))) == 80

        def summed() -> bool:
            lines = httpx.get(f"{url}/metrics").text.splitlines()
            expected = (
                'rac_requests_total{route="/classify",status="200"} 80.0',
                'rac_stage_seconds_count{stage="total"} 80.0',
            )
            return all(line in lines for line in expected)

        wait_until(summed, 5, "every process's counts in /metrics")  # each writes them every 0.1 s
        for _ in range(6):  # scrapes land on either process, and none is missing the other's counts
            assert summed()


def test_the_cache_lives_in_the_real_redis(quick_artifacts: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    version = read_manifest(quick_artifacts).memory_version
    for key in client.scan_iter(f"rac:nb:*:{version}:*"):
        client.delete(key)
    data = (quick_artifacts / "examples" / "00-t-shirt-top.png").read_bytes()
    with serving(quick_artifacts, REDIS_URL=redis_url) as url:
        assert httpx.get(f"{url}/info").json()["cache"] == "redis"
        first, second = post(url, data, neighbors=3).json(), post(url, data, neighbors=3).json()
        assert (first["cached"], second["cached"]) == (False, True)
        assert first["predictions"] == second["predictions"] and first["neighbors"] == second["neighbors"]
        assert len(list(client.scan_iter(f"rac:nb:*:{version}:*"))) == 1
        assert 'rac_cache_total{result="hit"} 1.0' in exposition(url)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, object, object]]:
    """A real redis-server of our own on a free port, which the test may stop and start at will (the
    machine's own Redis on 6379 is left alone)."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed", "RAC_REQUIRE_REDIS")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until(lambda: redis.Redis(port=port).ping(), 10, "redis-server")

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait(10)

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", start, stop
    finally:
        for p in procs:
            p.kill()


def test_redis_stopped_and_restarted_while_requests_flow(quick_artifacts: Path, own_redis) -> None:  # type: ignore[no-untyped-def]
    url_redis, start, stop = own_redis
    examples = sorted((quick_artifacts / "examples").glob("*.png"))
    statuses: list[int] = []
    hits: list[bool] = []  # each answer's `cached`, in order
    done = threading.Event()
    # Without its recent answers, the process asks Redis for every repeat: this is about Redis.
    env = {"REDIS_URL": url_redis, "RAC_REDIS_RETRY_S": "0.5", "RAC_ANSWER_CACHE_ENTRIES": "0"}
    with serving(quick_artifacts, **env) as url:

        def traffic() -> None:
            with httpx.Client(timeout=10) as c:
                n = 0
                while not done.is_set():
                    r = c.post(f"{url}/classify", files={"image": ("x.png", examples[n % 3].read_bytes(), "image/png")})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        hits.append(r.json()["cached"])
                    n += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        wait_until(lambda: sum(hits) >= 5, 30, "answers from the cache")
        stop()
        stopped = len(hits)
        wait_until(lambda: len(hits) >= stopped + 20, 30, "answers without Redis")
        restarting = len(hits)
        start()  # returns once Redis answers
        wait_until(lambda: any(hits[restarting:]), 30, "answers from the cache again")
        done.set()
        thread.join()
        metrics = exposition(url)
    assert statuses and set(statuses) == {200}  # not one request failed
    during = hits[stopped + 2 : restarting]  # (the first two may have been on their way when Redis stopped)
    assert during and not any(during)  # without Redis: answered, from scratch
    errors = next(line for line in metrics.splitlines() if line.startswith('rac_cache_total{result="error"}'))
    assert float(errors.split()[1]) > 0
