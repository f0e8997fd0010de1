"""The zero-shot head (RECO): labels named in the request, scored against a retrieval-refined image embedding.

It is a second head over the pipeline's batch: the image is decoded, encoded and searched with /classify's
images (same batch, same cache entry), then its k nearest memory images' aligned texts are fused into it
(`fuse_image`, TorchScript). Labels: prompt -> tokenizer (the `tokenizers` library) -> text tower (ONNX: no
torch for text) -> the memory version's text index -> the keys of the k nearest texts fused into the prompt's
embedding (`embed_labels`), cached by label, template and memory version.

The model parts (text tower, tokenizer, fusion modules) are loaded once; the parts that index a memory
version's items (text index, aligned texts) belong to the version (service/memory/text_index.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from service.artifacts import (
    MANIFEST,
    ZS_FUSION_IMAGE,
    ZS_FUSION_TEXT,
    ZS_MODEL_FILES,
    ZS_TEXT_TOWER,
    ZS_TOKENIZER,
    ArtifactError,
    ZeroShotInfo,
    digest,
)
from service.errors import RequestError
from service.memory.versions import MemoryVersion


def load_tokenizer(
    path: Path, max_tokens: int, pad_id: int = 0, pad_token: str = "[PAD]", fixed: bool = False
) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_tokens if fixed else None)
    return tok


def text_tokenizer(directory: Path, info: ZeroShotInfo) -> Tokenizer:
    """The tokenizer of an artifact directory's text tower, set up as its manifest says."""
    return load_tokenizer(directory / ZS_TOKENIZER, info.max_tokens, info.pad_id, info.pad_token, info.pad_to_max)


def run_text_tower(
    tower: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> aligned (n, d) and search (n, dt) embeddings, float32: what the service does with a prompt,
    and what the offline side does with memory texts."""
    enc = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.asarray([e.ids for e in enc], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
    }
    aligned, search = tower.run(["embedding", "search"], feeds)
    return np.asarray(aligned, np.float32), np.asarray(search, np.float32)


def check_labels(labels: list[str], template: str, max_labels: int, max_chars: int) -> list[str]:
    """Labels stripped and validated; raises RequestError (422, 413) naming the first problem."""
    if template.count("{}") != 1 or len(template) > 200:
        raise RequestError(422, "template must contain '{}' exactly once and be at most 200 characters")
    if not labels:
        raise RequestError(422, "no labels: send the candidates as repeated multipart field 'labels'")
    if len(labels) > max_labels:
        raise RequestError(413, f"{len(labels)} labels in one request; the limit is {max_labels}")
    out = []
    for n, raw in enumerate(labels):
        label = raw.strip()
        if not label:
            raise RequestError(422, f"label {n} is empty")
        if len(label) > max_chars:
            raise RequestError(422, f"label {n} is {len(label)} characters; the limit is {max_chars}")
        if any(ord(c) < 32 for c in label):
            raise RequestError(422, f"label {n} contains control characters")
        out.append(label)
    if len(set(out)) != len(out):
        raise RequestError(422, "labels must be distinct")
    return out


def softmax_scores(labels: np.ndarray, image: np.ndarray, scale: float) -> np.ndarray:
    """(L, d) label embeddings, (d,) image embedding -> (L,) probabilities."""
    logits = scale * labels @ image
    probs = np.exp(logits - logits.max())
    return np.asarray(probs / probs.sum(), np.float32)


class ZeroShot:
    """The zero-shot model parts of an artifact directory (text tower, tokenizer, fusion modules)."""

    def __init__(self, directory: Path, info: ZeroShotInfo, verify: bool):
        self.info = info
        if verify:
            for name in ZS_MODEL_FILES:
                if digest(directory / name) != info.files.get(name):
                    raise ArtifactError(f"{directory / name} does not match the checksum in {MANIFEST}")
        self.model_files = {name: info.files.get(name, "?") for name in ZS_MODEL_FILES}
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.tower = ort.InferenceSession(str(directory / ZS_TEXT_TOWER), options, providers=["CPUExecutionProvider"])
        self.tokenizer = text_tokenizer(directory, info)
        self.fuse_images = torch.jit.load(str(directory / ZS_FUSION_IMAGE), map_location="cpu").eval()
        self.fuse_texts = torch.jit.load(str(directory / ZS_FUSION_TEXT), map_location="cpu").eval()
        # Part of every label cache key: embeddings made by other parts are never read back.
        self.parts_id = hashlib.blake2b("".join(sorted(self.model_files.values())).encode(), digest_size=6).hexdigest()

    def missing(self, version: MemoryVersion) -> str | None:
        """None where `version` carries zero-shot parts made for this model; else why it cannot be served."""
        if version.text_index is None:
            return (
                f"memory version {version.id} has no zero-shot parts: derive it with `rac memory add` / `remove` "
                "from a version that has them, or build them with `rac build --zero-shot`"
            )
        if version.text_index.model_files != self.model_files:
            return (
                f"the zero-shot parts of memory version {version.id} were made for another text tower or fusion "
                "modules than this process serves: restart the service to serve them"
            )
        return None

    def fuse_image(self, z: np.ndarray, ids: np.ndarray, version: MemoryVersion) -> np.ndarray:
        """z (b, d) query embeddings, ids (b, >=k) their neighbours -> (b, d) refined image embeddings: the
        aligned texts of the k nearest memory images fused in."""
        assert version.text_index is not None  # checked when the request started
        nb = version.memory.rows(ids[:, : self.info.k])  # (b, k): the aligned texts are by row (id order)
        texts = np.take(version.text_index.aligned, nb.ravel(), axis=0).reshape(*nb.shape, -1)  # (b, k, d)
        with torch.inference_mode():
            refined = self.fuse_images(torch.from_numpy(z), torch.from_numpy(texts).float())
        return np.asarray(refined.numpy(), np.float32)

    def embed_labels(self, prompts: list[str], version: MemoryVersion) -> np.ndarray:
        """Prompts -> refined label embeddings (n, d): text tower, text search in `version`'s text index,
        fusion of its neighbours' images (their keys)."""
        aligned, search = run_text_tower(self.tower, self.tokenizer, prompts)
        text = version.text_index
        assert text is not None  # checked when the request started
        _, pos = text.index.search(np.ascontiguousarray(search, dtype=np.float32), self.info.k)
        images = version.memory.gather(version.memory.id_of_rows(text.order[pos]), True, False)[0]  # (n, k, d)
        with torch.inference_mode():
            refined = self.fuse_texts(torch.from_numpy(aligned), torch.from_numpy(images).float())
        return np.asarray(refined.numpy(), np.float32)
