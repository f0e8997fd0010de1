"""The shard calls' own transport (service/cluster/wire.py), without Ray: a shard called over its connection
answers exactly what it answers in process, from threads at once too; its errors arrive as themselves; a
connection without the token is closed before anything it sent is unpickled; a listener gone is Gone."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from models.memory.scale import SynthConfig, synth
from models.memory.shards import shard
from service.artifacts import read_manifest
from service.cluster.wire import TOKEN_BYTES, Gone, Listener, Peer, send
from service.memory.shards import Shard, StaleShard, merge, owners

K = 20
unpickled: list[int] = []


def seen(mark: int) -> None:
    unpickled.append(mark)


class Marker:
    """Unpickling it is seen: it calls `seen`."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return seen, (1,)


@pytest.fixture(scope="module")
def shards(synthetic_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Shard]:
    out = tmp_path_factory.mktemp("wire")
    synth(synthetic_artifacts, out / "memory", SynthConfig(size=5000, pq_above=10**9, chunk=4096, recall_queries=0))
    nprobe = read_manifest(out / "memory").index.nprobe
    return [Shard(d, nprobe) for d in shard(out / "memory", out / "sharded", 2)]


def queries(d: int, n: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_a_shard_over_its_connection_answers_as_in_process(shards: list[Shard]) -> None:
    """Search (probes, and every list) and gather through the listeners equal the shards' own answers, bit for
    bit, one call at a time and from 4 threads at once (each call on a connection of its own)."""
    listeners = [Listener(s, ("search", "gather"), "127.0.0.1") for s in shards]
    peers = [Peer(listener.address, 30.0) for listener in listeners]
    version = shards[0].info.memory_version
    d = shards[0].memory.dim

    def check(seed: int) -> None:
        z = queries(d, 16, seed)
        for every_list in (False, True):
            calls = [p.send("search", (z, K, every_list, None, version)) for p in peers]
            got = merge([c.result() for c in calls], K)
            want = merge([s.search(z, K, every_list, None, version) for s in shards], K)
            for a, b in ((got.sims, want.sims), (got.ids, want.ids), (got.values, want.values)):
                np.testing.assert_array_equal(a, b)
        ids = want.ids.ravel()
        owner = owners(ids, len(shards))
        for s, (p, held) in enumerate(zip(peers, shards, strict=True)):
            keys, values = p.send("gather", (ids[owner == s], True, True, version)).result()
            want_keys, want_values = held.gather(ids[owner == s], True, True, version)
            np.testing.assert_array_equal(keys, want_keys)
            np.testing.assert_array_equal(values, want_values)

    check(0)
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            for i in range(5):
                check(100 * seed + i)
        except BaseException as e:  # the assertion, seen by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(peers[0]._free) >= 2  # the threads' calls overlapped, on connections of their own
    for listener in listeners:
        listener.close()


def test_a_shards_errors_arrive_as_themselves_and_a_closed_listener_is_gone(shards: list[Shard]) -> None:
    listener = Listener(shards[0], ("search",), "127.0.0.1")
    peer = Peer(listener.address, 30.0)
    z = queries(shards[0].memory.dim, 2, 1)
    with pytest.raises(StaleShard, match="not another-version"):
        peer.send("search", (z, K, False, None, "another-version")).result()
    with pytest.raises(ValueError, match="no such call: gather"):  # only the methods named are served
        peer.send("gather", (np.arange(2), True, True, None)).result()
    assert peer.send("search", (z, K, False, None, None)).result().ids.shape == (2, K)  # the connection still serves
    listener.close()
    with pytest.raises(Gone):
        peer.send("search", (z, K, False, None, None)).result()
    with pytest.raises(Gone):  # nobody listens there any more
        peer.send("search", (z, K, False, None, None)).result()


def test_a_connection_without_the_token_is_closed_before_anything_is_unpickled(shards: list[Shard]) -> None:
    listener = Listener(shards[0], ("search",), "127.0.0.1")
    host, port, token = listener.address
    for opening, seen in ((b"x" * TOKEN_BYTES, []), (token, [1])):
        unpickled.clear()
        with socket.create_connection((host, port), timeout=10) as sock:
            try:
                sock.sendall(opening)
                send(sock, ("search", (Marker(),)))
                sock.shutdown(socket.SHUT_WR)
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
            except OSError:  # reset: closed with what was sent unread (at any step, by how fast the listener is)
                answer = b""
        assert unpickled == seen
        assert bool(answer) == bool(seen)  # the token's connection gets an answer (an error: no such query)
    listener.close()
