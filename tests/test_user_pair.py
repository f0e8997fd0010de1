"""A user's own aligned pair: tiny random-weight towers exported to ONNX here (a few convolutions on one grey
channel; an embedding bag over int32 token ids and mask), a quick `rac build --zero-shot` over them, and
/classify/zero-shot answering what an offline reference computes with onnxruntime on the same two files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from models.encoders import export_graph
from models.zero_shot.build import minilm_dir
from models.zero_shot.reco import text_index
from models.zero_shot.user_pair import TextSide, read_spec, wrap_image_tower, wrap_text_tower
from service.artifacts import (
    EXAMPLES,
    INDEX,
    ITEMS,
    KEYS,
    ZS_FUSION_IMAGE,
    ZS_FUSION_TEXT,
    ZS_TEXT_ALIGNED,
    ZS_TEXT_INDEX,
    read_manifest,
)
from service.core.zero_shot import load_tokenizer
from tests.helpers import ROOT, client

D, SIZE, MAX_LENGTH = 32, 28, 24
SPEC = {
    "image": {"size": SIZE, "grey": True, "mean": 0.5, "std": 0.25, "channels": 1, "input": "image"},
    "text": {"max_length": MAX_LENGTH, "input_ids": "ids", "attention_mask": "mask", "output": "text_embeds"},
    "logit_scale": 20.0,
}


class ImageTower(nn.Module):
    """(B, 1, 28, 28) -> (B, D), not normalised (the wrapper does it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(2)
        )
        self.out = nn.Linear(64, D, bias=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(image).flatten(1))


class TextTower(nn.Module):
    """ids, mask (B, L) int32 -> masked mean of token embeddings -> linear (B, D), not normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30522, D)
        self.out = nn.Linear(D, D)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.unsqueeze(-1).float()
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return pooled, self.out(pooled)  # a second output (the one the spec names), as CLIP exports have two


def export_towers(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    image, text = folder / "image.onnx", folder / "text.onnx"
    export_graph(ImageTower(), (torch.zeros(2, 1, SIZE, SIZE),), image, ["image"], ["image_embeds"], [{0: "b"}])
    ids = torch.ones(2, 5, dtype=torch.int32)
    axes = {0: "b", 1: "t"}
    export_graph(TextTower(), (ids, ids), text, ["ids", "mask"], ["pooled", "text_embeds"], [axes, axes])
    return image, text


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Reference:
    """The two towers run as the user would run them, with onnxruntime on the original files."""

    def __init__(self, image: Path, text: Path):
        self.image = ort.InferenceSession(str(image), providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(text), providers=["CPUExecutionProvider"])
        self.tok = load_tokenizer(minilm_dir() / "tokenizer.json", MAX_LENGTH)

    def embed_image(self, png: Path) -> np.ndarray:
        grey = np.asarray(Image.open(png).convert("L"), np.float32)[None, None] / 255  # (1, 1, 28, 28)
        return unit(self.image.run(None, {"image": (grey - 0.5) / 0.25})[0])  # (1, D)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        enc = self.tok.encode_batch(texts)
        feeds = {
            n: np.asarray([getattr(e, a) for e in enc], np.int32)
            for n, a in (("ids", "ids"), ("mask", "attention_mask"))
        }
        return unit(self.text.run(["text_embeds"], feeds)[0])  # (n, D)


@pytest.fixture(scope="module")
def pair_artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    image, text = export_towers(folder)
    (folder / "pair.json").write_text(json.dumps(SPEC))
    out = folder / "artifacts"
    cli = [sys.executable, "-m", "rac.cli", "build", "--quick", "--zero-shot", "--out", str(out)]
    cli += ["--cache", str(folder / "cache"), "--image-tower", str(image), "--text-tower", str(text)]
    cli += ["--tokenizer", str(minilm_dir() / "tokenizer.json"), "--preprocess", str(folder / "pair.json")]
    subprocess.run(cli, check=True, cwd=ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
    return out, image, text


@pytest.mark.slow
def test_a_user_pair_is_served_as_the_reference_computes(pair_artifacts: tuple[Path, Path, Path]) -> None:
    out, image_onnx, text_onnx = pair_artifacts
    m = read_manifest(out)
    zs = m.zero_shot
    assert zs is not None and m.encoder.dim == zs.dim == zs.search_dim == D and m.encoder.input["size"] == SIZE
    assert m.encoder.projection == "none" and zs.text_encoder == "user: text.onnx" and zs.max_tokens == MAX_LENGTH
    ref = Reference(image_onnx, text_onnx)
    with sqlite3.connect(out / ITEMS) as db:
        texts = [t for (t,) in db.execute("SELECT text FROM items ORDER BY id")]
    db.close()
    distinct = sorted(set(texts))  # each distinct text embedded once, as the build does
    table = ref.embed_texts(distinct)
    item_text = ref_texts = table[[distinct.index(t) for t in texts]]  # (N, D)
    np.testing.assert_allclose(np.load(out / ZS_TEXT_ALIGNED).astype(np.float32), item_text, atol=2e-3)
    keys_index = faiss.read_index(str(out / INDEX))
    keys = np.load(out / KEYS).astype(np.float32)  # what the service gathers
    text_idx, text_order = text_index(ref_texts, seed=0)
    fuse_image = torch.jit.load(str(out / ZS_FUSION_IMAGE))
    fuse_text = torch.jit.load(str(out / ZS_FUSION_TEXT))
    labels = ["t-shirt", "trouser", "ankle boot", "bag", "a zebra"]

    with client(out, max_wait_ms=5) as c:
        assert c.get("/info").json()["supports"] == {"closed_set": True, "zero_shot": True}
        for example in m.examples[:3]:
            png = out / str(example["file"])
            data = png.read_bytes()
            r = c.post("/classify", files={"image": ("x.png", data, "image/png")})
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] == example["predicted"]
            form = [("labels", (None, label.encode())) for label in labels]
            r = c.post(
                "/classify/zero-shot",
                files=[("image", ("x.png", data, "image/png")), *form],
                params={"neighbors": zs.k},
            )
            assert r.status_code == 200, r.text
            got = r.json()

            # The reference: the image tower, exact search over the memory's keys, fusion of their texts ...
            z = ref.embed_image(png)  # (1, D)
            sims, nb = keys_index.search(z, zs.k)
            assert [n["id"] for n in got["neighbors"]] == nb[0].tolist()
            np.testing.assert_allclose([n["similarity"] for n in got["neighbors"]], sims[0], atol=1e-4)
            texts16 = ref_texts.astype(np.float16).astype(np.float32)  # stored as float16
            with torch.no_grad():
                img = fuse_image(torch.from_numpy(z), torch.from_numpy(texts16[nb])).numpy()[0]
                # ... the labels through the text tower, their nearest memory texts, fusion of those images.
                prompts = ref.embed_texts([zs.template.format(label) for label in labels])
                _, pos = text_idx.search(prompts, zs.k)
                lab = fuse_text(torch.from_numpy(prompts), torch.from_numpy(keys[text_order[pos]])).numpy()
            logits = zs.scale * lab @ img
            want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            probs = {p["label"]: p["probability"] for p in got["predictions"]}
            np.testing.assert_allclose([probs[label] for label in labels], want, atol=1e-4)


@pytest.mark.slow
def test_a_user_pair_build_grows_with_memory_add(pair_artifacts: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Added captions go through the user's text tower and tokenizer, as the reference runs them."""
    from models.memory.add import add
    from tests.helpers import write_list

    out, image_onnx, text_onnx = pair_artifacts
    examples = sorted((out / EXAMPLES).glob("*.png"))[:3]
    texts = ["a zebra-striped rain boot", "a velvet evening clutch", "a photo of a bag."]
    m = add(out, write_list(examples, tmp_path / "new", list(texts)), tmp_path / "v2")
    assert m.zero_shot is not None and m.zero_shot.text_encoder == "user: text.onnx"
    aligned = np.load(tmp_path / "v2" / ZS_TEXT_ALIGNED).astype(np.float32)[-3:]
    np.testing.assert_allclose(aligned, Reference(image_onnx, text_onnx).embed_texts(texts), atol=2e-3)
    index = faiss.read_index(str(tmp_path / "v2" / ZS_TEXT_INDEX))
    assert index.ntotal == m.memory.size == read_manifest(out).memory.size + 3


