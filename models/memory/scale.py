"""Memories at scale: a synthetic scale memory grown from a real one, and an IVF-PQ index built out-of-core
from memory-mapped float16 keys (never all keys in RAM), in the artifact layout the service serves.

    rac memory synth --from artifacts/demo --size 1000000 --out .cache/scale/1m

The synthetic items are a benchmark input, never the demo: each is a real item's key perturbed and
renormalised (so the IVF lists are as uneven as the real data's), with the value, text and label of the item
it came from, and source `synthetic` in the item table.
"""

from __future__ import annotations

import datetime
import logging
import math
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from models.memory.rows import copy_items, parent_ids
from service.artifacts import (
    ENCODER,
    HEAD,
    IDS,
    INDEX,
    ITEMS,
    KEYS,
    MANIFEST,
    VALUES,
    IndexInfo,
    Manifest,
    read_manifest,
    version_id,
)
from service.memory.integrity import digest_chunks

log = logging.getLogger(__name__)

CHUNK = 1 << 18  # rows per out-of-core step: 256k x 256-d float32 = 256 MB at most in RAM
MEMORY_FILES = (INDEX, KEYS, VALUES, ITEMS, IDS)


@dataclass(frozen=True)
class SynthConfig:
    size: int  # items in the scale memory, the real ones included
    noise: float = 0.5  # key = normalise(origin + noise * g / sqrt(d)): cosine to its origin about 1/sqrt(1+noise²)
    index: str = "auto"  # "auto" (IVF-Flat below pq_above items, IVF-PQ above) or a FAISS factory string
    pq_above: int = 500_000
    nlist: int = 0  # IVF lists; 0: about sqrt(size)
    pq_m: int = 64  # PQ sub-quantizers (bytes per item): 64 (4 dims each) keeps recall@k after re-ranking near IVF-Flat
    opq: bool = False  # learn a rotation before PQ (OPQ): better codes, a slower build
    nprobe: int = 0  # 0: the source memory's
    train_size: int = 0  # 0: 40 x nlist sampled keys (FAISS's minimum is 39 per centroid)
    recall_queries: int = 200  # perturbed real keys searched against exact search to measure recall@k
    threads: int = 1  # FAISS threads for the build: on a shared machine more threads mostly wait on each other
    chunk: int = CHUNK
    seed: int = 0


def nlist_for(n: int) -> int:
    """About sqrt(n) IVF lists, a power of two (the same rule as the demo's index)."""
    return int(2 ** round(math.log2(math.sqrt(n))))


def factory_for(n: int, cfg: SynthConfig, d: int) -> str:
    if cfg.index != "auto":
        return cfg.index
    nlist = cfg.nlist or nlist_for(n)
    if n < cfg.pq_above:
        return f"IVF{nlist},Flat"
    m = cfg.pq_m
    assert d % m == 0, f"{d}-d keys do not split into {m} PQ sub-vectors"
    return f"OPQ{m},IVF{nlist},PQ{m}" if cfg.opq else f"IVF{nlist},PQ{m}"


def _rows(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[np.sort(rows)], dtype=np.float32)


def build_ivf(
    keys: np.ndarray,
    factory: str,
    train_size: int = 0,
    chunk: int = CHUNK,
    seed: int = 0,
    ids: np.ndarray | None = None,
) -> faiss.Index:
    """keys (N, d) float16 memmap, L2-normalised -> a trained IVF index (inner product = cosine) holding all N
    under `ids` (default: their rows), trained on a sample and filled chunk by chunk: at most `chunk` keys are
    widened to float32 at once."""
    n, d = keys.shape
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFFlat | IndexIVFPQ
    ivf.cp.niter = 10  # k-means iterations: 10 is within 1% of 25's quantization error, at 40% of the cost
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # on by default, 30x the training time, unused by our search
    sample = min(n, train_size or max(40 * ivf.nlist, 256 * 64))
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    index.train(_rows(keys, rng.choice(n, sample, replace=False)))
    log.info("trained %s on %d keys in %.1f s", factory, sample, time.perf_counter() - t)
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    for s in tqdm(range(0, n, chunk), desc=f"add to {factory}", unit="chunk", mininterval=5):
        index.add_with_ids(np.ascontiguousarray(keys[s : s + chunk], dtype=np.float32), ids[s : s + chunk])
    return index


