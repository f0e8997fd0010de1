"""Shared fixtures: synthetic and real artifact directories, a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium
from tests.helpers import REDIS_HOST, REDIS_PORT, ROOT, redis_up, unavailable
from tests.synthetic import make_artifacts

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
        [sys.executable, "-m", "rac.cli", "build", "--quick", "--out", str(out), "--cache", str(cache)],
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
            "rac.cli",
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless (tests/browser.py)."""
    yield from chromium()


@pytest.fixture
def redis_url() -> str:
    """The machine's real Redis. CI (RAC_REQUIRE_REDIS=1) fails rather than skips when it is not up."""
    if not redis_up():
        unavailable(f"no Redis on {REDIS_HOST}:{REDIS_PORT} (start one, or run make test)", "RAC_REQUIRE_REDIS")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
