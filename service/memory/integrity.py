"""Checksums that scale: each large artifact file is hashed once at build time, whole and in chunks; at start
the service checks sizes and a sample of chunks (a 10M-item memory is 13 GB: hashing all of it takes minutes),
and every byte only when asked (`RAC_VERIFY_FULL=1`)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from pydantic import BaseModel

CHUNK = 64 << 20  # bytes per chunk digest
SAMPLE = 8  # chunks checked at start besides the first and the last


class FileChunks(BaseModel):
    size: int  # bytes
    chunk_bytes: int
    digests: list[str]  # blake2b of each chunk, in order


def _hash() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=16)


def digest_chunks(path: Path, chunk: int = CHUNK) -> tuple[str, FileChunks]:
    """One pass over the file: its whole digest (as artifacts.digest gives) and its chunk digests."""
    whole, digests, size = _hash(), [], 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            whole.update(block)
            part = _hash()
            part.update(block)
            digests.append(part.hexdigest())
            size += len(block)
    return whole.hexdigest(), FileChunks(size=size, chunk_bytes=chunk, digests=digests)


def sampled_ok(path: Path, chunks: FileChunks, sample: int = SAMPLE, seed: int | None = None) -> str | None:
    """None where the size and the first, last and `sample` random chunks match; else what does not."""
    size = path.stat().st_size
    if size != chunks.size:
        return f"is {size} bytes, the build wrote {chunks.size}"
    n = len(chunks.digests)
    picks = {0, n - 1} | set(random.Random(seed).sample(range(n), min(sample, n)))
    with path.open("rb") as f:
        for i in sorted(p for p in picks if p >= 0):
            f.seek(i * chunks.chunk_bytes)
            h = _hash()
            h.update(f.read(chunks.chunk_bytes))
            if h.hexdigest() != chunks.digests[i]:
                return f"chunk {i} (bytes {i * chunks.chunk_bytes}..) does not match its checksum"
    return None
