"""Sharding a memory: S shards, shard s holding the items whose id % S == s, each index sharing the unsharded
index's trained coarse quantizer (and PQ), so that a search over all shards, merged, equals the unsharded
search at the same nprobe. An item's shard follows from its id alone: it never moves.

    rac memory shard --from .cache/scale/1m --shards 2 --out .cache/scale/1m-shards

Each shard directory is a memory directory of its own (service/memory/store.py reads it): its IVF lists'
entries (copied code for code, with their ids; of a flat index, its vectors and ids), its rows of keys and
values, their ids, an item table with what filters read (source, key, tags), and a shard.json naming its
place; DIR/shards.json lists them. DIR also holds the manifest, encoder, head, the whole item table, examples
and zero-shot parts: what a sharded service's ingress reads (service/cluster/app.py).

A sharded memory also grows and shrinks where it lives (`rac memory add`, `remove` with a sharded `--from`,
derive_shards below): each shard drops the ids it owns that go and appends the new items it owns into its own
index (the shared quantizer), so no machine ever holds the whole memory. `--retrain-index` trains the shared
quantizer again on a sample gathered from the shards, and each shard re-indexes its own keys.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from models.memory.rows import (
    NewRows,
    copy_items,
    derive_memory,
    filled,
    insert_items,
    parent_ids,
    sample_rows,
    trained_like,
    with_ids,
)
from service.artifacts import (
    ENCODER,
    EXAMPLES,
    HEAD,
    IDS,
    INDEX,
    ITEMS,
    KEYS,
    MANIFEST,
    VALUES,
    ZS_FILES,
    ArtifactError,
    Manifest,
    digest,
    read_manifest,
    verify_files,
)
from service.memory.items import KEY_INDEX, SCHEMA
from service.memory.shards import SHARD, SHARDS, owners, shard_dirs

ROWS = 1 << 18  # rows copied per step


def shard_index(index: faiss.Index, shard: int, shards: int) -> faiss.Index:
    """The entries of `index` whose id % shards == shard, in an index with the same trained quantizer (and PQ);
    of a flat index (exact search, nothing trained), its vectors with their ids."""
    if faiss.try_extract_index_ivf(index) is None:
        flat: Any = with_ids(index, np.arange(index.ntotal, dtype=np.int64))  # a bare flat index: ids are rows
        inner = faiss.downcast_index(flat.index)
        ids = faiss.vector_to_array(flat.id_map).astype(np.int64)
        keep = np.flatnonzero(owners(ids, shards) == shard)
        part = faiss.IndexIDMap2(faiss.IndexFlat(inner.d, inner.metric_type))
        if len(keep):
            part.add_with_ids(inner.reconstruct_batch(keep), np.ascontiguousarray(ids[keep]))
        return part
    out = faiss.clone_index(index)
    out_ivf = faiss.extract_index_ivf(out)
    out_ivf.reset()
    src: Any = faiss.extract_index_ivf(index).invlists  # ArrayInvertedLists (read without mmap)
    dst: Any = out_ivf.invlists
    code_size = src.code_size
    total = 0
    for lst in range(src.nlist):
        n = src.list_size(lst)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(src.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(src.get_codes(lst), n * code_size).copy()
        keep = owners(ids, shards) == shard
        if keep.any():
            kept_ids = np.ascontiguousarray(ids[keep])
            kept_codes = np.ascontiguousarray(codes.reshape(n, code_size)[keep])
            dst.add_entries(lst, len(kept_ids), faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept_codes))
            total += len(kept_ids)
    out_ivf.ntotal = total
    if isinstance(out, faiss.IndexPreTransform):
        out.ntotal = total
    return out


def shard_items(src: Path, dst: Path, ids: np.ndarray) -> None:
    """The item table of a shard: its items' ids, sources, labels, keys and tags (what filters read); texts and
    thumbnails stay with the ingress's whole table."""
    with sqlite3.connect(dst) as db:
        db.execute(SCHEMA)
        db.execute(KEY_INDEX)
        db.execute("ATTACH DATABASE ? AS whole", (f"file:{src}?mode=ro",))
        have = {r[1] for r in db.execute("PRAGMA whole.table_info(items)")}
        key, tags = ("key" if "key" in have else "NULL"), ("tags" if "tags" in have else "NULL")
        db.execute("CREATE TEMP TABLE mine (id INTEGER PRIMARY KEY)")
        db.executemany("INSERT INTO mine VALUES (?)", [(int(i),) for i in ids])
        db.execute(
            f"INSERT INTO items SELECT id, source, '', label, '', NULL, {key}, {tags} FROM whole.items"
            " WHERE id IN (SELECT id FROM mine)"
        )
        db.commit()
        db.execute("DETACH DATABASE whole")
    db.close()


