"""The Docker engine and CLIs that deploy/check.py drives: commands run from the repository root, the compose
project's files and environment, the engine started (../shared/docker/standins.sh where it exists) and stopped,
and the CPU torch wheel put where the image build finds it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from deploy.requirements import lists

ROOT = Path(__file__).resolve().parent.parent
STANDINS = ROOT.parent / "shared" / "docker" / "standins.sh"
PROJECT = "raccheck"
COMPOSE_FILES = ("--env-file", "deploy/local.env", "-f", "docker-compose.yml", "-f", "deploy/compose.local.yml")

T0 = time.monotonic()
T = TypeVar("T")


class StepError(Exception):
    """A step that later checks depend on failed; the message says what and shows the command's output."""


def step(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def docker_cli() -> str:  # the 20.10 CLI where standins.sh installed it; a newer one earlier on PATH wants buildx
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"


def compose_cli() -> list[str]:
    legacy = "/usr/bin/docker-compose" if Path("/usr/bin/docker-compose").exists() else shutil.which("docker-compose")
    return [legacy] if legacy else [docker_cli(), "compose"]


def sh(*cmd: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True) -> str:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        out = "\n".join((p.stdout + p.stderr).splitlines()[-40:])
        raise StepError(f"`{' '.join(cmd)}` exited {p.returncode}:\n{out}")
    return p.stdout


def docker(*args: str, **kw: Any) -> str:
    return sh(docker_cli(), *args, **kw)


COMPOSE_ENV: dict[str, str] = {"RAC_BUILD_ARGS": "--quick"}  # the keys files join it once made


def compose(*args: str, timeout: float = 600) -> str:
    env = os.environ | COMPOSE_ENV
    return sh(*compose_cli(), "-p", PROJECT, *COMPOSE_FILES, *args, env=env, timeout=timeout)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 1.0) -> T:
    end = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if value is not None:
                return value
        except (httpx.HTTPError, subprocess.SubprocessError, StepError, KeyError, ValueError):
            pass
        if time.monotonic() > end:
            raise StepError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


# ---------------------------------------------------------------- the engine and the images


def engine_answers() -> bool:
    try:
        return subprocess.run([docker_cli(), "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start_engine() -> bool | None:
    """Make an engine answer. Returns whether this call started it, or None where none can be had."""
    was_up = engine_answers()
    if STANDINS.exists():
        step(f"engine: {STANDINS.resolve()} (installs and starts dockerd, builds the stand-in base images)")
        p = subprocess.run(["bash", str(STANDINS)], capture_output=True, text=True, timeout=900)
        print("\n".join(f"          {line}" for line in (p.stdout + p.stderr).strip().splitlines()[-3:]))
    if not engine_answers():
        return None
    return not was_up


def stop_engine() -> None:
    pid = int(Path("/var/run/docker.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for("dockerd to exit", lambda: True if not Path(f"/proc/{pid}").exists() else None, 60)


def torch_wheel() -> str:
    """Put the pinned CPU torch wheel into deploy/wheels/ where this machine has one (pip's find-links); never
    download one: elsewhere the build takes torch from PyTorch's CPU index instead."""
    (req,) = lists(ROOT / "pyproject.toml", "cpu")["torch"]
    wheels = ROOT / "deploy" / "wheels"
    version = req.partition("==")[2]
    if have := sorted(wheels.glob(f"torch-{version}+cpu-*.whl")):
        return f"{have[0].name} already there"
    pip = [sys.executable, "-m", "pip", "download", req, "--no-deps", "--no-index", "-d", str(wheels)]
    subprocess.run(pip, capture_output=True, timeout=300)
    for w in wheels.glob("torch-*.whl"):
        if "+cpu" not in w.name:
            w.unlink()  # a CUDA build must never reach the CPU image
    have = sorted(wheels.glob(f"torch-{version}+cpu-*.whl"))
    return f"copied {have[0].name}" if have else "no local CPU wheel: the build uses PyTorch's CPU index"
