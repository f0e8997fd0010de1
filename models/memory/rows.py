"""A version's memory files made from its parent's: the kept rows compacted, new rows appended, each row's
stable id beside it, and the same ids in the index and the item table.

Rows are in id order and new items get ids above every id given before, so appending keeps the order. The
keys and values stream in chunks (the memory is never in RAM at once; only the index is).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from service.artifacts import IDS, INDEX, ITEMS, KEYS, VALUES, ArtifactError
from service.memory.items import KEY_INDEX, encode_tags
from service.memory.shards import SHARDS, shard_dirs
from service.memory.store import open_array

CHUNK = 8192  # rows per step when streaming keys and values
# A re-clustering trains the coarse quantizer on a sample of the keys: this many, or this many a list if more.
SAMPLE_KEYS, KEYS_PER_LIST = 256 * 1024, 64


@dataclass
class NewRows:
    """Items to add, embedded: what the new rows of keys, values and the item table hold."""

    keys: np.ndarray  # (m, d) float32, the query encoder's embeddings of their images
    values: np.ndarray  # (m, dv) float32, their values (text embeddings)
    texts: list[str]
    labels: list[int]  # the class each text names
    source: str
    origins: list[str]  # where each came from (its path in the list)
    keys_: list[str | None] = field(default_factory=list)  # the user's keys (None: none)
    tags: list[list[str]] = field(default_factory=list)
    thumbnails: list[bytes | None] = field(default_factory=list)
    retrain: bool = False  # re-cluster the IVF lists over every key
    lists: int = 0  # with retrain: the IVF lists to cluster into (0: as many as the parent's)


def parent_ids(directory: Path) -> np.ndarray:
    """The id of each row of a version: its ids.npy, or its rows where it was written before ids were stable;
    of a sharded memory, every shard's ids, in order (the rows of its whole item table)."""
    if (directory / SHARDS).exists():
        return np.sort(np.concatenate([np.load(d / IDS) for d in shard_dirs(directory)]))
    if (directory / IDS).exists():
        return np.load(directory / IDS)
    return np.arange(len(open_array(directory / KEYS)), dtype=np.int64)


def with_ids(index: faiss.Index, ids: np.ndarray) -> faiss.Index:
    """An index whose searches answer `ids` for its rows: an IVF index stores them already; a bare flat index
    (which answers positions) is wrapped in an IndexIDMap2 that knows each position's id."""
    if faiss.try_extract_index_ivf(index) is not None or isinstance(index, faiss.IndexIDMap):
        return index
    if not isinstance(index, faiss.IndexFlat):
        raise ArtifactError(f"a {type(index).__name__} index cannot carry item ids")
    wrapped = faiss.IndexIDMap2(faiss.IndexFlat(index.d, index.metric_type))  # it must start empty
    if index.ntotal:
        wrapped.add_with_ids(index.reconstruct_n(0, index.ntotal), np.ascontiguousarray(ids, np.int64))
    return wrapped


def derive_memory(
    src: Path, out: Path, gone: np.ndarray, new: NewRows | None, new_ids: np.ndarray, reindexed: bool = False
) -> np.ndarray:
    """Write out's index, keys, values, ids and item table: src's rows less the ids `gone`, then `new` with
    the ids `new_ids` (above every id src holds, in order). reindexed: the caller writes the index itself (a
    sharded re-clustering), none is written here. Returns the kept rows of src, in order."""
    ids = parent_ids(src)
    keep = ~np.isin(ids, gone)
    kept = np.flatnonzero(keep)
    m = len(new.texts) if new is not None else 0
    old_keys, old_values = open_array(src / KEYS), open_array(src / VALUES)
    size = len(kept) + m
    keys = np.lib.format.open_memmap(out / KEYS, "w+", np.float16, (size, old_keys.shape[1]))
    values = np.lib.format.open_memmap(out / VALUES, "w+", np.float16, (size, old_values.shape[1]))
    to = 0
    for s in tqdm(range(0, len(ids), CHUNK), desc="copy memory", unit="chunk"):
        mask = keep[s : s + CHUNK]
        n = int(mask.sum())
        keys[to : to + n], values[to : to + n] = old_keys[s : s + CHUNK][mask], old_values[s : s + CHUNK][mask]
        to += n
    if new is not None:
        keys[to:], values[to:] = new.keys, new.values
    keys.flush()
    values.flush()
    np.save(out / IDS, np.concatenate([ids[kept], new_ids]))
    if not reindexed:
        index = with_ids(faiss.read_index(str(src / INDEX)), ids)  # the trained coarse quantizer is reused
        if len(gone):
            removed = index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(gone, np.int64)))
            if removed != len(gone):
                raise ArtifactError(f"the index held {removed} of the {len(gone)} ids to remove")
        if new is not None and new.retrain:
            index = retrained(index, keys, np.concatenate([ids[kept], new_ids]), new.lists)
        elif m:
            index.add_with_ids(np.ascontiguousarray(new.keys, np.float32), new_ids)  # type: ignore[union-attr]
        faiss.write_index(index, str(out / INDEX))
    del keys, values
    copy_items(src / ITEMS, out / ITEMS, gone)
    if new is not None:
        insert_items(out / ITEMS, new, new_ids)
    return kept


