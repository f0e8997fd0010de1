"""The zero-shot parts of a memory version derived with `rac memory add` / `remove` (models/memory/ops.py).

The text tower, tokenizer and fusion modules are the model's: hard-linked, as the encoder and head are. The
parts that index the items are made again for the new item set, as `rac build --zero-shot` makes them:
  text_index.faiss, text_order.npy   exact inner-product index over the items' frozen text embeddings, the
                                     items added in the same seeded random order (models/zero_shot/reco.py, text_index)
  text_aligned.npy                   (N, d) float16 aligned text embedding of every item
A kept item keeps its embeddings (read back from the source version's index and aligned texts). A new item
whose text the memory already holds takes that text's embeddings, as the build embeds each distinct text
once; a new text goes through the artifact's own text tower (ONNX: outputs `search` and `embedding`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.zero_shot.reco import text_index
from service.artifacts import (
    ITEMS,
    MANIFEST,
    ZS_FILES,
    ZS_TEXT_ALIGNED,
    ZS_TEXT_INDEX,
    ZS_TEXT_ORDER,
    ZS_TEXT_TOWER,
    ArtifactError,
    ZeroShotInfo,
    digest,
)
from service.core.zero_shot import run_text_tower, text_tokenizer

BATCH = 64  # texts per text-tower run


def embed_texts(tower: Path, tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> aligned (n, d) and search (n, dt) embeddings, float32, through a text tower file and its
    tokenizer, as the service embeds a label's prompt (in batches)."""
    session = ort.InferenceSession(str(tower), providers=["CPUExecutionProvider"])
    parts = [run_text_tower(session, tokenizer, texts[s : s + BATCH]) for s in range(0, len(texts), BATCH)]
    return np.concatenate([a for a, _ in parts]), np.concatenate([s for _, s in parts])


def item_texts(items: Path) -> list[str]:
    with sqlite3.connect(f"file:{items}?mode=ro", uri=True) as db:
        texts = [str(t) for (t,) in db.execute("SELECT text FROM items ORDER BY id")]
    db.close()
    return texts


def carry(
    src: Path,
    out: Path,
    info: ZeroShotInfo,
    parent_version: str,
    keep: np.ndarray,
    new_texts: list[str],
) -> ZeroShotInfo:
    """Write `out`'s zero-shot memory files, for src's items `keep` (ids, in order) then items with
    `new_texts` (the model files are linked there by the caller). Returns the manifest section."""
    for name in ZS_FILES:
        if not (src / name).exists() or digest(src / name) != info.files.get(name):
            raise ArtifactError(f"{src / name} is missing or does not match the checksum in {MANIFEST}")
    index = faiss.read_index(str(src / ZS_TEXT_INDEX))
    n = index.ntotal
    search = np.empty((n, index.d), np.float32)  # (N, dt) by memory id
    search[np.load(src / ZS_TEXT_ORDER)] = index.reconstruct_n(0, n)  # text_order: position -> memory id
    aligned = np.load(src / ZS_TEXT_ALIGNED)  # (N, d) float16
    rows = keep  # each item of the new version: its row in [search; the unseen texts' embeddings]
    if new_texts:
        known: dict[str, int] = {}  # text -> the first source item carrying it
        for i, t in enumerate(item_texts(src / ITEMS)):
            known.setdefault(t, i)
        unseen = {t: n + j for j, t in enumerate(dict.fromkeys(t for t in new_texts if t not in known))}
        if unseen:
            new_aligned, new_search = embed_texts(src / ZS_TEXT_TOWER, text_tokenizer(src, info), list(unseen))
            search = np.concatenate([search, new_search])
            aligned = np.concatenate([aligned, new_aligned.astype(np.float16)])
        rows = np.concatenate([keep, [known[t] if t in known else unseen[t] for t in new_texts]]).astype(np.int64)
    search, aligned = search[rows], aligned[rows]
    new_index, new_order = text_index(search, seed=0)
    faiss.write_index(new_index, str(out / ZS_TEXT_INDEX))
    np.save(out / ZS_TEXT_ORDER, new_order)
    np.save(out / ZS_TEXT_ALIGNED, aligned)
    measured = info.evaluation.get("measured_on_version", parent_version)
    return info.model_copy(
        update={
            "files": {name: digest(out / name) for name in ZS_FILES},
            # The build's figures were measured with another memory: they do not describe this one.
            "evaluation": {"measured_on_version": measured},
        }
    )
