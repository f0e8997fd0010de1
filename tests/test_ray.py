"""The service on Ray Serve (service/cluster/app.py) on a local two-node Ray cluster started here: it answers as the
single-process service over the same memory (classify, zero-shot, the page, the protocol's REST and gRPC),
switches memory versions across shards with no failed or mixed answer (a shard replica killed during the switch
included), loses no request when a shard replica dies, and its cache and metrics work as the single-machine
service's. (tests/test_ray_data.py: what needs no deployment.)

Ray comes with the `ray` extra (`make test` installs it); without it these tests skip, except in CI (CI=true or
RAC_REQUIRE_RAY=1), where they fail."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from loadtests.server import free_port, serving
from loadtests.server import samples as exposition_samples
from models.memory import ops
from models.memory.shards import shard
from service.app import create_app
from service.artifacts import read_manifest
from service.settings import Settings
from tests.browser import THUMBS_LOADED, WAIT_MS, open_page
from tests.helpers import need_ray, png, wait_until

if TYPE_CHECKING:
    from loadtests.ray_cluster import LocalCluster

SHARDS = 2


class Deployed:
    def __init__(self, url: str, grpc: str, memory: Path, root: Path, cluster: LocalCluster):
        self.url, self.grpc, self.memory, self.root, self.cluster = url, grpc, memory, root, cluster


@pytest.fixture(scope="module")
def deployed(zs_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A quick zero-shot build (the real encoder and text tower, a flat index) in 2 shards of 2 replicas each,
    served by one ingress with the protocol's gRPC port on."""
    need_ray()
    from loadtests.ray_cluster import ray_cluster

    tmp = tmp_path_factory.mktemp("ray")
    shard(zs_artifacts, tmp / "v1-shards", SHARDS)
    ops.publish(tmp / "v1-shards", tmp / "root")  # a serving root: the ingress follows its `current` link
    grpc_port = free_port()
    with ray_cluster() as cluster:
        settings = {"grpc_port": grpc_port, "memory_poll_s": 0.2}
        url = cluster.deploy(tmp / "root", free_port(), shards=SHARDS, shard_replicas=2, settings=settings)
        yield Deployed(url, f"127.0.0.1:{grpc_port}", zs_artifacts, tmp / "root", cluster)


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


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.browser
def test_the_page_against_the_ray_ingress(deployed: Deployed, browser: Any, tmp_path: Path) -> None:
    """The page the Ray ingress serves, in chromium: it names the version served, shows an uploaded image's
    neighbours (thumbnails from the ingress's item table) as /classify answers, and with labels typed in asks
    /classify/zero-shot and shows its answer."""
    page, errors = open_page(browser, deployed.url, viewport={"width": 1280, "height": 900})
    assert read_manifest(deployed.root / "current").memory_version in page.inner_text("#served")
    assert page.is_visible("#zero-shot")  # the build has the zero-shot parts
    image = tmp_path / "query.png"
    image.write_bytes(png(50_000))
    files = {"image": ("query.png", image.read_bytes(), "image/png")}
    page.fill("#neighbors", "6")
    page.set_input_files("#file", str(image))
    page.wait_for_function(THUMBS_LOADED, arg=6, timeout=WAIT_MS)
    answer = httpx.post(f"{deployed.url}/classify", files=files, params={"neighbors": 6}, timeout=30).json()
    cards = page.eval_on_selector_all("#neighbor-grid li", "els => els.map(e => Number(e.dataset.id))")
    assert cards == [n["id"] for n in answer["neighbors"]]
    shown = page.eval_on_selector_all("#predictions li", "els => els.map(e => e.dataset.label)")
    assert shown == [p["label"] for p in answer["predictions"]]

    labels = ["sneaker", "handbag", "shirt"]
    page.fill("#labels", "\n".join(labels))
    page.click("#again")
    page.wait_for_function(
        "labels => [...document.querySelectorAll('#predictions li')].every(e => labels.includes(e.dataset.label))",
        arg=labels,
        timeout=WAIT_MS,
    )
    form = [("image", ("query.png", image.read_bytes(), "image/png"))] + [
        ("labels", (None, x.encode())) for x in labels
    ]
    params = {"top_k": 5, "neighbors": 6}  # the page's
    want = httpx.post(f"{deployed.url}/classify/zero-shot", files=form, params=params, timeout=30).json()
    shown = page.eval_on_selector_all("#predictions li", "els => els.map(e => e.dataset.label)")
    assert shown == [p["label"] for p in want["predictions"]]
    assert errors == []
    page.context.close()