def test_the_spec_and_the_graphs_are_checked(tmp_path: Path) -> None:
    image, text = export_towers(tmp_path)
    bad = {"image": {"size": 28, "channels": 1}, "text": {"max_length": 8}}  # one channel, but not grey
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="channels 1"):
        read_spec(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"image": {"size": 28}, "text": {"max_length": 8, "mask": "m"}}))
    with pytest.raises(ValueError, match="unknown text fields"):
        read_spec(tmp_path / "typo.json")
    (tmp_path / "pair.json").write_text(json.dumps(SPEC))
    spec = read_spec(tmp_path / "pair.json")
    assert spec.image.mean == (0.5, 0.5, 0.5) and spec.channels == 1
    with pytest.raises(ValueError, match="no input 'input_ids'"):
        wrap_text_tower(text, TextSide(max_length=8), tmp_path / "t.onnx")  # the default names
    # The wrapped graphs take the service's inputs and give what the originals give, normalised.
    assert wrap_image_tower(image, spec, tmp_path / "i.onnx") == D
    assert wrap_text_tower(text, spec.text, tmp_path / "t.onnx") == D
    x = np.random.default_rng(0).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    wrapped = ort.InferenceSession(str(tmp_path / "i.onnx")).run(None, {"pixels": np.repeat(x, 3, axis=1)})[0]
    np.testing.assert_allclose(wrapped, unit(ort.InferenceSession(str(image)).run(None, {"image": x})[0]), atol=1e-6)
    ids = np.array([[101, 2023, 102, 0], [101, 7592, 2088, 102]], np.int64)
    mask = (ids > 0).astype(np.int64)
    emb, search = ort.InferenceSession(str(tmp_path / "t.onnx")).run(
        ["embedding", "search"], {"input_ids": ids, "attention_mask": mask}
    )
    orig = ort.InferenceSession(str(text)).run(
        ["text_embeds"], {"ids": ids.astype(np.int32), "mask": mask.astype(np.int32)}
    )
    np.testing.assert_allclose(emb, unit(orig[0]), atol=1e-6)
    np.testing.assert_array_equal(emb, search)
    fixed = load_tokenizer(minilm_dir() / "tokenizer.json", 16, fixed=True).encode_batch(["a", "a longer text"])
    assert [len(e.ids) for e in fixed] == [16, 16]
