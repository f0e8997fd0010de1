"""What a quantized index costs in accuracy, on the real demo memory with its own head: test top-1 with
neighbours from exact search, the served IVF-Flat index, IVF-PQ alone (approximate similarities) and IVF-PQ
re-ranked against the stored keys (what the service does for a quantized index). The search uses the test
images' keys; the head reads what it reads in the service (a fine-tuned build's query output).

    python -m loadtests.memory_accuracy --artifacts artifacts/demo --json results/memory_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.features import embed
from models.memory.scale import build_ivf, exact_search, nlist_for
from service.artifacts import ENCODER, HEAD, INDEX, KEYS, VALUES, read_manifest
from service.core.encode import Encoder
from service.core.head import Head
from service.memory import rerank


def _search(index: faiss.Index, z: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe > 0:  # 0: a build whose served index is flat (faiss's own default then)
        ivf.nprobe = nprobe
    return index.search(z, k)


def run(artifacts: Path, cache: Path, pq_m: int = 64, factor: int = rerank.FACTOR) -> dict[str, Any]:
    from models.build.artifact import config_from_manifest, prepare

    manifest = read_manifest(artifacts)
    cfg = config_from_manifest(manifest, artifacts, cache)
    prep = prepare(cfg, artifacts / ENCODER, exported=manifest.encoder)
    test = prep.splits.test
    z = np.ascontiguousarray(prep.emb[test.pool][test.index], np.float32)  # (n, d) search keys
    encoder = Encoder(artifacts / ENCODER, "cpu")
    query = z  # what the head reads: the key, or a fine-tuned build's query output
    if encoder.query_name is not None:
        query = embed(prep.dataset.pools[test.pool].subset(test.index), encoder, prep.spec, desc="query", query=True)
    labels = prep.dataset.labels(test)
    keys = np.load(artifacts / KEYS, mmap_mode="r")
    values = np.load(artifacts / VALUES, mmap_mode="r")
    head = Head(artifacts / HEAD)
    k, nprobe = manifest.index.k, manifest.index.nprobe
    served = faiss.read_index(str(artifacts / INDEX))
    t = time.perf_counter()
    factory = f"IVF{nlist_for(len(keys))},PQ{pq_m}"
    pq = build_ivf(keys, factory)
    build_s = time.perf_counter() - t
    _, truth = exact_search(keys, z, k)

    def reranked(z_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, cand = _search(pq, z_, factor * k, nprobe)
        return rerank.rerank(z_, cand, keys, k)

    variants = {
        "exact": lambda z_: exact_search(keys, z_, k),
        manifest.index.type: lambda z_: _search(served, z_, k, nprobe),
        f"{factory} (PQ similarities)": lambda z_: _search(pq, z_, k, nprobe),
        f"{factory} + re-rank {factor}k": reranked,
    }
    out: dict[str, Any] = {"test_images": len(labels), "k": k, "nprobe": nprobe, "variants": {}}
    # What the build itself measured over the served index (its manifest): the served index's row should match.
    out["build_test_top1"] = manifest.evaluation["test"]["accuracy"]["all"]
    for name, fn in variants.items():
        correct, found, seconds = 0, [], 0.0
        for s in range(0, len(z), 256):
            t = time.perf_counter()
            sims, ids = fn(z[s : s + 256])
            seconds += time.perf_counter() - t
            vals = np.take(values, ids.ravel(), axis=0).reshape(*ids.shape, -1)
            keys_b = np.empty((*ids.shape, 0), np.float16)
            if head.uses_keys:
                keys_b = np.take(keys, ids.ravel(), axis=0).reshape(*ids.shape, -1)
            probs, _ = head(query[s : s + 256], sims.astype(np.float32), keys_b, vals)
            correct += int((probs.argmax(1) == labels[s : s + 256]).sum())
            found.append(ids)
        ids_all = np.concatenate(found)
        recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids_all, truth, strict=True)])
        out["variants"][name] = {
            "test_top1": round(100 * correct / len(labels), 2),
            "recall_at_k": round(float(recall), 4),
            "search_ms_per_query": round(1000 * seconds / len(z), 3),
        }
    out["pq_build_s"] = round(build_s, 1)
    out["bytes_per_item"] = {"IVF-Flat": 4 * keys.shape[1], "IVF-PQ": pq_m}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--cache", type=Path, default=Path(".cache/rac"))
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("results/memory_accuracy.json"))
    a = p.parse_args()
    faiss.omp_set_num_threads(1)
    result = run(a.artifacts, a.cache, a.pq_m)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print("| neighbours from | test top-1 % | recall@k | search ms/query |\n| --- | --- | --- | --- |")
    for name, v in result["variants"].items():
        print(f"| {name} | {v['test_top1']} | {v['recall_at_k']} | {v['search_ms_per_query']} |")
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
