"""The Open Inference Protocol (KServe v2, as Triton speaks it), shared by its two front-ends.

service/v2_rest.py (HTTP/JSON with the binary tensor data extension) and service/v2_grpc.py
(`inference.GRPCInferenceService`) only translate their wire format into an `InferRequest` and the `Output`s
back (service/v2_types.py). This module holds which models the server has, what model `rac` looks like (its
metadata), every check on its requests, and the one `Pipeline.classify` call a request makes: batching,
caching and metrics stay the pipeline's. Model `rac-zero-shot` is service/v2_zeroshot.py's.

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

from typing import cast

import numpy as np

from service import v2_zeroshot
from service.decode import DecodeError
from service.pipeline import Classification, Pipeline
from service.settings import Settings
from service.v2_types import VERSION, InferRequest, Output, V2Error, bytes_inputs, int_parameter, outputs_asked

MODEL, PLATFORM = "rac", "rac_retrieval_augmented"
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


# ---------------------------------------------------------------- the models


def models(pipeline: Pipeline | None) -> list[str]:
    """The models this server answers for now (the zero-shot one only while its parts fit the memory served)."""
    zero_shot = pipeline is not None and v2_zeroshot.available(pipeline) is None
    return [MODEL, v2_zeroshot.MODEL] if zero_shot else [MODEL]


def check_model(name: str, version: str, pipeline: Pipeline | None) -> None:
    """V2Error 404 for a model or version the server does not have (503 while it is still loading, for the
    model whose presence depends on the artifacts)."""
    if name == v2_zeroshot.MODEL:
        if pipeline is None:
            raise V2Error(503, "not ready: the artifacts are still loading")
        why = v2_zeroshot.available(pipeline)
        if why is not None:
            raise V2Error(404, f"unknown model '{name}': {why}")
    elif name != MODEL:
        served = ", ".join(f"'{m}'" for m in models(pipeline))
        raise V2Error(404, f"unknown model '{name}': this server serves {served}")
    if version not in ("", VERSION):
        raise V2Error(404, f"unknown version '{version}' of model '{name}': it has version '{VERSION}'")


def element_limits(settings: Settings) -> dict[str, int]:
    """How many elements each model's BYTES inputs may hold: refused past that while they are still read."""
    return {IMAGE: settings.max_batch_images, v2_zeroshot.LABELS: settings.zero_shot_max_labels}


def server_metadata() -> dict[str, object]:
    return {"name": SERVER, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def model_metadata(pipeline: Pipeline, name: str) -> dict[str, object]:
    if name == v2_zeroshot.MODEL:
        return v2_zeroshot.model_metadata()
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


async def infer(pipeline: Pipeline, req: InferRequest) -> tuple[list[Output], str]:
    """Check `req`, classify its images in one pipeline call (model `rac`; `rac-zero-shot`'s are answered by
    service/v2_zeroshot.py), and return the outputs it asked for and the
    memory version that answered (each image holds one version throughout; a batch that straddles a swap names
    both, in the order of its images, comma-separated).

    Raises V2Error for anything the request got wrong (a bad image fails the whole request, naming the item),
    and lets the pipeline's Overloaded through (the front-ends answer 503 / UNAVAILABLE)."""
    check_model(req.model, req.version, pipeline)
    if req.model == v2_zeroshot.MODEL:
        return await v2_zeroshot.infer(pipeline, req)
    images = bytes_inputs(req, [IMAGE], {IMAGE: pipeline.settings.max_batch_images})[IMAGE]
    classes = pipeline.manifest.classes
    top_k = min(int_parameter(req.parameters, "top_k", DEFAULT_TOP_K, 1, None), len(classes))
    neighbors = int_parameter(req.parameters, "neighbors", DEFAULT_NEIGHBORS, 0, pipeline.k)
    names = outputs_asked(req, list(OUTPUTS))
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
