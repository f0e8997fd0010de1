"""Zero-shot figures: the dual encoder alone, with image-side, text-side and both-sides RECO, and uni-modal
fusion as the ablation; top-1 on seen classes, held-out classes and all; 3 seeds; a sweep over k.

    rac evaluate --zero-shot --artifacts artifacts/demo      # writes results/zero_shot.json

A test image is classified among every class's prompt ("a photo of a {class}."). Held-out classes never
reach training (neither their images nor texts naming them), the memory still holds them. Choices are made
on the validation split's seen classes only; the test split is reported once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.memory.make import MemoryItems
from models.zero_shot.align import (
    PROMPT,
    AlignConfig,
    Pairs,
    TextProjection,
    distinct_texts,
    project,
    seen_rows,
    train_alignment,
)
from models.zero_shot.reco import (
    FusionConfig,
    FusionData,
    MemoryViews,
    Reco,
    refine,
    search_images,
    search_text,
    text_index,
    text_neighbours_of_items,
    train_reco,
)

log = logging.getLogger(__name__)
JSON = dict[str, Any]

# Pullover, Sandal, Ankle boot: each has a look-alike among the seen classes (Coat/Shirt, Sneaker, Sneaker).
HELD_OUT = (2, 5, 9)
ROWS: dict[str, FusionConfig | None] = {
    "dual encoder": None,
    "+ image-side RECO": FusionConfig(image="cross", text="none"),
    "+ text-side RECO": FusionConfig(image="none", text="cross"),
    "+ both (RECO)": FusionConfig(image="cross", text="cross"),
    "+ both, uni-modal fusion": FusionConfig(image="uni", text="uni"),
}


@dataclass
class ZeroShotConfig:
    held_out: tuple[int, ...] = HELD_OUT
    seeds: tuple[int, ...] = (0, 1, 2)
    align: AlignConfig = field(default_factory=AlignConfig)
    align_lrs: tuple[float, ...] = (1e-3, 1e-2)  # chosen on validation (seen classes), seed 0
    fusion: FusionConfig = field(default_factory=FusionConfig)
    k_sweep: tuple[int, ...] = (1, 10, 30)
    fusion_pairs: int = 8_000  # training pairs for the fusion modules (a seeded subsample)
    template: str = PROMPT


@dataclass
class Split:
    z: np.ndarray  # (n, d)
    labels: np.ndarray  # (n,)
    image_nb: np.ndarray  # (n, K) nearest memory images (the whole memory)


@dataclass
class ZeroShotData:
    """Everything every seed shares: the memory in both modalities, searches done once."""

    classes: list[str]
    held_out: tuple[int, ...]
    keys: np.ndarray  # (N, d) memory image embeddings
    item_text: np.ndarray  # (N,) index into `table`
    table: np.ndarray  # (T, dt) frozen text embeddings of the distinct memory texts
    train_rows: np.ndarray  # memory rows usable for training (seen image, seen text)
    prompts: np.ndarray  # (C, dt) frozen text embeddings of the class prompts
    prompt_nb: np.ndarray  # (C, K) nearest memory texts of each prompt (the whole memory)
    fusion_rows: np.ndarray  # the training pairs of the fusion modules
    fusion_image_nb: np.ndarray  # (n, K) their nearest images in the training memory, not themselves
    fusion_text_nb: np.ndarray  # (n, K) their nearest texts in the training memory, not themselves
    val: Split
    test: Split


def prepare_data(
    classes: list[str],
    items: MemoryItems,
    keys: np.ndarray,
    image_index: faiss.Index,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    embed_text: Any,
    cfg: ZeroShotConfig,
) -> ZeroShotData:
    """embed_text: list[str] -> (n, dt) float32, L2-normalised (the frozen text encoder)."""
    k_max = max(max(cfg.k_sweep), cfg.fusion.k)
    texts, item_text = distinct_texts(items.text)
    table = embed_text(texts)
    prompts = embed_text([cfg.template.format(c.lower()) for c in classes])
    train_rows = seen_rows(items.true_label, items.label, cfg.held_out)
    full_index, full_order = text_index(table[item_text], seed=0)
    seen_index, seen_order = text_index(table[item_text[train_rows]], seed=0)
    seen_order = train_rows[seen_order]  # positions in the seen index -> memory ids
    rng = np.random.default_rng(0)
    fusion_rows = np.sort(rng.permutation(train_rows)[: cfg.fusion_pairs])
    t = time.perf_counter()
    fusion_image_nb = search_images(image_index, keys[fusion_rows], k_max, allowed=train_rows, exclude=fusion_rows)
    fusion_text_nb = text_neighbours_of_items(item_text, fusion_rows, table, seen_index, seen_order, k_max)
    splits = [Split(z, y, search_images(image_index, z, k_max)) for z, y in (val, test)]
    log.info("zero-shot searches: %.1f s", time.perf_counter() - t)
    return ZeroShotData(
        classes,
        cfg.held_out,
        keys,
        item_text,
        table,
        train_rows,
        prompts,
        search_text(full_index, full_order, prompts, k_max),
        fusion_rows,
        fusion_image_nb,
        fusion_text_nb,
        *splits,
    )


def accuracy(logits: np.ndarray, labels: np.ndarray, held_out: tuple[int, ...]) -> dict[str, float]:
    """Top-1 (%) among all classes, on images of seen classes, of held-out classes, and all."""
    ok = logits.argmax(1) == labels
    held = np.isin(labels, held_out)
    return {
        "seen": float(100 * ok[~held].mean()),
        "held_out": float(100 * ok[held].mean()),
        "all": float(100 * ok.mean()),
    }


def align(data: ZeroShotData, cfg: AlignConfig) -> TextProjection:
    rows = data.train_rows
    proj, losses = train_alignment(Pairs(data.keys[rows], data.item_text[rows], data.table), cfg)
    log.info("alignment (lr %g, seed %d): loss %s", cfg.lr, cfg.seed, [round(x, 3) for x in losses])
    return proj


def score(data: ZeroShotData, proj: TextProjection, reco: Reco | None, k: int) -> JSON:
    """Validation and test accuracy of one dual encoder (+ fusion)."""
    views = MemoryViews(data.keys, project(proj, data.table)[data.item_text])
    prompts = project(proj, data.prompts)
    scale = float((proj.scale if reco is None else reco.scale).detach())
    if reco is not None:
        prompts = refine(reco.text, prompts, views.values(reco.cfg.text, "text"), data.prompt_nb[:, :k])
    out: JSON = {}
    for name, split in (("val", data.val), ("test", data.test)):
        z = split.z
        if reco is not None:
            z = refine(reco.image, z, views.values(reco.cfg.image, "image"), split.image_nb[:, :k])
        out[name] = accuracy(scale * z @ prompts.T, split.labels, data.held_out)
    return out


def fit_reco(data: ZeroShotData, proj: TextProjection, cfg: FusionConfig) -> Reco:
    aligned = project(proj, data.table)
    views = MemoryViews(data.keys, aligned[data.item_text])
    rows = data.fusion_rows
    fd = FusionData(
        data.keys[rows], aligned[data.item_text[rows]], data.item_text[rows], data.fusion_image_nb, data.fusion_text_nb
    )
    t = time.perf_counter()
    reco, losses = train_reco(fd, views, cfg, float(proj.scale.detach()))
    log.info(
        "fusion %s/%s k=%d seed %d: loss %s (%.0f s)",
        cfg.image,
        cfg.text,
        cfg.k,
        cfg.seed,
        [round(x, 3) for x in losses],
        time.perf_counter() - t,
    )
    return reco


def run(data: ZeroShotData, cfg: ZeroShotConfig) -> JSON:
    t0 = time.perf_counter()
    trials = {lr: align(data, replace(cfg.align, lr=lr, seed=cfg.seeds[0])) for lr in cfg.align_lrs}
    val_seen = {lr: score(data, p, None, 0)["val"]["seen"] for lr, p in trials.items()}
    lr = max(val_seen, key=lambda r: val_seen[r])
    log.info("alignment lr by validation (seen classes): %s -> %g", val_seen, lr)
    projections = {cfg.seeds[0]: trials[lr]}
    for s in cfg.seeds[1:]:
        projections[s] = align(data, replace(cfg.align, lr=lr, seed=s))
    runs: dict[str, list[JSON]] = {name: [] for name in ROWS}
    sweep: dict[int, list[JSON]] = {k: [] for k in cfg.k_sweep}
    for s, proj in projections.items():
        for name, row in ROWS.items():
            if row is None:
                runs[name].append(score(data, proj, None, 0))
                log.info("seed %d, %s: %s", s, name, runs[name][-1])
                continue
            fcfg = replace(cfg.fusion, image=row.image, text=row.text, seed=s)
            runs[name].append(score(data, proj, fit_reco(data, proj, fcfg), fcfg.k))
            log.info("seed %d, %s: %s", s, name, runs[name][-1])
            if row.image == row.text == "cross":
                sweep[fcfg.k].append(runs[name][-1])
        for k in cfg.k_sweep:
            if k != cfg.fusion.k:
                fcfg = replace(cfg.fusion, k=k, seed=s)
                sweep[k].append(score(data, proj, fit_reco(data, proj, fcfg), k))
                log.info("seed %d, k=%d: %s", s, k, sweep[k][-1])
    return {
        "held_out": [data.classes[c] for c in data.held_out],
        "seeds": list(cfg.seeds),
        "align_lr": lr,
        "align_val_seen": {str(k): v for k, v in val_seen.items()},
        "config": {
            "align": replace(cfg.align, lr=lr).to_dict(),
            "fusion": cfg.fusion.to_dict(),
            "template": cfg.template,
        },
        "table": {name: summarise(r) for name, r in runs.items()},
        "k_sweep": {str(k): summarise(r) for k, r in sweep.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def summarise(runs: list[JSON]) -> JSON:
    return {
        split: {
            group: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
            for group in ("seen", "held_out", "all")
            for v in [[r[split][group] for r in runs]]
        }
        for split in ("val", "test")
    }


def _cell(s: JSON) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def markdown(result: JSON) -> str:
    held = ", ".join(result["held_out"])
    lines = [
        f"Zero-shot top-1 (%) on the test set, mean ± std over seeds {result['seeds']}; held out: {held}",
        "",
        "| method | seen | held-out | all |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in result["table"].items():
        t = r["test"]
        lines.append(f"| {name} | {_cell(t['seen'])} | {_cell(t['held_out'])} | {_cell(t['all'])} |")
    lines += ["", "k sweep, RECO both sides: test top-1 held-out / all (val held-out / all)", ""]
    ks = list(result["k_sweep"])
    lines += ["| " + " | ".join(f"k={k}" for k in ks) + " |", "|" + " --- |" * len(ks)]
    cells = []
    for k in ks:
        r = result["k_sweep"][k]
        cells.append(
            f"{_cell(r['test']['held_out'])} / {_cell(r['test']['all'])} "
            f"({r['val']['held_out']['mean']:.1f} / {r['val']['all']['mean']:.1f})"
        )
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(result: JSON, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
