"""The classification heads, one nn.Module family: linear probe, 2-layer MLP, mean-kNN fusion and the memory
attention module (MAM). Every head takes the same inputs and returns (logits, attention), so training,
evaluation, TorchScript export and the service treat them alike.

Inputs (B queries, k neighbours):
    z      (B, d)      query embedding, L2-normalised
    sims   (B, k)      cosine similarity of each neighbour's key to the query (from the k-NN search)
    keys   (B, k, d)   neighbour keys (image embeddings), L2-normalised
    values (B, k, dv)  neighbour values (text or visual embeddings), L2-normalised
Outputs:
    logits (B, C)
    attn   (B, L, k)   attention over the neighbours per layer (L = 0 for heads that do not retrieve)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class HeadConfig:
    kind: str = "mam"  # linear | mlp | mean_knn | mam
    layers: int = 1  # MAM: stacked memory-attention layers (the paper uses 8)
    # MAM scores: "projected" is the paper's softmax(psi_Q(f) psi_K(K)^T / sqrt(h)); "similarity" is
    # softmax(t * standardised cos(z, K)) with one learned temperature t per layer, starting at 0 (so the
    # head starts as mean-kNN); "both" adds the projected term, zero-initialised, to the similarity one.
    attention: str = "similarity"
    attn_dim: int = 256  # h: width of psi_Q / psi_K
    # AdamW moves every parameter by about lr a step, whatever its gradient's size. The temperature is one
    # scalar whose useful range is about 0..2 (on standardised similarities): stored divided by this factor,
    # it gets there within a few hundred steps at lr 1e-3, instead of ending training near 0.2.
    temperature_scale: float = 10.0
    hidden: int = 1024  # MLP hidden width
    dropout: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised vectors have per-dimension scale 1/sqrt(d): rescale to unit scale per dimension, or
    the heads train far too slowly at usual learning rates. Applied after any mixing over the k
    neighbours (mixing is linear), never to the (B, k, dv) tensors themselves: far less memory traffic."""
    return x * math.sqrt(x.shape[-1])


class MemoryAttention(nn.Module):
    """One MAM layer: attention of the current query over the k neighbours; returns chi(mixed values)."""

    def __init__(self, d: int, dv: int, cfg: HeadConfig):
        super().__init__()
        self.use_sims = cfg.attention in ("similarity", "both")
        self.use_proj = cfg.attention in ("projected", "both")
        self.temperature = nn.Parameter(torch.zeros(()))
        self.temperature_scale = cfg.temperature_scale
        self.q = nn.Linear(d, cfg.attn_dim)
        # psi_K's bias adds q.b_K to every score of a query alike, which softmax ignores: no bias.
        self.k = nn.Linear(d, cfg.attn_dim, bias=False)
        self.chi = nn.Linear(dv, d)
        self.scale = 1.0 / math.sqrt(cfg.attn_dim)
        if cfg.attention == "both":  # start exactly as the similarity head, learn a correction
            nn.init.zeros_(self.q.weight)
            nn.init.zeros_(self.q.bias)

    def forward(
        self, f: torch.Tensor, sims_std: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.zeros_like(sims_std)  # (B, k)
        if self.use_sims:
            scores = scores + (self.temperature_scale * self.temperature) * sims_std
        if self.use_proj:
            # psi_Q(f) . psi_K(K_j) = (W_K^T psi_Q(f)) . K_j: project the one query, not the k keys.
            u = self.q(f) @ self.k.weight  # (B, d)
            scores = scores + torch.einsum("bd,bkd->bk", _scaled(u), keys) * self.scale
        attn = torch.softmax(scores, dim=-1)  # (B, k)
        mixed = torch.einsum("bk,bkv->bv", attn, values)  # (B, dv)
        return self.chi(_scaled(mixed)), attn


class Head(nn.Module):
    def __init__(self, cfg: HeadConfig, d: int, dv: int, num_classes: int):
        super().__init__()
        self.kind = cfg.kind
        self.uses_keys = cfg.kind == "mam" and cfg.attention in ("projected", "both")
        self.uses_values = cfg.kind in ("mean_knn", "mam")
        self.num_layers = cfg.layers if cfg.kind == "mam" else (1 if cfg.kind == "mean_knn" else 0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            [MemoryAttention(d, dv, cfg) for _ in range(cfg.layers)] if cfg.kind == "mam" else []
        )
        self.chi = nn.Linear(dv, d) if cfg.kind == "mean_knn" else nn.Identity()
        if cfg.kind == "mlp":
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(d, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, num_classes)
            )
        else:
            self.classifier = nn.Linear(d, num_classes)

    def forward(
        self, z: torch.Tensor, sims: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = _scaled(z)
        batch, k = sims.shape
        attn = torch.zeros(batch, self.num_layers, k, dtype=z.dtype, device=z.device)
        f = z
        if self.kind == "mean_knn":
            f = z + self.chi(_scaled(values.mean(dim=1)))
            attn = attn + 1.0 / k
        elif self.kind == "mam":
            # Standardised per query, so a temperature means the same whatever the spread of similarities.
            sims_std = (sims - sims.mean(-1, keepdim=True)) / (sims.std(-1, keepdim=True, unbiased=False) + 1e-6)
            maps = []
            for layer in self.layers:
                update, a = layer(f, sims_std, keys, values)
                f = z + update  # each layer re-reads the memory with a refined query, then adds to z
                maps.append(a)
            attn = torch.stack(maps, dim=1)  # (B, L, k)
        return self.classifier(self.dropout(f)), attn
