"""The served memory: the FAISS index opened memory-mapped, keys and values as read-only memmaps, and the
item table in SQLite. Arrays in, arrays out."""

from __future__ import annotations

import mmap
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service import artifacts as A
from service import paging, rerank

# Ids per `IN (...)` query: under SQLite's smallest default bound on parameters (999), whatever B * k is.
SQL_CHUNK = 900


@dataclass(frozen=True)
class Item:
    id: int
    source: str
    text: str
    label: int  # the class the item's text names


def open_array(path: Path) -> np.ndarray:
    """A read-only memmap of an .npy file, its size checked against its header first (a truncated file
    is refused by name, whether or not checksums are verified)."""
    if not path.exists():
        raise A.ArtifactError(f"{path} is missing")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise A.ArtifactError(f"{path} is not a readable .npy file: {e}") from e
    want = offset + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have != want:
        raise A.ArtifactError(f"{path} is {have} bytes, its header says {shape} {dtype}: {want} bytes (truncated?)")
    return np.load(path, mmap_mode="r")


def check_sqlite(path: Path) -> None:
    """The item table's size against its header (page size x page count): SQLite itself reads a truncated
    file without complaint and answers with rows missing."""
    if not path.exists():
        raise A.ArtifactError(f"{path} is missing")
    with path.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        raise A.ArtifactError(f"{path} is not an SQLite database")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    size = path.stat().st_size
    header_valid = head[24:28] == head[92:96]  # the page count is trusted only then (SQLite's rule)
    if size % page or (header_valid and pages and size != page * pages):
        raise A.ArtifactError(f"{path} is {size} bytes, its header says {pages} pages of {page} bytes (truncated?)")


def prefault(path: Path) -> None:
    """Bring a file into the page cache before it serves: a cold page costs a disk read inside a request."""
    with path.open("rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        while f.readinto(_BLOCK):
            pass


_BLOCK = bytearray(8 << 20)

_threads = threading.local()  # OpenMP's thread count is a per-thread setting: set it where the search runs


class Described:
    """What a memory (here, or in shards) answers from its item table: the items behind ids, a thumbnail."""

    table: ItemTable

    def items(self, ids: list[int]) -> dict[int, Item]:
        return self.table.items(ids)

    def item(self, item_id: int) -> Item | None:
        return self.table.items([item_id]).get(item_id)

    def thumbnail(self, item_id: int) -> bytes | None:
        return self.table.thumbnail(item_id)

    def close(self) -> None:
        self.table.close()


class Memory(Described):
    def __init__(self, directory: Path, nprobe: int, threads: int = 1):
        # IO_FLAG_MMAP_IFC maps flat and IVF codes straight from the file: pages load on demand and are
        # shared between processes serving the same artifacts.
        try:
            self.index = faiss.read_index(str(directory / A.INDEX), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:
            raise A.ArtifactError(f"{directory / A.INDEX} is not a readable FAISS index: {e}") from e
        self.directory = directory
        self.ivf = faiss.try_extract_index_ivf(self.index)  # also inside an OPQ pre-transform
        if self.ivf is not None:
            self.ivf.nprobe = nprobe
        # A quantized index searches FACTOR x k candidates and re-ranks them against the stored keys.
        self.rerank = rerank.FACTOR if rerank.quantized(self.index) else 0
        self.threads = threads
        self.keys = open_array(directory / A.KEYS)  # (N, d) float16
        self.values = open_array(directory / A.VALUES)  # (N, dv) float16
        self.table = ItemTable(directory / A.ITEMS)
        self.size, self.n_items = int(self.index.ntotal), self.table.size

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def willneed(self) -> None:
        """madvise(WILLNEED) on the keys and values maps: the kernel reads them ahead."""
        for array in (self.keys, self.values):
            m = getattr(array, "_mmap", None)
            if isinstance(m, mmap.mmap) and hasattr(mmap, "MADV_WILLNEED"):
                m.madvise(mmap.MADV_WILLNEED)

    def search(self, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """z (B, d) float32 -> sims (B, k) float32, ids (B, k) int64, best first."""
        if getattr(_threads, "n", None) != self.threads:
            faiss.omp_set_num_threads(self.threads)  # for this thread only (the batch worker, not the loader)
            _threads.n = self.threads
        z = np.ascontiguousarray(z, dtype=np.float32)
        wanted = min(k * self.rerank, self.size) if self.rerank else k
        sims, ids = self.index.search(z, wanted)
        short = (ids >= 0).sum(1) < k  # an IVF probe that found fewer than k items pads with -1
        if short.any() and self.ivf is not None:
            sims[short], ids[short] = self.index.search(z[short], wanted, params=rerank.exhaustive(self.index))
        if ((ids >= 0).sum(1) < k).any():
            raise RuntimeError(f"the memory holds fewer than k={k} items")
        if self.rerank:
            return rerank.rerank(z, ids, self.keys, k)
        return sims, ids

    def prefault(self) -> None:
        """Keys and values into the page cache and this process's page tables; the index into the page cache."""
        paging.touch(self.keys, self.values)
        prefault(self.directory / A.INDEX)

    def gather(self, ids: np.ndarray, keys: bool, values: bool) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, k) -> keys (B, k, d) and values (B, k, dv), float16 as stored; (B, k, 0) for what is not
        wanted. (The head widens them to float32: torch does that about 12x faster than numpy.)"""

        def take(store: np.ndarray, wanted: bool) -> np.ndarray:
            if not wanted:
                return np.empty((*ids.shape, 0), np.float16)
            return np.take(store, ids.ravel(), axis=0).reshape(*ids.shape, -1)

        return take(self.keys, keys), take(self.values, values)

    def lookup(self, z: np.ndarray, k: int, values: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """search and the values of what it found: sims (B, k), ids (B, k), values (B, k, dv) float16 ((B, k, 0)
        where not wanted). A sharded memory does both in one round trip to each shard."""
        sims, ids = self.search(z, k)
        return sims, ids, self.gather(ids, False, values)[1]


class ItemTable:
    """The item table (SQLite, read-only): id -> source, text, label, thumbnail."""

    def __init__(self, path: Path):
        check_sqlite(path)
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            (n_items,) = self._db.execute("SELECT COUNT(*) FROM items").fetchone()
        except sqlite3.Error as e:
            raise A.ArtifactError(f"{path} is not a readable item table: {e}") from e
        self._lock = threading.Lock()
        self.size = int(n_items)

    def items(self, ids: list[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        with self._lock:
            step = min(SQL_CHUNK, self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
            for s in range(0, len(ids), step):
                chunk = ids[s : s + step]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT id, source, text, label FROM items WHERE id IN ({marks})"
                out.update((r[0], Item(*r)) for r in self._db.execute(query, chunk))
        return out

    def close(self) -> None:
        self._db.close()

    def thumbnail(self, item_id: int) -> bytes | None:
        """The item's thumbnail (PNG bytes); None where it has none, or the table has no thumbnail column
        (memories built before thumbnails were stored)."""
        with self._lock:
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
            if "thumbnail" not in columns:
                return None
            row = self._db.execute("SELECT thumbnail FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])
