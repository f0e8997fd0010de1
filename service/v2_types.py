"""The Open Inference Protocol's request, tensors and refusals, and the checks every model's inputs share.

service/v2.py (model `rac`) and service/v2_zeroshot.py (model `rac-zero-shot`) read an `InferRequest` and
answer `Output`s; service/v2_rest.py and service/v2_grpc.py translate their wire formats to and from these.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import cast

import numpy as np

VERSION = "1"  # every model's one version


class V2Error(Exception):
    """A request the protocol refuses; `status` is the HTTP status (the gRPC front-end maps it to a code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    elements: list[bytes]  # a BYTES tensor's elements, row-major; empty for other datatypes (refused anyway)


@dataclass
class InferRequest:
    model: str
    version: str
    inputs: list[InputTensor]
    parameters: dict[str, object] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # the outputs asked for, in order; empty: all of them
    id: str = ""


@dataclass
class Output:
    name: str
    datatype: str
    array: np.ndarray  # FP32 / INT64, or an object array of bytes for BYTES

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        """The binary form: little-endian values, or for BYTES each element as a 4-byte length and its bytes."""
        if self.datatype == "BYTES":
            return serialize_bytes(list(self.array.ravel()))
        return self.array.astype(self.array.dtype.newbyteorder("<"), copy=False).tobytes()

    def data(self) -> list[object]:
        """The JSON form: the values flattened row-major (BYTES as UTF-8 strings: labels are text)."""
        if self.datatype == "BYTES":
            return [b.decode("utf-8") for b in self.array.ravel()]
        return cast(list[object], self.array.ravel().tolist())


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def parse_bytes(raw: bytes | memoryview, what: str, limit: int) -> list[bytes]:
    """A BYTES tensor's binary form -> its elements; V2Error (400) when the lengths do not add up, or past
    `limit` elements (before the loop spends long on a body of empty elements)."""
    view, out, pos = memoryview(raw), list[bytes](), 0
    while pos < len(view):
        if len(out) == limit:
            raise V2Error(400, f"{what}: more than {limit} elements; the limit is {limit}")
        if pos + 4 > len(view):
            raise V2Error(400, f"{what}: binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise V2Error(400, f"{what}: binary BYTES element {len(out)} claims {n} bytes; {len(view) - pos} remain")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


# ---------------------------------------------------------------- checks on a request


def int_parameter(parameters: dict[str, object], name: str, default: int, low: int, high: int | None) -> int:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise V2Error(400, f"parameter '{name}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise V2Error(400, f"parameter '{name}' is {value}; it must be {bound}")
    return value


def bytes_inputs(req: InferRequest, names: list[str], limits: dict[str, int]) -> dict[str, list[bytes]]:
    """The request's inputs, exactly `names`, each BYTES of shape [n], 1 <= n <= limits[name]: their elements."""
    if sorted(t.name for t in req.inputs) != sorted(names):
        given = [t.name for t in req.inputs]
        wanted = f"one input, '{names[0]}'" if len(names) == 1 else "the inputs " + ", ".join(map(repr, names))
        raise V2Error(400, f"inputs {given}: model '{req.model}' takes exactly {wanted}")
    out = {}
    for tensor in req.inputs:
        name = tensor.name
        if tensor.datatype != "BYTES":
            raise V2Error(400, f"input '{name}' has datatype {tensor.datatype}; it must be BYTES")
        if len(tensor.shape) != 1 or tensor.shape[0] < 1:
            raise V2Error(400, f"input '{name}' has shape {tensor.shape}; it must be [n], n >= 1")
        if tensor.shape[0] != len(tensor.elements):
            raise V2Error(400, f"input '{name}' has shape {tensor.shape} but holds {len(tensor.elements)} elements")
        if len(tensor.elements) > limits[name]:
            raise V2Error(400, f"input '{name}' holds {len(tensor.elements)} elements; the limit is {limits[name]}")
        out[name] = tensor.elements
    return out


def outputs_asked(req: InferRequest, outputs: list[str]) -> list[str]:
    """The outputs the request names (each once, in its order), or all of `outputs`."""
    unknown = [n for n in req.outputs if n not in outputs]
    if unknown:
        raise V2Error(400, f"unknown outputs {unknown}: model '{req.model}' has {outputs}")
    return list(dict.fromkeys(req.outputs)) or list(outputs)
