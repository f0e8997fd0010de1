"""The images load generators send: distinct PNGs, so that every new request is a cache miss."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator

import numpy as np
from PIL import Image


def pngs() -> Iterator[bytes]:
    """Every image once, in an endless stream: Fashion-MNIST's test, then training images where the package
    is installed, else noise; past the end, the same images with their bits flipped, so still distinct."""
    try:
        from models.data import fashion_mnist

        pools = fashion_mnist().pools
        arrays = np.concatenate([pools["test"].pixels, pools["train"].pixels])  # type: ignore[union-attr]
    except (ImportError, FileNotFoundError):
        arrays = np.random.default_rng(0).integers(0, 256, (70_000, 28, 28), dtype=np.uint8)
    for n in itertools.count():
        pixels = arrays[n % len(arrays)]
        buf = io.BytesIO()
        Image.fromarray(pixels if n < len(arrays) else pixels ^ (n // len(arrays))).save(buf, "PNG")
        yield buf.getvalue()
