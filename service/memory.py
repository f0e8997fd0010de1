"""The served memory: the FAISS index opened memory-mapped, keys and values as read-only memmaps, and the
item table in SQLite. Arrays in, arrays out."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service import artifacts as A


@dataclass(frozen=True)
class Item:
    id: int
    source: str
    text: str
    label: int  # the class the item's text names


class Memory:
    def __init__(self, directory: Path, nprobe: int, threads: int = 1):
        # IO_FLAG_MMAP_IFC maps flat and IVF codes straight from the file: pages load on demand and are
        # shared between processes serving the same artifacts.
        self.index = faiss.read_index(str(directory / A.INDEX), faiss.IO_FLAG_MMAP_IFC)
        if isinstance(self.index, faiss.IndexIVF):
            self.index.nprobe = nprobe
        faiss.omp_set_num_threads(threads)
        self.keys = np.load(directory / A.KEYS, mmap_mode="r")  # (N, d) float16
        self.values = np.load(directory / A.VALUES, mmap_mode="r")  # (N, dv) float16
        self._db = sqlite3.connect(f"file:{directory / A.ITEMS}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        (n_items,) = self._db.execute("SELECT COUNT(*) FROM items").fetchone()
        self.size, self.n_items = int(self.index.ntotal), int(n_items)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """z (B, d) float32 -> sims (B, k) float32, ids (B, k) int64, best first."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        sims, ids = self.index.search(z, k)
        short = (ids < 0).any(1)  # an IVF probe that found fewer than k items pads with -1
        if short.any() and isinstance(self.index, faiss.IndexIVF):
            exhaustive = faiss.SearchParametersIVF()
            exhaustive.nprobe = self.index.nlist
            sims[short], ids[short] = self.index.search(z[short], k, params=exhaustive)
        if (ids < 0).any():
            raise RuntimeError(f"the memory holds fewer than k={k} items")
        return sims, ids

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, k) -> keys (B, k, d) and values (B, k, dv), float16 as stored; (B, k, 0) for what is not
        wanted. (The head widens them to float32: torch does that about 12x faster than numpy.)"""

        def take(store: np.ndarray, wanted: bool) -> np.ndarray:
            if not wanted:
                return np.empty((*ids.shape, 0), np.float16)
            return np.take(store, ids.ravel(), axis=0).reshape(*ids.shape, -1)

        return take(self.keys, keys), take(self.values, values)

    def items(self, ids: list[int]) -> dict[int, Item]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT id, source, text, label FROM items WHERE id IN ({marks})", ids).fetchall()
        return {r[0]: Item(*r) for r in rows}

    def close(self) -> None:
        self._db.close()

    def item(self, item_id: int) -> Item | None:
        return self.items([item_id]).get(item_id)

    def thumbnail(self, item_id: int) -> bytes | None:
        """The item's thumbnail (PNG bytes); None where it has none, or the table has no thumbnail column
        (memories built before thumbnails were stored)."""
        with self._lock:
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
            if "thumbnail" not in columns:
                return None
            row = self._db.execute("SELECT thumbnail FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])
