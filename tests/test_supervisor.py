"""The supervisor of several server processes, as real processes: SIGHUP to it (what docker kill -s HUP,
systemd's ExecReload and Kubernetes send to the main process) makes every server process look at the memory
root, without restarting any; POST /admin/reload to one process reaches them all; a SIGHUP with a plain
artifact directory changes nothing; a server whose processes refuse to start exits at once; connections opened
at once are spread over the processes; a port in use fails the start; a process that dies leaves the port to
the others; the processes stop when the supervisor is killed."""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from loadtests.server import free_port
from models.memory import ops
from service.artifacts import ITEMS, VALUES, read_manifest
from tests.helpers import rows, tampered, wait_until
from tests.processes import ROOT, environ, server

pytestmark = pytest.mark.slow
TOKEN = "s3cret"


@pytest.fixture
def root(synthetic_artifacts: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """ROOT/current -> the synthetic memory; v2 and v3 beside it (fewer items each), not yet published."""
    root = tmp_path / "root"
    ops.publish(synthetic_artifacts, root)
    versions = []
    for name, label in (("v2", 0), ("v3", 1)):
        ids = tmp_path / f"{name}.txt"
        ids.write_text("\n".join(str(r[0]) for r in rows(synthetic_artifacts / ITEMS) if r[3] == label))
        ops.remove(synthetic_artifacts, root / name, ids_file=ids)
        versions.append(root / name)
    return root, versions


def workers(proc: subprocess.Popen[str]) -> set[int]:
    """The server processes under the supervisor (not multiprocessing's resource tracker)."""
    children = psutil.Process(proc.pid).children()
    return {c.pid for c in children if "resource_tracker" not in " ".join(c.cmdline())}


def served(url: str, pids: set[int], version: str) -> bool:
    """Whether every one of `pids` says it serves `version`, asking /info on new connections (the kernel
    hands each to one process or the other) until each has answered."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while set(seen) != pids and time.monotonic() < deadline:
        memory = httpx.get(f"{url}/info", timeout=5).json()["memory"]
        seen[memory["pid"]] = memory["version"]
    assert set(seen) == pids, f"only {set(seen)} of {pids} answered"
    return set(seen.values()) == {version}


def test_sighup_to_the_supervisor_reloads_every_server_process(root: tuple[Path, list[Path]]) -> None:
    path, (v2, v3) = root
    env = {"RAC_WORKERS": "2", "RAC_MEMORY_POLL_S": "3600", "RAC_ADMIN_TOKEN": TOKEN}  # no polling: signals only
    with server(path, **env) as (proc, url):
        wait_until(lambda: len(workers(proc)) == 2, 10, "two server processes")
        pids = workers(proc)
        ops.publish(v2, path)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: served(url, pids, read_manifest(v2).memory_version), 30, "v2 in every process")
        assert workers(proc) == pids  # reloaded, not restarted

        ops.publish(v3, path)
        r = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200 and r.json()["all_processes"] is True
        wait_until(lambda: served(url, pids, read_manifest(v3).memory_version), 30, "v3 in every process")
        assert workers(proc) == pids and proc.poll() is None


def test_sighup_with_an_artifact_directory_changes_nothing(synthetic_artifacts: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with server(synthetic_artifacts, log, RAC_WORKERS="2") as (proc, url):
        wait_until(lambda: len(workers(proc)) == 2, 10, "two server processes")
        pids = workers(proc)
        assert served(url, pids, read_manifest(synthetic_artifacts).memory_version)  # both have started
        for pid in [proc.pid, *pids]:  # the supervisor (which passes it on), and each server process directly
            psutil.Process(pid).send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text().count("nothing to reload") == 4, 10, "each process to see two")
        assert workers(proc) == pids and proc.poll() is None  # not restarted (uvicorn's SIGHUP), not killed
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize("workers_", ["1", "2"])
def test_a_server_that_refuses_to_start_exits_within_seconds(
    synthetic_artifacts: Path, tmp_path: Path, workers_: str
) -> None:
    """Time from the refusal in the log to the exit: uvicorn's supervisor took a 30 s health-check timeout."""
    bad = tampered(synthetic_artifacts, tmp_path / "bad", file=VALUES)
    cmd = [sys.executable, "-m", "service"]
    env = environ(bad, free_port(), RAC_WORKERS=workers_)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    refused = None
    for line in proc.stderr:
        if refused is None and "refusing to start" in line:
            refused = time.monotonic()
    proc.wait(30)
    assert refused is not None, "no refusal in the log"
    assert proc.returncode != 0
    assert time.monotonic() - refused < 5


def burst(port: int, n: int) -> list[http.client.HTTPConnection]:
    """n connections opened at once, as a load generator's or a proxy's pool opens them: every handshake on
    its way before any has completed."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    connections = []
    for s in socks:
        select.select([], [s], [], 10)
        s.setblocking(True)
        s.settimeout(10)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.sock = s
        connections.append(c)
    return connections


def answering(connections: list[http.client.HTTPConnection]) -> list[int]:
    """The server process behind each connection (each asks /info once)."""
    pids = []
    for c in connections:
        c.request("GET", "/info")
        pids.append(json.loads(c.getresponse().read())["memory"]["pid"])
    return pids


def test_connections_opened_at_once_are_spread_over_the_processes(synthetic_artifacts: Path) -> None:
    """Each process listens on a socket of its own: one socket shared by all could hand a burst of keep-alive
    connections to whichever process woke first, for the connections' whole life."""
    with server(synthetic_artifacts, RAC_WORKERS="2") as (proc, url):
        wait_until(lambda: len(workers(proc)) == 2, 10, "two server processes")
        pids = workers(proc)
        assert served(url, pids, read_manifest(synthetic_artifacts).memory_version)  # both listen
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            connections = burst(port, 64)
            counts = {pid: answering(connections).count(pid) for pid in pids}
            for c in connections:
                c.close()
            assert min(counts.values()) >= 16, counts  # a hash of 64 connections: 32 +- 4 each


def test_a_port_in_use_fails_the_start_naming_it(synthetic_artifacts: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = environ(synthetic_artifacts, port, RAC_WORKERS="2")
        done = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr


def test_a_process_that_dies_leaves_the_port_to_the_others(synthetic_artifacts: Path) -> None:
    """Its socket closes with it: new connections go to the process still serving, none to the dead one's
    socket, until its replacement is ready and listens."""
    with server(synthetic_artifacts, RAC_WORKERS="2") as (proc, url):
        wait_until(lambda: len(workers(proc)) == 2, 10, "two server processes")
        pids = workers(proc)
        assert served(url, pids, read_manifest(synthetic_artifacts).memory_version)
        dead, alive = sorted(pids)
        psutil.Process(dead).kill()
        psutil.Process(dead).wait(10)
        for _ in range(32):  # new connections each: all answered, by the survivor (or the replacement once ready)
            r = httpx.get(f"{url}/info", timeout=10)
            assert r.status_code == 200 and r.json()["memory"]["pid"] != dead
        wait_until(lambda: len(workers(proc)) == 2 and alive in workers(proc), 30, "a replacement")


def test_the_server_processes_stop_when_the_supervisor_is_killed(synthetic_artifacts: Path) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) takes its server processes with it: left running,
    they would go on answering on the port beside those of a server started again there."""
    with server(synthetic_artifacts, RAC_WORKERS="2") as (proc, url):
        wait_until(lambda: len(workers(proc)) == 2, 10, "two server processes")
        pids = workers(proc)
        assert served(url, pids, read_manifest(synthetic_artifacts).memory_version)
        proc.kill()
        proc.wait(10)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in pids], timeout=20)
        assert not alive, f"still running: {[p.pid for p in alive]}"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
