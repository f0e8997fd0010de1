"""The HTTP/2 server of gRPC's unary calls (service/v2/http2.py), on its own, against grpcio's client: answers,
status codes, deadlines, flow control both ways, many calls on one connection; raw frames for what a client
library never sends; and the kept header blocks against HPACK decoded afresh."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import hpack
import pytest

from loadtests.server import free_port
from service.v2 import frames as h2
from service.v2.http2 import Connection, Server

LIMIT = 6 << 20  # the largest message the test server reads
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class Served:
    def __init__(self, port: int) -> None:
        self.port, self.started, self.cancelled = port, threading.Event(), threading.Event()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """A server on its own event loop in a thread: Echo answers its message reversed, Fail a status, Meta the
    caller's `authorization`, Slow never (it records being cancelled)."""
    s = Served(free_port())
    loop = asyncio.new_event_loop()

    async def echo(message: bytes, metadata: dict[str, str]) -> bytes:
        return message[::-1]

    async def fail(message: bytes, metadata: dict[str, str]) -> bytes:
        raise h2.Status(h2.INVALID_ARGUMENT, f"naïve 100% wrong: {message.decode()}")

    async def meta(message: bytes, metadata: dict[str, str]) -> bytes:
        return metadata.get("authorization", "").encode()

    async def slow(message: bytes, metadata: dict[str, str]) -> bytes:
        s.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            s.cancelled.set()
            raise
        return b""

    handlers = {"/t.T/Echo": echo, "/t.T/Fail": fail, "/t.T/Meta": meta, "/t.T/Slow": slow}
    server = Server(handlers, LIMIT)  # type: ignore[arg-type]
    loop.run_until_complete(server.start("127.0.0.1", s.port, reuse_port=False))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield s
    asyncio.run_coroutine_threadsafe(server.stop(1), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def channel(s: Served) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{s.port}", options=UNLIMITED)


def test_answers_statuses_and_metadata(served: Served) -> None:
    with channel(served) as c:
        assert c.unary_unary("/t.T/Echo")(b"hello", timeout=10) == b"olleh"
        assert c.unary_unary("/t.T/Echo")(b"", timeout=10) == b""
        assert c.unary_unary("/t.T/Meta")(b"", metadata=[("authorization", "Bearer k")], timeout=10) == b"Bearer k"
        with pytest.raises(grpc.RpcError) as e:
            c.unary_unary("/t.T/Fail")(b"x", timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "naïve 100% wrong: x"
        with pytest.raises(grpc.RpcError) as e:
            c.unary_unary("/t.T/Nope")(b"x", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/t.T/Nope" in (e.value.details() or "")


def test_messages_larger_than_every_window_go_both_ways(served: Served) -> None:
    """A message of 5 MiB in and out: past the stream and connection windows this server gives (1 MiB) and the
    client's, so both sides wait for WINDOW_UPDATEs; the answer is the exact bytes."""
    message = random.Random(1).randbytes(5 << 20)
    with channel(served) as c:
        assert c.unary_unary("/t.T/Echo")(message, timeout=30) == message[::-1]
        with pytest.raises(grpc.RpcError) as e:
            c.unary_unary("/t.T/Echo")(message + message, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in (e.value.details() or "")
        assert c.unary_unary("/t.T/Echo")(b"after", timeout=10) == b"retfa"  # the connection is still good


def test_many_calls_at_once_on_one_connection(served: Served) -> None:
    """200 calls in flight on one channel (one connection), messages of every size up to 200 KB: each gets
    its own answer."""
    rng = random.Random(2)
    messages = [rng.randbytes(rng.randrange(0, 200_000)) for _ in range(200)]
    with channel(served) as c, ThreadPoolExecutor(32) as pool:
        echo = c.unary_unary("/t.T/Echo")
        answers = list(pool.map(lambda m: echo(m, timeout=60), messages))
    assert answers == [m[::-1] for m in messages]


def test_a_deadline_cancels_the_handler(served: Served) -> None:
    served.cancelled.clear()
    with channel(served) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.unary_unary("/t.T/Slow")(b"", timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert served.cancelled.wait(5)  # the server gave up too: the work does not run on for nobody
        served.started.clear()
        served.cancelled.clear()
        future = c.unary_unary("/t.T/Slow").future(b"", timeout=30)
        assert served.started.wait(5)
        future.cancel()  # the client resets the stream
        assert served.cancelled.wait(5)


def read_frames(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Frames (type, flags, stream, payload) until the server closes the connection or goes quiet."""
    sock.settimeout(2)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    frames, pos = [], 0
    while len(data) - pos >= 9:
        head, flags, stream = h2.FRAME_HEAD.unpack_from(data, pos)
        frames.append((head & 0xFF, flags, stream, data[pos + 9 : pos + 9 + (head >> 8)]))
        pos += 9 + (head >> 8)
    return frames


@pytest.mark.parametrize(
    "sent, code",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h2.PROTOCOL_ERROR),  # not HTTP/2
        (h2.PREFACE + struct.pack(">IBI", 20_000 << 8 | h2.DATA, 0, 1), h2.FRAME_SIZE_ERROR),  # a frame too large
        (h2.PREFACE + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\x7f"), h2.COMPRESSION_ERROR),
        (h2.PREFACE + h2.frame(h2.DATA, 0, 3, b"x"), h2.PROTOCOL_ERROR),  # DATA on a stream never opened
        (h2.PREFACE + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.PADDED, 1, b"\x05abc"), h2.PROTOCOL_ERROR),  # padding
    ],
)
def test_a_peer_that_breaks_the_protocol_gets_goaway(served: Served, sent: bytes, code: int) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(sent)
        frames = read_frames(sock)
    goaway = [f for f in frames if f[0] == h2.GOAWAY]
    assert goaway and struct.unpack(">II", goaway[-1][3][:8])[1] == code


def test_padded_frames_are_read_without_their_padding(served: Served) -> None:
    """HEADERS and DATA with padding (grpc clients send none, the protocol allows it): the call is answered as
    without."""
    block = hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"), ("content-type", "application/grpc")]
    )
    message = b"\x00" + (5).to_bytes(4, "big") + b"hello"
    sent = h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
    sent += h2.frame(h2.HEADERS, h2.END_HEADERS | h2.PADDED, 1, b"\x03" + block + b"pad")
    sent += h2.frame(h2.DATA, h2.END_STREAM | h2.PADDED, 1, b"\x02" + message + b"pp")
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(sent)
        frames = read_frames(sock)
    assert [f[3] for f in frames if f[0] == h2.DATA and f[2] == 1] == [b"\x00" + (5).to_bytes(4, "big") + b"olleh"]


def test_ping_is_answered_and_settings_acknowledged(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0) + h2.frame(h2.PING, 0, 0, b"12345678"))
        frames = read_frames(sock)
    assert (h2.PING, h2.ACK, 0, b"12345678") in frames
    assert (h2.SETTINGS, h2.ACK, 0, b"") in frames


def test_messages_arriving_on_one_connection_hold_at_most_one_message(served: Served) -> None:
    """Three calls whose messages arrive in part, side by side, on one connection: the one whose bytes would take
    what the connection holds past one message's worth is refused (RESOURCE_EXHAUSTED, then RST_STREAM), while
    the first two go on; nothing waits for the client to finish."""
    encoder, part = hpack.Encoder(), 2_500_000  # three parts: more than LIMIT (6 MiB) held at once
    head = [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Echo"), ("content-type", "application/grpc")]
    sent = [h2.PREFACE, h2.frame(h2.SETTINGS, 0, 0)]
    for sid in (1, 3, 5):
        sent.append(h2.frame(h2.HEADERS, h2.END_HEADERS, sid, encoder.encode(head)))
        message = b"\x00" + (3_000_000).to_bytes(4, "big") + bytes(part - 5)  # 3 MB declared, 2.5 MB sent
        sent += [h2.frame(h2.DATA, 0, sid, message[i : i + h2.MAX_FRAME]) for i in range(0, part, h2.MAX_FRAME)]
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"".join(sent))
        frames = read_frames(sock)
    decoder = hpack.Decoder()
    answered = {
        f[2]: {bytes(k).decode(): bytes(v).decode() for k, v in decoder.decode(f[3], raw=True)}
        for f in frames
        if f[0] == h2.HEADERS
    }
    assert list(answered) == [5] and answered[5]["grpc-status"] == str(h2.RESOURCE_EXHAUSTED)
    assert "arriving" in answered[5]["grpc-message"]
    assert (h2.RST_STREAM, 0, 5, struct.pack(">I", h2.NO_ERROR)) in frames
    assert not [f for f in frames if f[0] == h2.GOAWAY]


def test_kept_header_blocks_decode_as_hpack_does() -> None:
    """Blocks of table references alone are kept decoded; the table they refer to changes whenever a block adds
    to it. 3,000 blocks from hpack's encoder over header sets that repeat, change and grow the table past its
    size: each decodes as a fresh decoder that has seen the same blocks decodes it."""
    rng = random.Random(3)
    encoder, reference = hpack.Encoder(), hpack.Decoder()
    connection = Connection(Server({}, LIMIT))
    paths = [f"/s.S/M{i}" for i in range(6)]
    kept = 0
    for _ in range(3000):
        headers = [(":method", "POST"), (":path", rng.choice(paths)), ("content-type", "application/grpc")]
        if rng.random() < 0.3:
            headers.append(("authorization", f"Bearer {rng.randrange(40)}"))
        if rng.random() < 0.1:
            headers.append(("x-padding", "p" * rng.randrange(100, 900)))  # evicts older entries
        block = encoder.encode(headers)
        want = {k.decode(): v.decode() for k, v in reference.decode(block, raw=True)}
        decoded = connection.indexed.get(block)  # as Connection.call reads a block
        kept += decoded is not None
        assert (decoded if decoded is not None else connection.decode(block)) == want
    assert kept > 300  # the kept blocks were used, after the table had changed many times


def test_the_server_answers_deadline_exceeded_when_a_calls_timeout_passes(served: Served) -> None:
    """A call whose grpc-timeout passes while its handler runs: the handler is cancelled, and the server itself
    answers DEADLINE_EXCEEDED in trailers (a client that kept waiting learns it from the server)."""
    served.cancelled.clear()
    head = [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Slow"), ("content-type", "application/grpc")]
    sent = h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
    sent += h2.frame(h2.HEADERS, h2.END_HEADERS, 1, hpack.Encoder().encode([*head, ("grpc-timeout", "200m")]))
    sent += h2.frame(h2.DATA, h2.END_STREAM, 1, b"\x00" + (0).to_bytes(4, "big"))
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(sent)
        frames = read_frames(sock)
    blocks = [hpack.Decoder().decode(f[3], raw=True) for f in frames if f[0] == h2.HEADERS and f[2] == 1]
    fields = {bytes(k).decode(): bytes(v).decode() for block in blocks for k, v in block}
    assert fields["grpc-status"] == str(h2.DEADLINE_EXCEEDED)
    assert served.cancelled.is_set()


def test_timeouts_read_as_grpc_writes_them() -> None:
    assert h2.timeout("100m") == pytest.approx(0.1) and h2.timeout("2S") == 2.0 and h2.timeout("1H") == 3600.0
    assert h2.timeout("99999999u") == pytest.approx(99.999999)
    for bad in (None, "", "S", "5", "5x", "-5S", "²S", "123456789S", " 5S"):
        assert h2.timeout(bad) is None, bad
