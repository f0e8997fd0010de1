"""The embedding step of `rac memory add --ray`, on Ray Data: the listed images read, embedded and made into
thumbnails in parallel across the cluster's nodes (map_batches over a pool of actors, each holding one ONNX
session of the version's encoder and one text encoder for the items' texts); the rows come back to the driver
in list order, which writes the version as the single-machine path does (models/memory/add.py). The images
and the version's encoder must be at the same path on every node. The one module of `models` that imports Ray
(the `ray` extra).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.data import FileImages
from models.memory.make import thumbnail_bytes

log = logging.getLogger(__name__)

BATCH = 128  # images an actor embeds per call
ACTOR_CPUS = 1  # CPUs (and encoder threads) per actor: one actor per CPU of the cluster


class Embedder:
    """One Ray Data actor: the encoder's ONNX session and the text encoder, loaded once."""

    def __init__(self, encoder: str, spec: dict[str, Any], root: str, threads: int):
        import torch

        from models.encoders import TextEncoder
        from service.core.decode import InputSpec
        from service.core.encode import Encoder

        # As many threads as the CPUs the actor reserved: one session per CPU, none oversubscribing its node.
        torch.set_num_threads(threads)
        self.encoder, self.spec = Encoder(Path(encoder), "auto", intra_threads=threads), InputSpec.from_dict(spec)
        self.text, self.root = TextEncoder(), Path(root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from models.features import embed

        images = FileImages(self.root, [str(p) for p in batch["path"]], np.zeros(len(batch["path"]), np.int64))
        thumbnails = [thumbnail_bytes(images.image(i)) for i in range(len(images))]
        return {
            "row": batch["row"],
            "key": embed(images, self.encoder, self.spec),  # (b, d) float32, as queries are embedded
            "value": self.text([str(t) for t in batch["text"]]),
            "thumbnail": np.array(thumbnails, dtype=object),
        }


def embed_on_ray(
    encoder: Path,
    spec: dict[str, Any],
    root: Path,
    paths: list[str],
    texts: list[str],
    dims: tuple[int, int],
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[bytes | None]]:
    """keys (m, d) and values (m, dv) float32 and thumbnails of the listed images, computed by one actor per
    logical CPU of the cluster the process is connected to (ray.init: RAY_ADDRESS, else a running one).
    timings, if given, gets the seconds in all, the rows of the first batch back and when it came (the actors'
    start-up before it), for the steady rate after it."""
    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    actors = max(1, int(ray.cluster_resources().get("CPU", 1)) // ACTOR_CPUS)
    t = time.perf_counter()
    rows = [{"row": i, "path": p, "text": x} for i, (p, x) in enumerate(zip(paths, texts, strict=True))]
    embedded = ray.data.from_items(rows).map_batches(
        Embedder,
        fn_constructor_args=(str(encoder), spec, str(root), ACTOR_CPUS),
        batch_size=BATCH,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=ACTOR_CPUS,
    )
    m = len(paths)
    keys, values = np.empty((m, dims[0]), np.float32), np.empty((m, dims[1]), np.float32)
    thumbnails: list[bytes | None] = [None] * m
    done = np.zeros(m, bool)
    for b in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        at = b["row"].astype(np.int64)
        if timings is not None and "first_batch_s" not in timings:
            timings["first_batch_s"], timings["first_batch_rows"] = time.perf_counter() - t, len(at)
        keys[at], values[at], done[at] = b["key"], b["value"], True
        for r, thumb in zip(at, b["thumbnail"], strict=True):
            thumbnails[r] = bytes(thumb)
    if not done.all():
        raise RuntimeError(f"Ray Data returned {done.sum()} of {m} items")
    seconds = time.perf_counter() - t
    if timings is not None:
        timings["seconds"] = seconds
    log.info("embedded %d items on Ray (%d actors) in %.1f s: %.1f images/s", m, actors, seconds, m / seconds)
    return keys, values, thumbnails
