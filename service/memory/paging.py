"""Pre-faulting the memory before the service says it is ready: cold pages of a 10M-item memory cost tens of
milliseconds at p99 for search and hundreds for the value gather, paid by the first requests otherwise."""

from __future__ import annotations

import logging
import mmap
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
BLOCK = 64 << 20  # bytes touched per step


def meminfo(field: str, path: Path = Path("/proc/meminfo")) -> int:
    """A /proc/meminfo figure in bytes (MemTotal, MemAvailable), or 0 where the file is not there."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fits(nbytes: int, available: int, total: int) -> bool:
    """Whether `nbytes` of file pages can be held in the page cache beside everything else: what the kernel
    says is available now (free memory plus reclaimable cache), less a reserve of an eighth of the RAM (at
    least 1 GiB) for the processes' own growth. Unknown memory (no /proc/meminfo): assume it fits."""
    if not available:
        return True
    return nbytes <= available - max(1 << 30, total // 8)


def touch(*stores: np.ndarray) -> None:
    """Memory-mapped arrays: madvise(MADV_WILLNEED) so the kernel reads ahead, then touch one byte of every
    page so that each page is in the page cache *and* mapped in this process (no fault on the first request).
    A memory the page cache cannot hold beside everything else (fits()) only gets the advice: touching it
    all would evict its own first pages while reading the last."""
    t, total = time.perf_counter(), 0
    size = sum(s.nbytes for s in stores)
    advise_only = not fits(size, meminfo("MemAvailable"), meminfo("MemTotal"))
    if advise_only:
        log.warning(
            "the memory (%.1f GB) is more than the page cache can hold now (%.1f GB available): only advising "
            "the kernel, not pre-faulting",
            size / 1e9,
            meminfo("MemAvailable") / 1e9,
        )
    for store in stores:
        raw = getattr(store, "_mmap", None)  # np.memmap's mapping of the whole file
        if raw is not None and hasattr(mmap, "MADV_WILLNEED"):
            raw.madvise(mmap.MADV_WILLNEED)
        if advise_only:
            continue
        flat = store.reshape(-1).view(np.uint8)  # (bytes,)
        for s in range(0, len(flat), BLOCK):
            int(flat[s : s + BLOCK : PAGE].sum())  # reads one byte a page
        total += flat.nbytes
    log.info("pre-faulted %.1f MB of keys and values in %.1f s", total / 1e6, time.perf_counter() - t)
