"""The zero-shot parts that index one memory version's items: the text index, its order and the aligned
texts. Loaded and checked with the version they belong to (service/memory/versions.py), so that a swap to a version
brings its own; the towers and fusion modules are the model's, loaded once (service/core/zero_shot.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service.artifacts import (
    MANIFEST,
    ZS_MEMORY_FILES,
    ZS_MODEL_FILES,
    ZS_TEXT_ALIGNED,
    ZS_TEXT_INDEX,
    ZS_TEXT_ORDER,
    ArtifactError,
    ZeroShotInfo,
    digest,
)


@dataclass(eq=False)
class TextIndex:
    model_files: dict[str, str]  # digests of the text tower, tokenizer and fusion modules they were made with
    index: faiss.Index  # exact inner product over the items' frozen text embeddings (N, dt)
    order: np.ndarray  # (N,) int64: position in the text index -> memory row (rows are in id order)
    aligned: np.ndarray  # (N, d) float16, memory-mapped: aligned text embedding of every item, by row


def load_text_index(directory: Path, info: ZeroShotInfo, size: int, dim: int, verify: bool) -> TextIndex:
    """Read and check a version's zero-shot memory files against its manifest and its memory (`size` items,
    `dim`-d keys); raises ArtifactError naming what does not fit."""
    if verify:
        for name in ZS_MEMORY_FILES:
            if digest(directory / name) != info.files.get(name):
                raise ArtifactError(f"{directory / name} does not match the checksum in {MANIFEST}")
    try:
        index = faiss.read_index(str(directory / ZS_TEXT_INDEX))
        order = np.load(directory / ZS_TEXT_ORDER)
        aligned = np.load(directory / ZS_TEXT_ALIGNED, mmap_mode="r")
    except (OSError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"zero-shot parts in {directory} cannot be read: {e}") from e
    for what, n in (("text index", index.ntotal), ("text order", len(order)), ("aligned texts", len(aligned))):
        if n != size:
            raise ArtifactError(f"zero-shot {what} in {directory} holds {n} items, the memory {size}: rebuild")
    if aligned.shape[1:] != (dim,) or info.dim != dim or index.d != info.search_dim:
        raise ArtifactError(f"zero-shot parts in {directory} are not {dim}-d: they do not fit this memory")
    model = {name: info.files.get(name, "?") for name in ZS_MODEL_FILES}
    return TextIndex(model, index, order, aligned)
