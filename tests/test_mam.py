"""The head family: each optimised formula against the plain one, TorchScript against eager, and the
logit-adjusted loss doing what it is for."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.heads import Head, HeadConfig, MemoryAttention
from models.memory.make import Retrieved
from models.train import MemoryTensors, TrainConfig, predict, train_head

B, K, D, DV, C = 5, 7, 16, 12, 4
KINDS = {
    "linear": HeadConfig(kind="linear"),
    "mlp": HeadConfig(kind="mlp", hidden=32),
    "mean_knn": HeadConfig(kind="mean_knn"),
    "mam-paper": HeadConfig(kind="mam", layers=3, attention="projected", attn_dim=8),
    "mam-similarity": HeadConfig(kind="mam", layers=1, attention="similarity"),
    "mam-both": HeadConfig(kind="mam", layers=2, attention="both", attn_dim=8),
}


def unit(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape)
    return x / x.norm(dim=-1, keepdim=True)


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    z, keys, values = unit(B, D), unit(B, K, D), unit(B, K, DV)
    sims = torch.einsum("bd,bkd->bk", z, keys)
    return z, sims, keys, values


def test_projecting_the_query_equals_projecting_every_key() -> None:
    """score_j = psi_Q(f) . psi_K(K_j): computed as (W_K^T psi_Q(f)) . K_j, and psi_K's bias dropped, since
    it shifts every score of a query alike. The paper's formula, written out, must give the same weights."""
    torch.manual_seed(1)
    cfg = HeadConfig(kind="mam", attention="projected", attn_dim=8)
    layer = MemoryAttention(D, DV, cfg)
    z, sims, keys, values = inputs()
    f = z * math.sqrt(D)
    _, attn = layer(f, sims, keys, values)
    bias = torch.randn(8)  # any psi_K bias
    psi_k = (keys * math.sqrt(D)) @ layer.k.weight.T + bias  # (B, K, h): every key projected
    naive = torch.softmax(torch.einsum("bh,bkh->bk", layer.q(f), psi_k) / math.sqrt(8), -1)
    torch.testing.assert_close(attn, naive, rtol=1e-5, atol=1e-6)


def test_mean_knn_is_z_plus_chi_of_the_mean_value() -> None:
    head = Head(KINDS["mean_knn"], D, DV, C).eval()
    z, sims, keys, values = inputs()
    logits, attn = head(z, sims, keys, values)
    f = z * math.sqrt(D) + head.chi(values.mean(1) * math.sqrt(DV))
    torch.testing.assert_close(logits, head.classifier(f))
    assert torch.allclose(attn, torch.full((B, 1, K), 1 / K))


def test_similarity_mam_starts_as_mean_knn() -> None:
    head = Head(KINDS["mam-similarity"], D, DV, C).eval()
    z, sims, keys, values = inputs()
    _, attn = head(z, sims, keys, values)
    assert torch.allclose(attn, torch.full((B, 1, K), 1 / K))
    layer = head.layers[0]
    assert isinstance(layer, MemoryAttention)
    with torch.no_grad():
        layer.temperature.fill_(0.1)
    _, attn = head(z, sims, keys, values)
    order = sims.argsort(-1, descending=True)
    ranked = attn[:, 0].gather(1, order)
    assert (ranked[:, :-1] >= ranked[:, 1:] - 1e-7).all()  # more similar, more weight


@pytest.mark.parametrize("name", KINDS)
def test_torchscript_matches_eager(name: str, tmp_path: Path) -> None:
    torch.manual_seed(2)
    head = Head(KINDS[name], D, DV, C).eval()
    for p in head.parameters():  # away from the zero initialisations, so every term matters
        torch.nn.init.normal_(p, std=0.3)
    path = tmp_path / "head.pt"
    torch.jit.script(head).save(str(path))
    scripted = torch.jit.load(str(path))
    for seed in range(3):
        x = inputs(seed)
        for want, got in zip(head(*x), scripted(*x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert scripted.uses_keys == head.uses_keys and scripted.num_layers == head.num_layers
    _, attn = head(*inputs())
    if attn.shape[1]:
        torch.testing.assert_close(attn.sum(-1), torch.ones(B, attn.shape[1]))


def long_tailed_problem(counts: tuple[int, ...], seed: int) -> tuple[Retrieved, MemoryTensors]:
    """Overlapping Gaussian classes with the given training counts; no memory to speak of."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(counts), D)) * 0.35
    labels = np.repeat(np.arange(len(counts)), counts)
    z = (centres[labels] + rng.standard_normal((len(labels), D)) * 0.5).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(labels)
    data = Retrieved(z, np.zeros((n, 1), np.float32), np.zeros((n, 1), np.int64), labels)
    return data, MemoryTensors(np.zeros((1, D), np.float32), np.zeros((1, DV), np.float32))


def test_logit_adjustment_recovers_the_tail() -> None:
    train, memory = long_tailed_problem((2000, 200, 20), seed=0)
    test, _ = long_tailed_problem((500, 500, 500), seed=1)
    recall = {}
    for tau in (0.0, 1.0):
        cfg = TrainConfig(epochs=10, lr=3e-3, tau=tau, batch_size=128)
        head = train_head(HeadConfig(kind="linear"), cfg, train, memory, 1, 3, progress=False)
        pred = predict(head, test, memory, 1)[0].argmax(1)
        recall[tau] = [(pred[test.labels == c] == c).mean() for c in range(3)]
    assert recall[1.0][2] > recall[0.0][2] + 0.2  # the rarest class: far better with the prior removed
    assert np.mean(recall[1.0]) > np.mean(recall[0.0])  # and balanced accuracy with it
