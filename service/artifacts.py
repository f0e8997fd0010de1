"""The artifact directory contract: its file names and manifest, written offline and checked at start-up."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service.memory.integrity import FileChunks, sampled_ok

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
INDEX = "index.faiss"
KEYS = "keys.npy"
VALUES = "values.npy"
ITEMS = "items.sqlite"
IDS = "ids.npy"  # the stable id of each row of keys and values; absent in directories written before: id == row
HEAD = "head.pt"
EXAMPLES = "examples"
CHECKED_FILES = (ENCODER, INDEX, KEYS, VALUES, ITEMS, HEAD, IDS)
OPTIONAL_FILES = (IDS,)  # checked where the manifest names them
# Zero-shot parts (`rac build --zero-shot`), optional: see models/zero_shot/build.py
ZS_TEXT_TOWER = "text_tower.onnx"
ZS_TOKENIZER = "tokenizer.json"
ZS_TEXT_INDEX = "text_index.faiss"
ZS_TEXT_ORDER = "text_order.npy"
ZS_TEXT_ALIGNED = "text_aligned.npy"
ZS_FUSION_IMAGE = "fusion_image.pt"
ZS_FUSION_TEXT = "fusion_text.pt"
ZS_MODEL_FILES = (ZS_TEXT_TOWER, ZS_TOKENIZER, ZS_FUSION_IMAGE, ZS_FUSION_TEXT)  # fixed, as encoder and head
ZS_MEMORY_FILES = (ZS_TEXT_INDEX, ZS_TEXT_ORDER, ZS_TEXT_ALIGNED)  # index one memory version's items
ZS_FILES = ZS_MODEL_FILES + ZS_MEMORY_FILES
CURRENT = "current"  # in a serving root: the symlink to the version directory being served


class QueryInfo(BaseModel):
    """A fine-tuned build's query vector: the encoder graph's second output, `query`, which the head reads.
    The search key stays the frozen encoder's first output, so the memory depends on the frozen part only."""

    output: str = "query"
    dim: int
    finetune: dict[str, Any]  # models.finetune.FinetuneConfig: blocks trained with the head, their lr, views


class EncoderInfo(BaseModel):
    name: str
    input: dict[str, Any]  # service.core.decode.InputSpec.to_dict()
    dim: int  # embedding dimension (after the projection, if any): the search key's
    projection: str  # "none" or "pca-<d> of <raw dim>"
    query: QueryInfo | None = None  # absent: the head reads the search key

    def roles(self) -> dict[str, str]:
        """Which encoder produced the search key and which the query vector the head reads (for /info)."""
        key = f"{self.name}, frozen (output `embedding`, {self.dim}-d): the memory's keys come from it too"
        if self.query is None:
            return {"search_key": key, "query_vector": "the search key"}
        blocks = self.query.finetune.get("blocks")
        if self.query.finetune.get("head", "trained") == "trained":  # builds before the option trained it
            tuned = f"its last {blocks} blocks, head conv and projection fine-tuned with the head"
        else:
            tuned = f"its last {blocks} blocks fine-tuned with the head, its head conv and projection the frozen ones"
        return {
            "search_key": key,
            "query_vector": f"{self.name} with {tuned}, over the same frozen trunk (output `{self.query.output}`, "
            f"{self.query.dim}-d)",
        }


class MemoryInfo(BaseModel):
    size: int
    sources: dict[str, int]  # items per source
    tags: dict[str, int] = {}  # items per tag
    # The id the next item added gets: above every id this memory's lineage ever gave, so that an id is never
    # given twice. None: a memory written before ids were stable, whose ids are its rows (next: its size).
    next_id: int | None = None
    value_encoder: str
    value_dim: int
    text_noise: float  # probability that an external item's text names a wrong class


class IndexInfo(BaseModel):
    type: str  # FAISS factory string
    metric: str  # "cosine" (inner product of L2-normalised vectors)
    nprobe: int  # 0 for exact indexes
    recall_at_k: float  # measured against exact search at build time
    k: int  # neighbours the head reads


class HeadInfo(BaseModel):
    kind: str
    config: dict[str, object]
    train: dict[str, object]
    layers: int  # attention maps the head returns
    uses_keys: bool


