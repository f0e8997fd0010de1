"""Sharding a memory: S shards of contiguous id ranges that share the unsharded index's trained coarse
quantizer (and PQ), so that a search over all shards, merged, equals the unsharded search at the same nprobe.

    rac memory shard --from .cache/scale/1m --shards 2 --out .cache/scale/1m-shards

Each shard directory holds its IVF lists' entries (copied code for code, with the global ids), its slice of
the keys and values, and a shard.json naming its id range; DIR/shards.json lists them. DIR also holds the
manifest, encoder, head, item table and examples: what a sharded service's ingress reads
(service/ray_app.py).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from service import artifacts as A
from service.shards import SHARD, SHARDS


def split(n: int, shards: int) -> list[tuple[int, int]]:
    """[lo, hi) id ranges, sizes differing by at most one."""
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def shard_index(index: faiss.Index, lo: int, hi: int) -> faiss.Index:
    """The entries of `index` with ids in [lo, hi), in an index with the same trained quantizer (and PQ)."""
    out = faiss.clone_index(index)
    out_ivf = faiss.extract_index_ivf(out)
    out_ivf.reset()
    src: Any = faiss.extract_index_ivf(index).invlists  # ArrayInvertedLists (read without mmap)
    dst: Any = out_ivf.invlists
    code_size = src.code_size
    for lst in range(src.nlist):
        n = src.list_size(lst)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(src.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(src.get_codes(lst), n * code_size).copy()
        keep = (ids >= lo) & (ids < hi)
        if keep.any():
            kept_ids = np.ascontiguousarray(ids[keep])
            kept_codes = np.ascontiguousarray(codes.reshape(n, code_size)[keep])
            dst.add_entries(lst, len(kept_ids), faiss.swig_ptr(kept_ids), faiss.swig_ptr(kept_codes))
    out_ivf.ntotal = int(hi - lo)
    if isinstance(out, faiss.IndexPreTransform):
        out.ntotal = out_ivf.ntotal
    return out


def shard(src: Path, out: Path, shards: int) -> list[Path]:
    manifest = A.read_manifest(src)
    index = faiss.read_index(str(src / A.INDEX))
    if faiss.try_extract_index_ivf(index) is None:
        raise ValueError(f"{src} has a {manifest.index.type} index: sharding needs an IVF index")
    keys = np.load(src / A.KEYS, mmap_mode="r")
    values = np.load(src / A.VALUES, mmap_mode="r")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dirs = []
    for s, (lo, hi) in enumerate(tqdm(split(len(keys), shards), desc="shards", unit="shard")):
        d = partial / f"shard-{s:02d}"
        d.mkdir()
        faiss.write_index(shard_index(index, lo, hi), str(d / A.INDEX))
        for name, store in ((A.KEYS, keys), (A.VALUES, values)):
            part = np.lib.format.open_memmap(d / name, "w+", store.dtype, (hi - lo, store.shape[1]))
            for a in range(lo, hi, 1 << 18):
                part[a - lo : min(hi, a + (1 << 18)) - lo] = store[a : min(hi, a + (1 << 18))]
            part.flush()
            del part
        info = {"shard": s, "shards": shards, "lo": lo, "hi": hi, "memory_version": manifest.memory_version}
        (d / SHARD).write_text(json.dumps(info, indent=1))
        dirs.append(d.name)
    # What the ingress serves from DIR itself: the model, the whole item table (it describes the neighbours it
    # answers with), the manifest and the example images.
    for name in (A.ITEMS, A.MANIFEST, A.ENCODER, A.HEAD):
        shutil.copyfile(src / name, partial / name)
    if (src / A.EXAMPLES).is_dir():
        shutil.copytree(src / A.EXAMPLES, partial / A.EXAMPLES)
    (partial / SHARDS).write_text(json.dumps({"shards": dirs, "memory_version": manifest.memory_version}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return [out / d for d in dirs]
