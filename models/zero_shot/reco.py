"""RECO (Iscen et al., 2023): refine a frozen dual encoder's embeddings with what the memory knows.

Image side: the query image's k nearest memory images (uni-modal search, the service's key index) -> their
aligned *text* embeddings -> a one-layer transformer over [query; neighbours] -> refined image embedding.
Text side: a prompt's k nearest memory texts (a second index, over the frozen text encoder's embeddings) ->
their *image* embeddings -> fusion -> refined text embedding. Cross-modal fusion is the paper's choice;
uni-modal fusion (images into an image, texts into a text) is its ablation. Trained contrastively on the
alignment pairs with both towers frozen; a training pair never retrieves itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import torch
from torch import nn

from models.zero_shot.align import contrastive_loss, fit

SIDES = ("none", "cross", "uni")  # per side: no fusion, the other modality's neighbours, the same modality's


@dataclass
class FusionConfig:
    image: str = "cross"
    text: str = "cross"
    k: int = 10
    width: int = 64
    heads: int = 4
    ffn: int = 128
    epochs: int = 4
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Training only: the probability that a pair's own embedding is swapped for another pair's before fusion,
    # so that the module learns to lean on the neighbours where the query disagrees with them (what a
    # concept the towers never learned looks like); the retrieved neighbours stay the true ones.
    swap: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Fusion(nn.Module):
    """[query; neighbours] -> one pre-norm transformer layer (in a narrower width), read at the query token
    -> a zero-initialised projection back, added to the query, re-normalised: at initialisation the output
    is the query itself.

    Only the query token's output is used, so only it is computed: attention from the query over all k + 1
    tokens, then the feed-forward block on that one token (the same numbers a full layer gives there)."""

    def __init__(self, dim: int, width: int = 64, heads: int = 4, ffn: int = 128):
        super().__init__()
        self.kind = nn.Parameter(torch.zeros(2, dim))  # query / neighbour type embeddings
        self.down = nn.Linear(dim, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """query (B, d), neighbours (B, k, d) -> (B, d), L2-normalised."""
        # The embeddings are unit vectors (about 1/sqrt(d) a dimension): scaled up before the projection.
        scale = float(query.shape[-1]) ** 0.5
        tokens = torch.cat([(query + self.kind[0]).unsqueeze(1), neighbours + self.kind[1]], 1)  # (B, k+1, d)
        t = self.down(tokens * scale)  # (B, k+1, w)
        x = self.norm1(t)
        h = t[:, :1] + self.attn(x[:, :1], x, x, need_weights=False)[0]  # (B, 1, w)
        h = h + self.ffn(self.norm2(h))
        return nn.functional.normalize(query + self.out(h[:, 0]) / scale, dim=-1)


class Reco(nn.Module):
    """Both sides and the logit scale the fused embeddings are compared with."""

    def __init__(self, cfg: FusionConfig, dim: int, init_scale: float):
        super().__init__()
        self.cfg = cfg
        self.image = Fusion(dim, cfg.width, cfg.heads, cfg.ffn) if cfg.image != "none" else None
        self.text = Fusion(dim, cfg.width, cfg.heads, cfg.ffn) if cfg.text != "none" else None
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()


@dataclass
class MemoryViews:
    """The memory's items in the aligned space: image embeddings (the locked keys) and aligned text."""

    image: np.ndarray  # (N, d) float32
    text: np.ndarray  # (N, d) float32

    def values(self, side: str, fused_into: str) -> np.ndarray:
        """What a side's neighbours contribute: cross-modal fusion takes the other modality."""
        same = side == "uni"
        if fused_into == "image":
            return self.image if same else self.text
        return self.text if same else self.image


# ---------------------------------------------------------------- search


def text_index(search_emb: np.ndarray, seed: int = 0) -> tuple[faiss.Index, np.ndarray]:
    """Exact inner-product index over the items' frozen text embeddings (N, dt), items added in a seeded
    random order: memory captions repeat, and among identical texts the first added wins, so a query's k
    neighbours are a random sample of the items carrying its nearest text rather than the lowest ids.
    Returns the index and `order` (position in the index -> memory id)."""
    order = np.random.default_rng(seed).permutation(len(search_emb)).astype(np.int64)
    index = faiss.IndexFlatIP(search_emb.shape[1])
    index.add(np.ascontiguousarray(search_emb[order], dtype=np.float32))
    return index, order


