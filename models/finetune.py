"""Fine-tuning the query encoder with the head ("Ours + FT"): the last blocks of EfficientNet-Lite are trained
with the head (and its head conv and the projection too, with `head="trained"`), while the search keeps the
frozen encoder's embedding, so the memory's keys never change. Served as one ONNX graph: the frozen trunk,
computed once, feeds the frozen tail (output `embedding`, the search key) and the trained copy of the tail
(output `query`, the head's input); with the head conv and projection frozen, one head serves both tails.

    rac build --finetune --out artifacts/ft                               # a fine-tuned build
    rac train --finetune --artifacts artifacts/demo --ft-blocks 2          # one head on a build's data, validation
    rac evaluate --finetune --artifacts artifacts/demo --json results/finetune_split0.json

Training never runs the trunk: its features of every training image (and of `views` augmented views of each),
of validation and of test images are computed once with onnxruntime and cached on disk; an epoch runs only the
tails of the few last blocks, on 2x2 maps at 64 px.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from models.data import AugmentedImages, ImageSet, Part
from models.encoders import Projection, efficientnet_lite, export_onnx
from models.features import Prepared, cached_embed
from models.train import TunedQuery
from service.core.decode import preprocess
from service.core.encode import QUERY, Encoder

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    blocks: int = 2  # last EfficientNet-Lite blocks trained (of 16), with the head conv and the projection
    encoder_lr: float = 3e-4  # AdamW, on the head's schedule (warm-up, cosine); the head keeps its own lr
    augment: str = "flip"  # "none", or models.data.AugmentedImages' kind: random views of the training images
    views: int = 2  # augmented views of each training image besides itself (each one's trunk features cached)
    drop_connect: float = 0.2  # stochastic depth in the trained blocks: EfficientNet's own rate and profile
    head: str = "frozen"  # "frozen": the head conv and projection kept, shared by both tails; "trained": trained too

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Trunk(nn.Module):
    """Stem and every block but the last few: (B, 3, S, S) -> (B, C, h, w). Frozen; computed once an image."""

    def __init__(self, net: Any, cut: int):  # net: an EfficientNet (untyped third-party module)
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[:cut])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for block in self.blocks:
            x = block(x)
        return x


class Flat(nn.Module):
    """A trunk whose output is flattened (B, C*h*w): what the feature cache stores."""

    def __init__(self, trunk: Trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels).flatten(1)


class Tail(nn.Module):
    """The last blocks, head conv, mean pooling, L2 norm and projection: (B, C, h, w) or its flattened
    (B, C*h*w) -> L2-normalised (B, d). The frozen encoder is Trunk then Tail exactly (models/encoders.py:
    Embedder, then Projection)."""

    def __init__(self, net: Any, cut: int, shape: tuple[int, int, int], projection: nn.Module, drop_connect: float):
        super().__init__()
        n = len(net._blocks)
        self.blocks = nn.ModuleList(net._blocks[cut:])
        self.rates = [drop_connect * i / n for i in range(cut, n)]  # EfficientNet's stochastic-depth profile
        self.conv_head, self.bn, self.act = net._conv_head, net._bn1, net._swish
        self.shape = shape  # (C, h, w) of the trunk's output
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(x))

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) or (B, C*h*w) trunk features -> the last block's output (B, C', h, w)."""
        x = x.view(-1, *self.shape)
        for block, rate in zip(self.blocks, self.rates, strict=True):
            x = block(x, drop_connect_rate=rate)  # drop connect acts in training mode only
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output -> head conv, mean pooling, L2 norm, projection: (B, d), L2-normalised."""
        pooled = self.act(self.bn(self.conv_head(x))).mean((2, 3))  # (B, 1280)
        return nn.functional.normalize(self.projection(nn.functional.normalize(pooled, dim=-1)), dim=-1)


class Served(nn.Module):
    """What encoder.onnx computes in a fine-tuned build: pixels -> (embedding, query), each (B, d).

    shared_head: the query tail kept the frozen head conv and projection, so both tails' blocks feed one head
    as a batch of 2B: at small batches the head's weights, not its arithmetic, bound its time, and they are
    then read once for both outputs."""

    def __init__(self, trunk: Trunk, key: Tail, query: Tail, shared_head: bool = False):
        super().__init__()
        self.trunk, self.key, self.query, self.shared_head = trunk, key, query, shared_head

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trunk(pixels)  # once for both tails
        if not self.shared_head:
            return self.key(t), self.query(t)
        b = t.shape[0]
        both = self.key.head(torch.cat([self.key.run_blocks(t), self.query.run_blocks(t)]))  # (2B, d)
        return both[:b], both[b:]


def read_projection(encoder: Path) -> Projection:
    """The PCA projection inside an exported encoder (its `mean` (D,) and `components` (D, d) initializers),
    so that a build's frozen encoder can be rebuilt in torch exactly."""
    found = {
        i.name.rsplit(".", 1)[-1]: numpy_helper.to_array(i)
        for i in onnx.load(str(encoder)).graph.initializer
        if i.name.endswith((".mean", ".components"))
    }
    if set(found) != {"mean", "components"} or found["mean"].shape[0] != found["components"].shape[0]:
        raise ValueError(f"{encoder}: no PCA projection (mean, components) found among its initializers")
    return Projection(found["mean"], found["components"])


