"""The Open Inference Protocol (KServe v2, as Triton speaks it), shared by its two front-ends.

service/v2_rest.py (HTTP/JSON with the binary tensor data extension) and service/v2_grpc.py
(`inference.GRPCInferenceService`) only translate their wire format into an `InferRequest` and the `Output`s
back. This module holds what the model looks like (its metadata), every check on a request, and the one
`Pipeline.classify` call a request makes: batching, caching and metrics stay the pipeline's.

Model `rac`, version `1`:
  input   IMAGE                  BYTES [B]      encoded images (PNG, JPEG or WebP)
  outputs PROBABILITIES          FP32  [B, C]   every class, in the order of the manifest's classes
          LABELS                 BYTES [B, top_k]  the top classes' names, best first
          NEIGHBOR_IDS           INT64 [B, n]   memory ids of the neighbours, by attention weight
          NEIGHBOR_SIMILARITIES  FP32  [B, n]   their cosine similarity to the query
          NEIGHBOR_ATTENTION     FP32  [B, n]   the head's last-layer attention weight on them
  parameters top_k (default 5, at most C) and neighbors (n, default 0, at most k), as for POST /classify.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from service.decode import DecodeError
from service.pipeline import Classification, Pipeline

MODEL, VERSION, PLATFORM = "rac", "1", "rac_retrieval_augmented"
SERVER, SERVER_VERSION = "rac", "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
IMAGE = "IMAGE"
OUTPUTS = {  # name: datatype, in the order a response lists them
    "PROBABILITIES": "FP32",
    "LABELS": "BYTES",
    "NEIGHBOR_IDS": "INT64",
    "NEIGHBOR_SIMILARITIES": "FP32",
    "NEIGHBOR_ATTENTION": "FP32",
}
NUMPY = {"FP32": np.float32, "INT64": np.int64}
DEFAULT_TOP_K, DEFAULT_NEIGHBORS = 5, 0


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


# ---------------------------------------------------------------- wire helpers both front-ends use


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def parse_bytes(raw: bytes | memoryview, what: str, limit: int) -> list[bytes]:
    """A BYTES tensor's binary form -> its elements; V2Error (400) when the lengths do not add up, or past
    `limit` elements (before the loop spends long on a body of empty elements)."""
    view, out, pos = memoryview(raw), list[bytes](), 0
    while pos < len(view):
        if len(out) == limit:
            raise V2Error(400, f"{what}: more than {limit} elements; the limit is {limit} images")
        if pos + 4 > len(view):
            raise V2Error(400, f"{what}: binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise V2Error(400, f"{what}: binary BYTES element {len(out)} claims {n} bytes; {len(view) - pos} remain")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


def check_model(name: str, version: str = "") -> None:
    if name != MODEL:
        raise V2Error(404, f"unknown model '{name}': this server serves '{MODEL}'")
    if version not in ("", VERSION):
        raise V2Error(404, f"unknown version '{version}' of model '{name}': it has version '{VERSION}'")


def server_metadata() -> dict[str, object]:
    return {"name": SERVER, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def model_metadata(pipeline: Pipeline) -> dict[str, object]:
    classes = len(pipeline.manifest.classes)
    shapes = {"PROBABILITIES": [-1, classes]}
    return {
        "name": MODEL,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": t, "shape": shapes.get(n, [-1, -1])} for n, t in OUTPUTS.items()],
    }


# ---------------------------------------------------------------- one request


def _int_parameter(parameters: dict[str, object], name: str, default: int, low: int, high: int | None) -> int:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise V2Error(400, f"parameter '{name}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise V2Error(400, f"parameter '{name}' is {value}; it must be {bound}")
    return value


def _images(req: InferRequest, limit: int) -> list[bytes]:
    if len(req.inputs) != 1 or req.inputs[0].name != IMAGE:
        names = [t.name for t in req.inputs]
        raise V2Error(400, f"inputs {names}: model '{MODEL}' takes exactly one input, '{IMAGE}'")
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise V2Error(400, f"input '{IMAGE}' has datatype {tensor.datatype}; it must be BYTES (encoded images)")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise V2Error(400, f"input '{IMAGE}' has shape {tensor.shape}; it must be [B], B >= 1 images")
    if tensor.shape[0] != len(tensor.elements):
        raise V2Error(400, f"input '{IMAGE}' has shape {tensor.shape} but holds {len(tensor.elements)} elements")
    if len(tensor.elements) > limit:
        raise V2Error(400, f"input '{IMAGE}' holds {len(tensor.elements)} images; the limit is {limit}")
    return tensor.elements


def _outputs(req: InferRequest) -> list[str]:
    unknown = [n for n in req.outputs if n not in OUTPUTS]
    if unknown:
        raise V2Error(400, f"unknown outputs {unknown}: model '{MODEL}' has {list(OUTPUTS)}")
    return list(dict.fromkeys(req.outputs)) or list(OUTPUTS)


async def infer(pipeline: Pipeline, req: InferRequest) -> tuple[list[Output], str]:
    """Check `req`, classify its images in one pipeline call, and return the outputs it asked for and the
    memory version that answered (each image holds one version throughout; a batch that straddles a swap names
    both, in the order of its images, comma-separated).

    Raises V2Error for anything the request got wrong (a bad image fails the whole request, naming the item),
    and lets the pipeline's Overloaded through (the front-ends answer 503 / UNAVAILABLE)."""
    check_model(req.model, req.version)
    images = _images(req, pipeline.settings.max_batch_images)
    classes = pipeline.manifest.classes
    top_k = min(_int_parameter(req.parameters, "top_k", DEFAULT_TOP_K, 1, None), len(classes))
    neighbors = _int_parameter(req.parameters, "neighbors", DEFAULT_NEIGHBORS, 0, pipeline.k)
    names = _outputs(req)
    # Every class's probability comes back as a prediction when top_k is the number of classes.
    results = await pipeline.classify(images, len(classes) if "PROBABILITIES" in names else top_k, neighbors)
    bad = [f"{IMAGE}[{i}]: {r.message}" for i, r in enumerate(results) if isinstance(r, DecodeError)]
    if bad:
        raise V2Error(400, "; ".join(bad))
    answers = cast(list[Classification], results)
    versions = ",".join(dict.fromkeys(a.memory_version for a in answers))
    return [_tensor(name, answers, len(classes), top_k) for name in names], versions


def _tensor(name: str, results: list[Classification], classes: int, top_k: int) -> Output:
    if name == "PROBABILITIES":
        probs = np.zeros((len(results), classes), np.float32)
        for i, r in enumerate(results):
            for p in r.predictions:
                probs[i, cast(int, p["index"])] = cast(float, p["probability"])
        return Output(name, "FP32", probs)
    if name == "LABELS":
        array = np.empty((len(results), top_k), object)
        for i, r in enumerate(results):
            for j, p in enumerate(r.predictions[:top_k]):
                array[i, j] = cast(str, p["label"]).encode()
        return Output(name, "BYTES", array)
    field_name, datatype = {
        "NEIGHBOR_IDS": ("id", "INT64"),
        "NEIGHBOR_SIMILARITIES": ("similarity", "FP32"),
        "NEIGHBOR_ATTENTION": ("attention", "FP32"),
    }[name]
    values = [[n[field_name] for n in r.neighbors] for r in results]
    width = len(values[0])
    return Output(name, datatype, np.array(values, NUMPY[datatype]).reshape(len(results), width))
