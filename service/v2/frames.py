"""HTTP/2's frames (RFC 9113) and gRPC's use of them: the constants, the frames and header blocks this
service writes, the parts of a call's headers it reads, and a call's state (service/v2/http2.py serves them).

Header blocks are written without HPACK's dynamic table (every field a literal or a static-table reference),
so writing one needs no state shared with the peer.
"""

from __future__ import annotations

import asyncio
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, COMPRESSION_ERROR = 0x7, 0x9
HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 1, 3, 4, 5, 6

MAX_STREAMS = 256  # calls at once on one connection; admission bounds what the process takes on
WINDOW = 1 << 20  # bytes a stream, and the connection, may send before they are read: replenished as they are
MAX_FRAME = 1 << 14  # the protocol's default: the largest frame this server reads
MAX_HEADER_BLOCK = 1 << 16  # bytes of one header block, and of its decoded list
MAX_WINDOW = (1 << 31) - 1  # the largest flow-control window (RFC 9113 6.9.1)
STREAM_ID = (1 << 31) - 1  # a stream id's bits (31), and the largest id, which a graceful GOAWAY names
INDEXED = bytes(range(0x80, 0xFF))  # a byte of these alone is an "indexed header field" (RFC 7541 6.1)
FRAME_HEAD = struct.Struct(">IBI")  # length (24 bits) and type in one word, flags, stream id
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

# gRPC status codes (google.rpc.Code) this module answers itself
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 3, 4, 8, 12, 13


class Status(Exception):
    """A call's answer other than OK: a gRPC status code and its message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY and this error code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream) + payload


def unpadded(payload: bytes, kind: str) -> bytes:
    """A padded frame's payload without its pad length byte and padding (RFC 9113 6.1, 6.2)."""
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, f"a malformed padded {kind}")
    return payload[1 : len(payload) - payload[0]]


def _integer(value: int, prefix: int) -> bytes:
    """HPACK's integer with an N-bit prefix (RFC 7541 5.1), the prefix's other bits zero."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name, no Huffman coding (RFC 7541 6.2.2)."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


def percent(message: str) -> bytes:
    """grpc-message's encoding: printable ASCII but '%' as is, every other byte of the UTF-8 as %XX."""
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode("utf-8"))


RESPONSE = b"\x88" + b"\x0f\x10" + _integer(16, 7) + b"application/grpc"  # :status 200, content-type (index 31)
TRAILERS_OK = literal(b"grpc-status", b"0")


def trailers(code: int, message: str) -> bytes:
    return literal(b"grpc-status", b"%d" % code) + (literal(b"grpc-message", percent(message)) if message else b"")


def timeout(value: str | None) -> float | None:
    """grpc-timeout ("100m", "5S", ...) in seconds; None where absent or not a timeout."""
    if not value or value[-1] not in TIMEOUT_UNITS:
        return None
    digits = value[:-1]  # at most 8 ASCII digits
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 8:
        return None
    return int(digits) * TIMEOUT_UNITS[value[-1]]


# What this server says first: its settings, and the connection's window raised to WINDOW.
OPENING = frame(
    SETTINGS,
    0,
    0,
    struct.pack(
        ">HIHIHI",
        MAX_CONCURRENT_STREAMS,
        MAX_STREAMS,
        INITIAL_WINDOW_SIZE,
        WINDOW,
        MAX_HEADER_LIST_SIZE,
        MAX_HEADER_BLOCK,
    ),
) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW - 65535))


class Stream:
    """One call: its headers, its message as it arrives, and what of the answer waits for window."""

    __slots__ = (
        "body",
        "deadline",
        "ended",
        "expired",
        "id",
        "metadata",
        "path",
        "pending",
        "received",
        "sent",
        "task",
        "window",
    )

    def __init__(self, id: int, path: str, metadata: dict[str, str], window: int):
        self.id, self.path, self.metadata = id, path, metadata
        self.deadline = timeout(metadata.get("grpc-timeout"))
        self.body = bytearray()
        self.received = 0  # bytes read since the last WINDOW_UPDATE sent for this stream
        self.window = window  # bytes of the answer the peer still lets this stream send
        self.task: asyncio.Task[None] | None = None
        self.pending = b""  # the answer's DATA (prefixed message) while some of it waits for window
        self.sent = 0  # bytes of it sent
        self.ended = False  # the peer's side is closed (END_STREAM)
        self.expired = False  # its deadline passed: its task was cancelled for it

    def expire(self) -> None:
        """Its deadline passed: its task is cancelled, and answers DEADLINE_EXCEEDED."""
        if self.task is not None and not self.task.done():
            self.expired = True
            self.task.cancel()
