"""What the load drivers report beside their throughput (loadtests/drivers.py): how the server's processes held
the connections, and how many batches of each size the server ran; and loadtests.protocols, which drives the
APIs side by side with them."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from loadtests import protocols
from loadtests.drivers import GRPC_LOAD, Spread, batch_sizes, spread
from loadtests.server import samples
from service.metrics import Metrics
from tests.helpers import unavailable


def test_spread_counts_the_connections_each_process_holds() -> None:
    """What the drivers report as connections_per_process: the established connections to the port, by the
    process that holds them (here this one holds 3), and nothing for a port nobody is connected to."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert spread(port) == []
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [listener.accept()[0] for _ in clients]
        try:
            assert spread(port) == [3]
            held = Spread(port, 0.0, 3)
            held.join(timeout=10)  # it stops by itself once it has read the connections
            assert held.counts == [3]
            fewer = Spread(port, 0.0, 4)  # one more than are open: it reads on until asked
            time.sleep(0.7)
            assert fewer.is_alive() and fewer.result() == [3]
        finally:
            for s in clients + accepted:
                s.close()


def test_batch_sizes_counts_the_batches_of_each_size_between_two_scrapes() -> None:
    """What the drivers report as batch_sizes: rac_batch_size's buckets between two scrapes, each batch counted
    once, in the bucket of its size."""
    metrics = Metrics()
    metrics.batch_size.observe(32)
    before = samples(metrics.exposition().decode())  # what scrape() reads from /metrics
    for size in (1, 1, 3, 4, 16, 17, 32, 200):
        metrics.batch_size.observe(size)
    assert batch_sizes(before, samples(metrics.exposition().decode())) == {"1": 2, "4": 2, "16": 1, "32": 2, "inf": 1}


@pytest.mark.slow
def test_protocols_compares_the_apis_round_by_round(quick_artifacts: Path, tmp_path: Path) -> None:
    """`python -m loadtests.protocols --classify` over a quick build: every API answered every request, and the
    ratios it keeps are those of the throughputs it measured in the same round."""
    if shutil.which("wrk") is None or not GRPC_LOAD.exists():
        why = "wrk or the native gRPC driver is missing (make wrk grpc-load, which make test runs)"
        unavailable(why, "RAC_REQUIRE_WRK")
    out = tmp_path / "protocols.json"
    args = ["--artifacts", str(quick_artifacts), "--classify", "--grpc-processes", "0", "--concurrency", "2"]
    protocols.main([*args, "--seconds", "1", "--json", str(out)])
    runs = json.loads(out.read_text())["rounds"][0]["this"]
    rate = {api: runs[api]["2"]["req_per_s"] for api in ("classify", "v2_http", "v2_grpc_p0")}
    assert all(r > 0 for r in rate.values())
    assert runs["classify"]["2"]["non_2xx"] == runs["v2_http"]["2"]["non_2xx"] == runs["v2_grpc_p0"]["2"]["non_ok"] == 0
    assert runs["rest_over_classify"]["2"] == pytest.approx(rate["v2_http"] / rate["classify"])
    assert runs["grpc_over_http"]["2"]["p0"] == pytest.approx(rate["v2_grpc_p0"] / rate["v2_http"])
