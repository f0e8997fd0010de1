"""Model `rac-zero-shot` of the Open Inference Protocol: POST /classify/zero-shot's answer, as tensors.

Served where the artifacts have zero-shot parts (`rac build --zero-shot`) and while they fit the memory
served (a swap to a version without them takes the model away: 404, unknown model, saying why). Each image
is one call of the zero-shot entry point the REST route makes (`ZeroShot.classify`), all of a request's at
once, so that they share the zero-shot batcher; the labels are checked by the route's rules.

Model `rac-zero-shot`, version `1`:
  inputs  IMAGE                  BYTES [B]     encoded images (PNG, JPEG or WebP)
          LABELS                 BYTES [L]     the candidate labels, UTF-8 (in JSON: plain strings)
  outputs PROBABILITIES          FP32  [B, L]  every label's probability, in the order of LABELS
          LABEL                  BYTES [B]     the most probable label
          NEIGHBOR_IDS           INT64 [B, n]  memory ids of the neighbours whose texts refined the image
          NEIGHBOR_SIMILARITIES  FP32  [B, n]  their cosine similarity to the query
  parameters template (a prompt with '{}' for the label; default the server's) and neighbors (n, default 0,
  at most the k the zero-shot parts fuse).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import numpy as np

from service.decode import DecodeError
from service.v2_types import VERSION, InferRequest, Output, V2Error, bytes_inputs, int_parameter, outputs_asked
from service.zeroshot import LabelError, ZeroShot, check_labels

if TYPE_CHECKING:
    from service.pipeline import Pipeline

MODEL, PLATFORM = "rac-zero-shot", "rac_zero_shot"
IMAGE, LABELS = "IMAGE", "LABELS"
OUTPUTS = {  # name: (datatype, shape), in the order a response lists them
    "PROBABILITIES": ("FP32", [-1, -1]),
    "LABEL": ("BYTES", [-1]),
    "NEIGHBOR_IDS": ("INT64", [-1, -1]),
    "NEIGHBOR_SIMILARITIES": ("FP32", [-1, -1]),
}


def available(pipeline: Pipeline) -> str | None:
    """None where the model is served now, else why not."""
    zs = pipeline.zero_shot
    if zs is None:
        return "these artifacts have no zero-shot parts: rebuild them with `rac build --zero-shot --out DIR`"
    return zs.missing(pipeline.version)


def model_metadata() -> dict[str, object]:
    return {
        "name": MODEL,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in (IMAGE, LABELS)],
        "outputs": [{"name": n, "datatype": t, "shape": s} for n, (t, s) in OUTPUTS.items()],
    }


async def infer(pipeline: Pipeline, req: InferRequest) -> tuple[list[Output], str]:
    """Check `req` (a model the front-end found served), classify its images among its labels, and return the
    outputs it asked for and the memory version that answered. V2Error for what the request got wrong (bad
    labels 400, by POST /classify/zero-shot's rules; a bad image 400, naming it); Overloaded goes through."""
    zs = cast(ZeroShot, pipeline.zero_shot)
    s = pipeline.settings
    tensors = bytes_inputs(req, [IMAGE, LABELS], {IMAGE: s.max_batch_images, LABELS: s.zero_shot_max_labels})
    template = req.parameters.get("template", s.zero_shot_template)
    if not isinstance(template, str):
        raise V2Error(400, f"parameter 'template' must be a string, got {template!r}")
    neighbors = int_parameter(req.parameters, "neighbors", 0, 0, zs.info.k)
    names = outputs_asked(req, list(OUTPUTS))
    try:
        given = [_text(e, i) for i, e in enumerate(tensors[LABELS])]
        labels = check_labels(given, template, s.zero_shot_max_labels, s.zero_shot_max_label_chars)
    except LabelError as e:
        raise V2Error(400, e.message) from None
    calls = [zs.classify(image, labels, template, neighbors) for image in tensors[IMAGE]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    bad = []
    for i, r in enumerate(results):
        if isinstance(r, LabelError):  # the memory was swapped under the request
            raise V2Error(r.status if r.status == 404 else 400, r.message)
        if isinstance(r, DecodeError):
            bad.append(f"{IMAGE}[{i}]: {r.message}")
        elif isinstance(r, BaseException):  # Overloaded, or what the pipeline never answers with
            raise r
    if bad:
        raise V2Error(400, "; ".join(bad))
    answers = cast(list[dict[str, object]], results)
    return [_tensor(name, answers, labels) for name in names], str(answers[0]["memory_version"])


def _text(element: bytes, i: int) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise V2Error(400, f"{LABELS}[{i}] is not UTF-8 text") from None


def _tensor(name: str, answers: list[dict[str, object]], labels: list[str]) -> Output:
    predictions = [cast(list[dict[str, object]], a["predictions"]) for a in answers]
    if name == "PROBABILITIES":
        column = {label: j for j, label in enumerate(labels)}
        probs = np.zeros((len(answers), len(labels)), np.float32)  # (B, L)
        for i, row in enumerate(predictions):
            for p in row:
                probs[i, column[cast(str, p["label"])]] = cast(float, p["probability"])
        return Output(name, "FP32", probs)
    if name == "LABEL":  # predictions come most probable first
        return Output(name, "BYTES", np.array([cast(str, row[0]["label"]).encode() for row in predictions], object))
    key, datatype, dtype = {
        "NEIGHBOR_IDS": ("id", "INT64", np.int64),
        "NEIGHBOR_SIMILARITIES": ("similarity", "FP32", np.float32),
    }[name]
    values = [[n[key] for n in cast(list[dict[str, object]], a["neighbors"])] for a in answers]
    return Output(name, datatype, np.array(values, dtype).reshape(len(answers), len(values[0])))  # (B, n)
