"""Model `rac-zero-shot` of the Open Inference Protocol: POST /classify/zero-shot's answer, as tensors.

Served where the artifacts have zero-shot parts (`rac build --zero-shot`) and while they fit the memory
served (a swap to a version without them takes the model away: 404, unknown model, saying why). A request is
one call of the pipeline's zero-shot entry point, the one POST /classify/zero-shot makes: its images share
the batch, its labels are embedded once and checked by the route's rules.

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

from typing import TYPE_CHECKING

import numpy as np

from service.core.zero_shot import check_labels
from service.errors import RequestError
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

if TYPE_CHECKING:
    from service.auth import Principal
    from service.core.pipeline import Answer, Pipeline

MODEL, PLATFORM = "rac-zero-shot", "rac_zero_shot"
IMAGE, LABELS = "IMAGE", "LABELS"
OUTPUTS = {  # name: (datatype, shape), in the order a response lists them
    "PROBABILITIES": ("FP32", [-1, -1]),
    "LABEL": ("BYTES", [-1]),
    "NEIGHBOR_IDS": ("INT64", [-1, -1]),
    "NEIGHBOR_SIMILARITIES": ("FP32", [-1, -1]),
}


def model_metadata() -> dict[str, object]:
    return {
        "name": MODEL,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in (IMAGE, LABELS)],
        "outputs": [{"name": n, "datatype": t, "shape": s} for n, (t, s) in OUTPUTS.items()],
    }


async def infer(pipeline: Pipeline, req: InferRequest, principal: Principal) -> tuple[list[OutputTensor], Answer]:
    """Check `req` (a model the front-end found served), classify its images among its labels, and return the
    outputs it asked for and the memory version that answered. RequestError for what the request got wrong
    (bad labels 400, by POST /classify/zero-shot's rules; a bad image 400, naming it); Overloaded goes through."""
    s = pipeline.settings
    tensors = bytes_inputs(req, [IMAGE, LABELS], {IMAGE: s.max_batch_images, LABELS: s.zero_shot_max_labels})
    template = req.parameters.get("template", s.zero_shot_template)
    if not isinstance(template, str):
        raise RequestError(400, f"parameter 'template' must be a string, got {template!r}")
    k = pipeline.zero_shot.info.k if pipeline.zero_shot is not None else 0
    neighbors = int_parameter(req.parameters, "neighbors", 0, 0, k)
    names = outputs_asked(req, list(OUTPUTS))
    try:
        labels = check_labels(
            [_text(e, i) for i, e in enumerate(tensors[LABELS])],
            template,
            s.zero_shot_max_labels,
            s.zero_shot_max_label_chars,
        )
    except RequestError as e:
        raise RequestError(400, e.message) from None  # the protocol's status for any bad input
    only = filter_parameters(req.parameters)
    memory = pipeline.memories.reachable(memory_parameter(req.parameters), principal)
    result = await pipeline.zero_shot_classify(tensors[IMAGE], labels, template, neighbors, only, memory)
    answers = answered(result.answers, IMAGE)
    probs = np.array([a.probs for a in answers], np.float32)  # (B, L)
    out = []
    for name in names:
        if name == "PROBABILITIES":
            out.append(OutputTensor(name, "FP32", probs))
        elif name == "LABEL":
            out.append(
                OutputTensor(name, "BYTES", np.array([labels[int(i)].encode() for i in probs.argmax(1)], object))
            )
        else:
            out.append(neighbor_tensor(name, [a.neighbors for a in answers]))
    return out, answers[0]


def _text(element: bytes, i: int) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, f"{LABELS}[{i}] is not UTF-8 text") from None
