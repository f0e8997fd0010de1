"""Embed image pools with an exported ONNX encoder, through the service's own decode and encode stages,
cached on disk so that evaluation reruns in minutes."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.data import Dataset, ImageSet, Splits
from service.artifacts import digest
from service.core.decode import InputSpec, preprocess
from service.core.encode import Encoder

log = logging.getLogger(__name__)


def _batches(images: ImageSet, spec: InputSpec, batch: int) -> Iterator[np.ndarray]:
    """Preprocess in a background thread (PIL releases the GIL) so it overlaps the encoder. An error there
    (a corrupt image file) is raised here, in the consumer, instead of leaving it waiting for a batch."""
    q: queue.Queue[np.ndarray | BaseException | None] = queue.Queue(maxsize=4)

    def produce() -> None:
        try:
            for start in range(0, len(images), batch):
                stop = min(start + batch, len(images))
                q.put(np.stack([preprocess(images.image(i), spec) for i in range(start, stop)]))  # (b, 3, S, S)
        except BaseException as e:
            q.put(e)
        else:
            q.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (x := q.get()) is not None:
        if isinstance(x, BaseException):
            raise x
        yield x


@dataclass
class Prepared:
    """A dataset with its splits, embedded by the exported query/key encoder."""

    dataset: Dataset
    splits: Splits
    spec: InputSpec
    encoder_path: Path
    projection: str
    emb: dict[str, np.ndarray]  # pool -> (N, d) float32 embeddings


def embed(
    images: ImageSet, encoder: Encoder, spec: InputSpec, batch: int = 64, desc: str = "", query: bool = False
) -> np.ndarray:
    """(N, d) float32 embeddings of every image in the set, in order: the search keys, or with `query` what the
    head reads (a fine-tuned graph's query output; elsewhere the key)."""
    out = np.empty((len(images), encoder.query_dim if query else encoder.dim), np.float32)
    done = 0
    with tqdm(total=len(images), desc=desc or "embed", unit="img", leave=False) as bar:
        for x in _batches(images, spec, batch):
            out[done : done + len(x)] = encoder.both(x)[1] if query else encoder(x)
            done += len(x)
            bar.update(len(x))
    return out


def cached_embed(
    images: ImageSet, onnx_path: Path, spec: InputSpec, cache_dir: Path, desc: str = "", threads: int = 0
) -> np.ndarray:
    """embed(), memoised on disk by the encoder file's digest, the input spec and the images' fingerprint."""
    key = hashlib.blake2b(
        f"{digest(onnx_path)}|{spec.to_dict()}|{images.fingerprint()}".encode(), digest_size=12
    ).hexdigest()
    path = cache_dir / f"emb-{key}.npy"
    if path.exists():
        return np.load(path)
    feats = embed(images, Encoder(onnx_path, device="auto", intra_threads=threads), spec, desc=desc)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.rename(path)
    return feats


def export_encoder(
    name: str,
    input_size: int,
    grey: bool,
    pca_dim: int,
    fit_images: ImageSet,
    out: Path,
    cache_dir: Path,
    checkpoint: Path | None = None,
) -> tuple[InputSpec, str]:
    """Export the query/key encoder to `out`, with a PCA projection fitted on `fit_images` when pca_dim > 0.

    Returns the input spec and a description of the projection for the manifest.
    """
    from torch import nn

    from models.encoders import export_onnx, fit_pca, image_encoder

    model, spec = image_encoder(name, input_size, grey, checkpoint)
    if pca_dim <= 0:
        export_onnx(model, spec.size, out)
        return spec, "none"
    raw = cache_dir / f"raw-{out.name}"
    export_onnx(model, spec.size, raw)
    feats = cached_embed(fit_images, raw, spec, cache_dir, desc="embed (PCA fit)")
    export_onnx(nn.Sequential(model, fit_pca(feats, pca_dim)), spec.size, out)
    return spec, f"pca-{pca_dim} of {feats.shape[1]}"
