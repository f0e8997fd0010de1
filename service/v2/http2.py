"""gRPC's unary calls over HTTP/2 without TLS (h2c with prior knowledge, what a gRPC client speaks to an insecure
port), served on the process's own event loop.

A call is a stream: HEADERS (the method's path and the metadata), DATA (one length-prefixed message), and the
answer HEADERS, DATA, then trailers with `grpc-status`. This module reads and writes those frames, keeps the
flow-control windows, and hands each call's message to its method's handler (bytes in, bytes out). It is the
whole of what a unary gRPC server needs, and nothing else: no server push, no streaming calls, no compression.
Header blocks are decoded with `hpack`; answers are encoded without the dynamic table, so they need no state.

Why not grpcio's server: measured on this service (docs/protocol.md), its C core's threads and their hand-offs
to the event loop cost a call more CPU than the whole HTTP/1.1 request path did.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import cast

import hpack

from service.spread import Spread
from service.v2 import frames as h2

log = logging.getLogger(__name__)

Handler = Callable[[bytes, dict[str, str]], Awaitable[bytes]]  # (message, metadata) -> answer; raises Status


class Connection(asyncio.Protocol):
    def __init__(self, server: Server):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = h2.MAX_HEADER_BLOCK
        self.indexed: dict[bytes, dict[str, str]] = {}  # header blocks of table references alone, decoded
        self.streams: dict[int, h2.Stream] = {}
        self.last = 0  # the highest stream id the peer opened
        self.continued: tuple[int, int, bytearray] | None = None  # (stream, flags, block) until END_HEADERS
        self.window = 65535  # bytes of answers the peer still lets this connection send
        self.peer_window = 65535  # the peer's initial window for a new stream
        self.peer_frame = h2.MAX_FRAME
        self.received = 0  # bytes read since the last connection WINDOW_UPDATE
        self.arriving = 0  # bytes of the messages of calls not started yet (held until their last byte is in)
        self.table_update = b""  # a dynamic table size update owed at the start of the next header block
        self.out: list[bytes] = []  # frames to write at the end of this turn
        self.counted = False  # in the server's Spread
        self.leave = False  # asked to go after its first answer (then the client has connected once, fully)

    # -- reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.server.connections.add(self)
        self.transport.write(h2.OPENING)
        spread = self.server.spread
        self.counted = spread is not None and not spread.opened()
        if spread is not None and not self.counted:  # this process holds more than its share: not counted
            spread.closed()  # from now: after its first answer the client is asked to go (GOAWAY)
            self.leave = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.counted and self.server.spread is not None:
            self.server.spread.closed()
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()

    def pause_writing(self) -> None:  # the peer does not read its answers: stop reading its calls
        cast(asyncio.Transport, self.transport).pause_reading()

    def resume_writing(self) -> None:
        cast(asyncio.Transport, self.transport).resume_reading()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        try:
            if not self.preface:
                if not h2.PREFACE.startswith(bytes(buffer[: len(h2.PREFACE)])):
                    raise h2.ProtocolError(h2.PROTOCOL_ERROR, "not HTTP/2 with prior knowledge")
                if len(buffer) < len(h2.PREFACE):
                    return
                self.preface, pos = True, len(h2.PREFACE)
            end = len(buffer)
            while end - pos >= 9:
                head, flags, stream = h2.FRAME_HEAD.unpack_from(buffer, pos)
                length = head >> 8
                if length > h2.MAX_FRAME:
                    raise h2.ProtocolError(h2.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                self.frame(head & 0xFF, flags, stream & h2.STREAM_ID, bytes(buffer[pos + 9 : pos + 9 + length]))
                pos += 9 + length
        except h2.ProtocolError as e:
            self.close(e.code, str(e))
            return
        finally:
            del buffer[:pos]
            self.flush()

    def frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.continued is not None and (kind != h2.CONTINUATION or sid != self.continued[0]):
            raise h2.ProtocolError(h2.PROTOCOL_ERROR, "a header block was interrupted")
        if kind == h2.DATA:
            self.data(flags, sid, payload)
        elif kind == h2.HEADERS:
            self.headers(flags, sid, payload)
        elif kind == h2.CONTINUATION:
            if self.continued is None:
                raise h2.ProtocolError(h2.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            block = self.continued[2]
            block += payload
            if len(block) > h2.MAX_HEADER_BLOCK:
                raise h2.ProtocolError(h2.PROTOCOL_ERROR, "a header block too large")
            if flags & h2.END_HEADERS:
                _, first, _ = self.continued
                self.continued = None
                self.call(first, sid, bytes(block))
        elif kind == h2.SETTINGS:
            self.settings(flags, sid, payload)
        elif kind == h2.WINDOW_UPDATE:
            self.window_update(sid, payload)
        elif kind == h2.PING:
            if len(payload) != 8 or sid:
                raise h2.ProtocolError(h2.FRAME_SIZE_ERROR, "a malformed PING")
            if not flags & h2.ACK:
                self.out.append(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.RST_STREAM:
            stream = self.forget(sid)
            if stream is not None and stream.task is not None:
                stream.task.cancel()  # the caller went away
        elif kind == h2.PUSH_PROMISE:
            raise h2.ProtocolError(h2.PROTOCOL_ERROR, "a client may not push")
        # PRIORITY, GOAWAY (the peer opens no more calls; those open finish) and unknown types: nothing to do

    def data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or sid > self.last:
            raise h2.ProtocolError(h2.PROTOCOL_ERROR, f"DATA on stream {sid}, not open")
        self.received += len(payload)
        if self.received >= h2.WINDOW // 2:
            self.out.append(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        stream = self.streams.get(sid)
        if stream is None or stream.task is not None:  # reset, or answered before its end: dropped
            return
        if stream.ended:
            self.reset(sid, h2.STREAM_CLOSED)
            return
        counted = len(payload)  # padding included, as flow control counts it
        if flags & h2.PADDED:
            payload = h2.unpadded(payload, "DATA")
        limit = self.server.max_message
        if self.arriving + len(payload) > limit + 5:  # a connection's messages in part: one message's worth
            self.refuse(stream, h2.RESOURCE_EXHAUSTED, f"messages of {self.arriving} bytes arriving, limit {limit}")
            return
        body = stream.body
        body += payload
        self.arriving += len(payload)
        if len(body) >= 5:  # the message's length is known: refuse it now rather than read it
            size = int.from_bytes(body[1:5], "big")
            if size > limit:
                self.refuse(stream, h2.RESOURCE_EXHAUSTED, f"a message of {size} bytes, limit {limit}")
                return
            if len(body) > 5 + size:
                self.refuse(stream, h2.INVALID_ARGUMENT, "a unary call carries exactly one message")
                return
        if flags & h2.END_STREAM:
            stream.ended = True
            self.start(stream)
        else:
            stream.received += counted
            if stream.received >= h2.WINDOW // 2:
                self.out.append(h2.frame(h2.WINDOW_UPDATE, 0, sid, struct.pack(">I", stream.received)))
                stream.received = 0

    def headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or sid % 2 == 0:
            raise h2.ProtocolError(h2.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if flags & h2.PADDED:
            payload = h2.unpadded(payload, "HEADERS")
        if flags & h2.PRIORITY_FLAG:
            payload = payload[5:]
        if flags & h2.END_HEADERS:
            self.call(flags, sid, payload)
        else:
            self.continued = (sid, flags, bytearray(payload))

    def call(self, flags: int, sid: int, block: bytes) -> None:
        """A complete header block: a new call (or a client's trailers, which end its message)."""
        headers = self.indexed.get(block)
        if headers is None:
            headers = self.decode(block)
        if sid <= self.last:
            stream = self.streams.get(sid)
            if stream is not None and not stream.ended and flags & h2.END_STREAM:
                stream.ended = True
                self.start(stream)
            return
        self.last = sid
        if len(self.streams) >= h2.MAX_STREAMS:  # the peer may retry it
            self.reset(sid, h2.REFUSED_STREAM)
            return
        stream = h2.Stream(sid, headers.get(":path", ""), headers, self.peer_window)
        self.streams[sid] = stream
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith("application/grpc"):
            self.refuse(stream, h2.INVALID_ARGUMENT, "a gRPC call is a POST of content-type application/grpc")
        elif flags & h2.END_STREAM:
            stream.ended = True
            self.start(stream)

    def decode(self, block: bytes) -> dict[str, str]:
        """A header block's fields. Decoded even where its stream is refused: the peer's table changes with every
        block. A block of one-byte table references alone (what a client sends for a call like the last) changes
        no table: what it decodes to is kept until a block that may have changed the table arrives."""
        try:
            fields = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as e:
            raise h2.ProtocolError(h2.COMPRESSION_ERROR, f"a header block that does not decode: {e}") from None
        headers = {bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in fields}
        if block.translate(None, h2.INDEXED):  # not references alone: the table may have changed
            self.indexed.clear()
        elif len(self.indexed) < 64:
            self.indexed[block] = headers
        return headers

    def settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid or len(payload) % 6:
            raise h2.ProtocolError(h2.PROTOCOL_ERROR, "a malformed SETTINGS")
        if flags & h2.ACK:
            return
        for key, value in struct.iter_unpack(">HI", payload):
            if key == h2.INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise h2.ProtocolError(h2.FLOW_CONTROL_ERROR, "an initial window past 2^31-1")
                for stream in self.streams.values():
                    stream.window += value - self.peer_window
                self.peer_window = value
            elif key == h2.MAX_FRAME_SIZE:
                if not h2.MAX_FRAME <= value < 1 << 24:
                    raise h2.ProtocolError(h2.PROTOCOL_ERROR, f"a frame size of {value}")
                self.peer_frame = value
            elif key == h2.HEADER_TABLE_SIZE and value < 4096:
                self.table_update = b"\x20"  # our encoder uses no table: say it is empty, as RFC 7541 4.2 asks
        self.out.append(h2.frame(h2.SETTINGS, h2.ACK, 0))
        self.send_pending()

    def window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.ProtocolError(h2.FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & h2.MAX_WINDOW
        if sid == 0:
            if not increment or self.window + increment > h2.MAX_WINDOW:
                raise h2.ProtocolError(h2.FLOW_CONTROL_ERROR, "a connection window update out of range")
            self.window += increment
        elif (stream := self.streams.get(sid)) is not None:
            stream.window += increment
        self.send_pending()

    # -- calls

    def start(self, stream: h2.Stream) -> None:
        self.arriving -= len(stream.body)
        stream.task = asyncio.get_running_loop().create_task(self.run(stream))

    async def run(self, stream: h2.Stream) -> None:
        body = stream.body
        # The deadline: one timer that cancels the task (asyncio.timeout's context costs a call several times more)
        loop = asyncio.get_running_loop()
        timer = None if stream.deadline is None else loop.call_later(stream.deadline, stream.expire)
        try:
            handler = self.server.handlers.get(stream.path)
            if handler is None:
                raise h2.Status(h2.UNIMPLEMENTED, f"unknown method {stream.path}")
            if len(body) < 5 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
                raise h2.Status(h2.INVALID_ARGUMENT, "a unary call carries exactly one message")
            if body[0]:
                raise h2.Status(h2.UNIMPLEMENTED, "compressed messages are not accepted: send them uncompressed")
            answer = await handler(bytes(body[5:]), stream.metadata)
        except h2.Status as e:
            self.answer(stream, None, e.code, e.message)
        except asyncio.CancelledError:
            if stream.expired:
                self.answer(stream, None, h2.DEADLINE_EXCEEDED, "the call's deadline passed")
            return  # else the caller reset the stream or the connection went
        except Exception:
            log.exception("gRPC call %s failed", stream.path)
            self.answer(stream, None, h2.INTERNAL, "internal error")
        else:
            self.answer(stream, answer, h2.OK, "")
        finally:
            if timer is not None:
                timer.cancel()

    def refuse(self, stream: h2.Stream, code: int, message: str) -> None:
        """Answer a call before its message is in, and tell the peer to stop sending it."""
        self.answer(stream, None, code, message)
        if not stream.ended:
            self.reset(stream.id, h2.NO_ERROR)

    def answer(self, stream: h2.Stream, message: bytes | None, code: int, text: str) -> None:
        if self.streams.get(stream.id) is not stream or self.transport is None:
            return  # reset meanwhile
        head, self.table_update = self.table_update, b""
        if message is None:  # trailers only
            block = head + h2.RESPONSE + h2.trailers(code, text)
            self.out.append(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream.id, block))
            self.forget(stream.id)
        else:
            self.out.append(h2.frame(h2.HEADERS, h2.END_HEADERS, stream.id, head + h2.RESPONSE))
            stream.pending = b"\x00" + len(message).to_bytes(4, "big") + message
            self.send(stream)
        self.flush()
        if self.leave:
            self.leave = False
            self.goaway()

    def send(self, stream: h2.Stream) -> None:
        """As much of the stream's answer as the windows allow; the trailers once all of it has gone."""
        data, sent = stream.pending, stream.sent
        while sent < len(data):
            n = min(len(data) - sent, self.window, stream.window, self.peer_frame)
            if n <= 0:
                stream.sent = sent
                return
            self.out.append(h2.frame(h2.DATA, 0, stream.id, data[sent : sent + n]))
            sent += n
            self.window -= n
            stream.window -= n
        stream.pending = b""
        self.out.append(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream.id, h2.TRAILERS_OK))
        self.forget(stream.id)
        if not stream.ended:
            self.reset(stream.id, h2.NO_ERROR)

    def send_pending(self) -> None:
        for stream in [s for s in self.streams.values() if s.pending]:
            self.send(stream)

    def reset(self, sid: int, code: int) -> None:
        self.out.append(h2.frame(h2.RST_STREAM, 0, sid, struct.pack(">I", code)))
        self.forget(sid)

    def forget(self, sid: int) -> h2.Stream | None:
        """The stream is done with: its message's bytes no longer count as arriving."""
        stream = self.streams.pop(sid, None)
        if stream is not None and stream.task is None:
            self.arriving -= len(stream.body)
        return stream

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def close(self, code: int, message: str) -> None:
        log.info("closing an HTTP/2 connection: %s", message)
        self.out.append(h2.frame(h2.GOAWAY, 0, 0, struct.pack(">II", self.last, code) + message.encode()[:256]))
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def goaway(self) -> None:
        """Ask the client to open no more calls on this connection (it opens another for them) and to close it
        once its calls are answered. The last stream named is the largest there is: a call the client sent
        before it read this is served too, not failed (RFC 9113 6.8's graceful shutdown)."""
        self.out.append(h2.frame(h2.GOAWAY, 0, 0, struct.pack(">II", h2.STREAM_ID, h2.NO_ERROR)))
        self.flush()


class Server:
    """gRPC methods (path -> handler) served on host:port by this process's event loop."""

    def __init__(self, handlers: dict[str, Handler], max_message: int, spread: Spread | None = None):
        """spread: the connections of this server's processes, counted (service/spread.py); None: one process."""
        self.handlers, self.max_message, self.spread = handlers, max_message, spread
        self.connections: set[Connection] = set()
        self.listener: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        # The backlog is uvicorn's.
        self.listener = await loop.create_server(
            partial(Connection, self), host, port, reuse_port=reuse_port, backlog=2048
        )

    async def stop(self, grace: float) -> None:
        """Stop listening, tell every connection to open no more calls, wait up to `grace` s for those open."""
        if self.listener is not None:
            self.listener.close()
        for c in self.connections:
            c.goaway()
        deadline = time.monotonic() + grace
        while any(c.streams for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            cast(asyncio.Transport, c.transport).close()
        if self.spread is not None:
            self.spread.close()
