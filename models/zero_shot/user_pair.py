"""A user's own aligned image-text pair (a CLIP export made elsewhere, say) as the towers of a zero-shot build.

    rac build --zero-shot --image-tower image.onnx --text-tower text.onnx \\
        --tokenizer tokenizer.json --preprocess pair.json --out DIR

The image tower becomes the artifact's encoder: the memory's keys, the closed-set head and every query (of
/classify and /classify/zero-shot) go through it, with the preprocessing the spec names. The text tower's
output is taken as aligned with it: no projection is trained (the fusion modules are, on the memory's
pairs). Both graphs are wrapped to the artifact's interface, so the service runs them as it runs its own:
  encoder.onnx      `pixels` (B, 3, S, S) float32 -> L2-normalised `embedding` (B, d)
  text_tower.onnx   `input_ids`, `attention_mask` (B, L) int64 -> L2-normalised `embedding` (B, d), and
                    `search`, the same vector: the text index searches the aligned space, as RECO does
                    with CLIP's own text embeddings.

The spec (JSON; only `image.size` and `text.max_length` are required):
  {"image": {"size": 224, "grey": false, "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276],
             "channels": 3, "input": null, "output": null},
   "text": {"max_length": 77, "input_ids": "input_ids", "attention_mask": "attention_mask", "output": null,
            "pad_id": 0, "pad_token": "[PAD]", "fixed_length": false},
   "logit_scale": 100.0}
`channels` 1: the tower takes one grey channel (then `grey` must be true); `input` / `output`: the graph's
tensor names (default: its only input, its first output); `attention_mask` null: the tower takes ids only;
`fixed_length`: pad every text to `max_length` (CLIP's graphs want 77); `logit_scale`: the fusion training's
starting scale (default 1 / 0.07).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.core.decode import InputSpec

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TextSide:
    max_length: int
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    output: str | None = None
    pad_id: int = 0
    pad_token: str = "[PAD]"
    fixed_length: bool = False


@dataclass(frozen=True)
class PairSpec:
    image: InputSpec
    channels: int  # what the image tower takes: 3, or 1 (the first of the service's three equal grey channels)
    image_input: str | None
    image_output: str | None
    text: TextSide
    logit_scale: float


def three(v: Any, what: str) -> tuple[float, float, float]:
    values = [float(x) for x in (v if isinstance(v, list) else [v])]
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or (what == "std" and min(values) <= 0):
        raise ValueError(f"image.{what} must be one number or three (std above zero), not {v!r}")
    return values[0], values[1], values[2]


def read_spec(path: Path) -> PairSpec:
    """The preprocessing spec; raises ValueError naming the field that is wrong."""
    try:
        raw = json.loads(path.read_text())
        image, text = dict(raw["image"]), dict(raw["text"])
        size, max_length = int(image["size"]), int(text["max_length"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected image.size and text.max_length at least ({e})") from None
    channels, grey = int(image.get("channels", 3)), bool(image.get("grey", False))
    if channels not in (1, 3) or (channels == 1 and not grey) or size < 1 or max_length < 2:
        raise ValueError(f"{path}: channels 1 (with grey true) or 3, size >= 1, max_length >= 2")
    known = set(TextSide.__dataclass_fields__)
    if unknown := set(text) - known:
        raise ValueError(f"{path}: unknown text fields {sorted(unknown)} (known: {sorted(known)})")
    spec = InputSpec(size, grey, three(image.get("mean", HALF), "mean"), three(image.get("std", HALF), "std"))
    return PairSpec(
        spec,
        channels,
        image.get("input"),
        image.get("output"),
        TextSide(**(text | {"max_length": max_length})),
        float(raw.get("logit_scale", 1 / 0.07)),
    )


@dataclass(frozen=True)
class UserPair:
    image_tower: Path
    text_tower: Path
    tokenizer: Path  # a `tokenizers` library tokenizer.json
    spec: PairSpec

    @classmethod
    def read(cls, image_tower: Path, text_tower: Path, tokenizer: Path, preprocess: Path) -> UserPair:
        for path in (image_tower, text_tower, tokenizer, preprocess):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
        return cls(image_tower, text_tower, tokenizer, read_spec(preprocess))


# ---------------------------------------------------------------- wrapping the graphs


def _inputs(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    initializers = {i.name for i in graph.initializer}
    return {i.name: i for i in graph.input if i.name not in initializers}


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def _free(graph: onnx.GraphProto, name: str) -> None:
    """Rename the graph's own value `name`, if it has one, so that the interface can use the name: a user's
    graph may name inner values `embedding` or `search` (torch's exporter names values after the operator
    that made them, and a token lookup is `embedding`)."""
    new = f"{name}__tower"
    if any(name in n.output for n in graph.node) or any(i.name == name for i in graph.initializer):
        _rename(graph, name, new)
        for proto in (*graph.initializer, *graph.input, *graph.value_info, *graph.output):
            if proto.name == name:
                proto.name = new


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _finish(
    model: onnx.ModelProto, tower: str, d: int, inputs: list[onnx.ValueInfoProto], pre: list[onnx.NodeProto]
) -> None:
    """Put `inputs` in place of the tower's own, `pre` before its nodes, and `embedding` (B, d) (its output
    `tower`, L2-normalised) as the only output."""
    g = model.graph
    kept = [i for i in g.input if i.name not in _inputs(g)]  # initializers listed as inputs stay
    _rename(g, tower, tower + "__raw")
    for taken in [i.name for i in inputs] + ["embedding"]:
        _free(g, taken)
    del g.input[:]
    g.input.extend(inputs + kept)
    nodes = [*pre, *g.node, helper.make_node("LpNormalization", [tower + "__raw"], ["embedding"], axis=-1, p=2)]
    del g.node[:]
    g.node.extend(nodes)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d]))


def wrap_image_tower(src: Path, spec: PairSpec, out: Path) -> int:
    """src -> out with the service's encoder interface; returns the embedding dimension."""
    model = onnx.load(str(src))
    g = model.graph
    inputs = _inputs(g)
    name = spec.image_input or (next(iter(inputs)) if len(inputs) == 1 else None)
    if name not in inputs:
        raise ValueError(f"{src}: name the image input in the spec (image.input); the graph takes {list(inputs)}")
    if inputs[name].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"{src}: the image input {name!r} must be float32")
    s = spec.image.size
    try:  # a batch of two: the service batches images
        raw = _run(src, {name: np.zeros((2, spec.channels, s, s), np.float32)})
    except Exception as e:
        raise ValueError(f"{src} does not take (2, {spec.channels}, {s}, {s}) float32 images: {e}") from None
    if raw.ndim != 2 or len(raw) != 2:
        raise ValueError(f"{src}: the image tower's output is {raw.shape}, expected (batch, d)")
    tower = spec.image_output or g.output[0].name
    _rename(g, name, name + "__in")
    if spec.channels == 1:  # the service's input repeats the grey channel three times: take the first
        g.initializer.append(helper.make_tensor("rac_first_channel", TensorProto.INT64, [1], [0]))
        pre = [helper.make_node("Gather", ["pixels", "rac_first_channel"], [name + "__in"], axis=1)]
    else:
        pre = [helper.make_node("Identity", ["pixels"], [name + "__in"])]
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, s, s])
    _finish(model, tower, int(raw.shape[1]), [pixels], pre)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return int(raw.shape[1])