def exact_search(keys: np.ndarray, queries: np.ndarray, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """The reference: brute-force top-k over float16 memmap keys, chunk by chunk. (Q, k) sims and ids."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(keys), chunk):
        sims = queries @ np.asarray(keys[s : s + chunk], np.float32).T  # (Q, c)
        cs = np.concatenate([best_s, sims], 1)
        ci = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + sims.shape[1]), sims.shape)], 1)
        top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def perturb(keys: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """(n, d) float -> (n, d) float32 unit vectors near them."""
    x = keys.astype(np.float32) + noise / math.sqrt(keys.shape[1]) * rng.standard_normal(keys.shape, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- the scale memory


def _synth_arrays(src: Path, out: Path, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """keys.npy and values.npy of the scale memory, written chunk by chunk; returns (size - n0,) origins (the
    source row each synthetic item is a perturbed copy of)."""
    src_keys = np.load(src / KEYS)  # (n0, d) float16: the real memory is small, it stays in RAM
    src_values = np.load(src / VALUES)  # (n0, dv) float16
    n0 = len(src_keys)
    if cfg.size < n0:
        raise ValueError(f"--size {cfg.size} is smaller than the source memory ({n0} items)")
    origins = rng.integers(0, n0, cfg.size - n0)
    keys = np.lib.format.open_memmap(out / KEYS, "w+", np.float16, (cfg.size, src_keys.shape[1]))
    values = np.lib.format.open_memmap(out / VALUES, "w+", np.float16, (cfg.size, src_values.shape[1]))
    keys[:n0], values[:n0] = src_keys, src_values
    for s in tqdm(range(0, len(origins), cfg.chunk), desc="synthetic items", unit="chunk", mininterval=5):
        o = origins[s : s + cfg.chunk]
        keys[n0 + s : n0 + s + len(o)] = perturb(src_keys[o], cfg.noise, rng)
        values[n0 + s : n0 + s + len(o)] = src_values[o]
    keys.flush()
    values.flush()
    del keys, values
    return origins


def _synth_items(src: Path, path: Path, origins: np.ndarray, src_ids: np.ndarray, first: int, chunk: int) -> None:
    """The real item table, then one row per synthetic item (ids from `first` on): source `synthetic`, its
    origin's text, label and thumbnail (no key: keys are the user's)."""
    copy_items(src / ITEMS, path, np.empty(0, np.int64))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TEMP TABLE origin (id INTEGER PRIMARY KEY, src INTEGER NOT NULL)")
        for s in tqdm(range(0, len(origins), chunk), desc="item table", unit="chunk", mininterval=5):
            o = src_ids[origins[s : s + chunk]].tolist()
            new = range(first + s, first + s + len(o))
            db.executemany("INSERT INTO origin VALUES (?, ?)", zip(new, o, strict=True))
        db.execute(
            "INSERT INTO items (id, source, text, label, origin, thumbnail)"
            " SELECT o.id, 'synthetic', i.text, i.label, 'copy of ' || o.src, i.thumbnail"
            " FROM origin o JOIN items i ON i.id = o.src ORDER BY o.id"
        )
    db.close()


def measure_recall(directory: Path, nprobe: int, k: int, queries: int, noise: float, seed: int) -> float:
    """recall@k of the served search (with re-ranking where the index is quantized) against exact search, on
    perturbed real keys as queries."""
    from service.memory.store import Memory

    memory = Memory(directory, nprobe)
    rng = np.random.default_rng(seed + 1)
    q = perturb(memory.keys[np.sort(rng.choice(len(memory.keys), queries, replace=False))], noise, rng)
    _, truth = exact_search(memory.keys, q, k)
    truth = memory.id_of_rows(truth)  # exact search answers rows
    _, found = memory.search(q, k)
    memory.close()
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth, strict=True)]))


def synth(src: Path, out: Path, cfg: SynthConfig) -> Manifest:
    """The source artifact directory's memory grown to cfg.size items, indexed, with the source's encoder and
    head, written to out (via out.partial: a failed build leaves no half-written directory)."""
    source = read_manifest(src)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rng = np.random.default_rng(cfg.seed)
    faiss.omp_set_num_threads(cfg.threads)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    origins = _synth_arrays(src, partial, cfg, rng)
    src_ids = parent_ids(src)
    first = source.memory.next_id if source.memory.next_id is not None else source.memory.size
    ids = np.concatenate([src_ids, np.arange(first, first + len(origins), dtype=np.int64)])
    np.save(partial / IDS, ids)
    _synth_items(src, partial / ITEMS, origins, src_ids, first, cfg.chunk)
    seconds["items"] = time.perf_counter() - t
    keys = np.load(partial / KEYS, mmap_mode="r")
    factory = factory_for(cfg.size, cfg, keys.shape[1])
    t = time.perf_counter()
    index = build_ivf(keys, factory, cfg.train_size, cfg.chunk, cfg.seed, ids)
    faiss.write_index(index, str(partial / INDEX))
    del index
    seconds["index"] = time.perf_counter() - t
    for name in (ENCODER, HEAD):
        shutil.copyfile(src / name, partial / name)
    nprobe = cfg.nprobe or source.index.nprobe or 16
    k = source.index.k
    recall = measure_recall(partial, nprobe, k, cfg.recall_queries, cfg.noise, cfg.seed) if cfg.recall_queries else 0
    t = time.perf_counter()
    files, chunks = dict(source.files), {}
    for name in MEMORY_FILES:
        files[name], chunks[name] = digest_chunks(partial / name)
    seconds["checksums"] = time.perf_counter() - t
    version = version_id(files)
    sources = dict(source.memory.sources)
    sources["synthetic"] = len(origins)
    build: dict[str, Any] = {
        "synth": {**asdict(cfg), "from": str(src), "from_version": source.memory_version, "seconds": seconds}
    }
    manifest = source.model_copy(
        update={
            "memory_version": version,
            "parent_version": source.memory_version,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "memory": source.memory.model_copy(
                update={"size": cfg.size, "sources": sources, "next_id": first + len(origins)}
            ),
            "index": IndexInfo(type=factory, metric="cosine", nprobe=nprobe, recall_at_k=round(recall, 4), k=k),
            "files": files,
            "chunks": chunks,
            "evaluation": {},  # a benchmark input: the source's figures describe the source's memory
            "examples": [],
            "build": {**source.build, **build},
            "zero_shot": None,  # its zero-shot files would index the source's items only
        }
    )
    (partial / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log.info("wrote %s: %d items, %s, recall@%d %.3f, %s", out, cfg.size, factory, k, recall, seconds)
    return manifest
