"""The memory: which images it holds and what text they carry, their keys and values, the FAISS index over
the keys, and writing all of it in the form the service memory-maps."""

from __future__ import annotations

import io
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from models.data import Dataset, Part, Splits
from models.features import Prepared, cached_embed
from service.artifacts import IDS, INDEX, ITEMS, KEYS, VALUES
from service.memory.items import KEY_INDEX, SCHEMA, encode_tags

PROMPT = "a photo of a {}."
# Stand-ins for web alt-text: the memory's external items carry varied, sometimes wrong, captions.
ALT_TEXT = (
    "{}",
    "a photo of a {}.",
    "new {} for sale",
    "my favourite {}",
    "{}, size M, free shipping",
    "close-up of a {}",
    "vintage {} in good condition",
    "a {} on a plain background",
)
SOURCES = ("downstream", "external")


@dataclass
class MemoryItems:
    """The memory's rows, before any embedding: where each image comes from and the text it carries."""

    pool: np.ndarray  # (N,) str: the dataset pool of the image
    index: np.ndarray  # (N,) int64: the image's index in that pool
    source: np.ndarray  # (N,) str: "downstream" | "external"
    text: list[str]
    label: np.ndarray  # (N,) int64: the class the text names
    true_label: np.ndarray  # (N,) int64: the image's real class (for analysis only)

    def __len__(self) -> int:
        return len(self.label)


def memory_items(
    dataset: Dataset, splits: Splits, sources: tuple[str, ...], noise: float, seed: int = 0
) -> MemoryItems:
    """(a) downstream: the long-tailed training set, text = a label prompt; (b) external: the images left
    over, whose text names the right class, except with probability `noise` a random wrong one."""
    rng = np.random.default_rng(seed)
    parts: list[tuple[str, Part]] = [("downstream", splits.train)] if "downstream" in sources else []
    if "external" in sources:
        if splits.external is None:
            raise ValueError("this dataset has no external images for the memory")
        parts.append(("external", splits.external))
    pool, index, source, text, label, true = [], [], [], [], [], []
    names = [c.lower() for c in dataset.classes]
    num_classes = len(names)
    for src, part in parts:
        y = dataset.labels(part)
        named = y.copy()
        if src == "external":
            wrong = rng.random(len(y)) < noise
            # A uniformly drawn *other* class: shift by 1..C-1.
            named[wrong] = (y[wrong] + rng.integers(1, num_classes, wrong.sum())) % num_classes
            templates = rng.integers(0, len(ALT_TEXT), len(y))
            text += [ALT_TEXT[t].format(names[c]) for t, c in zip(templates, named, strict=True)]
        else:
            text += [PROMPT.format(names[c]) for c in named]
        pool.append(np.full(len(y), part.pool))
        index.append(part.index)
        source.append(np.full(len(y), src))
        label.append(named)
        true.append(y)
    return MemoryItems(
        np.concatenate(pool),
        np.concatenate(index),
        np.concatenate(source),
        text,
        np.concatenate(label),
        np.concatenate(true),
    )


def self_ids(items: MemoryItems, part: Part) -> np.ndarray:
    """(n,) memory id of each image of `part`, or -1 where the image is not in the memory."""
    lookup = {(p, int(i)): n for n, (p, i) in enumerate(zip(items.pool, items.index, strict=True))}
    return np.asarray([lookup.get((part.pool, int(i)), -1) for i in part.index], np.int64)


# ---------------------------------------------------------------- index


def index_factory(n: int, exact_below: int) -> str:
    """Exact search for small memories; IVF with about sqrt(n) lists above."""
    if n < exact_below:
        return "Flat"
    return f"IVF{2 ** round(math.log2(math.sqrt(n)))},Flat"


