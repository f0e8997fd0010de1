"""A tiny artifact directory made in a second, for driving the service without real weights: a random
pooled-linear ONNX encoder, a random memory, a scripted head, and a manifest that fits them. With `query`, the
encoder has a second output as a fine-tuned build's has (models/finetune.py): the vector the head reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.encoders import export_onnx
from models.heads import Head, HeadConfig, MemoryAttention
from models.memory.make import MemoryItems, build_index, thumbnail_bytes, write_memory
from service.artifacts import (
    CHECKED_FILES,
    ENCODER,
    FORMAT_VERSION,
    HEAD,
    MANIFEST,
    EncoderInfo,
    HeadInfo,
    IndexInfo,
    Manifest,
    MemoryInfo,
    QueryInfo,
    digest,
)
from service.core.decode import InputSpec

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


class TinyPair(nn.Module):
    """A fine-tuned build's encoder in small: (embedding: the search key, query: another vector), each (B, d)."""

    def __init__(self, d: int):
        super().__init__()
        self.key, self.query = TinyEncoder(d), TinyEncoder(d)
        torch.manual_seed(1)
        nn.init.normal_(self.query.proj.weight, std=0.3)  # unlike the key's: an answer shows which one the head read

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key(x), self.query(x)


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
    filters: bool = False,
    query: bool = False,
) -> Manifest:
    """filters: items of two sources (every fourth "downstream", the rest "external"), keys `item-<id>`, and
    tags `even` (even ids), `third` (every third id) and `rare` (ids 0..14)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if query:
        export_onnx(TinyPair(d), size, out / ENCODER, outputs=("embedding", "query"))
    else:
        export_onnx(TinyEncoder(d), size, out / ENCODER)
    keys = rng.standard_normal((n_items, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.standard_normal((n_items, dv)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    labels = rng.integers(0, len(CLASSES), n_items)
    ids = np.arange(n_items)
    source = np.where(ids % 4 == 0, "downstream", "external") if filters else np.full(n_items, "external")
    items = MemoryItems(
        pool=np.full(n_items, "train"),
        index=ids,
        source=source,
        text=[f"a {CLASSES[c]} number {i}" for i, c in enumerate(labels)],
        label=labels,
        true_label=labels,
    )
    thumbs = [thumbnail_bytes(item_image(i)) for i in range(n_items)] if thumbnails else None
    keys_ = [f"item-{i}" for i in ids] if filters else None
    tags = (
        [[t for t, on in (("even", i % 2 == 0), ("third", i % 3 == 0), ("rare", i < 15)) if on] for i in ids]
        if filters
        else None
    )
    write_memory(out, build_index(keys, index), keys, values, items, thumbs, keys_, tags)
    cfg = head or HeadConfig(kind="mam", layers=2, attention="both")
    torch.manual_seed(0)
    module = Head(cfg, d, dv, len(CLASSES)).eval()
    for layer in module.layers:  # non-zero attention parameters, so attention is not uniform
        assert isinstance(layer, MemoryAttention)
        nn.init.normal_(layer.q.weight, std=0.5)
        nn.init.constant_(layer.temperature, 0.1)
    torch.jit.script(module).save(str(out / HEAD))
    spec = InputSpec(size, grey=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        memory_version="synthetic1",
        created="2026-01-01T00:00:00+00:00",
        encoder=EncoderInfo(
            name="tiny",
            input=spec.to_dict(),
            dim=d,
            projection="none",
            query=QueryInfo(dim=d, finetune={"blocks": 1}) if query else None,
        ),
        memory=MemoryInfo(
            size=n_items,
            sources={str(s): int(c) for s, c in zip(*np.unique(source, return_counts=True), strict=True)},
            value_encoder="random",
            value_dim=dv,
            text_noise=0.0,
            next_id=n_items,
        ),
        index=IndexInfo(type=index, metric="cosine", nprobe=4 if index != "Flat" else 0, recall_at_k=1.0, k=k),
        head=HeadInfo(
            kind=cfg.kind, config=cfg.to_dict(), train={}, layers=module.num_layers, uses_keys=module.uses_keys
        ),
        classes=CLASSES,
        files={name: digest(out / name) for name in CHECKED_FILES},
        evaluation={},
        examples=[],
        build={},
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=1))
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
