"""uvicorn's HTTP/1.1 protocol with parking and probes: while its process is full, a keep-alive connection
whose answer has gone out is not read again until there is room; and GET /readyz and /healthz are answered
as soon as their headers are read, in the loop's I/O phase, with no task and no trip through the app.

Under a burst from many keep-alive clients each sends its next request as soon as it has its answer. Read at
once, that request would be parsed and would wait at the door (service/api/intake.py), or be refused and
retried, all on the event loop that the admitted requests and the health probes need. Parked, it waits in the
kernel's socket buffer and costs nothing until Admission (service/core/batching.py) resumes the connection,
keeping a slot for its next request for RESERVE_S. A new connection (a probe, a first request) is read at once.

A probe otherwise waits for every request task the loop has queued ahead of it (a whole batch's answers under
load) before its own task runs. Its answer comes from the app (service/app.py's probe(), the same as the
routes' and counted as theirs); an app without one, or a probe pipelined behind another request, takes the
usual way.

An answer's status line and headers leave with its body, in one write (OneWrite).

`python -m service` serves with it (service/serve.py); a server built otherwise (`uvicorn --factory
service.app:factory`) keeps uvicorn's own protocol, the door and the routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from service.api.intake import door
from service.core.batching import Admission
from service.spread import Spread

ADMISSION = "admission"  # the lifespan state's key for the process's Admission (service/app.py)
PROBE = "probe"  # and for its probe answers: path -> (status, JSON body), None for a path that is not a probe
SPREAD = "spread"  # and for the connections its processes hold (service/spread.py), where there are several
RESERVE_S = 0.1  # a resumed connection whose next request's headers are not in by then gives its slot back
Probe = Callable[[str], tuple[int, bytes] | None]


class ParkingProtocol(HttpToolsProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._reservation: asyncio.TimerHandle | None = None  # set while a slot is kept for the next request
        self._spread: Spread | None = None  # where this connection is counted
        self._leave = False  # this process holds more than its share: closed after its first answer

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        spread: Spread | None = self.app_state.get(SPREAD)
        if spread is not None and spread.opened():
            spread.closed()  # not counted from now: the client opens another connection after its answer
            self._leave = True
        else:
            self._spread = spread

    def _admission(self) -> Admission | None:
        admission: Admission | None = self.app_state.get(ADMISSION)
        return admission

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a request already read: it goes on at once
        super().on_response_complete()
        admission = self._admission()
        if pipelined or admission is None or self.transport.is_closing() or not admission.park(self):
            return
        self.flow.pause_reading()
        if self.timeout_keep_alive_task is not None:  # a parked connection is not idle: its client waits
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def resume(self) -> bool:
        if self.transport.is_closing():
            return False
        self.flow.resume_reading()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._reservation = self.loop.call_later(RESERVE_S, self._unreserve, False)
        return True

    def _unreserve(self, upload: bool = False) -> None:
        admission = self._admission()
        if self._reservation is not None and admission is not None:
            self._reservation.cancel()
            self._reservation = None
            admission.unreserve(upload)

    def on_headers_complete(self) -> None:
        if self._answer_probe():
            self._unreserve()
            return
        super().on_headers_complete()  # the request's task is scheduled: an upload takes the slot at the door
        if self._leave:
            self.cycle.keep_alive = False  # "connection: close" on its answer
        if self.scope["method"] != "HEAD":  # a HEAD's answer has no body to carry its head
            self.cycle.transport = OneWrite(self.transport)  # type: ignore[assignment]
        if self._reservation is not None:  # a resumed connection's slot: an upload takes it at the door
            self._unreserve(upload=door(self.scope) is not None)

    def _answer_probe(self) -> bool:
        probe: Probe | None = self.app_state.get(PROBE)
        idle = self.cycle is None or self.cycle.response_complete  # else it must wait for the answer before it
        if probe is None or not idle or self.parser.get_method() != b"GET":
            return False
        answer = probe(self.url.split(b"?", 1)[0].decode("latin-1"))
        if answer is None:
            return False
        status, body = answer
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        # A finished cycle: the parser's callbacks for the rest of this request (none: a GET) then do nothing.
        self.cycle = RequestResponseCycle(
            self.scope,
            self.transport,
            self.flow,
            self.logger,
            self.access_logger,
            False,
            self.server_state.default_headers,
            asyncio.Event(),
            False,
            keep_alive,
            self.on_response_complete,
        )
        self.cycle.response_complete = True
        head = [STATUS_LINE[status], *(n + b": " + v + b"\r\n" for n, v in self.server_state.default_headers)]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        if not keep_alive:
            head.append(b"connection: close\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))
        if keep_alive:
            HttpToolsProtocol.on_response_complete(self)  # not parked: a probe's connection stays readable
        else:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._unreserve()
        if self._spread is not None:
            self._spread.closed()
        super().connection_lost(exc)


class OneWrite:
    """The transport as one response's cycle sees it: the status line and headers wait for the body's first
    part and go out with it in one write: one send(2) and one packet, not two, each a system call and on
    loopback the receiver's TCP work too. A 100 Continue goes out at once; a close sends what waits first."""

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.head: bytes | None = None
        self.started = False

    def write(self, data: bytes) -> None:
        if not self.started and not data.startswith(b"HTTP/1.1 100 "):
            self.started, self.head = True, data  # the status line and headers: wait for the body
            return
        if self.head is not None:
            data, self.head = self.head + data, None
        self.transport.write(data)

    def close(self) -> None:
        if self.head is not None:
            self.transport.write(self.head)
            self.head = None
        self.transport.close()

    def __getattr__(self, name: str) -> object:  # is_closing(), get_extra_info(), ...: the transport's own
        return getattr(self.transport, name)
