"""`rac choices`: the figures behind the README's "Choices" table, measured in one run, printed and written
as JSON. Accuracy figures are on validation images; timings on this machine, one run (compare ratios).

    rac choices --artifacts artifacts/demo --json results/choices.json

1. input size: 1-NN accuracy of the validation images over the memory's images (raw 1280-d Lite0 features)
   at 32, 64 and 112 px, and Lite0's throughput in onnxruntime at 64 and 112 px (batch 32, every core)
2. the PCA projection: 1-NN and 10-NN vote accuracy with the demo's 256-d encoder vs the raw 1280-d one
3. the index: search time a query (batch 32, one thread) of the demo's IVF index vs exact search
4. the head: its time an image (batch 32, one thread) vs widening the gathered values with numpy
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.build.artifact import config_from_manifest, load_data
from models.encoders import export_onnx, image_encoder
from models.features import cached_embed
from service.artifacts import ENCODER, HEAD, INDEX, KEYS, VALUES, read_manifest
from service.core.decode import InputSpec
from service.core.encode import Encoder
from service.core.head import Head


def knn_accuracy(
    memory: np.ndarray, memory_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray, k: int
) -> float:
    """Top-1 (%) of a k-nearest-neighbour majority vote by cosine similarity (exact search)."""
    memory = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(memory.shape[1])
    index.add(np.ascontiguousarray(memory, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    votes = memory_labels[ids]  # (n, k)
    pred = np.array([np.bincount(v).argmax() for v in votes])
    return float(100 * (pred == labels).mean())


def per_item_ms(run: Callable[[], object], items: int, seconds: float = 2.0) -> float:
    """Milliseconds an item, running `run` (which handles `items` items) for about `seconds`."""
    run()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        run()
        n += 1
    return 1000 * (time.perf_counter() - t) / (n * items)


def main(artifacts: Path, out: Path, cache: Path) -> dict[str, Any]:
    manifest = read_manifest(artifacts)
    cfg = config_from_manifest(manifest, artifacts, cache)
    dataset, splits = load_data(cfg.data)
    memory_parts = [splits.train] + ([splits.external] if splits.external is not None else [])
    pool = dataset.pools[splits.val.pool]
    assert all(p.pool == splits.val.pool for p in memory_parts), "the memory and validation share one pool"
    mem_rows = np.concatenate([p.index for p in memory_parts])
    mem_labels, val_labels = pool.labels[mem_rows], pool.labels[splits.val.index]
    results: dict[str, Any] = {"memory_images": len(mem_rows), "validation_images": len(val_labels)}

    print("input size ...", flush=True)
    sizes: dict[str, Any] = {}
    raw64 = np.empty(0)
    for size in (32, 64, 112):
        model, spec = image_encoder("efficientnet-lite0", size, grey=True)
        path = cache / f"choices-lite0-{size}.onnx"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            export_onnx(model, size, path)
        emb = cached_embed(pool, path, spec, cache, desc=f"embed at {size} px")
        x = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
        encoder = Encoder(path, "cpu", 0, spin=True)
        sizes[str(size)] = {
            "knn1": knn_accuracy(emb[mem_rows], mem_labels, emb[splits.val.index], val_labels, 1),
            "img_per_s_b32": 1000 / per_item_ms(functools.partial(encoder, x), 32),
        }
        if size == 64:
            raw64 = emb
    results["input_size"] = sizes

    print("PCA projection ...", flush=True)
    spec = InputSpec.from_dict(manifest.encoder.input)
    served = cached_embed(pool, artifacts / ENCODER, spec, cache, desc="embed (served encoder)")
    results["projection"] = {
        name: {
            f"knn{k}": knn_accuracy(emb[mem_rows], mem_labels, emb[splits.val.index], val_labels, k) for k in (1, 10)
        }
        | {"dim": int(emb.shape[1])}
        for name, emb in (("raw", raw64), ("pca", served))
    }

    print("index ...", flush=True)
    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(artifacts / INDEX))
    keys = np.load(artifacts / KEYS).astype(np.float32)
    exact = faiss.IndexFlatIP(keys.shape[1])
    exact.add(keys)
    q = np.ascontiguousarray(served[splits.val.index][:32])
    k = manifest.index.k
    results["index"] = {
        "type": manifest.index.type,
        "nprobe": manifest.index.nprobe,
        "ivf_ms_per_query": per_item_ms(lambda: index.search(q, k), 32),
        "exact_ms_per_query": per_item_ms(lambda: exact.search(q, k), 32),
    }
    if isinstance(index, faiss.IndexIVF):
        for nprobe in (8, 16):
            index.nprobe = nprobe
            results["index"][f"ivf_ms_per_query_nprobe{nprobe}"] = per_item_ms(lambda: index.search(q, k), 32)

    print("head ...", flush=True)
    head = Head(artifacts / HEAD, threads=1)
    values16 = np.load(artifacts / VALUES, mmap_mode="r")
    ids = np.random.default_rng(0).integers(0, len(values16), (32, k))
    gathered = np.take(values16, ids.ravel(), axis=0).reshape(32, k, -1)  # (32, k, dv) float16
    z = np.ascontiguousarray(served[:32])
    sims = np.sort(np.random.default_rng(1).random((32, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    no_keys = np.empty((32, k, 0), np.float16)
    results["head"] = {
        "head_ms_per_image": per_item_ms(lambda: head(z, sims, no_keys, gathered), 32),
        "numpy_widen_ms_per_image": per_item_ms(lambda: gathered.astype(np.float32), 32),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results
