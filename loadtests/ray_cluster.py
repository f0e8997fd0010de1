"""A local Ray cluster of two nodes on this machine (a head and a worker, one logical CPU each), with the service
deployed on it from a Serve config file, for the Ray tests and benchmark. Needs the `ray` extra.

Everything the cluster starts inherits a marker variable naming its private temp dir; stop() ends exactly the
processes that carry it (never `ray stop`, which would end every Ray process on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from loadtests.server import ROOT, free_port

CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
MARKER = "RAC_RAY_CLUSTER"
BIN = Path(sys.executable).parent
DEPLOY_S = 180  # a deployment's replicas started, the artifacts loaded and warmed up


class LocalCluster:
    def __init__(self, env: dict[str, str] | None = None, root: Path = ROOT) -> None:
        """env: more environment for every Ray process (e.g. Serve's RAY_SERVE_* switches). root: the checkout of
        this project whose code the cluster runs (Ray puts the directory it is started from first on its
        workers' path, before PYTHONPATH: both are root)."""
        self.root = root
        # A short path: Ray's unix sockets live under it (at most 107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="rac-ray-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAC_") and k != "REDIS_URL"}
        self.env |= {MARKER: self.temp_dir, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": self.address}
        # A loopback cluster of its own, with no token: one in ~/.ray (a local `ray.init()` leaves one) would
        # otherwise fail the worker node's join with an authentication error.
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env |= env or {}
        if root != ROOT:
            self.env["PYTHONPATH"] = str(root)

    def _ray(self, *args: str) -> None:
        subprocess.run([str(BIN / "ray"), *args], cwd=self.root, env=self.env, check=True, capture_output=True)

    def start(self) -> None:
        # (Ray 2.60 replaces a loopback node address by the host's own: the nodes talk to each other at that address,
        # which the kernel delivers inside this machine.)
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        self._ray(
            "start",
            "--head",
            "--port",
            str(self.port),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(free_port()),
            "--ray-client-server-port",
            str(free_port()),
            "--temp-dir",
            self.temp_dir,
            *common,
        )
        self._ray("start", "--address", self.address, *common)

    def deploy(self, shards_dir: Path, http_port: int, **args: Any) -> str:
        """deploy/ray/serve.yaml with this shard directory, the HTTP proxy on 127.0.0.1:http_port (the head's
        only) and `args` over its application args (`settings` over its settings); `serve run --non-blocking`
        it and wait until /readyz answers. Returns the URL."""
        config = yaml.safe_load(CONFIG.read_text())
        config["http_options"] |= {"host": "127.0.0.1", "port": http_port}
        # One proxy, on the head: the two nodes share this machine's address, so a proxy per node would contend
        # for one port (HAProxy's on the second node fails to bind it, and Serve starts it again and again: a
        # Python process start each time, on the cores being measured). A real cluster's nodes each have theirs.
        config["proxy_location"] = "HeadOnly"
        app = config["applications"][0]["args"]
        app["settings"] = (app.get("settings") or {}) | args.pop("settings", {})
        app |= {"shards_dir": str(shards_dir), **args}
        path = Path(self.temp_dir) / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run(
            [str(BIN / "serve"), "run", "--non-blocking", str(path)],
            cwd=self.root,
            env=self.env,
            check=True,
            capture_output=True,
        )
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + DEPLOY_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the Ray application did not answer /readyz in {DEPLOY_S} s (logs: {self.temp_dir})")

    def processes(self) -> list[psutil.Process]:
        """The processes this cluster started (raylets, GCS, agents, replicas, ...): those carrying the marker,
        and those with a file open under the temp dir (an agent's retitled process hides its environment)."""
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():  # a driver connected from this process opens files there too
                continue
            try:
                if p.environ().get(MARKER) == self.temp_dir or any(
                    f.path.startswith(self.temp_dir + "/") for f in p.open_files()
                ):
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out

    def replicas(self, deployment: str) -> list[psutil.Process]:
        """The live replica processes of one deployment of the `rac` application."""
        name = f"ray::ServeReplica:rac:{deployment}"
        return self._live(lambda p: " ".join(p.cmdline()).startswith(name))

    def shard_processes(self, shard: int) -> list[psutil.Process]:
        """The live processes holding shard number `shard` (one for each replica of its deployment)."""
        return self._live(lambda p: p.environ().get("RAC_SHARD") == str(shard))

    def _live(self, match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
        """This cluster's processes, not zombies, that `match` (a process gone meanwhile is left out)."""
        found = []
        for p in self.processes():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and match(p):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to every process carrying the marker; again while any is left (a raylet
        restarts an agent that ends before it does)."""
        for _ in range(5):
            procs = self.processes()
            if not procs:
                return
            for p in procs:
                with suppress(psutil.Error):
                    p.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=5)
            for p in alive:
                with suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)


@contextmanager
def ray_cluster(env: dict[str, str] | None = None, root: Path = ROOT) -> Iterator[LocalCluster]:
    cluster = LocalCluster(env, root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
