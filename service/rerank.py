"""Exact similarities for a quantized index: search more candidates than the head reads, then re-rank them
against the stored float16 keys, so the head sees the cosine similarities an exact search gives."""

from __future__ import annotations

import faiss
import numpy as np

# Candidates searched per neighbour the head reads: 4k from the PQ index, re-ranked down to k.
FACTOR = 4


def quantized(index: faiss.Index) -> bool:
    """True where the index returns approximate similarities (PQ or scalar-quantized codes, an OPQ rotation),
    False for exact codes (Flat, IVF-Flat)."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else index
    return not isinstance(inner, faiss.IndexFlat | faiss.IndexIVFFlat)


def rerank(z: np.ndarray, candidates: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """z (B, d) float32, candidates (B, c) int64 ids (-1 where the index found none), keys (N, d) float16
    memmap -> exact sims (B, k) float32 and ids (B, k) int64, best first (ties: lower candidate rank first)."""
    b, c = candidates.shape
    valid = candidates >= 0
    rows = np.take(keys, np.where(valid, candidates, 0).ravel(), axis=0).reshape(b, c, -1)  # (B, c, d) float16
    sims = np.matmul(rows.astype(np.float32), z[:, :, None])[..., 0]  # (B, c): batched BLAS, not einsum
    sims[~valid] = -np.inf
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < c else np.broadcast_to(np.arange(c), (b, c))
    top_sims = np.take_along_axis(sims, top, 1)
    order = np.lexsort((top, -top_sims), axis=1)  # by similarity, then by candidate rank
    top = np.take_along_axis(top, order, 1)
    out_ids = np.take_along_axis(candidates, top, 1)
    out_sims = np.take_along_axis(sims, top, 1)
    if not np.isfinite(out_sims).all():
        raise RuntimeError(f"fewer than k={k} candidates to re-rank")
    return out_sims.astype(np.float32), out_ids.astype(np.int64)


def exhaustive(index: faiss.Index) -> faiss.SearchParameters:
    """Search parameters that probe every IVF list (for the rare query whose probes found too few items)."""
    ivf = faiss.extract_index_ivf(index)
    params = faiss.SearchParametersIVF()
    params.nprobe = ivf.nlist
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        return outer
    return params