def retrained(index: faiss.Index, keys: np.ndarray, ids: np.ndarray, lists: int = 0) -> faiss.Index:
    """The same kind of index, its coarse quantizer trained again on (a sample of) every key, into `lists` IVF
    lists (0: as many as `index` has)."""
    return filled(trained_like(index, keys[sample_rows(len(keys), index, lists)], lists), keys, ids)


def sample_rows(n: int, index: faiss.Index, lists: int = 0) -> np.ndarray:
    """The rows of an n-row memory its coarse quantizer is trained on, in order, drawn once (the same for the
    same memory, however its rows are stored: together or in shards): at most SAMPLE_KEYS, or KEYS_PER_LIST a
    list where the index re-clustered into `lists` lists (0: as many as `index` has) wants more."""
    ivf = faiss.try_extract_index_ivf(index)
    most = max(SAMPLE_KEYS, KEYS_PER_LIST * (lists or (ivf.nlist if ivf is not None else 0)))
    return np.sort(np.random.default_rng(0).permutation(n)[:most])


def retrained_type(index_type: str, lists: int = 0) -> str:
    """The FAISS factory string of an index of `index_type` re-clustered into `lists` lists (0: its own): IVF
    lists of full vectors, or a flat index for a flat one."""
    found = re.search(r"IVF(\d+)", index_type)
    if found is None:
        if lists:
            raise ArtifactError(f"a {index_type} index has no IVF lists to re-cluster into {lists}")
        return "Flat"
    return f"IVF{lists or int(found.group(1))},Flat"


def trained_like(index: faiss.Index, sample: np.ndarray, lists: int = 0) -> faiss.Index:
    """An empty index of `index`'s kind (IVF-Flat with its number of lists or `lists`, and its nprobe, at most
    every list; or flat) that answers ids, its quantizer trained on `sample` (d-wide keys)."""
    ivf = faiss.try_extract_index_ivf(index)
    factory = retrained_type(f"IVF{ivf.nlist}" if ivf is not None else "Flat", lists)
    new = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    lists_of_new = faiss.try_extract_index_ivf(new)
    if lists_of_new is not None and ivf is not None:
        if len(sample) < lists_of_new.nlist:
            raise ArtifactError(f"{len(sample)} keys cannot be clustered into {lists_of_new.nlist} lists")
        new.train(np.asarray(sample, np.float32))
        lists_of_new.nprobe = min(ivf.nprobe, lists_of_new.nlist)
    return with_ids(new, np.empty(0, np.int64))


def filled(index: faiss.Index, keys: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """`index` (empty, trained) with every key added under its id, streamed in chunks."""
    for s in tqdm(range(0, len(keys), CHUNK), desc="index", unit="chunk"):
        index.add_with_ids(np.asarray(keys[s : s + CHUNK], np.float32), ids[s : s + CHUNK])
    return index


def copy_items(src: Path, dst: Path, gone: np.ndarray) -> None:
    """src's item table less the ids `gone`: every column copied, whatever the table holds, and the key and
    tags columns added where an older table lacks them."""
    with sqlite3.connect(dst) as db:
        db.execute("ATTACH DATABASE ? AS old", (f"file:{src}?mode=ro",))
        (schema,) = db.execute("SELECT sql FROM old.sqlite_master WHERE type='table' AND name='items'").fetchone()
        db.execute(schema)
        columns = [r[1] for r in db.execute("PRAGMA main.table_info(items)")]
        for name in ("thumbnail BLOB", "key TEXT", "tags TEXT"):
            if name.split()[0] not in columns:
                db.execute(f"ALTER TABLE items ADD COLUMN {name}")
        db.execute(KEY_INDEX)
        db.execute("CREATE TEMP TABLE gone (id INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO gone VALUES (?)", [(int(i),) for i in gone])
        named = ", ".join(f'"{c}"' for c in columns)
        db.execute(f"INSERT INTO items ({named}) SELECT {named} FROM old.items WHERE id NOT IN (SELECT id FROM gone)")
        db.commit()
        db.execute("DETACH DATABASE old")
    db.close()


def insert_items(path: Path, new: NewRows, ids: np.ndarray) -> None:
    m = len(new.texts)
    rows = zip(
        ids.tolist(),
        [new.source] * m,
        new.texts,
        new.labels,
        new.origins,
        new.thumbnails or [None] * m,
        new.keys_ or [None] * m,
        [encode_tags(t) for t in new.tags] if new.tags else [None] * m,
        strict=True,
    )
    columns = "id, source, text, label, origin, thumbnail, key, tags"
    with sqlite3.connect(path) as db:
        try:
            db.executemany(f"INSERT INTO items ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError as e:  # a key the memory holds: add.py replaces such items first
            raise ArtifactError(f"{path}: {e}") from None
    db.close()
