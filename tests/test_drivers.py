"""What the load drivers report beside their throughput (loadtests/drivers.py): how the server's processes held
the connections, and how many batches of each size the server ran."""

from __future__ import annotations

import socket
import time

from loadtests.drivers import Spread, batch_sizes, spread
from loadtests.server import samples
from service.metrics import Metrics


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
