"""A dual encoder from parts that ship, LiT-style: the query encoder stays locked, the text tower is the frozen
all-MiniLM-L6-v2 plus a trained linear projection into the image embedding space (InfoNCE, learned
temperature) on the memory's image-text pairs, noisy alt-text included.

Some classes are held out: no image of them and no text naming them is used to train the projection (nor,
in models/zero_shot/reco.py, the fusion), while the memory still holds pairs of every class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

PROMPT = "a photo of a {}."


@dataclass
class AlignConfig:
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-2  # chosen on validation (seen classes) by `rac evaluate --zero-shot`
    weight_decay: float = 1e-4
    init_temperature: float = 0.07
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Pairs:
    """Image-text pairs as the towers see them: frozen image embeddings and indices into a table of distinct
    texts (memory texts repeat a lot; each distinct one is embedded once)."""

    z: np.ndarray  # (n, d) float32, L2-normalised query-encoder embeddings
    text: np.ndarray  # (n,) int64 into `table`
    table: np.ndarray  # (T, dt) float32, frozen text-encoder embeddings of the distinct texts


def seen_rows(true_label: np.ndarray, named_label: np.ndarray, held_out: tuple[int, ...]) -> np.ndarray:
    """Rows usable for training: neither the image's class nor the class its text names is held out."""
    held = np.asarray(held_out, np.int64)
    return np.flatnonzero(~np.isin(true_label, held) & ~np.isin(named_label, held))


class TextProjection(nn.Module):
    """Frozen text embedding (B, dt) -> aligned embedding (B, d), L2-normalised; and the learned logit scale."""

    def __init__(self, text_dim: int, dim: int, init_temperature: float = 0.07):
        super().__init__()
        self.linear = nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.linear(t), dim=-1)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()


def identity_projection(dim: int, scale: float) -> TextProjection:
    """For a text tower already aligned with the image tower (a user's pair): no training, only the
    normalisation, and `scale` as the logit scale."""
    proj = TextProjection(dim, dim, 1 / scale)
    with torch.no_grad():
        proj.linear.weight.copy_(torch.eye(dim))
        proj.linear.bias.zero_()
    return proj.eval()


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, text_id: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE whose targets count every pair with the same text as a positive (memory captions
    repeat: treating identical captions as negatives would punish the right answer)."""
    logits = scale * img @ txt.T  # (b, b)
    same = (text_id[:, None] == text_id[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def fit(
    params: Iterable[nn.Parameter],
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    rng: np.random.Generator,
    loss_of: Callable[[np.ndarray], torch.Tensor],
) -> list[float]:
    """AdamW with a cosine schedule over `epochs` passes of n rows, shuffled by `rng` each epoch and cut into
    batches; loss_of(rows) is a batch's loss. The mean loss of each epoch."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for _ in range(epochs):
        order = rng.permutation(n)
        total, count = 0.0, 0
        for s in range(0, n, batch_size):
            loss = loss_of(order[s : s + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / count)
    return losses


def train_alignment(pairs: Pairs, cfg: AlignConfig) -> tuple[TextProjection, list[float]]:
    """The text projection and the loss of each epoch (mean over its steps)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    proj = TextProjection(pairs.table.shape[1], pairs.z.shape[1], cfg.init_temperature)
    z, ids, table = torch.from_numpy(pairs.z), torch.from_numpy(pairs.text), torch.from_numpy(pairs.table)

    def loss_of(batch: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(batch)
        return contrastive_loss(z[rows], proj(table)[ids[rows]], ids[rows], proj.scale)  # T << batch

    losses = fit(proj.parameters(), len(ids), cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, rng, loss_of)
    return proj.eval(), losses


@torch.no_grad()
def project(proj: TextProjection, emb: np.ndarray) -> np.ndarray:
    """(n, dt) frozen text embeddings -> (n, d) aligned, float32."""
    return proj(torch.from_numpy(np.asarray(emb, np.float32))).numpy()


def distinct_texts(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in order of first appearance, and each row's index into them."""
    unique: dict[str, int] = {}
    index = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), np.int64, len(texts))
    return list(unique), index