def search_text(index: faiss.Index, order: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, dt) -> memory ids (Q, k) of the nearest texts."""
    _, pos = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return order[pos]


def search_images(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """(Q, d) -> memory ids (Q, k) of the nearest images, restricted to `allowed` ids and never `exclude[q]`
    (the query itself)."""
    params: faiss.SearchParameters | None = None
    if allowed is not None:
        params = faiss.SearchParametersIVF() if isinstance(index, faiss.IndexIVF) else faiss.SearchParameters()
        if isinstance(params, faiss.SearchParametersIVF):
            params.nprobe = faiss.extract_index_ivf(index).nprobe
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        params.sel = selector
    extra = 0 if exclude is None else 1
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), 4096):
        q = np.ascontiguousarray(queries[s : s + 4096], dtype=np.float32)
        _, ids = index.search(q, k + extra, params=params)
        if exclude is not None:
            drop = ids == exclude[s : s + 4096, None]
            drop[~drop.any(1), -1] = True
            ids = ids[~drop].reshape(len(q), k)
        out[s : s + len(q)] = ids
    return out


def text_neighbours_of_items(
    item_text: np.ndarray, rows: np.ndarray, table: np.ndarray, index: faiss.Index, order: np.ndarray, k: int
) -> np.ndarray:
    """For memory items `rows` (as queries): the k nearest memory texts other than the item itself. Items
    with the same text share one search."""
    out = np.empty((len(rows), k), np.int64)
    texts = item_text[rows]
    for t in np.unique(texts):
        at = np.flatnonzero(texts == t)
        ids = search_text(index, order, table[t : t + 1], k + 1)[0]  # (k+1,)
        for r in at:
            keep = ids[ids != rows[r]]
            out[r] = keep[:k]
    return out


# ---------------------------------------------------------------- training and inference


def fuse(fusion: Fusion | None, query: torch.Tensor, values: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    if fusion is None:
        return query
    return fusion(query, torch.from_numpy(np.take(values, ids, axis=0)))


def swapped(x: torch.Tensor, p: float) -> torch.Tensor:
    """Each row replaced, with probability p, by another row of the batch."""
    if p <= 0:
        return x
    swap = torch.rand(len(x)) < p
    other = torch.randperm(len(x))
    return torch.where(swap[:, None], x[other], x)


@dataclass
class FusionData:
    """Training pairs with their retrieved neighbours (from the training memory, never themselves)."""

    z: np.ndarray  # (n, d) image embeddings
    text: np.ndarray  # (n, d) aligned text embeddings
    text_id: np.ndarray  # (n,) which distinct text each pair carries
    image_nb: np.ndarray  # (n, K) memory ids
    text_nb: np.ndarray  # (n, K) memory ids


def train_reco(data: FusionData, views: MemoryViews, cfg: FusionConfig, init_scale: float) -> tuple[Reco, list[float]]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = Reco(cfg, data.z.shape[1], init_scale)
    vi, vt = views.values(cfg.image, "image"), views.values(cfg.text, "text")
    z, txt, tid = torch.from_numpy(data.z), torch.from_numpy(data.text), torch.from_numpy(data.text_id)

    def loss_of(rows: np.ndarray) -> torch.Tensor:
        img = fuse(model.image, swapped(z[rows], cfg.swap), vi, data.image_nb[rows, : cfg.k])
        tx = fuse(model.text, swapped(txt[rows], cfg.swap), vt, data.text_nb[rows, : cfg.k])
        return contrastive_loss(img, tx, tid[rows], model.scale)

    model.train()
    losses = fit(model.parameters(), len(z), cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, rng, loss_of)
    return model.eval(), losses


@torch.no_grad()
def refine(fusion: Fusion | None, query: np.ndarray, values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """query (n, d), ids (n, k) -> refined (n, d) float32, in batches."""
    if fusion is None:
        return np.asarray(query, np.float32)
    fusion.eval()
    out = [
        fuse(fusion, torch.from_numpy(np.asarray(query[s : s + 2048], np.float32)), values, ids[s : s + 2048]).numpy()
        for s in range(0, len(query), 2048)
    ]
    return np.concatenate(out)
