"""Shared fixtures: synthetic and real artifact directories, a real Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.synthetic import make_artifacts

ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# Apps built in tests leave gRPC off unless a test names a port: never the well-known 8001 of a running demo.
os.environ["RAC_GRPC_PORT"] = "0"


@pytest.fixture(scope="session")
def synthetic_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_artifacts(out)
    return out


@pytest.fixture(scope="session")
def quick_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rac build --quick` with the real bundled encoder and text encoder: a few hundred memory items."""
    out = tmp_path_factory.mktemp("quick") / "artifacts"
    cache = tmp_path_factory.mktemp("cache")
    subprocess.run(
        [sys.executable, "-m", "models.cli", "build", "--quick", "--out", str(out), "--cache", str(cache)],
        check=True,
        cwd=ROOT,
        env=os.environ | {"TQDM_DISABLE": "1"},
    )
    return out


@pytest.fixture(scope="session")
def zs_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rac build --quick --zero-shot`: the quick build plus the aligned text tower, text index and fusion."""
    out = tmp_path_factory.mktemp("zs") / "artifacts"
    cache = tmp_path_factory.mktemp("zs-cache")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "models.cli",
            "build",
            "--quick",
            "--zero-shot",
            "--out",
            str(out),
            "--cache",
            str(cache),
        ],
        check=True,
        cwd=ROOT,
        env=os.environ | {"TQDM_DISABLE": "1"},
    )
    return out


def root_without_zero_shot(artifacts: Path, tmp_path: Path) -> Path:
    """A serving root publishing `artifacts` (built with zero-shot parts) and, beside it as `v2` (not yet
    published), a version derived from it (three items removed) whose manifest lost its zero-shot section."""
    from models import memory_ops as ops
    from service import artifacts as A

    root = tmp_path / "root"
    ops.publish(artifacts, root)
    (tmp_path / "ids.txt").write_text("0\n1\n2\n")
    ops.remove(artifacts, tmp_path / "ids.txt", root / "v2")
    manifest = json.loads((root / "v2" / A.MANIFEST).read_text())
    manifest.pop("zero_shot")
    (root / "v2" / A.MANIFEST).write_text(json.dumps(manifest))
    return root


@dataclass
class Served:
    """A server started by a test: its HTTP base URL, gRPC address and the images it is asked about."""

    url: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    images: list[bytes]

    @property
    def http(self) -> str:
        return self.url.removeprefix("http://")


def wait_until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
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


@pytest.fixture
def redis_url() -> str:
    """The machine's real Redis. CI (RAC_REQUIRE_REDIS=1) fails rather than skips when it is not up."""
    if not redis_up():
        if os.environ.get("RAC_REQUIRE_REDIS") == "1":
            pytest.fail(f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT}")
        pytest.skip(f"no Redis on {REDIS_HOST}:{REDIS_PORT} (start one, or run make test)")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