def build_index(keys: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """keys (N, d) float32, L2-normalised: inner product is cosine similarity."""
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = keys[rng.permutation(len(keys))[: 256 * 1024]]
        index.train(sample)
    index.add(keys)
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = nprobe


def tune_nprobe(index: faiss.Index, keys: np.ndarray, queries: np.ndarray, k: int, target: float) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@k against exact search reaches `target`."""
    if not isinstance(index, faiss.IndexIVF):
        return 0, 1.0
    exact = faiss.IndexFlatIP(keys.shape[1])
    exact.add(keys)
    _, truth = exact.search(queries, k)
    nprobe, recall = 1, 0.0
    while nprobe <= index.nlist:
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth, strict=True)]))
        if recall >= target:
            break
        nprobe *= 2
    index.nprobe = min(nprobe, index.nlist)
    return index.nprobe, recall


def search(
    index: faiss.Index, queries: np.ndarray, k: int, exclude: np.ndarray | None = None, batch: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest memory items of each query: sims (Q, k) float32 and ids (Q, k) int64, best first.

    exclude: (Q,) memory id of each query itself (-1 if none): a query in the memory never retrieves itself.
    """
    extra = 0 if exclude is None else 1
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[s : s + batch])
        d, i = index.search(q, k + extra)
        short = (i < 0).any(1)  # an IVF probe that found too few items pads with -1: search every list, as
        if short.any() and isinstance(index, faiss.IndexIVF):  # the service does (service/memory/store.py)
            every = faiss.SearchParametersIVF()
            every.nprobe = index.nlist
            d[short], i[short] = index.search(q[short], k + extra, params=every)
        if exclude is not None:
            drop = i == exclude[s : s + batch, None]  # (b, k+1): at most one True a row
            drop[~drop.any(1), -1] = True  # rows without themselves drop their farthest instead
            keep = ~drop
            d, i = d[keep].reshape(len(d), k), i[keep].reshape(len(i), k)
        sims[s : s + batch], ids[s : s + batch] = d, i
    return sims, ids


# ---------------------------------------------------------------- a memory, embedded and indexed


@dataclass
class Memory:
    items: MemoryItems
    keys: np.ndarray  # (N, d) float32, L2-normalised image embeddings
    values: np.ndarray  # (N, dv) float32, rounded through float16 exactly as the service reads them
    value_encoder: str
    index: faiss.Index
    factory: str
    recall: float  # recall@k of the index against exact search, measured on validation queries

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe) if isinstance(self.index, faiss.IndexIVF) else 0


def visual_values(prep: Prepared, items: MemoryItems, cache_dir: Path) -> np.ndarray:
    """Values from the bigger EfficientNet-Lite2 (the paper's visual value encoder), (N, 1280)."""
    from models.encoders import export_onnx, image_encoder

    model, spec = image_encoder("efficientnet-lite2", prep.spec.size, prep.spec.grey)
    path = cache_dir / f"lite2-{spec.size}.onnx"
    if not path.exists():
        export_onnx(model, spec.size, path)
    out = np.empty((len(items), 1280), np.float32)
    for pool in np.unique(items.pool):
        rows = np.flatnonzero(items.pool == pool)
        emb = cached_embed(prep.dataset.pools[pool], path, spec, cache_dir, desc=f"embed {pool} (Lite2 values)")
        out[rows] = emb[items.index[rows]]
    return out


def make_memory(
    prep: Prepared,
    sources: tuple[str, ...],
    values: str,
    noise: float,
    k: int,
    index: str = "auto",
    exact_below: int = 20_000,
    target_recall: float = 0.95,
    seed: int = 0,
    cache_dir: Path = Path(".cache/rac"),
) -> Memory:
    """Items -> keys (the query encoder's embeddings), values (text or Lite2), index tuned to a recall."""
    from models.encoders import TextEncoder

    items = memory_items(prep.dataset, prep.splits, sources, noise, seed)
    keys = np.stack([prep.emb[p][i] for p, i in zip(items.pool, items.index, strict=True)]) if len(items) else None
    assert keys is not None, "the memory is empty"
    if values == "text":
        text = TextEncoder()
        vals, value_encoder = text(items.text), text.name
    elif values == "visual":
        vals, value_encoder = visual_values(prep, items, cache_dir), "efficientnet-lite2"
    else:
        raise ValueError(f"values must be 'text' or 'visual', not {values!r}")
    factory = index_factory(len(items), exact_below) if index == "auto" else index
    built = build_index(keys, factory, seed)
    val = prep.emb[prep.splits.val.pool][prep.splits.val.index]
    _, recall = tune_nprobe(built, keys, val[:2000], min(k, len(items)), target_recall)
    return Memory(items, keys, vals.astype(np.float16).astype(np.float32), value_encoder, built, factory, recall)


