"""The zero-shot parts that index one memory version's items: the text index, its order and the aligned
texts. Loaded and checked with the version they belong to (service/versions.py), so that a swap to a version
brings its own; the towers and fusion modules are the model's, loaded once (service/zeroshot.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service import artifacts as A


@dataclass(eq=False)
class ZsMemory:
    model_files: dict[str, str]  # digests of the text tower, tokenizer and fusion modules they were made with
    text_index: faiss.Index  # exact inner product over the items' frozen text embeddings (N, dt)
    text_order: np.ndarray  # (N,) int64: position in the text index -> memory id
    text_aligned: np.ndarray  # (N, d) float16, memory-mapped: aligned text embedding of every item


def load_zs_memory(directory: Path, info: A.ZeroShotInfo, size: int, dim: int, verify: bool) -> ZsMemory:
    """Read and check a version's zero-shot memory files against its manifest and its memory (`size` items,
    `dim`-d keys); raises ArtifactError naming what does not fit."""
    if verify:
        for name in A.ZS_MEMORY_FILES:
            if A.digest(directory / name) != info.files.get(name):
                raise A.ArtifactError(f"{directory / name} does not match the checksum in {A.MANIFEST}")
    try:
        index = faiss.read_index(str(directory / A.ZS_TEXT_INDEX))
        order = np.load(directory / A.ZS_TEXT_ORDER)
        aligned = np.load(directory / A.ZS_TEXT_ALIGNED, mmap_mode="r")
    except (OSError, RuntimeError, ValueError) as e:
        raise A.ArtifactError(f"zero-shot parts in {directory} cannot be read: {e}") from e
    for what, n in (("text index", index.ntotal), ("text order", len(order)), ("aligned texts", len(aligned))):
        if n != size:
            raise A.ArtifactError(f"zero-shot {what} in {directory} holds {n} items, the memory {size}: rebuild")
    if aligned.shape[1:] != (dim,) or info.dim != dim or index.d != info.search_dim:
        raise A.ArtifactError(f"zero-shot parts in {directory} are not {dim}-d: they do not fit this memory")
    model = {name: info.files.get(name, "?") for name in A.ZS_MODEL_FILES}
    return ZsMemory(model, index, order, aligned)
