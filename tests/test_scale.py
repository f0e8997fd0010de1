"""Scale memories: the synthetic memory, the out-of-core IVF-PQ build, re-ranking against exact search,
chunked checksums and pre-faulting, on memories of 20k items."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest

from models.memory import ops
from models.memory.scale import SynthConfig, build_ivf, exact_search, nlist_for, synth
from service.artifacts import IDS, INDEX, ITEMS, KEYS, MANIFEST, VALUES, ArtifactError, read_manifest, verify_files
from service.core.pipeline import Pipeline
from service.memory.rerank import quantized, rerank
from service.memory.store import Memory
from service.metrics import Metrics
from service.settings import Settings

SIZE = 20_000


@pytest.fixture(scope="module")
def scale_dir(synthetic_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "20k"
    synth(synthetic_artifacts, out, SynthConfig(size=SIZE, pq_above=10_000, pq_m=8, chunk=4096, recall_queries=100))
    return out


def unit_keys(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, d))[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_rerank_of_every_item_is_exact_search() -> None:
    keys = unit_keys(3000, 32, 0).astype(np.float16)
    z = unit_keys(50, 32, 1)
    everything = np.broadcast_to(np.random.default_rng(2).permutation(3000), (50, 3000))
    sims, ids = rerank(z, everything, keys, 20)
    want_sims, want_ids = exact_search(keys, z, 20)
    np.testing.assert_allclose(sims, want_sims, rtol=0, atol=1e-6)
    # Where two items tie (float16 keys can), either order is exact: compare the similarity of each pick.
    picked = np.einsum("qkd,qd->qk", keys[ids].astype(np.float32), z)
    np.testing.assert_allclose(picked, want_sims, rtol=0, atol=1e-6)
    assert (ids == want_ids).mean() > 0.99


def test_rerank_ignores_missing_candidates_and_pads_too_few() -> None:
    keys = unit_keys(100, 8, 0).astype(np.float16)
    z = unit_keys(1, 8, 1)
    cands = np.array([[5, -1, 7, 9, -1]])
    _, ids = rerank(z, cands, keys, 3)
    assert sorted(ids[0].tolist()) == [5, 7, 9]
    sims, ids = rerank(z, cands, keys, 4)  # three candidates for four places: padded as the index pads
    assert sorted(ids[0, :3].tolist()) == [5, 7, 9] and ids[0, 3] == -1 and sims[0, 3] == -np.inf


def test_out_of_core_build_equals_one_shot_build(tmp_path: Path) -> None:
    keys = np.lib.format.open_memmap(tmp_path / "keys.npy", "w+", np.float16, (6000, 32))
    keys[:] = unit_keys(6000, 32, 3)
    keys.flush()
    mapped = np.load(tmp_path / "keys.npy", mmap_mode="r")
    chunked = build_ivf(mapped, "IVF32,PQ8x4", chunk=1000)
    whole = build_ivf(mapped, "IVF32,PQ8x4", chunk=len(mapped))
    assert chunked.ntotal == whole.ntotal == len(mapped)
    q = unit_keys(20, 32, 4)
    for index in (chunked, whole):
        faiss.extract_index_ivf(index).nprobe = 8
    d1, i1 = chunked.search(q, 10)
    d2, i2 = whole.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    assert quantized(chunked) and not quantized(faiss.index_factory(32, "IVF4,Flat"))
    # A flat index carrying item ids is exact (no re-ranking against the float16 keys); a PQ one is not.
    assert not quantized(faiss.IndexIDMap2(faiss.IndexFlatIP(32)))
    assert quantized(faiss.IndexIDMap2(faiss.index_factory(32, "PQ4")))


def test_synthetic_memory_keeps_the_real_items_and_copies_values(scale_dir: Path, synthetic_artifacts: Path) -> None:
    m = read_manifest(scale_dir)
    src = read_manifest(synthetic_artifacts)
    n0 = src.memory.size
    assert m.memory.size == SIZE and m.memory.sources["synthetic"] == SIZE - n0
    assert m.index.type == f"IVF{nlist_for(SIZE)},PQ8" and m.memory_version != src.memory_version
    keys, values = np.load(scale_dir / KEYS, mmap_mode="r"), np.load(scale_dir / VALUES, mmap_mode="r")
    src_keys, src_values = np.load(synthetic_artifacts / KEYS), np.load(synthetic_artifacts / VALUES)
    np.testing.assert_array_equal(keys[:n0], src_keys)
    np.testing.assert_allclose(np.linalg.norm(keys.astype(np.float32), axis=1), 1, atol=2e-3)
    with sqlite3.connect(scale_dir / ITEMS) as db:
        rows = db.execute("SELECT id, source, text, label, origin FROM items WHERE id >= ? LIMIT 500", (n0,)).fetchall()
        real = dict(db.execute("SELECT id, text FROM items WHERE id < ?", (n0,)).fetchall())
        assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == SIZE
    cosines = []
    for i, source, text, _, origin in rows:
        o = int(origin.removeprefix("copy of "))
        assert source == "synthetic" and text == real[o]
        np.testing.assert_array_equal(values[i], src_values[o])
        cosines.append(float(keys[i].astype(np.float32) @ src_keys[o].astype(np.float32)))
    assert min(cosines) > 0.5 and np.mean(cosines) > 0.85  # near its origin: 1/sqrt(1 + 0.5²) = 0.89 expected


def test_synthetic_lists_are_as_uneven_as_the_real_ones(scale_dir: Path, synthetic_artifacts: Path) -> None:
    """The IVF list sizes of the synthetic items follow those of the real items they came from."""
    index = faiss.read_index(str(scale_dir / INDEX))
    n0 = read_manifest(synthetic_artifacts).memory.size
    keys = np.asarray(np.load(scale_dir / KEYS, mmap_mode="r"), np.float32)
    _, lists = faiss.extract_index_ivf(index).quantizer.search(keys, 1)
    nlist = faiss.extract_index_ivf(index).nlist
    real = np.bincount(lists[:n0, 0], minlength=nlist)
    synthetic = np.bincount(lists[n0:, 0], minlength=nlist)
    assert np.corrcoef(real, synthetic)[0, 1] > 0.8


def test_served_search_is_exact_after_reranking(scale_dir: Path) -> None:
    """The served IVF-PQ search: every similarity the head sees is the exact cosine against the stored key, and
    with every list probed the neighbours are exact search's."""
    m = read_manifest(scale_dir)
    assert m.index.recall_at_k >= 0.9  # measured at build time at the manifest's nprobe
    nlist = nlist_for(SIZE)
    memory = Memory(scale_dir, nprobe=nlist)
    assert memory.rerank > 0
    z = unit_keys(64, m.encoder.dim, 7)
    sims, ids = memory.search(z, m.index.k)
    np.testing.assert_allclose(sims, np.einsum("qkd,qd->qk", memory.keys[ids].astype(np.float32), z), atol=1e-6)
    want_sims, want_ids = exact_search(memory.keys, z, m.index.k)
    recall = np.mean([len(np.intersect1d(a, b)) / m.index.k for a, b in zip(ids, want_ids, strict=True)])
    assert recall >= 0.97
    np.testing.assert_allclose(sims[:, 0], want_sims[:, 0], atol=1e-6)  # the best is always found
    memory.close()


