"""Train a head on retrieved neighbours with the logit-adjusted (LACE) loss, and run a head over a split."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.heads import Head, HeadConfig
from models.memory.make import Retrieved


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4  # AdamW
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    tau: float = 1.0  # logit adjustment: train on logits + tau * log(prior); predict on plain logits
    # 0 by default: with 10 classes, smoothing 0.1 caps the margin a head can reach (about 4.5 nats) below
    # the prior gap it must overcome at ratio 1000 (log 1000 = 6.9 nats), collapsing many-shot accuracy.
    label_smoothing: float = 0.0
    # Class-balanced query sampling: each epoch draws as many queries as there are, each with probability
    # proportional to 1 / (its class's count), with replacement, so every class is seen about equally often.
    balanced: bool = False
    # Attention supervision (training only): weight of a cross-entropy between each layer's attention and
    # the normalised indicator of the neighbours whose text names the query's class. 0 turns it off.
    attn_supervision: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class MemoryTensors:
    """Keys and values as torch tensors, gathered per batch of neighbour ids."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self.keys = np.asarray(keys, np.float32)  # (M, d)
        self.values = np.asarray(values, np.float32)  # (M, dv)

    def batch(
        self, data: Retrieved, rows: np.ndarray, k: int, head: Head
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's four inputs for some queries; keys and values only where the head reads them
        (gathering (b, k, dv) rows is most of the cost of training)."""
        ids = data.ids[rows, :k]  # (b, k)
        z = torch.from_numpy(data.z[rows])  # (b, d)
        sims = torch.from_numpy(data.sims[rows, :k])  # (b, k)
        # np.take: about twice as fast as torch's advanced indexing here.
        keys = np.take(self.keys, ids, axis=0) if head.uses_keys else np.empty((len(rows), k, 0), np.float32)
        values = np.take(self.values, ids, axis=0) if head.uses_values else np.empty((len(rows), k, 0), np.float32)
        return z, sims, torch.from_numpy(keys), torch.from_numpy(values)  # (b, k, d), (b, k, dv)


@dataclass
class TunedQuery:
    """A query encoder's tail trained with the head: the head reads tail(features) instead of the frozen z,
    and the tail's parameters get their own learning rate. Only the tail runs: its input, the frozen
    trunk's features of every training query, is computed once (models/finetune.py)."""

    tail: nn.Module  # (b, F) trunk features -> (b, d) L2-normalised query vectors
    feats: np.ndarray  # (views, n, F) float32: view 0 each training query itself, then augmented views
    lr: float

    def train(self) -> None:
        """Training mode, with BatchNorm kept on its pretrained statistics: the trained blocks see 2x2 maps, and
        their statistics over a batch of a long-tailed split would shift the frozen tail's features away."""
        self.tail.train()
        for m in self.tail.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def queries(self, rows: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """(b, d) query vectors of training rows, each from one of its views drawn at random."""
        view = rng.integers(0, len(self.feats), len(rows))
        return self.tail(torch.from_numpy(self.feats[view, rows]))


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch of query rows drawn with probability 1 / count of their class (with replacement): every
    class is drawn about len(labels) / C times, whatever the long tail."""
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=p / p.sum())


def attention_target(ids: np.ndarray, item_labels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What attention supervision pulls each query's attention towards: ids (b, k) neighbour ids,
    item_labels (M,) the class each memory item's text names, labels (b,) the query's class.

    Returns target (b, k) float32, the indicator of same-class neighbours normalised to sum 1, and valid (b,)
    bool: queries with no such neighbour have no target and are skipped."""
    same = (item_labels[ids] == labels[:, None]).astype(np.float32)  # (b, k)
    n = same.sum(1)
    valid = n > 0
    return same / np.maximum(n, 1)[:, None], valid


def supervision_loss(attn: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between each layer's attention (b, L, k) and the target (b, k), over valid queries,
    averaged over layers and queries."""
    if attn.shape[1] == 0 or not bool(valid.any()):
        return attn.sum() * 0.0
    log_a = torch.log(attn[valid].clamp_min(1e-8))  # (v, L, k)
    return -(target[valid][:, None, :] * log_a).sum(-1).mean()


def train_head(
    cfg: HeadConfig,
    tcfg: TrainConfig,
    train: Retrieved,
    memory: MemoryTensors,
    k: int,
    num_classes: int,
    progress: bool = True,
    item_labels: np.ndarray | None = None,
    tuned: TunedQuery | None = None,
) -> Head:
    """item_labels (M,): the class each memory item's text names; needed for attention supervision.
    tuned: a query tail trained with the head (the head then reads its vectors, not train.z)."""
    if tcfg.attn_supervision > 0 and item_labels is None:
        raise ValueError("attention supervision needs the memory items' labels")
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    head = Head(cfg, train.z.shape[1], memory.values.shape[1], num_classes)
    counts = np.bincount(train.labels, minlength=num_classes).astype(np.float64)
    # LACE: the prior added to training logits; a class absent from training gets a tiny prior.
    log_prior = torch.tensor(np.log(np.maximum(counts, 0.5) / counts.sum()), dtype=torch.float32)
    groups: list[dict[str, Any]] = [{"params": list(head.parameters())}]
    if tuned is not None:
        groups.append({"params": [p for p in tuned.tail.parameters() if p.requires_grad], "lr": tuned.lr})
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps_per_epoch = math.ceil(len(train.labels) / tcfg.batch_size)
    total, warmup = tcfg.epochs * steps_per_epoch, max(1, int(tcfg.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing)
    labels = torch.from_numpy(train.labels)
    head.train()
    if tuned is not None:
        tuned.train()
    desc = f"train {cfg.kind}" + (" + encoder" if tuned is not None else "")
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=None if progress else True)
    for _ in range(tcfg.epochs):
        order = balanced_order(train.labels, rng) if tcfg.balanced else rng.permutation(len(train.labels))
        for s in range(0, len(order), tcfg.batch_size):
            rows = order[s : s + tcfg.batch_size]
            z, sims, keys, values = memory.batch(train, rows, k, head)
            if tuned is not None:
                z = tuned.queries(rows, rng)  # (b, d), with gradients into the tail
            logits, attn = head(z, sims, keys, values)  # (b, C), (b, L, k)
            loss = loss_fn(logits + tcfg.tau * log_prior, labels[rows])
            if tcfg.attn_supervision > 0 and item_labels is not None:
                target, valid = attention_target(train.ids[rows, :k], item_labels, train.labels[rows])
                sup = supervision_loss(attn, torch.from_numpy(target), torch.from_numpy(valid))
                loss = loss + tcfg.attn_supervision * sup
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    if tuned is not None:
        tuned.tail.eval()
    return head.eval()


@torch.no_grad()
def predict(
    head: Head, data: Retrieved, memory: MemoryTensors, k: int, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """logits (n, C) and attention (n, L, k) over a whole split."""
    head.eval()
    logits, attn = [], []
    for s in range(0, len(data.labels), batch):
        rows = np.arange(s, min(s + batch, len(data.labels)))
        lg, a = head(*memory.batch(data, rows, k, head))
        logits.append(lg.numpy())
        attn.append(a.numpy())
    return np.concatenate(logits), np.concatenate(attn)