def zero_shot(client: httpx.Client | TestClient, image: bytes, labels: list[str]) -> dict[str, Any]:
    form = [("labels", (None, label.encode())) for label in labels]
    r = client.post("/classify/zero-shot?neighbors=5", files=[("image", ("x.png", image, "image/png")), *form])
    assert r.status_code == 200, r.text
    return cast(dict[str, Any], r.json())


def v2_outputs(result: Any) -> dict[str, np.ndarray]:
    return {o: result.as_numpy(o) for o in ("LABELS", "PROBABILITIES", "NEIGHBOR_IDS", "NEIGHBOR_SIMILARITIES")}


@pytest.mark.ray
@pytest.mark.slow
def test_ray_zero_shot_v2_rest_and_grpc_answer_as_the_single_process_service(deployed: Deployed) -> None:
    """/classify/zero-shot, the protocol's REST route and its gRPC port (the unmodified tritonclient) on the Ray
    ingress answer as the single-process service over the unsharded memory does."""
    import tritonclient.grpc as tg

    manifest = read_manifest(deployed.memory)
    labels = [c.lower() for c in manifest.classes]
    images = [(deployed.memory / str(e["file"])).read_bytes() for e in manifest.examples[:3]]
    port = free_port()
    with (
        serving(deployed.memory, RAC_WORKERS="1", RAC_GRPC_PORT=str(port)) as single_url,
        httpx.Client(base_url=single_url, timeout=60) as single,
        httpx.Client(base_url=deployed.url, timeout=60) as ray,
    ):
        for image in images:
            want, got = zero_shot(single, image, labels), zero_shot(ray, image, labels)
            assert got["memory_version"] == want["memory_version"] == manifest.memory_version
            assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in want["neighbors"]]
            assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
            for g, w in zip(got["predictions"], want["predictions"], strict=True):
                assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
        doc = {
            "inputs": [
                {"name": "IMAGE", "shape": [len(images)], "datatype": "BYTES", "data": [b64(i) for i in images]}
            ],
            "parameters": {"top_k": 3, "neighbors": 5},
        }
        want_v2, got_v2 = (c.post("/v2/models/rac/infer", json=doc) for c in (single, ray))
        assert got_v2.status_code == want_v2.status_code == 200, got_v2.text
        got_out, want_out = outputs_of(got_v2.json()), outputs_of(want_v2.json())
        assert got_out.keys() == want_out.keys() and got_out["LABELS"] == want_out["LABELS"]
        assert got_out["NEIGHBOR_IDS"] == want_out["NEIGHBOR_IDS"]
        np.testing.assert_allclose(got_out["PROBABILITIES"], want_out["PROBABILITIES"], atol=1e-5)
        answers = []
        for address in (f"127.0.0.1:{port}", deployed.grpc):
            client = tg.InferenceServerClient(address)
            assert client.is_server_ready() and client.is_model_ready("rac")
            tensor = tg.InferInput("IMAGE", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=object))
            answers.append(v2_outputs(client.infer("rac", [tensor], parameters={"top_k": 3, "neighbors": 5})))
        want_g, got_g = answers
        np.testing.assert_array_equal(got_g["LABELS"], want_g["LABELS"])
        np.testing.assert_array_equal(got_g["NEIGHBOR_IDS"], want_g["NEIGHBOR_IDS"])
        np.testing.assert_allclose(got_g["PROBABILITIES"], want_g["PROBABILITIES"], atol=1e-5)
        np.testing.assert_allclose(got_g["NEIGHBOR_SIMILARITIES"], want_g["NEIGHBOR_SIMILARITIES"], atol=1e-6)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def outputs_of(body: dict[str, Any]) -> dict[str, list[Any]]:
    return {o["name"]: o["data"] for o in body["outputs"]}


COUNTED = (
    'rac_cache_total{result="hit"}',
    'rac_cache_total{result="miss"}',
    'rac_requests_total{route="/classify",status="200"}',
    'rac_requests_total{route="/classify",status="415"}',
    'rac_images_total{outcome="hit",memory="default"}',
    'rac_images_total{outcome="miss",memory="default"}',
    'rac_images_total{outcome="bad_input",memory="default"}',
    'rac_stage_seconds_count{stage="encode"}',
)