def wrap_text_tower(src: Path, text: TextSide, out: Path) -> int:
    """src -> out with the artifact's text tower interface (`embedding` and `search`); returns d."""
    model = onnx.load(str(src))
    g = model.graph
    inputs = _inputs(g)
    wanted = {"input_ids": text.input_ids} | ({"attention_mask": text.attention_mask} if text.attention_mask else {})
    pre, feeds = [], {}
    for canonical, name in wanted.items():
        if name not in inputs:
            raise ValueError(f"{src}: no input {name!r} (text.{canonical} in the spec); it takes {list(inputs)}")
        kind = inputs[name].type.tensor_type.elem_type
        if kind not in (TensorProto.INT64, TensorProto.INT32):
            raise ValueError(f"{src}: input {name!r} must be int64 or int32")
        feeds[name] = np.ones((2, 5), np.int64 if kind == TensorProto.INT64 else np.int32)
        _rename(g, name, name + "__in")
        if kind == TensorProto.INT64:
            pre.append(helper.make_node("Identity", [canonical], [name + "__in"]))
        else:
            pre.append(helper.make_node("Cast", [canonical], [name + "__in"], to=TensorProto.INT32))
    if len(inputs) != len(wanted):
        raise ValueError(f"{src}: the text tower takes {list(inputs)}; the spec names {list(wanted.values())}")
    try:
        raw = _run(src, feeds)
    except Exception as e:
        raise ValueError(f"{src} does not run on a (2, 5) batch of token ids: {e}") from None
    if raw.ndim != 2 or len(raw) != 2:
        raise ValueError(f"{src}: the text tower's output is {raw.shape}, expected (batch, d)")
    tokens = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"]) for n in wanted]
    for taken in ("attention_mask", "search"):  # the interface's names the graph may use inside
        _free(g, taken)
    _finish(model, text.output or g.output[0].name, int(raw.shape[1]), tokens, pre)
    if "attention_mask" not in wanted:  # the service always sends a mask: an input the graph ignores
        g.input.insert(1, helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]))
    g.node.append(helper.make_node("Identity", ["embedding"], ["search"]))
    g.output.append(helper.make_tensor_value_info("search", TensorProto.FLOAT, ["batch", int(raw.shape[1])]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return int(raw.shape[1])
