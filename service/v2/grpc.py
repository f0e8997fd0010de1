"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, in every server process.

The messages are the protocol's own generated code as tritonclient ships it (`tritonclient.grpc.service_pb2`):
nothing of the message format is written here. The calls arrive on service/v2/http2.py's HTTP/2 server, on the
server process's own event loop (the one uvicorn runs), so a request reaches the very pipeline, micro-batcher,
cache and metrics the HTTP routes use. Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer; the rest answer UNIMPLEMENTED.

Several server processes all listen on RAC_GRPC_PORT with SO_REUSEPORT, and the kernel spreads connections
over them (a process holding more than its share sends new ones on: service/spread.py); one process alone does
not set it, so a port already taken fails the start instead of being shared. A gRPC channel is one connection:
a client that wants every process busy opens several (with `grpc.use_local_subchannel_pool`, else grpcio
shares one connection among channels to the same address).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from starlette.datastructures import State
from tritonclient.grpc import service_pb2 as pb

from service.auth import OPEN, Keys, Principal
from service.errors import RequestError, grpc_code
from service.metrics import Metrics
from service.settings import Settings
from service.spread import shared
from service.v2 import frames as h2
from service.v2 import http2
from service.v2 import model as v2
from service.v2.tensors import VERSION, InferRequest, InputTensor, parse_bytes

log = logging.getLogger(__name__)
SERVICE = "/inference.GRPCInferenceService/"
PUBLIC_METHODS = ("ServerLive", "ServerReady")  # health checks answer without a key, as /healthz and /readyz


class Servicer:
    """Reads the pipeline and readiness from the app's state at every call, as the HTTP routes do. Each method
    takes its request message's bytes and the call's metadata and answers its response message's bytes."""

    def __init__(self, state: State, metrics: Metrics) -> None:
        self.state, self.metrics = state, metrics

    def handlers(self) -> dict[str, http2.Handler]:
        methods = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
        }
        return {SERVICE + name: self._method(name, call) for name, call in methods.items()}

    def _principal(self, method: str, metadata: dict[str, str]) -> Principal:
        """The caller's key (the `authorization` metadata, as HTTP's header), where keys are required and the
        method is not a health check: RequestError 401 without a known key."""
        keys: Keys = self.state.keys
        if not keys.enabled or method in PUBLIC_METHODS:
            return OPEN
        principal = keys.principal(metadata.get("authorization"))
        if principal is None:
            raise RequestError(401, "an API key is required: metadata authorization: Bearer KEY")
        self.metrics.key_requests.labels(principal.name).inc()
        return principal

    def _method(self, method: str, call: Callable[[bytes, Principal], Awaitable[Message]]) -> http2.Handler:
        """One method, counted in rac_requests_total{route="/inference.GRPCInferenceService/<method>"} with the
        HTTP status the outcome would have had (499: the client went away or its deadline passed); a
        RequestError (overload included) becomes the protocol's status code (service/errors.py's one mapping)."""
        route = SERVICE + method

        async def answer(message: bytes, metadata: dict[str, str]) -> bytes:
            status = 500
            try:
                result = await call(message, self._principal(method, metadata))
                status = 200
                return result.SerializeToString()
            except RequestError as e:
                status = e.status
                raise h2.Status(grpc_code(e.status).value[0], e.message) from None
            except asyncio.CancelledError:
                status = 499
                raise
            finally:
                self.metrics.requests.labels(route, str(status)).inc()

        return answer

    async def server_live(self, message: bytes, caller: Principal) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, message: bytes, caller: Principal) -> Message:
        return pb.ServerReadyResponse(ready=v2.ready(self.state))

    async def model_ready(self, message: bytes, caller: Principal) -> Message:
        request = decode(pb.ModelReadyRequest, message)
        v2.check_model(request.name, request.version, v2.loaded(self.state))
        return pb.ModelReadyResponse(ready=v2.ready(self.state))

    async def server_metadata(self, message: bytes, caller: Principal) -> Message:
        return json_format.ParseDict(v2.server_metadata(), pb.ServerMetadataResponse())

    async def model_metadata(self, message: bytes, caller: Principal) -> Message:
        request = decode(pb.ModelMetadataRequest, message)
        v2.check_model(request.name, request.version, v2.loaded(self.state))
        metadata = v2.model_metadata(v2.require_pipeline(self.state), request.name)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    async def model_infer(self, message: bytes, caller: Principal) -> Message:
        request = decode(pb.ModelInferRequest, message)
        v2.check_model(request.model_name, request.model_version, v2.loaded(self.state))
        pipeline = v2.require_pipeline(self.state)
        # The HTTP routes' door (service/api/intake.py): wait for a slot or be refused; the message is in.
        upload = await pipeline.admission.upload(len(message))
        try:
            upload.arrived()
            req = parse(request, v2.element_limits(pipeline.settings))
            outputs, first = await v2.infer(pipeline, req, caller)
        finally:
            upload.close()
        response = pb.ModelInferResponse(model_name=req.model, model_version=VERSION, id=request.id)
        response.parameters["memory"].string_param = first.memory
        response.parameters["memory_version"].string_param = first.memory_version
        response.parameters["neighbors_used"].int64_param = first.neighbors_used
        for out in outputs:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(out.raw())
        return response


def decode(kind: type[Message], message: bytes) -> Any:
    try:
        return kind.FromString(message)
    except DecodeError:
        raise RequestError(400, f"the message is not a {kind.DESCRIPTOR.name}") from None


def parse(request: Any, limits: dict[str, int]) -> InferRequest:
    """A ModelInferRequest -> the request. An input's data is in raw_input_contents (the same index as the
    input; what tritonclient sends) or in contents.bytes_contents. At most as many elements are read as
    `limits` gives the input's name (or the largest of them, for other names)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per input")
    inputs = []
    for i, t in enumerate(request.inputs):
        elements: list[bytes] = []
        if t.datatype == "BYTES":
            limit = limits.get(t.name, max(limits.values()))
            elements = parse_bytes(raw[i], f"input '{t.name}'", limit) if raw else list(t.contents.bytes_contents)
        inputs.append(InputTensor(t.name, t.datatype, list(t.shape), elements))
    parameters = {
        k: getattr(p, p.WhichOneof("parameter_choice") or "string_param") for k, p in request.parameters.items()
    }
    outputs = [o.name for o in request.outputs]
    return InferRequest(request.model_name, request.model_version, inputs, parameters, outputs, request.id)


async def start(state: State, settings: Settings, metrics: Metrics) -> http2.Server | None:
    """Serve the protocol on settings.host:settings.grpc_port in this process; None where the port is 0."""
    if not settings.grpc_port:
        return None
    spread = shared(metrics.multiprocess_dir, "grpc")
    server = http2.Server(Servicer(state, metrics).handlers(), settings.max_request_bytes, spread)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        await server.start(settings.host, settings.grpc_port, reuse_port=settings.workers > 1)
    except OSError as e:
        raise RuntimeError(
            f"gRPC cannot listen on {address} (RAC_GRPC_PORT; 0 turns gRPC off; processes of one server share it "
            f"where RAC_WORKERS gives their number, as `python -m service` sets it): {e}"
        ) from None
    log.info("Open Inference Protocol over gRPC on %s", address)
    return server