def samples(client: httpx.Client | TestClient) -> dict[str, float]:
    return exposition_samples(client.get("/metrics").text)


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
    """Two replicas per shard: one of shard 0's is killed (SIGKILL) while requests flow, and the shard process it
    owns ends with it; every request is answered (the ingress sends a failed shard call to the live replica's
    process), and Serve starts a new replica, with its process, in its place."""
    cluster = deployed.cluster
    before, held = cluster.replicas("shard-0"), cluster.shard_processes(0)
    assert len(before) == 2 and len(held) == 2
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
    wait_until(lambda: len(results) > 5, 60, "requests before the kill")
    victim = before[0]
    victim.kill()
    killed_at = len(results)
    wait_until(lambda: len(results) - killed_at > 20, 60, "requests after the kill")
    stop.set()
    for t in threads:
        t.join()
    assert killed_at > 5 and len(results) - killed_at > 20, (killed_at, len(results))
    failures = [r for r in results if r != 200]
    assert failures == [], f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"

    def replaced() -> bool:
        now, processes = cluster.replicas("shard-0"), cluster.shard_processes(0)
        pids = {p.pid for p in processes}
        return (
            len(now) == 2
            and victim.pid not in {p.pid for p in now}
            and len(pids) == 2
            and pids != {p.pid for p in held}
        )

    wait_until(replaced, 60, "Serve to replace the killed replica and its process")
    with httpx.Client(base_url=deployed.url, timeout=30) as c:
        assert c.post("/classify", files={"image": ("x.png", png(7), "image/png")}).status_code == 200


def swap_under_load(deployed: Deployed, tmp_path: Path, gone: set[int], published: Callable[[], None]) -> None:
    """A new version (the served build less `gone`, which shard 0 holds) published to the sharded root while
    three clients send requests, `published` called right after: no request fails, every answer is one
    version's (the new one never shows a removed item), the ingress never goes back, and its answers are
    those of a single-process service started fresh on the new version."""
    old = read_manifest(deployed.root / "current").memory_version
    (tmp_path / "gone.txt").write_text(" ".join(map(str, sorted(gone))))
    new = ops.remove(deployed.memory, tmp_path / "v2", tmp_path / "gone.txt")
    shards = tmp_path / f"{tmp_path.name}-shards"  # published under its name: one per test in the root
    shard(tmp_path / "v2", shards, SHARDS)
    images = [png(20_000 + i) for i in range(6)]
    seen: list[tuple[int, str, list[int]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=deployed.url, timeout=60) as c:
            n = worker
            while not stop.is_set():
                files = {"image": ("x.png", images[n % len(images)], "image/png")}
                r = c.post("/classify?neighbors=10", files=files)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")
                else:
                    body = r.json()
                    seen.append((n % len(images), body["memory_version"], [x["id"] for x in body["neighbors"]]))
                n += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(seen) >= 10, 60, "traffic before the publish")
    ops.publish(shards, deployed.root)
    published()
    wait_until(lambda: [v for _, v, _ in seen[-6:]] == [new.memory_version] * 6, 120, "the new version")
    count = len(seen)
    wait_until(lambda: len(seen) >= count + 10, 60, "traffic after the switch")
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    versions = [v for _, v, _ in seen]
    assert set(versions) == {old, new.memory_version}
    first = versions.index(new.memory_version)
    assert set(versions[first + 3 :]) == {new.memory_version}  # (three clients: one request each in flight)
    assert all(not gone & set(ids) for _, v, ids in seen if v == new.memory_version)
    with TestClient(create_app(Settings(artifacts=tmp_path / "v2"))) as fresh:
        for i, image in enumerate(images):
            want = fresh.post("/classify?neighbors=10", files={"image": ("x.png", image, "image/png")}).json()
            got = [ids for j, v, ids in seen if j == i and v == new.memory_version]
            assert got and got[-1] == [x["id"] for x in want["neighbors"]]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_swap_of_a_sharded_memory_under_load(deployed: Deployed, tmp_path: Path) -> None:
    """Every shard replica loads the new version before the ingress switches: 0 failed, 0 mixed answers."""
    swap_under_load(deployed, tmp_path, set(range(0, 400, 2)), lambda: None)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_swap_with_a_shard_process_killed_during_the_switch(deployed: Deployed, tmp_path: Path) -> None:
    """The process of one of shard 0's replicas killed (SIGKILL) as the new version is published: the ingress
    asks the live one again and switches once it holds the version (a dead process is not a refusal), no request
    fails, no answer mixes versions; its replica reports itself unhealthy, and the one Serve starts in its place
    serves the new version."""
    victim = deployed.cluster.shard_processes(0)[0]
    swap_under_load(deployed, tmp_path, set(range(1, 400, 2)), victim.kill)

    def replaced() -> bool:
        now = {p.pid for p in deployed.cluster.shard_processes(0)}
        return len(now) == 2 and victim.pid not in now and len(deployed.cluster.replicas("shard-0")) == 2

    wait_until(replaced, 60, "Serve to replace the replica whose process was killed")
    with httpx.Client(base_url=deployed.url, timeout=30) as c:  # both replicas answer, whichever is routed to
        for i in range(8):
            body = c.post("/classify?neighbors=10", files={"image": ("x.png", png(40_000 + i), "image/png")}).json()
            assert body["memory_version"] == read_manifest(tmp_path / "v2").memory_version
