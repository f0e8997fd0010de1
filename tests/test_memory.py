"""The memory: its items and texts, search (exact and IVF against the exact reference), and the files the
service memory-maps."""

from pathlib import Path

import faiss
import numpy as np
import pytest

from models.data import ArrayImages, Dataset, long_tailed_splits
from models.memory.make import (
    PROMPT,
    build_index,
    index_factory,
    memory_items,
    search,
    self_ids,
    set_nprobe,
    tune_nprobe,
    write_memory,
)
from service.memory.store import Memory


def clustered(n: int, d: int = 32, centres: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def toy(classes: int, per_class: int) -> Dataset:
    labels = np.repeat(np.arange(classes), per_class)
    pool = ArrayImages(np.zeros((len(labels), 2, 2), np.uint8), labels)
    return Dataset("toy", [f"Class {i}" for i in range(classes)], {"train": pool, "test": pool})


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = queries @ keys.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def test_items_carry_prompts_and_noisy_alt_text() -> None:
    ds = toy(10, 400)
    splits = long_tailed_splits(ds, ratio=10.0, val_per_class=50, seed=0)
    items = memory_items(ds, splits, ("downstream", "external"), noise=0.4, seed=0)
    down, ext = items.source == "downstream", items.source == "external"
    assert down.sum() == len(splits.train.index) and ext.sum() == len(splits.external.index)  # type: ignore[union-attr]
    texts = np.array(items.text)
    assert all(t == PROMPT.format(f"class {c}") for t, c in zip(texts[down], items.label[down], strict=True))
    assert np.array_equal(items.label[down], items.true_label[down])
    wrong = items.label[ext] != items.true_label[ext]
    assert abs(wrong.mean() - 0.4) < 0.03  # about p of the external texts name another class
    assert all(f"class {c}" in t for t, c in zip(texts[ext], items.label[ext], strict=True))
    assert not set(items.index[items.pool == "train"]) & set(splits.val.index)  # validation stays out
    clean = memory_items(ds, splits, ("external",), noise=0.0, seed=0)
    assert np.array_equal(clean.label, clean.true_label) and (clean.source == "external").all()


def test_a_query_in_the_memory_never_retrieves_itself() -> None:
    keys = clustered(500)
    index = build_index(keys, "Flat")
    queries = np.arange(0, 500, 7)
    exclude = queries.copy()
    exclude[::2] = -1  # half the queries are not (as far as the search knows) in the memory
    sims, ids = search(index, keys[queries], 10, exclude=exclude, batch=16)
    assert not (ids == exclude[:, None]).any()
    ref_sims, ref_ids = exact_topk(keys, keys[queries], 11)
    for row in range(len(queries)):
        want = [i for i in ref_ids[row] if i != exclude[row]][:10]
        assert list(ids[row]) == want
    assert np.allclose(sims[1::2], ref_sims[1::2, 1:], atol=1e-5)  # excluded rows: the next ten


def test_self_ids_map_parts_to_memory_rows() -> None:
    ds = toy(4, 50)
    splits = long_tailed_splits(ds, ratio=2.0, val_per_class=5, seed=0)
    items = memory_items(ds, splits, ("downstream",), noise=0.0)
    ids = self_ids(items, splits.train)
    assert np.array_equal(items.index[ids], splits.train.index)
    assert (self_ids(items, splits.val) == -1).all()


def test_ivf_search_agrees_with_exact_search() -> None:
    keys, queries = clustered(6000, seed=1), clustered(200, seed=2)
    factory = index_factory(len(keys), exact_below=1000)
    assert factory.startswith("IVF") and index_factory(999, exact_below=1000) == "Flat"
    ivf = build_index(keys, factory)
    assert isinstance(ivf, faiss.IndexIVF)
    nprobe, recall = tune_nprobe(ivf, keys, queries, 20, target=0.95)
    assert recall >= 0.95 and 1 <= nprobe < ivf.nlist
    sims, ids = search(ivf, queries, 20)
    _ref_sims, ref_ids = exact_topk(keys, queries, 20)
    found = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(ids, ref_ids, strict=True)])
    assert found >= 0.95
    # IVF,Flat stores exact vectors: every similarity it reports is the exact one for that item.
    assert np.allclose(sims, np.take_along_axis(queries @ keys.T, ids, 1), atol=1e-5)


def write_toy_memory(tmp_path: Path, factory: str, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    from models.memory.make import MemoryItems

    keys = clustered(n, seed=3)
    values = np.random.default_rng(4).standard_normal((n, 6)).astype(np.float32)
    labels = np.arange(n) % 3
    items = MemoryItems(
        np.full(n, "train"), np.arange(n), np.full(n, "external"), [f"item {i}" for i in range(n)], labels, labels
    )
    write_memory(tmp_path, build_index(keys, factory), keys, values, items)
    return keys, values


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_served_memory_reads_the_written_files(tmp_path: Path, factory: str) -> None:
    keys, values = write_toy_memory(tmp_path, factory)
    memory = Memory(tmp_path, nprobe=16)  # all lists: exact
    queries = clustered(8, seed=5)
    sims, ids = memory.search(queries, 5)
    ref_sims, ref_ids = exact_topk(keys, queries, 5)
    assert np.array_equal(ids, ref_ids) and np.allclose(sims, ref_sims, atol=1e-5)
    got_keys, got_values = memory.gather(ids, keys=True, values=True)
    assert got_values.dtype == np.float16 and got_values.shape == (8, 5, 6)
    assert np.array_equal(got_values, values[ids].astype(np.float16))  # stored as fp16
    assert np.allclose(got_keys.astype(np.float32), keys[ids], atol=1e-3)
    assert memory.gather(ids, keys=False, values=True)[0].shape == (8, 5, 0)
    items = memory.table.items([int(i) for i in ids[0]])
    assert items[int(ids[0, 0])].text == f"item {ids[0, 0]}" and items[int(ids[0, 0])].source == "external"
    assert isinstance(memory.index, faiss.IndexIVF) == factory.startswith("IVF")


def test_short_ivf_probes_fall_back_to_exhaustive_search(tmp_path: Path) -> None:
    """With one probe into small lists an IVF search finds fewer than k items and pads with -1: the served
    memory must search those queries again, never hand -1 ids to the head."""
    keys, _ = write_toy_memory(tmp_path, "IVF64,Flat", n=640)
    memory = Memory(tmp_path, nprobe=1)
    queries = clustered(16, seed=6)
    raw_ids = memory.index.search(queries, 60)[1]
    assert (raw_ids < 0).any()  # the situation really arises
    _sims, ids = memory.search(queries, 60)
    assert (ids >= 0).all()
    assert np.array_equal(ids, exact_topk(keys, queries, 60)[1])


def test_search_with_too_few_items_in_the_probed_lists_searches_every_list() -> None:
    """nprobe 1 over lists smaller than k pads with -1; the offline search, as the served one, then searches
    every list, so a query never gets -1 neighbours (nor loses rows to the self-exclusion)."""
    keys = clustered(600, centres=30)
    index = build_index(keys, "IVF32,Flat")
    set_nprobe(index, 1)
    queries = clustered(50, centres=30, seed=1)
    sims, ids = search(index, queries, 100, exclude=np.full(len(queries), -1))
    assert (ids >= 0).all()
    want_sims, _ = exact_topk(keys, queries, 100)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-5, atol=1e-5)  # every list searched: exact
