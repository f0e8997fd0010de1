"""Training recipes for any head: class-balanced sampling and attention supervision, each checked on a tiny
example where the right answer is known."""

import numpy as np
import torch

from models.heads import HeadConfig
from models.memory.make import Retrieved
from models.train import (
    MemoryTensors,
    TrainConfig,
    attention_target,
    balanced_order,
    predict,
    supervision_loss,
    train_head,
)


def test_balanced_order_draws_every_class_about_equally_often() -> None:
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    rng = np.random.default_rng(0)
    drawn = np.concatenate([labels[balanced_order(labels, rng)] for _ in range(20)])  # 20 epochs
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert len(drawn) == 20 * len(labels)
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.02)  # natural sampling: 0.90 / 0.09 / 0.01


def test_attention_target_is_the_normalised_same_class_indicator() -> None:
    item_labels = np.array([0, 1, 1, 2])  # the class each memory item's text names
    ids = np.array([[0, 1, 2], [3, 3, 0], [1, 2, 3]])
    labels = np.array([1, 0, 0])
    target, valid = attention_target(ids, item_labels, labels)
    np.testing.assert_allclose(target[0], [0, 0.5, 0.5])
    np.testing.assert_allclose(target[1], [0, 0, 1])
    assert valid.tolist() == [True, True, False]  # the third query has no neighbour naming its class
    np.testing.assert_allclose(target[2], [0, 0, 0])


def test_supervision_loss_is_cross_entropy_over_valid_queries_and_layers() -> None:
    attn = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]], [[1 / 3] * 3, [1 / 3] * 3]])  # (b=2, L=2, k=3)
    target = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    valid = torch.tensor([True, False])
    want = -(0.5 * np.log(0.25) * 2 + (0.5 * np.log(0.6) + 0.5 * np.log(0.2))) / 2
    assert abs(float(supervision_loss(attn, target, valid)) - want) < 1e-6
    assert float(supervision_loss(attn, target, torch.tensor([False, False]))) == 0.0


def noisy_memory(seed: int) -> tuple[Retrieved, MemoryTensors, np.ndarray]:
    """Each query has 8 neighbours; the ones whose key is close to the query carry its class in their text,
    the far ones a random class. Keys reveal which neighbours to trust: Q/K attention can learn that."""
    rng = np.random.default_rng(seed)
    n, k, d, dv, c = 400, 8, 16, 12, 4
    labels = rng.integers(0, c, n)
    z = rng.standard_normal((n, d)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    keys = np.empty((n * k, d), np.float32)
    item_labels = np.empty(n * k, np.int64)
    for i in range(n):
        for j in range(k):
            good = j < 3
            noise = rng.standard_normal(d) * (0.1 if good else 1.0)
            key = z[i] * (1.0 if good else 0.0) + noise
            keys[i * k + j] = key / np.linalg.norm(key)
            item_labels[i * k + j] = labels[i] if good else rng.integers(0, c)
    # Values carry nothing about the class: the classification loss gives attention no reason to move,
    # so whatever it learns about which neighbours to trust comes from the supervision.
    values = rng.standard_normal((n * k, dv)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    ids = np.arange(n * k).reshape(n, k)
    perm = rng.permuted(ids, axis=1)  # neighbour order carries no information
    sims = np.einsum("nd,nkd->nk", z, keys[perm]).astype(np.float32)
    order = np.argsort(-sims, axis=1)
    perm = np.take_along_axis(perm, order, 1)
    sims = np.take_along_axis(sims, order, 1)
    return Retrieved(z, sims, perm, labels), MemoryTensors(keys, values), item_labels


def test_attention_supervision_moves_attention_onto_same_class_neighbours() -> None:
    train, memory, item_labels = noisy_memory(0)
    head_cfg = HeadConfig(kind="mam", layers=1, attention="projected", attn_dim=16)
    mass = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(epochs=15, lr=3e-3, batch_size=64, attn_supervision=weight, tau=0.0)
        head = train_head(head_cfg, cfg, train, memory, 8, 4, progress=False, item_labels=item_labels)
        _, attn = predict(head, train, memory, 8)
        target, valid = attention_target(train.ids, item_labels, train.labels)
        mass[weight] = float((attn[:, -1] * (target > 0)).sum(1)[valid].mean())
    assert mass[0.0] < 0.6  # about the share of same-class neighbours: nothing learned
    assert mass[1.0] > mass[0.0] + 0.15