def trainable_projection(frozen: nn.Module) -> nn.Module:
    """The frozen projection as a Linear layer to train: (x - mean) @ C = x @ C - mean @ C."""
    if not isinstance(frozen, Projection):
        return nn.Identity()  # no PCA: the tail ends at the encoder's own pooled feature
    linear = nn.Linear(*frozen.components.shape)
    with torch.no_grad():
        linear.weight.copy_(frozen.components.T)  # (d, D)
        linear.bias.copy_(-(frozen.mean @ frozen.components))
    return linear


@dataclass
class Tuning:
    """What fine-tuning needs, made once per build's data: the frozen encoder split at the cut, and trunk
    features of the training images (and their views), validation and test images."""

    cfg: FinetuneConfig
    trunk: Trunk
    key: Tail  # the frozen tail: the search key
    train: np.ndarray  # (1 + views, n, F) float32, view 0 the images themselves; rows as the split's
    val: np.ndarray  # (n, F)
    test: np.ndarray  # (n, F)

    def trainable(self) -> TunedQuery:
        """A fresh trainable copy of the frozen tail, over the training features."""
        tail = copy.deepcopy(self.key)
        if self.cfg.head == "trained":
            tail.projection = trainable_projection(self.key.projection)
        else:
            tail.conv_head.requires_grad_(False)
            tail.bn.requires_grad_(False)
        return TunedQuery(tail, self.train, self.cfg.encoder_lr)

    def served(self, query: nn.Module) -> Served:
        assert isinstance(query, Tail)
        shared = self.cfg.head == "frozen"
        if shared:  # the query tail's head must be the frozen one, or sharing it would change the query vectors
            frozen, kept = self.key.state_dict(), query.state_dict()
            head = [k for k in frozen if k.startswith(("conv_head.", "bn.", "projection."))]
            if not head or not all(torch.equal(frozen[k], kept[k]) for k in head):
                raise ValueError("the query tail's head conv or projection differs from the frozen one's")
        return Served(self.trunk, self.key, query, shared).eval()


@torch.no_grad()
def query_vectors(tail: nn.Module, feats: np.ndarray, batch: int = 2048) -> np.ndarray:
    """(n, F) trunk features -> (n, d) float32 query vectors."""
    tail.eval()
    return np.concatenate([tail(torch.from_numpy(feats[s : s + batch])).numpy() for s in range(0, len(feats), batch)])


def _images(prep: Prepared, part: Part) -> ImageSet:
    return prep.dataset.pools[part.pool].subset(part.index)


