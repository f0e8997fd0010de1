"""serve(settings): the artifact directory over HTTP with uvicorn, as many processes as the settings say.

The settings (read once from RAC_* variables by the caller: `python -m service`, `rac serve`) are handed to
every server process as a Settings object, never through the environment. With several processes, each
loads the artifacts itself (the index and the value store are memory-mapped, so their pages are shared) and
the Prometheus metrics are summed across processes through files in a fresh directory made here for each
run and removed after it, so that no earlier run's counts are ever added in.

A process that refuses to start (artifacts that do not fit, a failed warm-up) makes the whole server exit
with a non-zero status within a second or so, with one process or several, so that systemd, Docker and
Kubernetes see it. SIGHUP to the main process (`docker kill -s HUP`, systemd's ExecReload, a Kubernetes
hook: they all signal the main process) makes every server process look at the serving root's `current`
link now; POST /admin/reload to any process does the same through it.

With several processes each listens on a socket of its own, bound to the server's address with SO_REUSEPORT,
and the kernel spreads new connections among the processes listening (a hash of each connection's addresses; a
process holding more than its share sends new ones on: service/spread.py). One socket shared by all would go
to whichever process wakes first: a burst of keep-alive connections, opened at once, could land nearly all on
one process for their whole life, leaving the other with small batches and idle time. A process starts
listening once it is ready, and its socket closes with it: connections it had not yet accepted when it died
are reset, and new ones go to the others until its replacement is ready. The supervisor holds the port bound
(not listening) meanwhile, so that a port in use fails the start at once and nobody else takes it; a server
process whose supervisor is gone stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from service.api.parking import ParkingProtocol
from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("uvicorn.error")
# prometheus_client decides, when it is imported, whether values live in files; it reads this variable for
# that, in each server process: the one environment variable set here, before any server process starts.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class AppFactory:
    """Builds the app in a server process from the settings it was bound to. Picklable: uvicorn's process
    launcher sends it to every process it starts (so no setting travels through the environment)."""

    def __init__(self, settings: Settings, metrics_dir: str | None = None, supervisor: int | None = None):
        """supervisor: the pid of the process that started this one, where there are several (a reload asked
        of one process reaches the others through it)."""
        self.settings, self.metrics_dir, self.supervisor = settings, metrics_dir, supervisor

    def __call__(self) -> FastAPI:
        from service.app import create_app  # the heavy imports happen in the server processes only

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # A SIGHUP before the app has started (its handler wakes the memory followers) would end the process.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return create_app(self.settings, self.metrics_dir, supervisor=self.supervisor)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not listening: it takes no connection until it
    listens (uvicorn's server does that once the app has started). One that cannot be bound (a port in use)
    ends the process with uvicorn's start-up failure status, the cause in the log."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        log.error("cannot bind %s:%s: %s", host, port, e)
        sys.exit(STARTUP_FAILURE)
    return sock


class Worker(Process):
    """A server process that listens on a socket of its own (the module says why), and stops when its
    supervisor is gone (killed, even with SIGKILL): nothing would restart, reload or stop it any more, and it
    would go on answering on the port beside the processes of a server started again there."""

    def always_pong(self) -> None:
        """Answers the supervisor's health checks. The pipe to it ends when the supervisor stops this process
        (it sends SIGTERM, then closes its end: the drain it started must not be cut short by a second one) or
        when the supervisor is gone: this process is then handed to another parent, and stops as on SIGTERM
        (readiness off, the requests in flight answered)."""
        try:
            super().always_pong()
        except (EOFError, OSError):
            while os.getppid() == self.supervisor_pid:  # the kernel closes a dying process's files, then reparents
                time.sleep(0.1)
            log.warning("the supervisor is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        # This process got both ends of the pipe (the launcher pickles the whole Process): with the
        # supervisor's end closed here, the pipe ends when the supervisor does.
        self.parent_conn.close()
        self.supervisor_pid = os.getppid()
        super().target([reuse_port_socket(self.config.host, self.config.port)])


class Supervisor(Multiprocess):
    """uvicorn's supervisor of the server processes, but: SIGHUP is passed on to every process that has
    started (a reload: they look at the memory root; uvicorn's own restarts them all); a process that exits
    is seen at once (uvicorn asks each process for a health answer and, for one that has just died, waits the
    whole health-check timeout); and when one refuses to start, the others are stopped at once, not left to
    finish loading. Each process binds its own socket (Worker)."""

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(Worker(self.config, []))
            self.processes[-1].start()

    def handle_hup(self) -> None:
        started = [p for p in self.processes if p.exitcode is None and _answer(p, 1.0) is True]
        log.info("SIGHUP: server processes %s look at the memory root now", [p.pid for p in started])
        for p in started:
            if p.pid is not None:
                os.kill(p.pid, signal.SIGHUP)

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.exitcode is None and _answer(process, self.config.timeout_worker_healthcheck) is not None:
                continue
            process.kill()  # hung, or gone
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # it would fail the same way again
                log.error("server process %s refused to start: stopping", process.pid)
                self.should_exit.set()
                return
            log.info("server process %s died: starting another", process.pid)
            self.processes[idx] = Worker(self.config, [])
            self.processes[idx].start()

    def join_all(self) -> None:
        """After a refusal to start the others are still loading: they get 2 s to stop, then are killed."""
        failed = any(p.exitcode == STARTUP_FAILURE for p in self.processes)
        for p in self.processes:
            p.process.join(2.0 if failed else None)
            if p.exitcode is None:
                p.kill()
                p.join()


def _answer(process: Process, timeout: float) -> bool | None:
    """The process's health answer (whether it has started serving), or None when it does not answer in time
    or exits meanwhile (its sentinel: the pipe to it stays open in this process, so no EOF would come)."""
    try:
        process.parent_conn.send(b"ping")
        ready = wait([process.parent_conn, process.process.sentinel], timeout)
        if process.parent_conn in ready:
            started: bool = process.parent_conn.recv()
            return started
    except (OSError, EOFError):
        pass
    return None


def serve(settings: Settings) -> int:
    """Serve until stopped. Returns the exit status: 3 (uvicorn's startup failure) when a process refused to
    start, else 0; a port that cannot be bound raises SystemExit(3), as uvicorn's own binding does."""
    workers = settings.processes
    settings = settings.model_copy(update={"workers": workers})  # each process sizes its encoder threads by it
    if workers == 1:
        os.environ.pop(METRICS_DIR_VARIABLE, None)
        server = uvicorn.Server(_config(AppFactory(settings), 1))
        server.run()  # a refusal raises SystemExit(3) out of here
        return 0 if server.started else STARTUP_FAILURE
    metrics_dir = os.environ[METRICS_DIR_VARIABLE] = tempfile.mkdtemp(prefix="rac-metrics-")
    try:
        config = _config(AppFactory(settings, metrics_dir, os.getpid()), workers)  # uvicorn's logging set up too
        with reuse_port_socket(config.host, config.port) as port:  # held, not listening, until the server stops
            config.port = port.getsockname()[1]  # RAC_PORT=0: the one port the kernel chose, for every process
            log.info("serving on http://%s:%s with %d processes", config.host, config.port, workers)
            supervisor = Supervisor(config, sockets=[])
            supervisor.run()  # returns, status unsaid, once a process failed to start or a signal came
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop(METRICS_DIR_VARIABLE, None)
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        log.error("server process %s refused to start: exiting", failed[0])
        return STARTUP_FAILURE
    return 0


def _config(factory: AppFactory, workers: int) -> uvicorn.Config:
    s = factory.settings
    return uvicorn.Config(
        factory,
        factory=True,
        host=s.host,
        port=s.port,
        workers=workers,
        backlog=s.backlog,
        access_log=False,
        # Neither X-Forwarded-* (client addresses are never used here) nor a Server header: work per request saved.
        proxy_headers=False,
        server_header=False,
        http=ParkingProtocol,  # keep-alive connections are not read while the process is full
        timeout_graceful_shutdown=int(s.shutdown_timeout_s),
        # The launcher kills a process that does not answer its ping in time and starts another: 5 s (the
        # default) is shorter than a start-up on a busy host (imports and checksums hold the interpreter),
        # which then never ends.
        timeout_worker_healthcheck=30,
    )
