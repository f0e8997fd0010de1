"""`rac evaluate --zero-shot`: the zero-shot table (models/zero_shot/evaluate.py) for an artifact directory,
its data and memory re-created offline.

    rac evaluate --zero-shot --artifacts artifacts/demo      # writes results/zero_shot.json
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from models.build.artifact import config_from_manifest, prepare
from models.encoders import TextEncoder
from models.memory.make import memory_items
from models.zero_shot.evaluate import ZeroShotConfig, ZeroShotData, markdown, prepare_data, run, write
from service.artifacts import ENCODER, INDEX, read_manifest


def from_artifacts(artifacts: Path, cache: Path, cfg: ZeroShotConfig) -> ZeroShotData:
    """Re-create an artifact directory's data and memory offline (embeddings come from the cache) and search
    with the index it serves."""
    manifest = read_manifest(artifacts)
    bcfg = config_from_manifest(manifest, artifacts, cache)
    prep = prepare(bcfg, artifacts / ENCODER, exported=manifest.encoder)
    items = memory_items(prep.dataset, prep.splits, bcfg.sources, bcfg.noise, bcfg.data.seed)
    keys = np.stack([prep.emb[p][i] for p, i in zip(items.pool, items.index, strict=True)])
    index = faiss.read_index(str(artifacts / INDEX))
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = manifest.index.nprobe
    if index.ntotal != len(items):
        raise ValueError(f"{artifacts}: index holds {index.ntotal} items, the re-created memory {len(items)}")
    s = prep.splits
    val, test = ((prep.emb[p.pool][p.index], prep.dataset.labels(p)) for p in (s.val, s.test))
    return prepare_data(prep.dataset.classes, items, keys, index, val, test, TextEncoder(), cfg)


def cli_evaluate(artifacts: Path, cache: Path, seeds: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)  # small batches: a second thread is slower where the cores are shared
    cfg = ZeroShotConfig(seeds=tuple(int(s) for s in seeds.split(",")))
    result = run(from_artifacts(artifacts, cache, cfg), cfg)
    result["artifacts"] = str(artifacts)
    write(result, out)
    print(markdown(result))
    print(f"\nwrote {out}")
