"""A sharded memory grown and shrunk where it lives (`rac memory add` and `remove` with a sharded `--from`):
shard by shard, it becomes exactly what sharding the same version of the unsharded memory gives (the same ids,
keys, values, index entries and item rows in every shard, the same zero-shot parts), and answers as it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.memory import ops, rows
from models.memory.add import add
from models.memory.shards import shard
from service.app import create_app
from service.artifacts import IDS, INDEX, ITEMS, KEYS, ZS_MEMORY_FILES, ArtifactError, digest, read_manifest
from service.memory.shards import SHARD, LocalShards, Shard, shard_dirs
from service.memory.versions import sharded
from service.settings import Settings
from tests.helpers import ROOT, png, same_shards

pytestmark = pytest.mark.slow


def test_a_sharded_memory_grows_and_shrinks_as_the_unsharded_one_sharded(zs_artifacts: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with sqlite3.connect(zs_artifacts / ITEMS) as db:
        (held,) = db.execute("SELECT key FROM items WHERE key IS NOT NULL ORDER BY id LIMIT 1").fetchone()
    db.close()
    lines = []
    for i in range(30):
        (images / f"{i}.png").write_bytes(png(40_000 + i))
        key = held if i == 0 else f"new/{i}"  # the first replaces an item the memory holds (an upsert)
        lines.append(json.dumps({"image": f"{i}.png", "label": i % 10, "key": key, "tags": [f"t{i % 3}"]}))
    (tmp_path / "new.jsonl").write_text("\n".join(lines))
    split = tmp_path / "split-v1"
    shard(zs_artifacts, split, 3)
    grown = add(split, tmp_path / "new.jsonl", tmp_path / "split-v2", images)
    add(zs_artifacts, tmp_path / "new.jsonl", tmp_path / "whole-v2", images)
    n = read_manifest(zs_artifacts).memory.size
    gone = [3, 7, n + 2, n + 11]  # two old items, two just added
    (tmp_path / "gone.txt").write_text(" ".join(map(str, gone)))
    shrunk = ops.remove(tmp_path / "split-v2", tmp_path / "split-v3", tmp_path / "gone.txt")
    ops.remove(tmp_path / "whole-v2", tmp_path / "whole-v3", tmp_path / "gone.txt")

    for version in ("v2", "v3"):
        shard(tmp_path / f"whole-{version}", tmp_path / f"resharded-{version}", 3)
        same_shards(tmp_path / f"split-{version}", tmp_path / f"resharded-{version}")
        for name in ZS_MEMORY_FILES:  # the zero-shot text index over the whole memory, made again alike
            assert digest(tmp_path / f"split-{version}" / name) == digest(tmp_path / f"whole-{version}" / name)
    assert grown.memory.size == n + 29 and shrunk.memory.size == n + 25 and shrunk.memory.next_id == n + 30
    assert len({read_manifest(split).memory_version, grown.memory_version, shrunk.memory_version}) == 3
    for d in shard_dirs(tmp_path / "split-v3"):  # every shard marked as a part of the new version
        assert json.loads((d / SHARD).read_text())["memory_version"] == shrunk.memory_version
    assert not np.isin(gone, np.concatenate([np.load(d / IDS) for d in shard_dirs(tmp_path / "split-v3")])).any()
    ops.publish(tmp_path / "split-v3", tmp_path / "root")  # checked as a sharded memory
    (listed,) = ops.list_versions(tmp_path / "root")
    shard_keys = sum((d / KEYS).stat().st_size for d in shard_dirs(tmp_path / "split-v3"))
    memory_mb = listed["memory_mb"]  # its shards' files counted
    assert listed["current"] and isinstance(memory_mb, float) and memory_mb >= round(shard_keys / 2**20, 1)

    v3 = tmp_path / "split-v3"
    open_sharded = sharded(LocalShards([Shard(d, 0) for d in shard_dirs(v3)]))
    with (
        TestClient(create_app(Settings(artifacts=tmp_path / "whole-v3"))) as whole,
        TestClient(create_app(Settings(artifacts=v3), open_memory=open_sharded)) as split_app,
    ):
        for i in (1, 5, 12):
            files = {"image": ("x.png", png(40_000 + i), "image/png")}
            want, got = (c.post("/classify?neighbors=5", files=files).json() for c in (whole, split_app))
            assert got["memory_version"] == shrunk.memory_version
            assert [x["id"] for x in got["neighbors"]] == [x["id"] for x in want["neighbors"]]
            assert got["neighbors"][0]["key"] == f"new/{i}"  # the item itself, found by its image
            for gp, wp in zip(got["predictions"], want["predictions"], strict=True):
                assert gp["label"] == wp["label"] and gp["probability"] == pytest.approx(wp["probability"], abs=1e-5)


def test_what_a_sharded_memory_cannot_do_in_place_is_refused(zs_artifacts: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    shard(zs_artifacts, split, 2)
    (tmp_path / "ids.txt").write_text("1 2")
    with pytest.raises(ArtifactError, match="sharded: tag the unsharded memory"):
        ops.tag(split, tmp_path / "tagged", tmp_path / "ids.txt", None, ["x"], [])
    (tmp_path / "list.txt").write_text("0.png 1\n")
    (tmp_path / "0.png").write_bytes(png(1))
    with pytest.raises(ArtifactError, match="no IVF lists to re-cluster into 8"):  # a flat index: exact search
        add(split, tmp_path / "list.txt", tmp_path / "relisted", tmp_path, retrain=True, lists=8)
    assert not (tmp_path / "tagged").exists() and not (tmp_path / "relisted").exists()


@pytest.fixture(scope="module")
def ivf_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rac build --quick` with an IVF index (16 lists): a memory whose coarse quantizer can be trained again."""
    out = tmp_path_factory.mktemp("ivf") / "artifacts"
    cmd = [sys.executable, "-m", "rac.cli", "build", "--quick", "--index", "IVF16,Flat", "--out", str(out)]
    cmd += ["--cache", str(tmp_path_factory.mktemp("ivf-cache"))]
    subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
    return out