@dataclass
class Retrieved:
    """One split as a head sees it: query embeddings, their neighbours, their labels."""

    z: np.ndarray  # (n, d) float32
    sims: np.ndarray  # (n, K) float32, best first
    ids: np.ndarray  # (n, K) int64 memory ids
    labels: np.ndarray  # (n,) int64

    def subset(self, rows: np.ndarray) -> Retrieved:
        return Retrieved(self.z[rows], self.sims[rows], self.ids[rows], self.labels[rows])


def retrieve(prep: Prepared, memory: Memory, part: Part, k: int) -> Retrieved:
    """Search the memory for every image of `part` (never retrieving the image itself)."""
    z = prep.emb[part.pool][part.index]
    sims, ids = search(memory.index, z, k, exclude=self_ids(memory.items, part))
    return Retrieved(z, sims, ids, prep.dataset.labels(part))


# ---------------------------------------------------------------- writing


THUMBNAIL_PX = 48  # the longest side of a stored thumbnail; smaller images are kept at their own size


def thumbnail_bytes(image: Image.Image, size: int = THUMBNAIL_PX) -> bytes:
    """A small PNG of `image` for the page: at most size x size, aspect kept, never enlarged (a 28x28
    Fashion-MNIST image stays 28x28, about 500 bytes)."""
    im = image if image.mode in ("L", "RGB") else image.convert("RGB")
    im = im.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def thumbnails(dataset: Dataset, items: MemoryItems, size: int = THUMBNAIL_PX) -> list[bytes]:
    """One thumbnail per memory item, in item order."""
    return [thumbnail_bytes(dataset.pools[p].image(int(i)), size) for p, i in zip(items.pool, items.index, strict=True)]


def item_keys(dataset: str, items: MemoryItems) -> list[str]:
    """Keys that say where each item came from: `fashion-mnist/train/12345` for the downstream set's
    images, `external/fashion-mnist/train/23456` for the external ones (an image is in the memory once)."""
    return [
        f"{'external/' if src == 'external' else ''}{dataset}/{p}/{i}"
        for src, p, i in zip(items.source, items.pool, items.index, strict=True)
    ]


def write_items(
    path: Path,
    items: MemoryItems,
    thumbs: Sequence[bytes | None] | None = None,
    keys: Sequence[str | None] | None = None,
    tags: Sequence[Sequence[str]] | None = None,
) -> None:
    """The item table the service shows with each neighbour: id -> source, text, label, origin, a thumbnail
    (PNG bytes; NULL where none was made), the item's key and tags (service/memory/items.py). Ids are
    0..N-1, in item order."""
    if thumbs is not None and len(thumbs) != len(items):
        raise ValueError(f"{len(thumbs)} thumbnails for {len(items)} items")
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(SCHEMA)
        db.execute(KEY_INDEX)
        rows = zip(
            range(len(items)),
            items.source.tolist(),
            items.text,
            items.label.tolist(),
            [f"{p}/{i}" for p, i in zip(items.pool, items.index, strict=True)],
            thumbs if thumbs is not None else [None] * len(items),
            keys if keys is not None else [None] * len(items),
            [encode_tags(list(t)) for t in tags] if tags is not None else [None] * len(items),
            strict=True,
        )
        db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()


def write_memory(
    out: Path,
    index: faiss.Index,
    keys: np.ndarray,
    values: np.ndarray,
    items: MemoryItems,
    thumbs: Sequence[bytes | None] | None = None,
    item_keys: Sequence[str | None] | None = None,
    tags: Sequence[Sequence[str]] | None = None,
) -> None:
    """index.faiss (its ids are the rows, 0..N-1), keys.npy and values.npy (float16, memory-mapped by the
    service), ids.npy (each row's id), items.sqlite."""
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / INDEX))
    np.save(out / KEYS, keys.astype(np.float16))
    np.save(out / VALUES, values.astype(np.float16))
    np.save(out / IDS, np.arange(len(items), dtype=np.int64))
    write_items(out / ITEMS, items, thumbs, item_keys, tags)
