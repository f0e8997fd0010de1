"""The Open Inference Protocol's request, tensors and refusals, and the checks every model's inputs share.

service/v2/model.py (model `rac`) and service/v2/zero_shot.py (model `rac-zero-shot`) read an `InferRequest` and
answer `OutputTensor`s; service/v2/rest.py and service/v2/grpc.py translate their wire formats to and from these.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from service.core.batch import Neighbors
from service.core.pipeline import Answer
from service.errors import RequestError
from service.memory.filters import Filter

VERSION = "1"  # every model's one version


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
class OutputTensor:
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


def answered(results: list[Answer | RequestError], what: str) -> list[Answer]:
    """Every image's answer; a RequestError naming the images that failed (a 400 for the whole request)."""
    bad = [f"{what}[{i}]: {r.message}" for i, r in enumerate(results) if isinstance(r, RequestError)]
    if bad:
        raise RequestError(400, "; ".join(bad))
    return [r for r in results if isinstance(r, Answer)]


# Outputs every model has: the neighbours each answer describes, (B, n), in the answer's order.
NEIGHBOR_OUTPUTS = {
    "NEIGHBOR_IDS": ("ids", "INT64", np.int64),
    "NEIGHBOR_SIMILARITIES": ("sims", "FP32", np.float32),
    "NEIGHBOR_ATTENTION": ("attention", "FP32", np.float32),
}


def neighbor_tensor(name: str, neighbors: list[Neighbors]) -> OutputTensor:
    field_name, datatype, dtype = NEIGHBOR_OUTPUTS[name]
    return OutputTensor(name, datatype, np.array([getattr(n, field_name) for n in neighbors], dtype))  # (B, n)


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def parse_bytes(raw: bytes | memoryview, what: str, limit: int) -> list[bytes]:
    """A BYTES tensor's binary form -> its elements; RequestError (400) when the lengths do not add up, or past
    `limit` elements (before the loop spends long on a body of empty elements)."""
    view, out, pos = memoryview(raw), list[bytes](), 0
    while pos < len(view):
        if len(out) == limit:
            raise RequestError(400, f"{what}: more than {limit} elements; the limit is {limit}")
        if pos + 4 > len(view):
            raise RequestError(400, f"{what}: binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise RequestError(
                400, f"{what}: binary BYTES element {len(out)} claims {n} bytes; {len(view) - pos} remain"
            )
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


# ---------------------------------------------------------------- checks on a request


def int_parameter(parameters: dict[str, object], name: str, default: int, low: int, high: int | None) -> int:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"parameter '{name}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise RequestError(400, f"parameter '{name}' is {value}; it must be {bound}")
    return value


def filter_parameters(parameters: dict[str, object]) -> Filter:
    """The request's filter from its parameters: `source` and `tag`, each a name or names separated by commas
    (any of them), and `exclude_key`, a key or a JSON array of keys (keys may hold commas)."""

    def text(name: str) -> str:
        value = parameters.get(name, "")
        if not isinstance(value, str):
            raise RequestError(400, f"parameter '{name}' must be a string, got {value!r}")
        return value

    def names(name: str) -> list[str]:
        return [part.strip() for part in text(name).split(",") if part.strip()]

    raw = text("exclude_key")
    keys: list[str] = [raw] if raw else []
    if raw.startswith("["):
        try:
            keys = json.loads(raw)
        except ValueError:
            raise RequestError(400, "parameter 'exclude_key': not a JSON array of strings") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise RequestError(400, "parameter 'exclude_key': not a JSON array of strings")
    return Filter.of(names("source"), names("tag"), keys)


def memory_parameter(parameters: dict[str, object]) -> str | None:
    """The named memory a request asks for (parameter `memory`); None: the server's default."""
    value = parameters.get("memory")
    if value is not None and not isinstance(value, str):
        raise RequestError(400, f"parameter 'memory' must be a string, got {value!r}")
    return value


def bytes_inputs(req: InferRequest, names: list[str], limits: dict[str, int]) -> dict[str, list[bytes]]:
    """The request's inputs, exactly `names`, each BYTES of shape [n], 1 <= n <= limits[name]: their elements."""
    if sorted(t.name for t in req.inputs) != sorted(names):
        given = [t.name for t in req.inputs]
        wanted = f"one input, '{names[0]}'" if len(names) == 1 else "the inputs " + ", ".join(map(repr, names))
        raise RequestError(400, f"inputs {given}: model '{req.model}' takes exactly {wanted}")
    out = {}
    for tensor in req.inputs:
        name = tensor.name
        if tensor.datatype != "BYTES":
            raise RequestError(400, f"input '{name}' has datatype {tensor.datatype}; it must be BYTES")
        if len(tensor.shape) != 1 or tensor.shape[0] < 1:
            raise RequestError(400, f"input '{name}' has shape {tensor.shape}; it must be [n], n >= 1")
        if tensor.shape[0] != len(tensor.elements):
            raise RequestError(
                400, f"input '{name}' has shape {tensor.shape} but holds {len(tensor.elements)} elements"
            )
        if len(tensor.elements) > limits[name]:
            raise RequestError(
                400, f"input '{name}' holds {len(tensor.elements)} elements; the limit is {limits[name]}"
            )
        out[name] = tensor.elements
    return out


def outputs_asked(req: InferRequest, outputs: list[str]) -> list[str]:
    """The outputs the request names (each once, in its order), or all of `outputs`."""
    unknown = [n for n in req.outputs if n not in outputs]
    if unknown:
        raise RequestError(400, f"unknown outputs {unknown}: model '{req.model}' has {outputs}")
    return list(dict.fromkeys(req.outputs)) or list(outputs)
