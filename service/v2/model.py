"""The Open Inference Protocol (KServe v2, as Triton speaks it), shared by its two front-ends.

service/v2/rest.py (HTTP/JSON with the binary tensor data extension) and service/v2/grpc.py
(`inference.GRPCInferenceService`) only translate their wire format into an `InferRequest` and the
`OutputTensor`s back (service/v2/tensors.py). This module holds the readiness both ask about, which models
the server has, what model `rac` looks like (its metadata), every check on its requests, and the one
`Pipeline.classify` call a request makes: batching, caching and metrics stay the pipeline's. Model `rac-zero-shot`
is service/v2/zero_shot.py's.

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

import numpy as np
from starlette.datastructures import State

from service.auth import Principal
from service.core.pipeline import Answer, Pipeline
from service.errors import NOT_READY, RequestError
from service.settings import Settings
from service.v2 import zero_shot
from service.v2.tensors import (
    VERSION,
    InferRequest,
    OutputTensor,
    answered,
    bytes_inputs,
    filter_parameters,
    int_parameter,
    memory_parameter,
    neighbor_tensor,
    outputs_asked,
)

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
DEFAULT_TOP_K, DEFAULT_NEIGHBORS = 5, 0


# ---------------------------------------------------------------- readiness, shared by both front-ends


def loaded(state: State) -> Pipeline | None:
    """The app's pipeline once the artifacts are loaded, else None."""
    pipeline: Pipeline | None = getattr(state, "pipeline", None)
    return pipeline


def require_pipeline(state: State) -> Pipeline:
    pipeline = loaded(state)
    if pipeline is None:
        raise RequestError(503, NOT_READY)
    return pipeline


def ready(state: State) -> bool:
    return bool(getattr(state, "ready", False))


# ---------------------------------------------------------------- the models


def models(pipeline: Pipeline | None) -> list[str]:
    """The models this server answers for now (the zero-shot one only while its parts fit the memory served)."""
    zero_shot_served = pipeline is not None and pipeline.zero_shot_missing() is None
    return [MODEL, zero_shot.MODEL] if zero_shot_served else [MODEL]


def check_model(name: str, version: str, pipeline: Pipeline | None) -> None:
    """RequestError 404 for a model or version the server does not have (503 while it is still loading,
    for the model whose presence depends on the artifacts)."""
    if name == zero_shot.MODEL:
        if pipeline is None:
            raise RequestError(503, NOT_READY)
        why = pipeline.zero_shot_missing()
        if why is not None:
            raise RequestError(404, f"unknown model '{name}': {why}")
    elif name != MODEL:
        served = ", ".join(f"'{m}'" for m in models(pipeline))
        raise RequestError(404, f"unknown model '{name}': this server serves {served}")
    if version not in ("", VERSION):
        raise RequestError(404, f"unknown version '{version}' of model '{name}': it has version '{VERSION}'")


def element_limits(settings: Settings) -> dict[str, int]:
    """How many elements each model's BYTES inputs may hold: refused past that while they are still read."""
    return {IMAGE: settings.max_batch_images, zero_shot.LABELS: settings.zero_shot_max_labels}


def server_metadata() -> dict[str, object]:
    return {"name": SERVER, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def model_metadata(pipeline: Pipeline, name: str) -> dict[str, object]:
    if name == zero_shot.MODEL:
        return zero_shot.model_metadata()
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


async def infer(pipeline: Pipeline, req: InferRequest, principal: Principal) -> tuple[list[OutputTensor], Answer]:
    """Check `req`, classify its images in one pipeline call (model `rac`; `rac-zero-shot`'s are answered by
    service/v2/zero_shot.py), and return the outputs it asked for and the first image's answer (the request
    holds one memory version and one filter for all its images: its version and neighbours used are theirs).

    Raises RequestError for anything the request got wrong (a bad image fails the whole request, naming the
    item); the pipeline's Overloaded goes through (the front-ends answer 503 / UNAVAILABLE)."""
    check_model(req.model, req.version, pipeline)
    if req.model == zero_shot.MODEL:
        return await zero_shot.infer(pipeline, req, principal)
    images = bytes_inputs(req, [IMAGE], {IMAGE: pipeline.settings.max_batch_images})[IMAGE]
    classes = pipeline.manifest.classes
    top_k = min(int_parameter(req.parameters, "top_k", DEFAULT_TOP_K, 1, None), len(classes))
    neighbors = int_parameter(req.parameters, "neighbors", DEFAULT_NEIGHBORS, 0, pipeline.k)
    names = outputs_asked(req, list(OUTPUTS))
    only = filter_parameters(req.parameters)
    memory = pipeline.memories.reachable(memory_parameter(req.parameters), principal)
    answers = answered(await pipeline.classify(images, neighbors, only, memory), IMAGE)
    return [_tensor(name, answers, classes, top_k) for name in names], answers[0]


def _tensor(name: str, answers: list[Answer], classes: list[str], top_k: int) -> OutputTensor:
    # np.array over the rows, not np.stack: the same (B, ...) array, without np.stack's Python around it
    if name == "PROBABILITIES":
        return OutputTensor(name, "FP32", np.array([a.probs for a in answers], np.float32))  # (B, C)
    if name == "LABELS":
        top = np.argsort(-np.array([a.probs for a in answers]), axis=1, kind="stable")[:, :top_k]  # (B, top_k)
        labels = np.array([[classes[c].encode() for c in row] for row in top.tolist()], dtype=object)
        return OutputTensor(name, "BYTES", labels.reshape(top.shape))
    return neighbor_tensor(name, [a.neighbors for a in answers])
