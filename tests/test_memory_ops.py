"""Memory versions offline: add (embedded as queries are), remove (gone from index, keys, values and items),
publish (atomic `current`), list; refusal of a memory built for another model; size checks without checksums;
the item lookup under SQLite's parameter limit; FAISS threads set in the thread that searches."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from models import memory_ops as ops
from models.memory import PROMPT, thumbnail_bytes
from service import artifacts as A
from service.decode import InputSpec, decode
from service.encode import Encoder
from service.memory import Memory
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import Settings
from service.versions import load_version
from tests.synthetic import make_artifacts

ROOT = Path(__file__).resolve().parents[1]


def write_list(images: list[Path], folder: Path, texts: list[str | None]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (src, text) in enumerate(zip(images, texts, strict=True)):
        shutil.copy(src, folder / f"img{n}.png")
        lines.append(f"img{n}.png {n % 10}" + (f"\t{text}" if text else ""))
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        out = db.execute("SELECT * FROM items ORDER BY id").fetchall()
    db.close()
    return out


@pytest.fixture(scope="module")
def added(quick_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """v1 (the quick build) -> v2: v1 and ten example images, some with their own text."""
    tmp = tmp_path_factory.mktemp("add")
    examples = sorted((quick_artifacts / A.EXAMPLES).glob("*.png"))
    texts = [f"custom text {n}" if n % 2 else None for n in range(len(examples))]
    ops.add(quick_artifacts, write_list(examples, tmp / "new", texts), tmp / "v2")
    return tmp / "new", tmp / "v2"


def test_add_appends_items_embedded_as_queries_are(quick_artifacts: Path, added: tuple[Path, Path]) -> None:
    from models.encoders import TextEncoder

    folder, v2 = added
    m1, m2 = A.read_manifest(quick_artifacts), A.read_manifest(v2)
    n, m = m1.memory.size, m2.memory.size - m1.memory.size
    assert m == 10 and m2.parent_version == m1.memory_version and m2.memory_version != m1.memory_version
    assert m2.model_id == A.model_identity(m1) and A.model_mismatch(m1, m2) is None
    A.verify_files(v2, m2)  # complete and checksummed on its own
    assert (v2 / A.ENCODER).stat().st_ino == (quick_artifacts / A.ENCODER).stat().st_ino  # hard link
    k1, k2 = np.load(quick_artifacts / A.KEYS), np.load(v2 / A.KEYS)
    np.testing.assert_array_equal(k2[:n], k1)
    np.testing.assert_array_equal(np.load(v2 / A.VALUES)[:n], np.load(quick_artifacts / A.VALUES))
    # The new keys are what the service computes for the same PNG bytes.
    spec = InputSpec.from_dict(m1.encoder.input)
    pngs = [(folder / f"img{i}.png").read_bytes() for i in range(m)]
    z = Encoder(quick_artifacts / A.ENCODER, "cpu")(np.stack([decode(b, spec, 10**7) for b in pngs]))
    np.testing.assert_allclose(k2[n:].astype(np.float32), z, atol=2e-3)
    new_rows = rows(v2 / A.ITEMS)[n:]
    texts = [r[2] for r in new_rows]
    assert texts[1] == "custom text 1" and texts[0] == PROMPT.format(m1.classes[0].lower())
    np.testing.assert_allclose(np.load(v2 / A.VALUES)[n:].astype(np.float32), TextEncoder()(texts), atol=2e-3)
    assert [r[0] for r in new_rows] == list(range(n, n + m)) and rows(v2 / A.ITEMS)[:n] == rows(
        quick_artifacts / A.ITEMS
    )
    for i, r in enumerate(new_rows):  # each new item gets its thumbnail, as built items have theirs
        with Image.open(folder / f"img{i}.png") as im:
            assert r[-1] == thumbnail_bytes(im)
    # Each new image finds itself first, through the index the service reads.
    memory = Memory(v2, m2.index.nprobe)
    sims, ids = memory.search(z, 5)
    assert (ids[:, 0] == np.arange(n, n + m)).all() and (sims[:, 0] > 0.99).all()


def test_remove_leaves_no_trace_and_keeps_the_rest(added: tuple[Path, Path], tmp_path: Path) -> None:
    _, v2 = added
    m2 = A.read_manifest(v2)
    n = m2.memory.size
    gone = np.array([0, 3, 7, n - 1, n - 4])
    (tmp_path / "ids.txt").write_text("\n".join(map(str, gone)))
    m3 = ops.remove(v2, tmp_path / "ids.txt", tmp_path / "v3")
    v3 = tmp_path / "v3"
    keep = np.setdiff1d(np.arange(n), gone)
    assert m3.memory.size == len(keep) and m3.parent_version == m2.memory_version
    A.verify_files(v3, m3)
    np.testing.assert_array_equal(np.load(v3 / A.KEYS), np.load(v2 / A.KEYS)[keep])
    np.testing.assert_array_equal(np.load(v3 / A.VALUES), np.load(v2 / A.VALUES)[keep])
    old, new = rows(v2 / A.ITEMS), rows(v3 / A.ITEMS)
    assert [r[1:] for r in new] == [old[i][1:] for i in keep] and [r[0] for r in new] == list(range(len(keep)))
    # The index agrees with exact search over the kept keys, ids renumbered to rows.
    keys = np.load(v3 / A.KEYS).astype(np.float32)
    memory = Memory(v3, m3.index.nprobe)
    sims, ids = memory.search(keys, 10)
    exact = keys @ keys.T
    np.testing.assert_allclose(sims, -np.sort(-exact, 1)[:, :10], atol=2e-3)
    assert (ids[:, 0] == np.arange(len(keep))).all()


def test_remove_from_an_ivf_index_and_unknown_columns_survive(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    make_artifacts(v1, n_items=400, index="IVF8,Flat")
    with sqlite3.connect(v1 / A.ITEMS) as db:  # thumbnails, and a column the item table might gain later
        db.execute("UPDATE items SET thumbnail = CAST(id AS BLOB)")
        db.execute("ALTER TABLE items ADD COLUMN extra TEXT")
        db.execute("UPDATE items SET extra = 'x' || id")
    db.close()
    m1 = A.read_manifest(v1)
    m1.files[A.ITEMS] = A.digest(v1 / A.ITEMS)
    (v1 / A.MANIFEST).write_text(m1.model_dump_json())
    gone = np.arange(0, 400, 3)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, gone)))
    ops.remove(v1, tmp_path / "ids.txt", tmp_path / "v2")
    keep = np.setdiff1d(np.arange(400), gone)
    new = rows(tmp_path / "v2" / A.ITEMS)
    assert [r[-2] for r in new] == [str(i).encode() for i in keep]  # the thumbnail column came along
    assert [r[-1] for r in new] == [f"x{i}" for i in keep]  # and the unknown one
    index = faiss.read_index(str(tmp_path / "v2" / A.INDEX))
    assert isinstance(index, faiss.IndexIVF) and index.ntotal == len(keep)
    index.nprobe = index.nlist
    keys = np.load(tmp_path / "v2" / A.KEYS).astype(np.float32)
    _, ids = index.search(keys, 3)
    assert (ids[:, 0] == np.arange(len(keep))).all() and ids.max() < len(keep)
    removed = np.load(v1 / A.KEYS)[gone].astype(np.float32)
    sims, _ = index.search(removed, 1)
    assert (sims[:, 0] < 0.999).all()  # a removed key does not find itself any more


def test_publish_switches_current_and_refuses_another_model(
    quick_artifacts: Path, added: tuple[Path, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first = ops.publish(quick_artifacts, root)
    assert A.resolve(root) == first.resolve() and first.parent == root
    second = ops.publish(added[1], root)
    assert (root / A.CURRENT).readlink() == Path(second.name) and A.resolve(root) == second.resolve()
    listed = ops.list_versions(root)
    assert [r["current"] for r in listed] == [False, True] and listed[1]["items"] == 510
    other = tmp_path / "other"
    make_artifacts(other)
    with pytest.raises(A.ArtifactError, match="built for another model: encoder"):
        ops.publish(other, root)
    cli = [sys.executable, "-m", "models.cli", "memory", "publish", str(other), "--root", str(root)]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "another model" in r.stderr
    assert A.resolve(root) == second.resolve()  # unchanged
    # ... and a server refuses it at load too.
    with pytest.raises(A.ArtifactError, match=r"another model: encoder .*; head .*; classes"):
        load_version(other, Settings(), A.read_manifest(quick_artifacts), 16)


def test_sizes_are_checked_without_checksums(tmp_path: Path) -> None:
    for name in (A.VALUES, A.KEYS, A.INDEX, A.ITEMS, A.ENCODER, A.HEAD):
        d = tmp_path / name
        make_artifacts(d)
        with (d / name).open("r+b") as f:
            f.truncate((d / name).stat().st_size - 100)
        with pytest.raises(A.ArtifactError, match=name):
            Pipeline(Settings(artifacts=d, verify_checksums=False), Metrics())


def test_item_lookup_stays_under_sqlites_parameter_limit(synthetic_artifacts: Path) -> None:
    memory = Memory(synthetic_artifacts, 0)
    memory.table._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
    items = memory.items(list(range(300)))
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
