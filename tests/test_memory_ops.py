"""Memory versions offline: add (embedded as queries are, new ids), remove (gone from index, keys, values and
items; every other item keeps its id), publish (atomic `current`), list; refusal of a memory built for another
model; size checks without checksums; the item lookup under SQLite's parameter limit; FAISS threads set in the
thread that searches."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from models.memory import ops
from models.memory.add import add
from models.memory.make import PROMPT, thumbnail_bytes
from models.memory.naming import MissingItems
from service.artifacts import (
    CURRENT,
    ENCODER,
    EXAMPLES,
    HEAD,
    IDS,
    INDEX,
    ITEMS,
    KEYS,
    MANIFEST,
    VALUES,
    ArtifactError,
    digest,
    model_identity,
    model_mismatch,
    read_manifest,
    resolve,
    verify_files,
)
from service.core.decode import InputSpec, decode
from service.core.encode import Encoder
from service.core.pipeline import Pipeline
from service.memory.store import Memory
from service.memory.versions import load_version
from service.metrics import Metrics
from service.settings import Settings
from tests.helpers import rows, write_list
from tests.synthetic import make_artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def added(quick_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """v1 (the quick build) -> v2: v1 and ten example images, some with their own text."""
    tmp = tmp_path_factory.mktemp("add")
    examples = sorted((quick_artifacts / EXAMPLES).glob("*.png"))
    texts = [f"custom text {n}" if n % 2 else None for n in range(len(examples))]
    add(quick_artifacts, write_list(examples, tmp / "new", texts), tmp / "v2")
    return tmp / "new", tmp / "v2"


def test_add_appends_items_embedded_as_queries_are(quick_artifacts: Path, added: tuple[Path, Path]) -> None:
    from models.encoders import TextEncoder

    folder, v2 = added
    m1, m2 = read_manifest(quick_artifacts), read_manifest(v2)
    n, m = m1.memory.size, m2.memory.size - m1.memory.size
    assert m == 10 and m2.parent_version == m1.memory_version and m2.memory_version != m1.memory_version
    assert m2.model_id == model_identity(m1) and model_mismatch(m1, m2) is None
    verify_files(v2, m2)  # complete and checksummed on its own
    assert (v2 / ENCODER).stat().st_ino == (quick_artifacts / ENCODER).stat().st_ino  # hard link
    k1, k2 = np.load(quick_artifacts / KEYS), np.load(v2 / KEYS)
    np.testing.assert_array_equal(k2[:n], k1)
    np.testing.assert_array_equal(np.load(v2 / VALUES)[:n], np.load(quick_artifacts / VALUES))
    # The new keys are what the service computes for the same PNG bytes.
    spec = InputSpec.from_dict(m1.encoder.input)
    pngs = [(folder / f"img{i}.png").read_bytes() for i in range(m)]
    z = Encoder(quick_artifacts / ENCODER, "cpu")(np.stack([decode(b, spec, 10**7) for b in pngs]))
    np.testing.assert_allclose(k2[n:].astype(np.float32), z, atol=2e-3)
    new_rows = rows(v2 / ITEMS)[n:]
    texts = [r[2] for r in new_rows]
    assert texts[1] == "custom text 1" and texts[0] == PROMPT.format(m1.classes[0].lower())
    np.testing.assert_allclose(np.load(v2 / VALUES)[n:].astype(np.float32), TextEncoder()(texts), atol=2e-3)
    assert [r[0] for r in new_rows] == list(range(n, n + m)) and rows(v2 / ITEMS)[:n] == rows(quick_artifacts / ITEMS)
    assert m2.memory.next_id == n + m and (np.load(v2 / IDS) == np.arange(n + m)).all()
    for i, r in enumerate(new_rows):  # each new item gets its thumbnail, as built items have theirs
        with Image.open(folder / f"img{i}.png") as im:
            assert r[5] == thumbnail_bytes(im)
    # Each new image finds itself first, through the index the service reads.
    memory = Memory(v2, m2.index.nprobe)
    sims, ids = memory.search(z, 5)
    assert (ids[:, 0] == np.arange(n, n + m)).all() and (sims[:, 0] > 0.99).all()


def test_remove_leaves_no_trace_and_keeps_every_other_id(added: tuple[Path, Path], tmp_path: Path) -> None:
    _, v2 = added
    m2 = read_manifest(v2)
    n = m2.memory.size
    gone = np.array([0, 3, 7, n - 1, n - 4])
    (tmp_path / "ids.txt").write_text("\n".join(map(str, gone)))
    m3 = ops.remove(v2, tmp_path / "v3", tmp_path / "ids.txt")
    v3 = tmp_path / "v3"
    keep = np.setdiff1d(np.arange(n), gone)
    assert m3.memory.size == len(keep) and m3.parent_version == m2.memory_version
    assert m3.memory.next_id == m2.memory.next_id  # a removed id is never given again
    verify_files(v3, m3)
    np.testing.assert_array_equal(np.load(v3 / KEYS), np.load(v2 / KEYS)[keep])
    np.testing.assert_array_equal(np.load(v3 / VALUES), np.load(v2 / VALUES)[keep])
    np.testing.assert_array_equal(np.load(v3 / IDS), keep)
    old, new = rows(v2 / ITEMS), rows(v3 / ITEMS)
    assert new == [old[i] for i in keep]  # the same ids, the same items
    # The index agrees with exact search over the kept keys, and answers their ids.
    keys = np.load(v3 / KEYS).astype(np.float32)
    memory = Memory(v3, m3.index.nprobe)
    sims, ids = memory.search(keys, 10)
    exact = keys @ keys.T
    np.testing.assert_allclose(sims, -np.sort(-exact, 1)[:, :10], atol=2e-3)
    assert (ids[:, 0] == keep).all() and not np.isin(ids, gone).any()


def test_an_id_the_version_does_not_hold_is_reported_never_mapped(added: tuple[Path, Path], tmp_path: Path) -> None:
    _, v2 = added
    n = read_manifest(v2).memory.size
    (tmp_path / "ids.txt").write_text(f"5 {n + 100} {n + 101}\n")
    with pytest.raises(MissingItems, match=f"holds no item {n + 100}, {n + 101}"):
        ops.remove(v2, tmp_path / "v3", tmp_path / "ids.txt")
    assert not (tmp_path / "v3").exists()  # nothing written
    cli = [sys.executable, "-m", "rac.cli", "memory", "remove", "--from", str(v2), "--ids", str(tmp_path / "ids.txt")]
    r = subprocess.run([*cli, "--out", str(tmp_path / "v3")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"holds no item {n + 100}" in r.stderr and not (tmp_path / "v3").exists()
    r = subprocess.run([*cli, "--out", str(tmp_path / "v3"), "--missing-ok"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "v3" / ITEMS) == [row for row in rows(v2 / ITEMS) if row[0] != 5]


def test_remove_from_an_ivf_index_and_unknown_columns_survive(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    make_artifacts(v1, n_items=400, index="IVF8,Flat")
    with sqlite3.connect(v1 / ITEMS) as db:  # thumbnails, and a column the item table might gain later
        db.execute("UPDATE items SET thumbnail = CAST(id AS BLOB)")
        db.execute("ALTER TABLE items ADD COLUMN extra TEXT")
        db.execute("UPDATE items SET extra = 'x' || id")
    db.close()
    m1 = read_manifest(v1)
    m1.files[ITEMS] = digest(v1 / ITEMS)
    (v1 / MANIFEST).write_text(m1.model_dump_json())
    gone = np.arange(0, 400, 3)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, gone)))
    ops.remove(v1, tmp_path / "v2", tmp_path / "ids.txt")
    keep = np.setdiff1d(np.arange(400), gone)
    new = rows(tmp_path / "v2" / ITEMS)
    assert [r[0] for r in new] == keep.tolist()
    assert [r[5] for r in new] == [str(i).encode() for i in keep]  # the thumbnail column came along
    assert [r[-1] for r in new] == [f"x{i}" for i in keep]  # and the unknown one
    index = faiss.read_index(str(tmp_path / "v2" / INDEX))
    assert isinstance(index, faiss.IndexIVF) and index.ntotal == len(keep)
    index.nprobe = index.nlist
    keys = np.load(tmp_path / "v2" / KEYS).astype(np.float32)
    _, ids = index.search(keys, 3)
    assert (ids[:, 0] == keep).all()  # the index keeps the stable ids
    removed = np.load(v1 / KEYS)[gone].astype(np.float32)
    sims, _ = index.search(removed, 1)
    assert (sims[:, 0] < 0.999).all()  # a removed key does not find itself any more


def test_publish_switches_current_and_refuses_another_model(
    quick_artifacts: Path, added: tuple[Path, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first = ops.publish(quick_artifacts, root)
    assert resolve(root) == first.resolve() and first.parent == root
    second = ops.publish(added[1], root)
    assert (root / CURRENT).readlink() == Path(second.name) and resolve(root) == second.resolve()
    listed = ops.list_versions(root)
    assert [r["current"] for r in listed] == [False, True] and listed[1]["items"] == 510
    other = tmp_path / "other"
    make_artifacts(other)
    with pytest.raises(ArtifactError, match="built for another model: encoder"):
        ops.publish(other, root)
    cli = [sys.executable, "-m", "rac.cli", "memory", "publish", str(other), "--root", str(root)]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "another model" in r.stderr
    assert resolve(root) == second.resolve()  # unchanged
    # ... and a server refuses it at load too.
    with pytest.raises(ArtifactError, match=r"another model: encoder .*; head .*; classes"):
        load_version(other, Settings(), read_manifest(quick_artifacts), 16)


def test_sizes_are_checked_without_checksums(tmp_path: Path) -> None:
    for name in (VALUES, KEYS, INDEX, ITEMS, ENCODER, HEAD, IDS):
        d = tmp_path / name
        make_artifacts(d)
        with (d / name).open("r+b") as f:
            f.truncate((d / name).stat().st_size - 100)
        with pytest.raises(ArtifactError, match=name):
            Pipeline(Settings(artifacts=d, verify_checksums=False), Metrics())


def test_item_lookup_stays_under_sqlites_parameter_limit(synthetic_artifacts: Path) -> None:
    memory = Memory(synthetic_artifacts, 0)
    memory.table._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
    items = memory.table.items(list(range(300)))
    assert sorted(items) == list(range(300))


def test_search_threads_are_set_in_the_thread_that_searches(synthetic_artifacts: Path) -> None:
    memory = Memory(synthetic_artifacts, 0, threads=3)
    seen: list[int] = []

    def search() -> None:
        memory.search(np.ones((2, memory.dim), np.float32), 5)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=search)
    t.start()
    t.join()
    assert seen == [3]