def test_scale_memory_serves_and_prefaults(scale_dir: Path) -> None:
    pipeline = Pipeline(Settings(artifacts=scale_dir, max_batch=4), Metrics())
    pipeline.warmup()  # loading pre-faulted: every page of the values is mapped in this process
    resident = _rss_of(scale_dir / VALUES)
    assert resident >= (scale_dir / VALUES).stat().st_size // 1024 - 8  # kB
    memory = pipeline.version.memory
    assert isinstance(memory, Memory) and memory.values.shape[0] == SIZE


def test_prefault_only_what_the_page_cache_can_hold(tmp_path: Path) -> None:
    from service.memory import paging

    gib = 1 << 30
    # 24 GiB machine with 20 available: the reserve is 3 GiB, so 17 GiB fit and 17 GiB + 1 byte does not.
    assert paging.fits(17 * gib, 20 * gib, 24 * gib)
    assert not paging.fits(17 * gib + 1, 20 * gib, 24 * gib)
    assert not paging.fits(gib // 2, gib, 4 * gib)  # a small machine keeps at least 1 GiB
    assert paging.fits(10 * gib, 0, 0)  # no /proc/meminfo: pre-fault
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       25165824 kB\nMemAvailable:   20971520 kB\n")
    assert paging.meminfo("MemAvailable", info) == 20 * gib
    assert paging.meminfo("Missing", info) == 0


def _rss_of(path: Path) -> int:
    """kB of this process's mapping of `path` that are resident (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[0] in "0123456789abcdef" and " " in line and "-" in line.split()[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_checksums_sampled_at_start_full_on_request(scale_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(scale_dir, copy)
    m = read_manifest(copy)
    assert set(m.chunks) == {INDEX, KEYS, VALUES, ITEMS, IDS}
    verify_files(copy, m, full=False)
    verify_files(copy, m, full=True)
    with (copy / VALUES).open("r+b") as f:  # one byte flipped in the last chunk (always sampled)
        f.seek(-10, 2)
        b = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ArtifactError, match="chunk"):
        verify_files(copy, m, full=False)
    with pytest.raises(ArtifactError, match="checksum"):
        verify_files(copy, m, full=True)
    with (copy / KEYS).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="bytes"):
        verify_files(copy, m, full=False)


def test_a_version_derived_from_a_scale_memory_has_its_own_chunk_digests(scale_dir: Path, tmp_path: Path) -> None:
    """tag, remove and add write new files: their chunk digests are made again (not the parent's), so the new
    version passes the sampled check at start and fails it when changed."""
    (tmp_path / "ids.txt").write_text(" ".join(map(str, range(0, SIZE, 2))))
    tagged = ops.tag(scale_dir, tmp_path / "tagged", tmp_path / "ids.txt", None, ["half"], [])
    (tmp_path / "gone.txt").write_text(" ".join(map(str, range(1, 400, 2))))
    removed = ops.remove(tmp_path / "tagged", tmp_path / "removed", tmp_path / "gone.txt")
    for directory, m in ((tmp_path / "tagged", tagged), (tmp_path / "removed", removed)):
        assert set(m.chunks) == set(read_manifest(scale_dir).chunks)
        assert m.chunks[ITEMS].size == (directory / ITEMS).stat().st_size
        verify_files(directory, read_manifest(directory), full=False)
    assert removed.chunks[KEYS].size < read_manifest(scale_dir).chunks[KEYS].size
    with (tmp_path / "removed" / ITEMS).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="bytes"):
        verify_files(tmp_path / "removed", removed, full=False)


@pytest.mark.slow
def test_memory_bench_runs_end_to_end(synthetic_artifacts: Path, tmp_path: Path) -> None:
    """`rac bench --memory` at a tiny size: builds, serves over HTTP, measures, writes the JSON and the plot;
    a second run reuses the cached memory."""
    import json

    from loadtests.memory_bench import main

    out = tmp_path / "memory_scale.json"
    main(synthetic_artifacts, [3000], tmp_path / "cache", out, requests=8)
    r = json.loads(out.read_text())["sizes"]["3000"]
    assert r["index"].startswith("IVF") and set(r["disk_mb"]) == {INDEX, KEYS, VALUES, ITEMS, IDS}
    assert r["http"]["startup_s"] > 0 and 0 < r["http"]["pss_anon_mb"] < 4000
    for where, key in (("http", "wall"), ("in_process", "search_gather")):
        for batch in ("batch1", "batch32"):
            lat = r[where][batch][key]
            assert 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    built = (tmp_path / "cache" / "3000" / MANIFEST).stat().st_mtime
    main(synthetic_artifacts, [3000], tmp_path / "cache", out, requests=2)
    assert (tmp_path / "cache" / "3000" / MANIFEST).stat().st_mtime == built


def test_opq_memory_searches_and_falls_back_when_probes_find_too_few(synthetic_artifacts: Path, tmp_path: Path) -> None:
    """An OPQ rotation wraps the IVF index (IndexPreTransform): nprobe still applies, re-ranking still gives
    exact similarities, and a probe that finds fewer than k items falls back to every list."""
    out = tmp_path / "opq"
    synth(synthetic_artifacts, out, SynthConfig(size=6000, pq_above=1, pq_m=8, opq=True, recall_queries=0))
    assert read_manifest(out).index.type.startswith("OPQ8,IVF")
    memory = Memory(out, nprobe=1)  # one list of about 90 items: fewer than k = 200
    assert memory.rerank and memory.ivf is not None and memory.ivf.nprobe == 1
    z = unit_keys(16, memory.dim, 9)
    sims, ids = memory.search(z, 200)
    assert (ids >= 0).all() and all(len(set(row)) == 200 for row in ids.tolist())
    np.testing.assert_allclose(sims, np.einsum("qkd,qd->qk", memory.keys[ids].astype(np.float32), z), atol=1e-6)
    want_sims, _ = exact_search(memory.keys, z, 1)
    assert (sims[:, 0] >= want_sims[:, 0] - 1e-6).mean() >= 0.9  # every list probed: the best is found
    memory.close()