def make_tuning(prep: Prepared, encoder: str, cfg: FinetuneConfig, cache_dir: Path) -> Tuning:
    """Rebuild the frozen encoder in torch from its name and the PCA in `prep`'s exported encoder (checked to
    reproduce its embeddings), split it, and compute (or read from the cache) the trunk features."""
    if not encoder.startswith("efficientnet-lite"):
        raise ValueError(f"fine-tuning trains the last blocks of an EfficientNet-Lite encoder, not of {encoder}")
    spec = prep.spec
    net = efficientnet_lite(encoder, spec.size).backbone
    n = len(net._blocks)
    if not 1 <= cfg.blocks <= n:
        raise ValueError(f"blocks to fine-tune must be 1 to {n}, not {cfg.blocks}")
    if cfg.head not in ("frozen", "trained"):
        raise ValueError(f"the head conv and projection are 'frozen' or 'trained', not {cfg.head!r}")
    cut = n - cfg.blocks
    trunk = Trunk(net, cut).eval()
    with torch.no_grad():
        shape = tuple(trunk(torch.zeros(1, 3, spec.size, spec.size)).shape[1:])
    projection = nn.Identity() if prep.projection == "none" else read_projection(prep.encoder_path)
    key = Tail(net, cut, (shape[0], shape[1], shape[2]), projection, cfg.drop_connect).eval()
    check_frozen(trunk, key, prep)

    path = cache_dir / f"trunk-{encoder}-{spec.size}-cut{cut}.onnx"
    export_onnx(Flat(trunk), spec.size, path)

    def feats(images: ImageSet, desc: str) -> np.ndarray:
        return cached_embed(images, path, spec, cache_dir, desc=f"trunk features: {desc}")

    s = prep.splits
    train = _images(prep, s.train)
    assert not isinstance(train, AugmentedImages)
    views = [feats(train, "train")]
    for v in range(1, cfg.views + 1 if cfg.augment != "none" else 1):
        views.append(feats(AugmentedImages(train, cfg.augment, seed=v), f"train view {v}"))
    val, test = feats(_images(prep, s.val), "val"), feats(_images(prep, s.test), "test")
    return Tuning(cfg, trunk, key, np.stack(views), val, test)


def check_frozen(trunk: Trunk, key: Tail, prep: Prepared, count: int = 16, tol: float = 1e-4) -> None:
    """The torch encoder rebuilt for fine-tuning must give the embeddings the build's exported encoder gave
    (the memory's keys), or the fine-tuned query would start from another encoder than the search's."""
    val = prep.splits.val
    images = prep.dataset.pools[val.pool]
    rows = val.index[:count]
    pixels = np.stack([preprocess(images.image(int(i)), prep.spec) for i in rows])  # (n, 3, S, S)
    with torch.no_grad():
        got = key(trunk(torch.from_numpy(pixels))).numpy()
    err = float(np.abs(got - prep.emb[val.pool][rows]).max())
    if err > tol:
        raise ValueError(f"the torch encoder rebuilt from {prep.encoder_path} differs from it by {err:.2g}")


def export_served(tuning: Tuning, query: nn.Module, prep: Prepared, out: Path, count: int = 32) -> float:
    """Export the two-output encoder to `out` and check it on validation images against torch: its
    `embedding` against the frozen embeddings the memory was built with, its `query` against the trained
    tail. Returns the largest difference; raises over 1e-4."""
    model = tuning.served(query)
    export_onnx(model, prep.spec.size, out, outputs=("embedding", QUERY))
    val = prep.splits.val
    images = prep.dataset.pools[val.pool]
    rows = val.index[:count]
    pixels = np.stack([preprocess(images.image(int(i)), prep.spec) for i in rows])
    key, got = Encoder(out, "cpu").both(pixels)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels))[1].numpy()
    err = max(float(np.abs(key - prep.emb[val.pool][rows]).max()), float(np.abs(got - want).max()))
    if err > 1e-4:
        raise ValueError(f"{out} differs from the torch encoder by {err:.2g}")
    return err
