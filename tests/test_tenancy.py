"""Several named memories on one model, and API keys that keep tenants apart: real server processes, real HTTP
and gRPC. Two memories answer as servers started on each alone; a swap of one leaves the other untouched under
load; every route group answers 401 / 403 / 200 as a key's scope and memories say; a tenant's key reaches the
other tenant's memory by no route; a key taken out of the file stops working without a restart."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from loadtests.server import free_port, serving
from models.memory import ops
from service.artifacts import EXAMPLES, read_manifest
from service.auth import add_key, remove_key
from tests.helpers import ROOT, sample, serving_in, wait_until

pytestmark = pytest.mark.slow


@dataclass
class Tenants:
    url: str
    grpc: str
    keys: Path
    admin: str
    a: str  # a key that reaches memory a only
    b: str  # a key that reaches memory b only
    roots: dict[str, Path]
    images: list[bytes]


def two_roots(artifacts: Path, tmp: Path) -> dict[str, Path]:
    """Memory a: the build as it is; memory b: the build less its first 50 items (one model, two memories)."""
    ops.publish(artifacts, tmp / "a")
    (tmp / "gone.txt").write_text(" ".join(map(str, range(50))))
    ops.remove(artifacts, tmp / "b-v1", tmp / "gone.txt")
    ops.publish(tmp / "b-v1", tmp / "b")
    return {"a": tmp / "a", "b": tmp / "b"}


def memories(roots: dict[str, Path]) -> str:
    return ",".join(f"{name}={root}" for name, root in roots.items())


def classify(url: str, image: bytes, key: str | None = None, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = {"image": ("x.png", image, "image/png")}
    return httpx.post(f"{url}/classify", files=files, params={"neighbors": "5", **params}, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def tenants(zs_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    tmp = tmp_path_factory.mktemp("tenants")
    roots = two_roots(zs_artifacts, tmp)
    keys = tmp / "keys.json"
    admin = add_key(keys, "ops", "admin", None)
    a, b = add_key(keys, "shop-a", "classify", ["a"]), add_key(keys, "shop-b", "classify", ["b"])
    port = free_port()
    env = {"RAC_MEMORIES": memories(roots), "RAC_API_KEYS": str(keys), "RAC_WORKERS": "2", "RAC_GRPC_PORT": str(port)}
    images = [p.read_bytes() for p in sorted((zs_artifacts / EXAMPLES).glob("*.png"))[:4]]
    with serving(roots["a"], **env, RAC_API_KEYS_POLL_S="0.2") as url:
        auth = {"Authorization": f"Bearer {admin}"}
        for name, root in roots.items():  # every process has loaded every memory before a test swaps one
            version = read_manifest(root / "current").memory_version
            ready = partial(serving_in, url, 2, name, version, auth)
            wait_until(ready, 60, f"both server processes to serve memory {name}")
        yield Tenants(url, f"127.0.0.1:{port}", keys, admin, a, b, roots, images)


def test_two_memories_answer_as_each_served_alone(tenants: Tenants) -> None:
    t = tenants
    for name, root in t.roots.items():
        with serving(root) as alone:
            for image in t.images:
                got = classify(t.url, image, t.admin, memory=name).json()
                want = classify(alone, image).json()
                assert got["memory"] == name and got["memory_version"] == want["memory_version"]
                assert got["predictions"] == want["predictions"]
                assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in want["neighbors"]]
    default = classify(t.url, t.images[0], t.admin).json()
    assert default["memory"] == "a"  # the first named is the default
    b_ids = {n["id"] for image in t.images for n in classify(t.url, image, t.admin, memory="b").json()["neighbors"]}
    assert not b_ids & set(range(50))  # memory b lacks the items removed from it


def test_a_swap_of_one_memory_leaves_the_other_untouched_under_load(tenants: Tenants, tmp_path: Path) -> None:
    t = tenants
    a_version = read_manifest(t.roots["a"] / "current").memory_version
    (tmp_path / "gone.txt").write_text(" ".join(map(str, range(50, 80))))
    new_b = ops.remove(t.roots["b"] / "current", tmp_path / "b-v2", tmp_path / "gone.txt")
    seen: dict[str, list[str]] = {"a": [], "b": []}
    failures: list[str] = []
    stop = threading.Event()

    def client(name: str) -> None:
        n = 0
        while not stop.is_set():
            r = classify(t.url, t.images[n % len(t.images)], t.admin, memory=name)
            n += 1
            if r.status_code != 200:
                failures.append(f"{name}: {r.status_code} {r.text[:100]}")
            else:
                seen[name].append(r.json()["memory_version"])

    threads = [threading.Thread(target=client, args=(name,)) for name in ("a", "b", "a", "b")]
    for th in threads:
        th.start()
    wait_until(lambda: len(seen["a"]) >= 10 and len(seen["b"]) >= 10, 60, "traffic on both memories")
    old_b = read_manifest(t.roots["b"] / "current").memory_version
    ops.publish(tmp_path / "b-v2", t.roots["b"])

    def swaps(name: str) -> float:
        metrics = httpx.get(f"{t.url}/metrics", headers={"Authorization": f"Bearer {t.admin}"}, timeout=30).text
        return sample(metrics, "rac_memory_swaps_total", memory=name)

    wait_until(lambda: swaps("b") == 2, 60, "both server processes to swap memory b")  # each on its own
    # From here every process serves b's new version; a request that took the old one just before may still
    # be answered (one in flight per client of b).
    after_a, after_b = len(seen["a"]), len(seen["b"]) + 2
    wait_until(lambda: len(seen["a"]) >= after_a + 10 and len(seen["b"]) >= after_b + 10, 60, "traffic after")
    stop.set()
    for th in threads:
        th.join()
    assert failures == []
    assert set(seen["a"]) == {a_version} and swaps("a") == 0  # memory a never moved
    assert set(seen["b"]) == {old_b, new_b.memory_version}
    assert set(seen["b"][after_b:]) == {new_b.memory_version}  # never back to the old version
    info = httpx.get(f"{t.url}/info", headers={"Authorization": f"Bearer {t.admin}"}).json()["memories"]
    assert info["a"]["version"] == a_version and info["b"]["version"] == new_b.memory_version


def test_routes_answer_by_the_keys_scope_and_memories(tenants: Tenants) -> None:
    t = tenants
    image = t.images[0]

    def get(path: str, key: str | None = None, **params: str) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{t.url}{path}", params=params, headers=headers, timeout=30).status_code

    for path in ("/healthz", "/readyz", "/", "/static/page.js"):  # public
        assert get(path) == 200
    for path in ("/info", "/items/60", "/items/60/thumbnail", "/examples", "/metrics", "/openapi.json", "/v2"):
        assert get(path) == 401, path
    assert get("/info", "rac_not-a-key") == 401
    assert classify(t.url, image).status_code == 401
    assert httpx.post(f"{t.url}/admin/reload", timeout=30).status_code == 401
    # A tenant's key: its memory, classify scope
    assert classify(t.url, image, t.a).status_code == 200  # the default memory, a, is its own
    assert classify(t.url, image, t.b).status_code == 403  # the default is not b's
    assert classify(t.url, image, t.b, memory="b").status_code == 200
    assert get("/items/60", t.a) == 200 and get("/items/60/thumbnail", t.a) == 200
    assert get("/metrics", t.a) == 403
    assert httpx.post(f"{t.url}/admin/reload", headers={"Authorization": f"Bearer {t.a}"}).status_code == 403
    listed = httpx.get(f"{t.url}/info", headers={"Authorization": f"Bearer {t.a}"}).json()["memories"]
    assert list(listed) == ["a"]  # it does not even learn the other memory's name
    # The admin key: everything
    assert get("/metrics", t.admin) == 200 and get("/info", t.admin, memory="b") == 200
    assert httpx.post(f"{t.url}/admin/reload", headers={"Authorization": f"Bearer {t.admin}"}).status_code == 200
    metrics = httpx.get(f"{t.url}/metrics", headers={"Authorization": f"Bearer {t.admin}"}).text
    assert 'rac_key_requests_total{key="shop-a"}' in metrics and t.a not in metrics and t.admin not in metrics


def test_a_tenants_key_reaches_the_other_memory_by_no_route(tenants: Tenants) -> None:
    t, key = tenants, tenants.a
    auth = {"Authorization": f"Bearer {key}"}
    files = {"image": ("x.png", t.images[0], "image/png")}
    refused = [
        httpx.post(f"{t.url}/classify", files=files, params={"memory": "b"}, headers=auth),
        httpx.post(
            f"{t.url}/classify/batch",
            files=[("images", ("x.png", t.images[0], "image/png"))],
            params={"memory": "b"},
            headers=auth,
        ),
        httpx.post(
            f"{t.url}/classify/zero-shot",
            files=files,
            data={"labels": ["bag", "sneaker"]},
            params={"memory": "b"},
            headers=auth,
        ),
        httpx.get(f"{t.url}/items/60", params={"memory": "b"}, headers=auth),
        httpx.get(f"{t.url}/items/60/thumbnail", params={"memory": "b"}, headers=auth),
        httpx.get(f"{t.url}/items", params={"key": "x", "memory": "b"}, headers=auth),
        httpx.get(f"{t.url}/info", params={"memory": "b"}, headers=auth),
        httpx.get(f"{t.url}/examples", params={"memory": "b"}, headers=auth),
    ]
    for r in refused:
        assert r.status_code == 403 and "does not reach memory 'b'" in r.json()["detail"], (r.request.url, r.text)
    doc = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(t.images[0]).decode()]}
        ],
        "parameters": {"memory": "b"},
    }
    labels = {"name": "LABELS", "datatype": "BYTES", "shape": [2], "data": ["bag", "sneaker"]}
    for model, body in (("rac", doc), ("rac-zero-shot", {**doc, "inputs": [*doc["inputs"], labels]})):
        r = httpx.post(f"{t.url}/v2/models/{model}/infer", json=body, headers=auth)
        assert r.status_code == 403 and "does not reach memory 'b'" in r.json()["error"]
    client = tg.InferenceServerClient(t.grpc)
    image = tg.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([t.images[0]], dtype=object))
    with pytest.raises(InferenceServerException) as e:
        client.infer("rac", [image], parameters={"memory": "b"}, headers={"authorization": f"Bearer {key}"})
    assert (
        e.value.status() == str(grpc.StatusCode.PERMISSION_DENIED) and "does not reach memory 'b'" in e.value.message()
    )
    with pytest.raises(InferenceServerException) as e:
        client.infer("rac", [image])
    assert e.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
    assert client.is_server_live()  # health answers without a key, as /healthz
    ok = client.infer("rac", [image], parameters={"memory": "a"}, headers={"authorization": f"Bearer {key}"})
    assert ok.get_response().parameters["memory"].string_param == "a"


def test_a_key_taken_out_of_the_file_stops_working_without_a_restart(tenants: Tenants) -> None:
    t = tenants
    spare = add_key(t.keys, "spare", "classify", None)
    wait_until(lambda: classify(t.url, t.images[0], spare).status_code == 200, 10, "the new key taken")
    remove_key(t.keys, "spare")
    wait_until(lambda: classify(t.url, t.images[0], spare).status_code == 401, 10, "the removed key refused")
    assert classify(t.url, t.images[0], t.a).status_code == 200  # the others are untouched


def test_a_memory_for_another_model_is_refused_at_start_naming_it(
    quick_artifacts: Path, synthetic_artifacts: Path
) -> None:
    base = os.environ | {"RAC_WORKERS": "1", "RAC_PORT": str(free_port()), "RAC_GRPC_PORT": "0"}
    cmd = [sys.executable, "-m", "service"]
    env = base | {"RAC_MEMORIES": f"main={quick_artifacts},other={synthetic_artifacts}"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0 and "memory 'other'" in done.stderr and "another model" in done.stderr
    done = subprocess.run(
        cmd, cwd=ROOT, env=base | {"RAC_MEMORIES": "a=x,a=y"}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "named twice" in done.stderr
