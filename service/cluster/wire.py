"""The shard calls' own transport: the ingress sends each search and gather to a shard process over a TCP
connection of its own, not as a Ray actor call.

Ray still places, starts, restarts and health-checks the shard processes and carries their control calls (a
version's load and release, the ping); only the per-batch data calls take this path, where an actor call cost
more than the search it carried (`python -m loadtests.ray_calls` times both: results/ray_calls.json).

A message is a header (how many out-of-band buffers, then the byte length of the pickle and of each buffer) and
a pickle (protocol 5) whose arrays travel out of band as buffers of their own: a batch's arrays are copied into
the socket and out of it, never into a pickle stream. The first bytes a connection sends are the listener's
token, which only a Ray call to the process gives (`ShardServer.address`): nothing is unpickled from a peer
that does not know it, and the port listens on the node's address only. One connection carries one call at a
time; a calling thread takes a free connection of the process's or opens one.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")
TOKEN_BYTES = 32
CONNECT_TIMEOUT_S = 5.0


class Address(NamedTuple):
    host: str
    port: int
    token: bytes


class Gone(ConnectionError):
    """The shard process could not be reached, or the connection broke during a call: the process is gone
    (or going); a call sent again goes to another."""


def send(sock: socket.socket, obj: object) -> None:
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"<{1 + len(raws)}Q", len(payload), *(r.nbytes for r in raws))
    sock.sendall(b"".join((_COUNT.pack(len(raws)), sizes, payload)))
    for raw in raws:
        sock.sendall(raw)


def receive(sock: socket.socket) -> Any:
    (count,) = _COUNT.unpack(_exactly(sock, _COUNT.size))
    sizes = struct.unpack(f"<{1 + count}Q", _exactly(sock, 8 * (1 + count)))
    payload = _exactly(sock, sizes[0])
    return pickle.loads(payload, buffers=[_exactly(sock, n) for n in sizes[1:]])


def _exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        read = sock.recv_into(view[got:])
        if not read:
            raise EOFError("the peer closed the connection")
        got += read
    return buf


class Listener:
    """Serves `target`'s methods named in `methods` to every connection that opens with the token, each
    connection in a thread of its own (a call's work releases the GIL: FAISS, numpy)."""

    def __init__(self, target: object, methods: Iterable[str], host: str):
        self.target, self.methods = target, frozenset(methods)
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = Address(host, self.sock.getsockname()[1], self.token)
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="shard-listener", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="shard-call", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.open.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not hmac.compare_digest(bytes(_exactly(conn, TOKEN_BYTES)), self.token):
                log.warning("a connection without the token: closed")
                return
            while True:
                method, args = receive(conn)
                self._reply(conn, method, args)
        except (OSError, EOFError):
            return  # the caller went away, or the listener closed
        except Exception as e:  # not a message of this protocol
            log.warning("a connection sent what is not a call (%s): closed", type(e).__name__)
        finally:
            with self.lock:
                self.open.discard(conn)
            conn.close()

    def _reply(self, conn: socket.socket, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in self.methods:
                raise ValueError(f"no such call: {method}")
            reply: tuple[bool, object] = (True, getattr(self.target, method)(*args))
        except Exception as e:  # the call's own error goes back to the caller, which raises it
            reply = (False, e)
        try:
            send(conn, reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # an answer or error that does not pickle
            send(conn, (False, RuntimeError(f"{method}: {type(reply[1]).__name__} could not be sent: {e}")))

    def close(self) -> None:
        """Stop listening and end every connection (a call under way is answered with a broken connection)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept(), which close() alone does not
        self.sock.close()
        with self.lock:
            for conn in self.open:
                with contextlib.suppress(OSError):  # closed on its side already
                    conn.shutdown(socket.SHUT_RDWR)


class Call:
    """A call sent on a connection: result() waits for its answer (or raises the shard's error, or Gone)."""

    def __init__(self, peer: Peer, sock: socket.socket):
        self.peer, self.sock = peer, sock

    def result(self) -> Any:
        try:
            ok, value = receive(self.sock)
        except (OSError, EOFError) as e:
            self.sock.close()
            raise Gone(f"{self.peer.address.host}:{self.peer.address.port}: {e}") from e
        self.peer.free(self.sock)
        if not ok:
            raise value
        return value


class Failed:
    """A call that could not be sent: result() raises why."""

    def __init__(self, error: Exception):
        self.error = error

    def result(self) -> Any:
        raise self.error


class Peer:
    """The calls to one shard process: its connections, each carrying one call at a time."""

    def __init__(self, address: Address, timeout_s: float | None):
        """timeout_s: how long a call may wait for its answer (None: as long as it takes)."""
        self.address, self.timeout_s = address, timeout_s
        self._free: list[socket.socket] = []
        self.lock = threading.Lock()

    def _connect(self) -> socket.socket:
        host, port, token = self.address
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
            sock.sendall(token)
        except OSError as e:
            raise Gone(f"{host}:{port}: {e}") from e
        return sock

    def send(self, method: str, args: tuple[Any, ...]) -> Call:
        """The call on a free connection (one kept open by an earlier call, else a new one)."""
        with self.lock:
            sock = self._free.pop() if self._free else None
        if sock is not None:
            try:
                send(sock, (method, args))
                return Call(self, sock)
            except OSError:
                sock.close()  # the process closed it since (or is gone): a new connection says which
        sock = self._connect()
        try:
            send(sock, (method, args))
        except OSError as e:
            sock.close()
            raise Gone(f"{self.address.host}:{self.address.port}: {e}") from e
        return Call(self, sock)

    def free(self, sock: socket.socket) -> None:
        with self.lock:
            self._free.append(sock)

    def close(self) -> None:
        with self.lock:
            socks, self._free = self._free, []
        for sock in socks:
            sock.close()
