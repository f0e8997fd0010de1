"""A tiny artifact directory made in a second, for driving the service without real weights: a random
pooled-linear ONNX encoder, a random memory, a scripted head, and a manifest that fits them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.encoders import export_onnx
from models.mam import Head, HeadConfig, MemoryAttention
from models.memory import MemoryItems, build_index, thumbnail_bytes, write_memory
from service import artifacts as A
from service.decode import InputSpec

CLASSES = ["circle", "square", "triangle"]


class TinyEncoder(nn.Module):
    """(B, 3, S, S) -> pool to 4x4 -> linear -> L2-normalised (B, d)."""

    def __init__(self, d: int):
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(48, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(self.pool(x).flatten(1)), dim=-1)


def make_artifacts(
    out: Path,
    n_items: int = 300,
    d: int = 16,
    dv: int = 8,
    k: int = 10,
    size: int = 16,
    head: HeadConfig | None = None,
    index: str = "Flat",
    thumbnails: bool = False,
) -> A.Manifest:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    export_onnx(TinyEncoder(d), size, out / A.ENCODER)
    keys = rng.standard_normal((n_items, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n_items, dv)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    labels = rng.integers(0, len(CLASSES), n_items)
    items = MemoryItems(
        pool=np.full(n_items, "train"),
        index=np.arange(n_items),
        source=np.full(n_items, "external"),
        text=[f"a {CLASSES[c]} number {i}" for i, c in enumerate(labels)],
        label=labels,
        true_label=labels,
    )
    thumbs = [thumbnail_bytes(item_image(i)) for i in range(n_items)] if thumbnails else None
    write_memory(out, build_index(keys, index), keys, values, items, thumbs)
    cfg = head or HeadConfig(kind="mam", layers=2, attention="both")
    torch.manual_seed(0)
    module = Head(cfg, d, dv, len(CLASSES)).eval()
    for layer in module.layers:  # non-zero attention parameters, so attention is not uniform
        assert isinstance(layer, MemoryAttention)
        nn.init.normal_(layer.q.weight, std=0.5)
        nn.init.constant_(layer.temperature, 0.1)
    torch.jit.script(module).save(str(out / A.HEAD))
    spec = InputSpec(size, grey=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    manifest = A.Manifest(
        format_version=A.FORMAT_VERSION,
        memory_version="synthetic1",
        created="2026-01-01T00:00:00+00:00",
        encoder=A.EncoderInfo(name="tiny", input=spec.to_dict(), dim=d, projection="none"),
        memory=A.MemoryInfo(
            size=n_items, sources={"external": n_items}, value_encoder="random", value_dim=dv, text_noise=0.0
        ),
        index=A.IndexInfo(type=index, metric="cosine", nprobe=4 if index != "Flat" else 0, recall_at_k=1.0, k=k),
        head=A.HeadInfo(
            kind=cfg.kind, config=cfg.to_dict(), train={}, layers=module.num_layers, uses_keys=module.uses_keys
        ),
        classes=CLASSES,
        files={name: A.digest(out / name) for name in A.CHECKED_FILES},
        evaluation={},
        examples=[],
        build={},
    )
    (out / A.MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest


def item_image(i: int) -> Image.Image:
    """The synthetic memory's image of item i (for its thumbnail): 60x40 RGB, a colour from i."""
    return Image.new("RGB", (60, 40), (i % 256, (7 * i) % 256, (13 * i) % 256))


def png(seed: int, size: int = 24, mode: str = "RGB") -> bytes:
    """A small random image as PNG bytes; different seeds give different images."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
