"""Stable item ids: an id names one item in every version that holds it, through remove, add and publish, on
every surface (answers, /items, thumbnails); removed ids are gone for good; keys find items, replace them on
add and remove them; a directory written before ids were stable keeps loading with its rows as ids."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.memory import ops
from models.memory.add import add
from service.artifacts import EXAMPLES, IDS, ITEMS, MANIFEST, digest, read_manifest
from tests.helpers import client, wait_until

pytestmark = pytest.mark.slow


def items_of(c: TestClient, ids: list[int]) -> dict[int, tuple[str, str, str, str | None]]:
    out = {}
    for i in ids:
        r = c.get(f"/items/{i}")
        if r.status_code == 200:
            body = r.json()
            out[i] = (body["text"], body["source"], body["label"], body["key"])
    return out


def neighbours(c: TestClient, image: bytes, **query: str) -> list[dict]:
    r = c.post("/classify", files={"image": ("x.png", image, "image/png")}, params={"neighbors": "100", **query})
    assert r.status_code == 200, r.text
    return list(r.json()["neighbors"])


def test_ids_survive_remove_add_and_publish_across_three_versions(quick_artifacts: Path, tmp_path: Path) -> None:
    """The takedown walk-through: note a neighbour's id, remove other items, add some, publish each version,
    then remove the noted id: exactly that item goes, and every other id means what it meant."""
    root = tmp_path / "root"
    ops.publish(quick_artifacts, root)
    examples = sorted((quick_artifacts / EXAMPLES).glob("*.png"))
    image = examples[0].read_bytes()
    with client(root, memory_poll_s=0.05, max_wait_ms=5) as c:
        v1 = c.get("/info").json()["memory"]["version"]
        first = neighbours(c, image)
        noted = first[0]["id"]  # the id a user notes to take down later
        noted_item = items_of(c, [noted])[noted]
        everything = items_of(c, list(range(read_manifest(quick_artifacts).memory.size)))
        # v2: other items removed (by id and by key)
        others = [n["id"] for n in first[1:6]]
        (tmp_path / "ids.txt").write_text("\n".join(map(str, others[:3])))
        ops.remove(quick_artifacts, tmp_path / "v2a", tmp_path / "ids.txt")
        keys = [str(everything[i][3]) for i in others[3:]]
        (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
        ops.remove(tmp_path / "v2a", tmp_path / "v2", keys_file=tmp_path / "keys.txt")
        ops.publish(tmp_path / "v2", root)
        v2 = read_manifest(tmp_path / "v2").memory_version
        wait_until(lambda: c.get("/info").json()["memory"]["version"] == v2, 10, "v2 served")
        # v3: items added (new ids above every id given before)
        lines = [
            json.dumps({"image": p.name, "label": i % 10, "key": f"new/{i}", "tags": ["added"]})
            for i, p in enumerate(examples[:4])
        ]
        (tmp_path / "new.jsonl").write_text("\n".join(lines) + "\n")
        m3 = add(tmp_path / "v2", tmp_path / "new.jsonl", tmp_path / "v3", image_root=quick_artifacts / EXAMPLES)
        ops.publish(tmp_path / "v3", root)
        wait_until(lambda: c.get("/info").json()["memory"]["version"] == m3.memory_version, 10, "v3 served")
        now = items_of(c, list(everything) + list(range(len(everything), len(everything) + 10)))
        for i, item in everything.items():  # the same id, the same item, or gone
            assert (i in others and i not in now) or now[i] == item
        new_ids = sorted(set(now) - set(everything))
        assert new_ids == list(range(len(everything), len(everything) + 4))  # next_id on: never a reused id
        assert [now[i][3] for i in new_ids] == [f"new/{i}" for i in range(4)]
        assert c.get("/items", params={"key": "new/2"}).json()["id"] == new_ids[2]
        for n in neighbours(c, image):
            assert n["id"] not in others  # removed ids never come back as neighbours
            assert (n["text"], n["source"], n["label"], n["key"]) == now[n["id"]]
        for gone in others:
            assert c.get(f"/items/{gone}").status_code == 404
            assert c.get(f"/items/{gone}/thumbnail").status_code == 404
        # Later: the noted id is taken down, in a version two steps away from where it was noted.
        (tmp_path / "noted.txt").write_text(f"{noted}\n")
        m4 = ops.remove(tmp_path / "v3", tmp_path / "v4", tmp_path / "noted.txt")
        ops.publish(tmp_path / "v4", root)
        wait_until(lambda: c.get("/info").json()["memory"]["version"] == m4.memory_version, 10, "v4 served")
        assert c.get(f"/items/{noted}").status_code == 404
        after = items_of(c, list(now))
        assert set(now) - set(after) == {noted} and all(after[i] == now[i] for i in after)
        assert noted_item not in after.values()
        assert v1 != v2


def test_add_with_a_key_the_memory_holds_replaces_that_item(quick_artifacts: Path, tmp_path: Path) -> None:
    examples = sorted((quick_artifacts / EXAMPLES).glob("*.png"))
    line = {"image": examples[0].name, "text": "a red sneaker", "key": "sku-1", "tags": ["sale"]}
    (tmp_path / "a.jsonl").write_text(json.dumps(line) + "\n")
    m2 = add(quick_artifacts, tmp_path / "a.jsonl", tmp_path / "v2", image_root=quick_artifacts / EXAMPLES)
    n = read_manifest(quick_artifacts).memory.size
    line |= {"image": examples[1].name, "text": "a blue sneaker", "tags": ["new"]}
    (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n")
    m3 = add(tmp_path / "v2", tmp_path / "b.jsonl", tmp_path / "v3", image_root=quick_artifacts / EXAMPLES)
    assert m2.memory.size == n + 1 and m3.memory.size == n + 1  # replaced, not added beside
    assert m3.memory.next_id == n + 2 and m3.memory.tags == {"new": 1}
    with sqlite3.connect(tmp_path / "v3" / ITEMS) as db:
        rows = db.execute("SELECT id, text, label, tags FROM items WHERE key = 'sku-1'").fetchall()
        assert db.execute("SELECT COUNT(*) FROM items WHERE id = ?", (n,)).fetchone() == (0,)
    db.close()
    assert rows == [(n + 1, "a blue sneaker", 7, '["new"]')]  # a new id; the label the text names (Sneaker)
    np.testing.assert_array_equal(np.load(tmp_path / "v3" / IDS), [*range(n), n + 1])
    with client(tmp_path / "v3") as c:
        assert c.get("/items", params={"key": "sku-1"}).json()["id"] == n + 1
        assert c.get(f"/items/{n}").status_code == 404
        assert c.get("/items", params={"key": "sku-404"}).status_code == 404
        r = c.post(
            "/classify",
            files={"image": ("x.png", examples[1].read_bytes(), "image/png")},
            params={"tag": "new", "neighbors": "1"},
        )
        assert r.json()["neighbors"][0]["key"] == "sku-1" and r.json()["neighbors_used"] == 1


def test_a_directory_written_before_ids_were_stable_loads_with_rows_as_ids(
    quick_artifacts: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(quick_artifacts, old)
    (old / IDS).unlink()  # no ids.npy, no key or tags column, no next_id: as written before
    with sqlite3.connect(old / ITEMS) as db:
        db.execute("DROP INDEX items_key")
        db.execute("ALTER TABLE items DROP COLUMN key")
        db.execute("ALTER TABLE items DROP COLUMN tags")
    db.close()
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["files"].pop(IDS)
    manifest["files"][ITEMS] = digest(old / ITEMS)
    manifest["memory"].pop("next_id")
    (old / MANIFEST).write_text(json.dumps(manifest))
    image = (old / EXAMPLES).glob("*.png").__next__().read_bytes()
    with client(old) as c:
        got = neighbours(c, image)
        assert all(n["key"] is None and n["tags"] == [] for n in got)
    with client(quick_artifacts) as c:
        want = neighbours(c, image)
    assert [n["id"] for n in got] == [n["id"] for n in want]  # its ids are its rows
    (tmp_path / "ids.txt").write_text("0 1 2\n")
    m2 = ops.remove(old, tmp_path / "v2", tmp_path / "ids.txt")  # from then on they stay fixed
    assert m2.memory.next_id == read_manifest(quick_artifacts).memory.size
    np.testing.assert_array_equal(np.load(tmp_path / "v2" / IDS)[:3], [3, 4, 5])