def shard(src: Path, out: Path, shards: int) -> list[Path]:
    manifest = read_manifest(src)
    index = faiss.read_index(str(src / INDEX))
    ids = parent_ids(src)
    keys = np.load(src / KEYS, mmap_mode="r")
    values = np.load(src / VALUES, mmap_mode="r")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dirs = []
    owner = owners(ids, shards)
    for s in tqdm(range(shards), desc="shards", unit="shard"):
        d = partial / f"shard-{s:02d}"
        d.mkdir()
        rows = np.flatnonzero(owner == s)  # in id order, as every memory's rows are
        faiss.write_index(shard_index(index, s, shards), str(d / INDEX))
        for name, store in ((KEYS, keys), (VALUES, values)):
            part = np.lib.format.open_memmap(d / name, "w+", store.dtype, (len(rows), store.shape[1]))
            for a in range(0, len(rows), ROWS):
                part[a : a + ROWS] = store[rows[a : a + ROWS]]
            part.flush()
            del part
        np.save(d / IDS, ids[rows])
        shard_items(src / ITEMS, d / ITEMS, ids[rows])
        info = {"shard": s, "shards": shards, "size": len(rows), "memory_version": manifest.memory_version}
        (d / SHARD).write_text(json.dumps(info, indent=1))
        dirs.append(d.name)
    # What the ingress serves from DIR itself: the model, the whole item table (it describes the neighbours it
    # answers with), the manifest and the example images.
    # The zero-shot parts (the text tower, the fusion, the text index over the whole memory's rows) are the
    # ingress's too: it fuses with texts by row and searches the text index itself.
    zero_shot = ZS_FILES if manifest.zero_shot is not None else ()
    for name in (ITEMS, MANIFEST, ENCODER, HEAD, *zero_shot):
        shutil.copyfile(src / name, partial / name)
    if (src / EXAMPLES).is_dir():
        shutil.copytree(src / EXAMPLES, partial / EXAMPLES)
    (partial / SHARDS).write_text(json.dumps({"shards": dirs, "memory_version": manifest.memory_version}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return [out / d for d in dirs]


def checked(directory: Path) -> Manifest:
    """A sharded memory as `shard` wrote it: the ingress's files against the manifest's checksums, and shards
    0..S-1 of S cut from its version, holding its items between them. ArtifactError naming what is wrong."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest, names=(ENCODER, HEAD, ITEMS))
    infos = [json.loads((d / SHARD).read_text()) for d in shard_dirs(directory)]
    count = len(infos)
    if [(i["shard"], i["shards"]) for i in infos] != [(s, count) for s in range(count)]:
        raise ArtifactError(f"{directory}: its shards are not shards 0..{count - 1} of {count}")
    if {i["memory_version"] for i in infos} != {manifest.memory_version}:
        raise ArtifactError(f"{directory}: shards cut from other versions than {manifest.memory_version}")
    if sum(i["size"] for i in infos) != manifest.memory.size:
        raise ArtifactError(f"{directory}: its shards do not hold the memory's {manifest.memory.size} items")
    return manifest


def derive_shards(
    src: Path, out: Path, gone: np.ndarray, new: NewRows | None, new_ids: np.ndarray
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """A new version of the sharded memory `src` in `out`, shard by shard: each shard less the ids `gone` it
    holds, plus the new items it owns (`new_ids`, placed by id as `shard` places them); the ingress's whole item
    table likewise. With `new.retrain`, the coarse quantizer is trained once on a sample of every shard's keys
    and each shard re-indexes its own. shard.json and shards.json are written by `stamp`, once the version is
    known. Returns the kept rows of the whole memory and each shard's file digests (its memory version's make)."""
    dirs = shard_dirs(src)
    owner_of_new, owner_of_gone = owners(new_ids, len(dirs)), owners(gone, len(dirs))
    retrain = new is not None and new.retrain
    for d in tqdm(dirs, desc="shards", unit="shard"):
        s = int(json.loads((d / SHARD).read_text())["shard"])
        mine = np.flatnonzero(owner_of_new == s)
        part = None if new is None or not len(mine) else _rows_of_shard(new, mine)
        (out / d.name).mkdir()
        derive_memory(d, out / d.name, gone[owner_of_gone == s], part, new_ids[mine], reindexed=retrain)
    if new is not None and new.retrain:
        like = faiss.read_index(str(dirs[0] / INDEX), faiss.IO_FLAG_MMAP)  # its kind, lists and nprobe
        reindex([out / d.name for d in dirs], like, new.lists)
    digests = [{name: digest(out / d.name / name) for name in (INDEX, KEYS, VALUES, IDS, ITEMS)} for d in dirs]
    copy_items(src / ITEMS, out / ITEMS, gone)
    if new is not None:
        insert_items(out / ITEMS, new, new_ids)
    return np.flatnonzero(~np.isin(parent_ids(src), gone)), digests


def reindex(dirs: list[Path], like: faiss.Index, lists: int = 0) -> None:
    """Every shard's index made again with one coarse quantizer (of `lists` lists, 0: as many as `like`'s),
    trained on the rows of the whole memory that the unsharded re-clustering samples (models/memory/rows.py
    retrained), gathered from the shards holding them: the shards then hold what sharding the re-clustered
    unsharded memory gives. Only the sample is ever in one place."""
    ids = [np.load(d / IDS) for d in dirs]
    size = sum(len(i) for i in ids)
    wanted = np.sort(np.concatenate(ids))[sample_rows(size, like, lists)]  # ids, in the memory's order
    keys = [np.load(d / KEYS, mmap_mode="r") for d in dirs]
    sample = np.empty((len(wanted), keys[0].shape[1]), np.float32)
    for shard_ids, shard_keys in zip(ids, keys, strict=True):
        rows = np.flatnonzero(np.isin(shard_ids, wanted))  # shard rows are in id order, as the memory's
        sample[np.searchsorted(wanted, shard_ids[rows])] = shard_keys[rows]
    trained = trained_like(like, sample, lists)
    for d, shard_ids, shard_keys in zip(dirs, ids, keys, strict=True):
        faiss.write_index(filled(faiss.clone_index(trained), shard_keys, shard_ids), str(d / INDEX))


def _rows_of_shard(new: NewRows, rows: np.ndarray) -> NewRows:
    """What a shard keeps of new items: embeddings, labels, keys and tags (what filters read); texts and
    thumbnails stay with the ingress's whole table, as `shard_items` leaves them."""
    pick = rows.tolist()
    return NewRows(
        new.keys[rows],
        new.values[rows],
        [""] * len(pick),
        [new.labels[i] for i in pick],
        new.source,
        [""] * len(pick),
        [new.keys_[i] for i in pick] if new.keys_ else [],
        [new.tags[i] for i in pick] if new.tags else [],
    )


def stamp(src: Path, out: Path, memory_version: str) -> None:
    """Each shard of `out` marked as its place (from `src`'s shard of the same name) in `memory_version`, and
    DIR/shards.json listing them."""
    dirs = shard_dirs(src)
    for d in dirs:
        info = json.loads((d / SHARD).read_text())
        size = len(np.load(out / d.name / IDS, mmap_mode="r"))
        info |= {"size": size, "memory_version": memory_version}
        (out / d.name / SHARD).write_text(json.dumps(info, indent=1))
    listing = {"shards": [d.name for d in dirs], "memory_version": memory_version}
    (out / SHARDS).write_text(json.dumps(listing, indent=1))