def test_re_clustering_a_sharded_memory_equals_re_clustering_then_sharding(
    ivf_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rac memory add --retrain-index --lists 32` on a sharded memory: one quantizer, trained on the rows the
    unsharded re-clustering samples (gathered from the shards), and each shard's own keys indexed with it: the
    same centroids, the same ids in every list and the same shards as re-clustering the unsharded memory, then
    sharding it."""
    monkeypatch.setattr(rows, "SAMPLE_KEYS", 200)  # a sample of 200 of the 520 keys: gathered from 3 shards
    monkeypatch.setattr(rows, "KEYS_PER_LIST", 4)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        (images / f"{i}.png").write_bytes(png(70_000 + i))
    (tmp_path / "new.jsonl").write_text(
        "\n".join(json.dumps({"image": f"{i}.png", "label": i % 10}) for i in range(20))
    )
    shard(ivf_artifacts, tmp_path / "split", 3)
    with pytest.raises(ArtifactError, match="only with a re-clustering"):
        add(tmp_path / "split", tmp_path / "new.jsonl", tmp_path / "refused", images, lists=32)
    grown = add(tmp_path / "split", tmp_path / "new.jsonl", tmp_path / "split-v2", images, retrain=True, lists=32)
    add(ivf_artifacts, tmp_path / "new.jsonl", tmp_path / "whole-v2", images, retrain=True, lists=32)
    assert grown.index.type == read_manifest(tmp_path / "whole-v2").index.type == "IVF32,Flat"
    assert len(rows.sample_rows(grown.memory.size, faiss.IndexFlatIP(1), 32)) == 200 < grown.memory.size
    shard(tmp_path / "whole-v2", tmp_path / "resharded", 3)
    same_shards(tmp_path / "split-v2", tmp_path / "resharded")
    held = []  # the indexes whose IVF parts are read: a part must not outlive its index

    def ivf(path: Path) -> tuple[np.ndarray, list[np.ndarray], faiss.IndexIVF]:
        held.append(index := faiss.read_index(str(path / INDEX)))
        lists = faiss.extract_index_ivf(index)
        invlists: Any = lists.invlists
        ids = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy() for i in range(lists.nlist)]
        return lists.quantizer.reconstruct_n(0, lists.nlist), ids, lists

    assert ivf(ivf_artifacts)[2].nlist == 16
    for got, want in zip(shard_dirs(tmp_path / "split-v2"), shard_dirs(tmp_path / "resharded"), strict=True):
        (centroids, lists, index), (want_centroids, want_lists, _) = ivf(got), ivf(want)
        np.testing.assert_array_equal(centroids, want_centroids)
        for a, b in zip(lists, want_lists, strict=True):
            np.testing.assert_array_equal(np.sort(a), np.sort(b))
        assert index.nprobe == read_manifest(ivf_artifacts).index.nprobe and index.nlist == 32
