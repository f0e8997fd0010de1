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
    if isinstance(inner, faiss.IndexIDMap):  # a flat index that carries item ids (IndexIDMap2 is one too)
        inner = faiss.downcast_index(inner.index)
    return not isinstance(inner, faiss.IndexFlat | faiss.IndexIVFFlat)


def rerank(z: np.ndarray, candidates: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """z (B, d) float32, candidates (B, c) int64 rows of `keys` (-1 where the index found none), keys (N, d)
    float16 memmap -> exact sims (B, k) float32 and rows (B, k) int64, best first (ties: lower candidate rank
    first)."""
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
    out_ids[~np.isfinite(out_sims)] = -1  # fewer than k candidates: padded, as the index pads
    return out_sims.astype(np.float32), out_ids.astype(np.int64)


def ivf_params(index: faiss.Index, nprobe: int, selector: faiss.IDSelector | None = None) -> faiss.SearchParameters:
    """Search parameters for an IVF index (inside an OPQ pre-transform too): the lists to probe, and the
    selector of the items that may be returned (filtered search)."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    if selector is not None:
        params.sel = selector
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        return outer
    return params
