"""The served memory: the FAISS index opened memory-mapped (it stores each item's id), keys and values as
read-only memmaps by row, the id of each row, and the item table. Ids in, ids out: rows stay in here.

An item's id is stable: given once when the item enters a memory, kept in every later version, never given
to another item. A version's `ids.npy` holds the id of each row, increasing, so an id's row is found by
binary search; a directory written before ids were stable has none, and its ids are its rows.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from pathlib import Path

import faiss
import numpy as np

from service.artifacts import IDS, INDEX, ITEMS, KEYS, VALUES, ArtifactError
from service.memory import paging, rerank
from service.memory.filters import ByItemIds, Filter, FilterIndex, Selection
from service.memory.items import ItemTable


def open_array(path: Path) -> np.ndarray:
    """A read-only memmap of an .npy file, its size checked against its header first (a truncated file
    is refused by name, whether or not checksums are verified)."""
    if not path.exists():
        raise ArtifactError(f"{path} is missing")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable .npy file: {e}") from e
    want = offset + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have != want:
        raise ArtifactError(f"{path} is {have} bytes, its header says {shape} {dtype}: {want} bytes (truncated?)")
    return np.load(path, mmap_mode="r")


def prefault(path: Path) -> None:
    """Bring a file into the page cache before it serves: a cold page costs a disk read inside a request."""
    with path.open("rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        while f.readinto(_BLOCK):
            pass


_BLOCK = bytearray(8 << 20)

_threads = threading.local()  # OpenMP's thread count is a per-thread setting: set it where the search runs


class Memory(ByItemIds):
    """One memory version (or one shard of one), memory-mapped."""

    def __init__(self, directory: Path, nprobe: int, threads: int = 1):
        # IO_FLAG_MMAP_IFC maps flat and IVF codes straight from the file: pages load on demand and are
        # shared between processes serving the same artifacts.
        try:
            self.index = faiss.read_index(str(directory / INDEX), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:
            raise ArtifactError(f"{directory / INDEX} is not a readable FAISS index: {e}") from e
        self.directory = directory
        self.ivf = faiss.try_extract_index_ivf(self.index)  # also inside an OPQ pre-transform
        self.nprobe = nprobe
        if self.ivf is not None:
            self.ivf.nprobe = nprobe
        # A quantized index searches FACTOR x k candidates and re-ranks them against the stored keys.
        self.rerank = rerank.FACTOR if rerank.quantized(self.index) else 0
        self.threads = threads
        self.keys = open_array(directory / KEYS)  # (N, d) float16
        self.values = open_array(directory / VALUES)  # (N, dv) float16
        self.ids: np.ndarray | None = open_array(directory / IDS) if (directory / IDS).exists() else None  # (N,)
        self.table = ItemTable(directory / ITEMS)
        self.filters: FilterIndex = self.table.filter_index()
        if self.ids is not None and np.array_equal(self.filters.ids, self.ids):
            self.filters.ids = self.ids  # the memory-mapped copy: its pages are shared between processes
        self.size, self.n_items = int(self.index.ntotal), self.table.size

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def value_dim(self) -> int:
        return int(self.values.shape[1])

    def close(self) -> None:
        self.table.close()

    # ------------------------------------------------------------ filters

    def select(self, f: Filter) -> Selection:
        """`f` resolved against this memory: RequestError 422 for a source or tag it does not have."""
        self.filters.check(f)
        excluded = tuple(sorted(item.id for item in self.table.by_keys(list(f.exclude_keys)).values()))
        return self.filters.select(f, excluded)

    # ------------------------------------------------------------ search

    def willneed(self) -> None:
        """madvise(WILLNEED) on the keys and values maps: the kernel reads them ahead."""
        for array in (self.keys, self.values):
            m = getattr(array, "_mmap", None)
            if isinstance(m, mmap.mmap) and hasattr(mmap, "MADV_WILLNEED"):
                m.madvise(mmap.MADV_WILLNEED)

    def _params(self, selection: Selection | None, every_list: bool) -> faiss.SearchParameters | None:
        """Search parameters: the selection's selector, and for an IVF index the lists to probe: all of them
        (`every_list`), or enough that a selection keeping a fraction f of the items meets about as many
        candidates as an unfiltered search (nprobe / f lists)."""
        selector = selection.selector if selection is not None else None
        if self.ivf is None:
            if selector is None:
                return None
            params = faiss.SearchParameters()
            params.sel = selector
            return params
        nprobe = self.ivf.nlist if every_list else self.nprobe
        if selection is not None and not every_list:
            nprobe = min(self.ivf.nlist, math.ceil(self.nprobe * selection.size / max(selection.count, 1)))
        if selector is None and nprobe == self.nprobe:
            return None
        return rerank.ivf_params(self.index, nprobe, selector)

    def candidates(
        self, z: np.ndarray, k: int, selection: Selection | None = None, every_list: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's best k for z (B, d) float32 among what `selection` passes, re-ranked against the keys
        where the index is quantized: sims (B, k) float32, ids (B, k) int64, -1 where it found fewer."""
        if getattr(_threads, "n", None) != self.threads:
            faiss.omp_set_num_threads(self.threads)  # for this thread only (the batch worker, not the loader)
            _threads.n = self.threads
        z = np.ascontiguousarray(z, dtype=np.float32)
        wanted = min(k * self.rerank, self.size) if self.rerank else k
        sims, ids = self.index.search(z, wanted, params=self._params(selection, every_list))
        if self.rerank:
            sims, rows = rerank.rerank(z, self.rows_of_candidates(ids), self.keys, min(k, wanted))
            ids = self.id_of_rows(rows)
        return sims, ids

    def search(self, z: np.ndarray, k: int, selection: Selection | None = None) -> tuple[np.ndarray, np.ndarray]:
        """z (B, d) float32 -> sims (B, n) float32, ids (B, n) int64, best first, among the items `selection`
        lets through (all by default): n = k, or every item that passes where fewer than k do."""
        n = min(k, selection.count if selection is not None else self.size)
        sims, ids = self.candidates(z, k, selection)
        short = (ids >= 0).sum(1) < n  # an IVF probe that found fewer than n items pads with -1
        if short.any() and self.ivf is not None:
            sims[short], ids[short] = self.candidates(z[short], k, selection, every_list=True)
        if ((ids >= 0).sum(1) < n).any():
            raise RuntimeError(f"the memory holds fewer than {n} items that pass")
        return sims[:, :n], ids[:, :n]

    def rows_of_candidates(self, ids: np.ndarray) -> np.ndarray:
        """A search's ids (-1 where it found none) -> rows (-1 kept)."""
        if self.ids is None:
            return ids
        rows = np.full(ids.shape, -1, np.int64)
        found = ids >= 0
        rows[found] = self.rows(ids[found])
        return rows

    def prefault(self) -> None:
        """Keys and values into the page cache and this process's page tables; the index into the page cache."""
        paging.touch(self.keys, self.values)
        prefault(self.directory / INDEX)

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, n) -> keys (B, n, d) and values (B, n, dv), float16 as stored; (B, n, 0) for what is not
        wanted. (The head widens them to float32: torch does that about 12x faster than numpy.)"""
        rows = self.rows(ids) if keys or values else ids

        def take(store: np.ndarray, wanted: bool) -> np.ndarray:
            if not wanted:
                return np.empty((*ids.shape, 0), np.float16)
            return np.take(store, rows.ravel(), axis=0).reshape(*ids.shape, store.shape[1])

        return take(self.keys, keys), take(self.values, values)

    def lookup(
        self, z: np.ndarray, k: int, values: bool, selection: Selection | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """search and the values of what it found: sims (B, n), ids (B, n), values (B, n, dv) float16
        ((B, n, 0) where not wanted). A sharded memory does both in one round trip to each shard."""
        sims, ids = self.search(z, k, selection)
        return sims, ids, self.gather(ids, False, values)[1]
