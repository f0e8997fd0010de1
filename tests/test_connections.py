"""A server of two processes as its clients meet it: connections spread evenly over the processes (HTTP and
gRPC), and what its gRPC service refuses."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loadtests.drivers import spread
from loadtests.server import free_port, serving
from tests.helpers import Served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(quick_artifacts: Path) -> Iterator[Served]:
    port = free_port()
    with serving(quick_artifacts, RAC_WORKERS="2", RAC_GRPC_PORT=str(port)) as url:
        yield Served(url, f"127.0.0.1:{port}", [])


def test_connections_end_up_even_over_the_processes(server: Served) -> None:
    """16 keep-alive clients, HTTP and gRPC each: whatever the kernel's hash gave each process at first, a
    process holding more than one more than the other sends a new connection on ("connection: close" after its
    answer; GOAWAY), and the clients' next calls, on new connections, end up 8 and 8."""
    http_port, grpc_port = (int(address.rsplit(":", 1)[1]) for address in (server.url, server.grpc))
    clients = [http.client.HTTPConnection("127.0.0.1", http_port, timeout=10) for _ in range(16)]  # reopened if closed
    channels = [grpc.insecure_channel(server.grpc, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(16)]
    stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]

    def http_calls() -> None:
        for h in clients:
            h.request("GET", "/v2/health/ready")
            answer = h.getresponse()
            answer.read()
            assert answer.status == 200

    def grpc_calls() -> None:
        for stub in stubs:
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready

    try:
        for port, calls in ((http_port, http_calls), (grpc_port, grpc_calls)):
            for _ in range(20):
                calls()
                if spread(port) == [8, 8]:
                    break
            assert spread(port) == [8, 8]
    finally:
        for h in clients:
            h.close()
        for c in channels:
            c.close()


def test_grpc_refuses_what_is_not_the_protocol(server: Served) -> None:
    """A message that is not a ModelInferRequest is INVALID_ARGUMENT; a method the service lacks, or one of
    another service, UNIMPLEMENTED; the connection keeps serving."""
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ModelInferRequest" in (e.value.details() or "")
        for method in ("/inference.GRPCInferenceService/ModelStatistics", "/grpc.health.v1.Health/Check"):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(method)(b"", timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        live = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest())
        assert live.live
