"""The service on Ray Serve (service/ray_app.py) on a local two-node Ray cluster started here: it answers as the
single-process service over the same memory, loses no request when a shard replica dies, and its cache and
metrics work as the single-machine service's. And the single-machine service never imports Ray.

Ray comes with the `ray` extra (`make test` installs it); without it these tests skip, except in CI (CI=true or
RAC_REQUIRE_RAY=1), where they fail."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loadtests.server import ROOT, free_port
from models.scale import SynthConfig, synth
from models.shards import shard
from service.app import create_app
from service.settings import Settings

if TYPE_CHECKING:
    from loadtests.ray_cluster import LocalCluster

SIZE = 4000  # memory items: IVF-Flat, so the sharded answers equal the unsharded ones exactly
SHARDS = 2


def png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((20, 20, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_the_single_machine_service_never_imports_ray() -> None:
    code = (
        "import sys, service.app, service.serve, service.__main__, models.cli\n"
        "from service.app import create_app; from service.settings import Settings\n"
        "create_app(Settings())\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def need_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("RAC_REQUIRE_RAY") == "1":
            pytest.fail("the `ray` extra is not installed: pip install -e '.[ray]'")
        pytest.skip("the `ray` extra is not installed: pip install -e '.[ray]'")


@pytest.mark.ray
def test_a_shard_call_a_dying_replica_failed_is_asked_again() -> None:
    """RayShards over stand-in handles: a call that fails with a dead replica's error is sent again; a shard's
    own error is not."""
    need_ray()
    import ray

    from service.ray_app import RETRIES, RayShards
    from service.shards import ShardsUnavailable

    class Response:
        def __init__(self, value: object):
            self.value = value

        def result(self) -> object:
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    class Method:
        def __init__(self, answers: list[object]):
            self.answers, self.calls = answers, 0

        def remote(self, *args: object) -> Response:
            self.calls += 1
            return Response(self.answers.pop(0))

    class Handle:
        deployment_name = "shard-x"

        def __init__(self, answers: list[object]):
            self.describe = Method(answers)

    died = ray.exceptions.ActorDiedError()
    flaky, steady = Handle([died, died, (0, 5, "v")]), Handle([(5, 9, "v")])
    client = RayShards([flaky, steady])  # type: ignore[list-item]
    assert client.describe() == [(0, 5, "v"), (5, 9, "v")]
    assert (flaky.describe.calls, steady.describe.calls, client.retried) == (3, 1, 2)
    with pytest.raises(ValueError):
        RayShards([Handle([ValueError("bad ids")])]).describe()  # type: ignore[list-item]
    with pytest.raises(ShardsUnavailable):  # every try failed: the request answers 503
        RayShards([Handle([died] * (RETRIES + 1))]).describe()  # type: ignore[list-item]


class Deployed:
    def __init__(self, url: str, memory: Path, cluster: LocalCluster):
        self.url, self.memory, self.cluster = url, memory, cluster


@pytest.fixture(scope="module")
def deployed(synthetic_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    need_ray()
    from loadtests.ray_cluster import ray_cluster

    memory = tmp_path_factory.mktemp("ray") / "memory"
    synth(synthetic_artifacts, memory, SynthConfig(size=SIZE, recall_queries=0))
    shards_dir = memory.with_name("shards")
    shard(memory, shards_dir, SHARDS)
    with ray_cluster() as cluster:
        url = cluster.deploy(shards_dir, free_port(), shards=SHARDS, shard_replicas=2)
        yield Deployed(url, memory, cluster)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_answers_as_the_single_process_service(deployed: Deployed) -> None:
    k = 10
    with (
        TestClient(create_app(Settings(artifacts=deployed.memory))) as single,
        httpx.Client(base_url=deployed.url, timeout=30) as ray,
    ):
        for seed in range(8):
            files = {"image": ("x.png", png(seed), "image/png")}
            want = single.post(f"/classify?top_k=3&neighbors={k}", files=files).json()
            got = ray.post(f"/classify?top_k=3&neighbors={k}", files=files)
            assert got.status_code == 200, got.text
            got_json = got.json()
            assert got_json["memory_version"] == want["memory_version"]
            assert [n["id"] for n in got_json["neighbors"]] == [n["id"] for n in want["neighbors"]]
            for g, w in zip(got_json["neighbors"], want["neighbors"], strict=True):
                assert g["similarity"] == pytest.approx(w["similarity"], abs=1e-6)
                assert g["attention"] == pytest.approx(w["attention"], abs=1e-5)
            assert [p["label"] for p in got_json["predictions"]] == [p["label"] for p in want["predictions"]]
            for g, w in zip(got_json["predictions"], want["predictions"], strict=True):
                assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
        assert ray.get("/items/3").json()["text"] == single.get("/items/3").json()["text"]


COUNTED = (
    'rac_cache_total{result="hit"}',
    'rac_cache_total{result="miss"}',
    'rac_requests_total{route="/classify",status="200"}',
    'rac_requests_total{route="/classify",status="415"}',
    'rac_images_total{outcome="hit"}',
    'rac_images_total{outcome="miss"}',
    'rac_images_total{outcome="bad_input"}',
    'rac_stage_seconds_count{stage="encode"}',
)


def samples(client: httpx.Client | TestClient) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rac_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def exercise(client: httpx.Client | TestClient) -> tuple[list[dict[str, object]], int, dict[str, float]]:
    """An image twice (a miss, then a hit), then a text file; the answers and what the counters grew by."""
    before = samples(client)
    files = {"image": ("x.png", png(1000), "image/png")}
    answers = [client.post("/classify?neighbors=3", files=files).json() for _ in range(2)]
    refused = client.post("/classify", files={"image": ("x.txt", b"not an image", "text/plain")}).status_code
    after = samples(client)
    return answers, refused, {key: after.get(key, 0.0) - before.get(key, 0.0) for key in COUNTED}


@pytest.mark.ray
@pytest.mark.slow
def test_ray_cache_metrics_and_refusals_as_the_single_machine_service(deployed: Deployed) -> None:
    with (
        TestClient(create_app(Settings(artifacts=deployed.memory))) as single,
        httpx.Client(base_url=deployed.url, timeout=30) as ray,
    ):
        want, want_refused, want_grew = exercise(single)
        got, refused, grew = exercise(ray)
    assert [a["cached"] for a in got] == [False, True]
    assert [a["neighbors"] for a in got] == [a["neighbors"] for a in want]
    assert refused == want_refused == 415
    assert grew == want_grew
    assert grew['rac_cache_total{result="hit"}'] == 1 and grew['rac_stage_seconds_count{stage="encode"}'] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_killing_a_shard_replica_fails_no_request(deployed: Deployed) -> None:
    """Two replicas per shard: one of shard 0's is killed (SIGKILL) while requests flow; every request is answered
    (the ingress asks a failed shard call again, the handle routes it to the live replica), and Ray starts a new
    replica in its place."""
    cluster = deployed.cluster
    before = cluster.replicas("shard-0")
    assert len(before) == 2
    stop = threading.Event()
    results: list[int | str] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=deployed.url, timeout=30) as c:
            n = 0
            while not stop.is_set():
                n += 1
                files = {"image": ("x.png", png(10_000 * (worker + 1) + n), "image/png")}  # new: searched
                try:
                    status: int | str = c.post("/classify", files=files).status_code
                except httpx.HTTPError as e:
                    status = repr(e)
                with lock:
                    results.append(status)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim = before[0]
    victim.kill()
    killed_at = len(results)
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    assert killed_at > 5 and len(results) - killed_at > 20, (killed_at, len(results))
    failures = [r for r in results if r != 200]
    assert failures == [], f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = cluster.replicas("shard-0")
        if len(now) == 2 and victim.pid not in {p.pid for p in now}:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Ray did not replace the killed replica: {[p.pid for p in cluster.replicas('shard-0')]}")
    with httpx.Client(base_url=deployed.url, timeout=30) as c:
        assert c.post("/classify", files={"image": ("x.png", png(7), "image/png")}).status_code == 200
