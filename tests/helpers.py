"""Helpers the tests share (imported from here, never from another test module): waiting on a condition,
what is missing on this machine (skipped locally, a failure where it is required), servers and clients,
artifact directories changed for a test, item lists."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import faiss
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.artifacts import IDS, INDEX, ITEMS, KEYS, MANIFEST, VALUES, read_manifest
from service.memory.shards import SHARD, shard_dirs
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def unavailable(why: str, required_by: str) -> NoReturn:
    """Something a test needs is not on this machine: a failure where it is required (CI=true, or the
    environment variable `required_by`=1), a skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true" or os.environ.get(required_by) == "1":
        pytest.fail(why)
    pytest.skip(why)


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `check` (a connection error counts as not yet) until it is true: how a test waits for a
    condition instead of sleeping for a guessed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def redis_up(host: str = REDIS_HOST, port: int = REDIS_PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Served:
    """A server started by a test: its HTTP base URL, gRPC address and the images it is asked about."""

    url: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    images: list[bytes]

    @property
    def http(self) -> str:
        return self.url.removeprefix("http://")


@contextmanager
def client(artifacts: Path, **overrides: object) -> Iterator[TestClient]:
    settings = Settings(artifacts=artifacts, **overrides)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 10, "readyz")
        yield c


def classify(c: TestClient, data: bytes, **params: Any) -> dict:
    r = c.post("/classify", files={"image": ("x.png", data, "image/png")}, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def tampered(src: Path, dst: Path, change: dict[str, object] | None = None, file: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if change:
        manifest = json.loads((dst / MANIFEST).read_text())
        for path, value in change.items():
            node = manifest
            *parents, leaf = path.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        (dst / MANIFEST).write_text(json.dumps(manifest))
    if file:
        with (dst / file).open("ab") as f:
            f.write(b"\0")
    return dst


def root_without_zero_shot(artifacts: Path, tmp_path: Path) -> Path:
    """A serving root publishing `artifacts` (built with zero-shot parts) and, beside it as `v2` (not yet
    published), a version derived from it (three items removed) whose manifest lost its zero-shot section."""
    from models.memory import ops

    root = tmp_path / "root"
    ops.publish(artifacts, root)
    (tmp_path / "ids.txt").write_text("0\n1\n2\n")
    ops.remove(artifacts, root / "v2", tmp_path / "ids.txt")
    manifest = json.loads((root / "v2" / MANIFEST).read_text())
    manifest.pop("zero_shot")
    (root / "v2" / MANIFEST).write_text(json.dumps(manifest))
    return root


def write_list(images: list[Path], folder: Path, texts: list[str | None]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (src, text) in enumerate(zip(images, texts, strict=True)):
        shutil.copy(src, folder / f"img{n}.png")
        lines.append(f"img{n}.png {n % 10}" + (f"\t{text}" if text else ""))
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        out = db.execute("SELECT * FROM items ORDER BY id").fetchall()
    db.close()
    return out


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny data chunk: a decompression-bomb shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def sample(exposition: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus exposition (0.0 where it is absent), whatever order its labels are
    written in (a server of several processes sorts them by name)."""
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def serving_in(url: str, processes: int, memory: str, version: str, headers: dict[str, str] | None = None) -> bool:
    """Whether `processes` server processes serve `version` of `memory` (the rac_memory_version gauge, summed
    over the live processes): /readyz answers once one process has started, and another may still be loading
    its memory, so a test that publishes a version to be swapped in by every process waits for this first."""
    exposition = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return sample(exposition, "rac_memory_version", memory=memory, version=version) == processes


def png(seed: int) -> bytes:
    """A 20 x 20 RGB PNG of random pixels: a new image for each seed."""
    pixels = (np.random.default_rng(seed).random((20, 20, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def need_ray() -> None:
    """Skip without the `ray` extra (fail in CI: RAC_REQUIRE_RAY)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        unavailable("the `ray` extra is not installed: pip install -e '.[ray]'", "RAC_REQUIRE_RAY")


def same_shards(got: Path, want: Path) -> None:
    """Two sharded memories hold the same items in the same places, searched alike."""
    for g, w in zip(shard_dirs(got), shard_dirs(want), strict=True):
        for name in (IDS, KEYS, VALUES):
            np.testing.assert_array_equal(np.load(g / name), np.load(w / name), err_msg=f"{g / name}")
        assert rows(g / ITEMS) == rows(w / ITEMS)
        assert json.loads((g / SHARD).read_text())["size"] == json.loads((w / SHARD).read_text())["size"]
        gi, wi = faiss.read_index(str(g / INDEX)), faiss.read_index(str(w / INDEX))
        z = np.random.default_rng(3).standard_normal((16, gi.d)).astype(np.float32)
        for index in (gi, wi):
            if (ivf := faiss.try_extract_index_ivf(index)) is not None:
                ivf.nprobe = ivf.nlist
        (gd, gids), (wd, wids) = gi.search(z, 10), wi.search(z, 10)
        np.testing.assert_array_equal(gids, wids)
        np.testing.assert_allclose(gd, wd, rtol=0, atol=1e-6)
    assert rows(got / ITEMS) == rows(want / ITEMS)
    a, b = read_manifest(got).memory, read_manifest(want).memory
    assert (a.size, a.next_id, a.sources, a.tags) == (b.size, b.next_id, b.sources, b.tags)