class ZeroShotInfo(BaseModel):
    text_encoder: str
    dim: int  # the aligned space: the query encoder's embedding dimension
    search_dim: int  # the text index's space: the frozen text encoder's
    max_tokens: int
    k: int  # neighbours each fusion module reads
    scale: float  # logit scale of the fused embeddings
    template: str  # the prompt the labels are put in by default
    held_out: list[str]  # classes kept out of training (evaluation only)
    align: dict[str, Any]
    fusion: dict[str, Any]
    files: dict[str, str]  # file name -> blake2b digest
    evaluation: dict[str, Any]  # val / test zero-shot top-1 when built
    pad_id: int = 0  # the tokenizer's padding (a user's text tower may want another, or a fixed length)
    pad_token: str = "[PAD]"
    pad_to_max: bool = False  # pad every text to max_tokens, not to the longest of its batch


class Manifest(BaseModel):
    format_version: int
    memory_version: str  # content hash of index, keys, values and items: part of every cache key
    created: str
    encoder: EncoderInfo
    memory: MemoryInfo
    index: IndexInfo
    head: HeadInfo
    classes: list[str]
    files: dict[str, str]  # file name -> blake2b digest
    evaluation: dict[str, Any]  # figures measured when built (see README)
    examples: list[dict[str, Any]]  # example PNGs with the labels and predictions made offline
    build: dict[str, Any]  # the offline configuration that made this directory
    chunks: dict[str, FileChunks] = {}  # file name -> chunk digests (large memories: see service/memory/integrity.py)
    zero_shot: ZeroShotInfo | None = None  # absent: built without `--zero-shot`
    # The model this memory belongs to (model_identity()); absent in directories written before versions.
    model_id: str | None = None
    parent_version: str | None = None  # the memory version this one was made from (rac memory add / remove)


def digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactError(RuntimeError):
    """Artifacts that are missing or do not fit together; the message names the mismatch."""


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path} not found: build artifacts with `rac build --out {directory}`")
    manifest = Manifest.model_validate_json(path.read_text())
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {manifest.format_version}, this service reads {FORMAT_VERSION}: rebuild"
        )
    return manifest


def version_id(files: dict[str, str]) -> str:
    """A memory version: a hash of the memory files' digests (index, keys, values, items, and ids where
    the directory has them)."""
    parts = "".join(files[n] for n in (INDEX, KEYS, VALUES, ITEMS)) + files.get(IDS, "")
    return hashlib.blake2b(parts.encode(), digest_size=6).hexdigest()


def model_parts(manifest: Manifest) -> dict[str, str]:
    """What a memory must agree with to be served by a model: encoder and head files, classes, input spec,
    embedding and value dimensions, value encoder and k."""
    m = manifest
    return {
        "encoder": m.files.get(ENCODER, "?"),
        "head": m.files.get(HEAD, "?"),
        "classes": ",".join(m.classes),
        "input": json.dumps(m.encoder.input, sort_keys=True),
        "dim": str(m.encoder.dim),
        "value encoder": f"{m.memory.value_encoder} ({m.memory.value_dim}-d)",
        "k": str(m.index.k),
    }


def model_identity(manifest: Manifest) -> str:
    parts = model_parts(manifest)
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()


def model_mismatch(served: Manifest, candidate: Manifest) -> str | None:
    """None when `candidate`'s memory fits the model of `served`; else a sentence naming what differs."""
    a, b = model_parts(served), model_parts(candidate)
    diff = [f"{name} ({a[name][:40]} vs {b[name][:40]})" for name in a if a[name] != b[name]]
    if not diff:
        return None
    return f"memory {candidate.memory_version} was built for another model: " + "; ".join(diff)


def resolve(path: Path) -> Path:
    """The version directory to serve: `path` itself when it is a flat artifact directory (what
    `rac build --out` writes), or the target of `path/current` when it is a serving root."""
    current = path / CURRENT
    if current.is_symlink() or current.is_dir():
        return current.resolve()
    return path


def verify_files(
    directory: Path, manifest: Manifest, full: bool = True, names: tuple[str, ...] = CHECKED_FILES
) -> None:
    """Every file's whole digest; where `full` is False, files with chunk digests are checked by size and a
    sample of chunks instead."""
    for name in names:
        path = directory / name
        if name in OPTIONAL_FILES and name not in manifest.files:
            continue
        if not path.exists():
            raise ArtifactError(f"{path} is missing")
        chunks = manifest.chunks.get(name)
        if not full and chunks is not None:
            if (problem := sampled_ok(path, chunks)) is not None:
                raise ArtifactError(f"{path} {problem}: it was changed after the build")
            continue
        want = manifest.files.get(name)
        if want is not None and digest(path) != want:
            raise ArtifactError(f"{path} does not match the checksum in {MANIFEST}: it was changed after the build")
