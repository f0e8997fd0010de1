"""Live swap in-process over synthetic versions: the served version follows ROOT/current; answers after a
swap equal those of the new version served alone; a refused version leaves the old one serving; stale cache
entries are ignored and counted; the admin route needs its token."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.memory import ops
from service.artifacts import CURRENT, ITEMS, read_manifest, resolve
from service.core.cache import Entry, cache_key
from tests.helpers import classify, client, rows, wait_until
from tests.synthetic import CLASSES, make_artifacts, png

TOKEN = "s3cret"


@pytest.fixture
def root(synthetic_artifacts: Path, tmp_path: Path) -> tuple[Path, Path]:
    """ROOT/current -> v1 (the synthetic memory); v2 (v1 without the items whose text names class 0) beside."""
    root = tmp_path / "root"
    ops.publish(synthetic_artifacts, root)
    label0 = [str(r[0]) for r in rows(synthetic_artifacts / ITEMS) if r[3] == 0]
    (tmp_path / "ids.txt").write_text("\n".join(label0))
    ops.remove(synthetic_artifacts, root / "v2", tmp_path / "ids.txt")
    return root, root / "v2"


def answers(c: TestClient, n: int = 6) -> list[dict]:
    return [classify(c, png(i), top_k=3, neighbors=10) for i in range(n)]


def metric(c: TestClient, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def test_a_published_version_is_served_and_equals_it_served_alone(root: tuple[Path, Path]) -> None:
    path, v2 = root
    v1_id, v2_id = read_manifest(resolve(path)).memory_version, read_manifest(v2).memory_version
    with client(v2) as alone:
        want = answers(alone)
    with client(path, memory_poll_s=0.05, max_wait_ms=20) as c:
        assert {a["memory_version"] for a in answers(c)} == {v1_id}
        ops.publish(v2, path)
        wait_until(lambda: classify(c, png(99))["memory_version"] == v2_id, 10, "the swap")
        got = answers(c)
        for g, w in zip(got, want, strict=True):
            assert g["memory_version"] == v2_id
            assert g["predictions"] == w["predictions"]
            assert [(n["id"], n["text"]) for n in g["neighbors"]] == [(n["id"], n["text"]) for n in w["neighbors"]]
            assert all(n["label"] != CLASSES[0] for n in g["neighbors"])  # removed items never come back
        info = c.get("/info").json()["memory"]
        assert info["version"] == v2_id and info["parent_version"] == v1_id and info["follow"]["swaps"] == 1
        assert metric(c, 'rac_memory_swaps_total{memory="default"}') == 1 and c.get("/readyz").status_code == 200
        assert metric(c, f'rac_memory_version{{memory="default",version="{v2_id}"}}') == 1


def test_a_refused_version_leaves_the_old_one_serving(root: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = root
    served = read_manifest(resolve(path)).memory_version
    other = path / "other"
    make_artifacts(other, d=8)  # another encoder: its memory does not fit this model
    with client(path, memory_poll_s=3600, admin_token=TOKEN) as c:
        link = path / ".tmp-link"
        os.symlink("other", link)
        os.replace(link, path / CURRENT)  # bypassing `rac memory publish`, which would refuse it
        r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["swapped"] is False and r.json()["failed_loads"] == 1
        assert "another model: encoder" in r.json()["last_error"]
        assert {a["memory_version"] for a in answers(c, 2)} == {served}
        assert (
            metric(c, 'rac_memory_load_failures_total{memory="default"}') == 1 and c.get("/readyz").status_code == 200
        )


def test_admin_reload_needs_its_token(root: tuple[Path, Path], synthetic_artifacts: Path) -> None:
    path, v2 = root
    with client(path, memory_poll_s=3600, admin_token=TOKEN) as c:
        assert c.post("/admin/reload").status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
        ops.publish(v2, path)
        r = c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["swapped"] is True
        assert r.json()["memory_version"] == read_manifest(v2).memory_version
    with client(synthetic_artifacts) as c:  # no token configured: the route is off
        assert c.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_a_cache_entry_of_another_shape_is_ignored_and_counted(synthetic_artifacts: Path) -> None:
    with client(synthetic_artifacts, answer_cache_entries=0) as c:  # the second request asks the cache again
        pipeline = c.app.state.pipeline  # type: ignore[attr-defined]
        want = classify(c, png(5), neighbors=3)
        stale = Entry(np.zeros(3, np.float32), np.zeros(2, np.int64), np.zeros(2, np.float32))
        key = cache_key(png(5), "default", pipeline.version.id, pipeline.k, pipeline.encoder.dim)
        asyncio.run(pipeline.cache.store.set(key, stale.pack(), 3600))  # the in-process store: no loop needed
        got = classify(c, png(5), neighbors=3)
        assert got["predictions"] == want["predictions"] and got["neighbors"] == want["neighbors"]
        assert metric(c, 'rac_cache_total{result="stale"}') == 1


def test_cache_keys_hold_what_decides_an_entry() -> None:
    keys = {cache_key(b"a", "m", "v1", 100, 256), cache_key(b"a", "m", "v2", 100, 256)}
    keys |= {cache_key(b"a", "m", "v1", 50, 256), cache_key(b"a", "m", "v1", 100, 128)}
    keys |= {cache_key(b"b", "m", "v1", 100, 256), cache_key(b"a", "m", "v1", 100, 256, "f1")}
    assert len(keys) == 6
