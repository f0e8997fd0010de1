"""Figures: top-1 accuracy by many/mid/few-shot bucket, where the attention goes, and the paper's tables
(Table 1, the sweep over k, the memory ablation), each mean and spread over seeds.

    rac evaluate --artifacts artifacts/demo            # all tables, printed and written as JSON
    rac evaluate --artifacts artifacts/demo --only table
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.data import BUCKETS, class_buckets
from models.features import Prepared
from models.finetune import Tuning, query_vectors
from models.heads import Head, HeadConfig
from models.memory.make import Memory, Retrieved, make_memory, retrieve
from models.train import MemoryTensors, TrainConfig, predict, train_head

log = logging.getLogger(__name__)

JSON = dict[str, Any]  # results as they are written to JSON: nested dicts of figures


def bucket_accuracy(pred: np.ndarray, labels: np.ndarray, buckets: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy (%) overall and per bucket; buckets (C,) names each class's bucket."""
    ok = pred == labels
    out = {b: float(100 * ok[buckets[labels] == b].mean()) for b in BUCKETS if (buckets[labels] == b).any()}
    out["all"] = float(100 * ok.mean())
    return out


def attention_focus(
    attn: np.ndarray, ids: np.ndarray, item_labels: np.ndarray, labels: np.ndarray, buckets: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per bucket: attention mass (%) on neighbours whose image is of the query's class, against their share
    of the retrieved list (what uniform averaging gives them). attn, ids: (n, k)."""
    same = item_labels[ids] == labels[:, None]  # (n, k)
    mass, share = (attn * same).sum(1), same.mean(1)
    out = {}
    for b in (*BUCKETS, "all"):
        rows = np.ones(len(labels), bool) if b == "all" else buckets[labels] == b
        if rows.any():
            out[b] = {"attention": float(100 * mass[rows].mean()), "share": float(100 * share[rows].mean())}
    return out


def evaluate_head(
    head: Head, data: Retrieved, memory: MemoryTensors, k: int, buckets: np.ndarray, item_labels: np.ndarray
) -> JSON:
    logits, attn = predict(head, data, memory, k)
    out: JSON = {"accuracy": bucket_accuracy(logits.argmax(1), data.labels, buckets)}
    if attn.shape[1]:
        out["attention"] = attention_focus(attn[:, -1], data.ids[:, :k], item_labels, data.labels, buckets)
    return out


# ---------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Row:
    """One row of Table 1: a head and the training recipe it gets (TrainConfig fields changed from the
    defaults: plain LACE with natural sampling)."""

    head: HeadConfig
    recipe: tuple[tuple[str, object], ...] = ()
    finetune: bool = False  # the query encoder's last blocks trained with the head (models/finetune.py)
    # The row whose validation-chosen learning rate this one's head takes, where that row ran in the same table
    # (a fine-tuned row costs minutes a run: its encoder's lr is chosen on validation with `rac train`).
    lr_from: str | None = None

    def train(self, base: TrainConfig, **changes: object) -> TrainConfig:
        return replace(base, **dict(self.recipe), **changes)  # type: ignore[arg-type]


# Class-balanced query sampling plus attention supervision (weight 1): what the paper's Q/K form needs here.
RECIPE = (("balanced", True), ("attn_supervision", 1.0))

# The rows of Table 1. "MAM (paper)" is the published module; "MAM" is the variant this project serves:
# its scores are the query's own similarities to the neighbours with a learned temperature (README).
# Rows marked "balanced + att. sup." are trained with RECIPE instead of plain LACE.
HEADS: dict[str, Row] = {
    "Linear": Row(HeadConfig(kind="linear")),
    "MLP": Row(HeadConfig(kind="mlp")),
    "Mean kNN": Row(HeadConfig(kind="mean_knn")),
    "MAM (paper, 8 layers)": Row(HeadConfig(kind="mam", layers=8, attention="projected")),
    "MAM (paper, 1 layer), balanced + att. sup.": Row(HeadConfig(kind="mam", layers=1, attention="projected"), RECIPE),
    "MAM (paper, 8 layers), balanced + att. sup.": Row(HeadConfig(kind="mam", layers=8, attention="projected"), RECIPE),
    "MAM": Row(HeadConfig(kind="mam", layers=1, attention="similarity")),
    # Keeps the paper's Q/K scores as a supervised correction on top of the similarity scores.
    "MAM, similarity + Q/K, att. sup.": Row(
        HeadConfig(kind="mam", layers=1, attention="both"), (("attn_supervision", 1.0),)
    ),
    # The paper's "Ours + FT" and its plain fine-tuned baseline: search still by the frozen encoder's keys.
    # Only run where the context has fine-tuning data (`rac evaluate --finetune`).
    "Linear + FT": Row(HeadConfig(kind="linear"), finetune=True, lr_from="Linear"),
    "MAM + FT": Row(HeadConfig(kind="mam", layers=1, attention="similarity"), finetune=True, lr_from="MAM"),
}


@dataclass
class EvalConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    heads: str = ""  # a regular expression: only the Table 1 rows whose name it matches ("" for all)
    lrs: tuple[float, ...] = (1e-3, 3e-3)  # chosen per head on validation (seed 0)
    k: int = 100
    k_sweep: tuple[int, ...] = (1, 10, 50, 100, 200)
    noise_levels: tuple[float, ...] = (0.0, 0.4, 0.8)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep_heads: tuple[str, ...] = ("Mean kNN", "MAM")


@dataclass
class Context:
    """What every run of one memory shares."""

    prep: Prepared
    memory: Memory
    tensors: MemoryTensors
    train: Retrieved
    val: Retrieved
    test: Retrieved
    buckets: np.ndarray
    tuning: Tuning | None = None  # trunk features and the frozen tail, for rows that fine-tune the encoder

    @classmethod
    def make(cls, prep: Prepared, memory: Memory, k_max: int) -> Context:
        s = prep.splits
        train, val, test = (retrieve(prep, memory, p, k_max) for p in (s.train, s.val, s.test))
        counts = np.bincount(train.labels, minlength=len(prep.dataset.classes))
        return cls(prep, memory, MemoryTensors(memory.keys, memory.values), train, val, test, class_buckets(counts))

    def run(self, cfg: HeadConfig, tcfg: TrainConfig, k: int, finetune: bool = False) -> JSON:
        """Train a head (with the query encoder's tail when `finetune`) and evaluate it on val and test."""
        t = time.perf_counter()
        classes = len(self.prep.dataset.classes)
        if finetune and self.tuning is None:
            raise ValueError("fine-tuning needs the trunk features: rac evaluate / train --finetune")
        tuned = self.tuning.trainable() if finetune and self.tuning is not None else None
        labels = self.memory.items.label
        head = train_head(cfg, tcfg, self.train, self.tensors, k, classes, item_labels=labels, tuned=tuned)
        val, test = self.val, self.test
        if tuned is not None and self.tuning is not None:  # the head reads the fine-tuned queries
            val = replace(val, z=query_vectors(tuned.tail, self.tuning.val))
            test = replace(test, z=query_vectors(tuned.tail, self.tuning.test))
        figures = {
            split: evaluate_head(head, data, self.tensors, k, self.buckets, self.memory.items.true_label)
            for split, data in (("val", val), ("test", test))
        }
        return {**figures, "seconds": time.perf_counter() - t}


def summarise(runs: list[JSON]) -> JSON:
    """Mean and standard deviation over seeds of every accuracy and attention figure."""

    def collect(path: tuple[str, ...]) -> list[float]:
        vals = []
        for r in runs:
            node: object = r
            for p in path:
                node = node[p] if isinstance(node, dict) and p in node else None
            if isinstance(node, float):
                vals.append(node)
        return vals

    out: JSON = {}
    for split in ("val", "test"):
        acc = {b: _ms(collect((split, "accuracy", b))) for b in (*BUCKETS, "all")}
        out[split] = {"accuracy": {b: v for b, v in acc.items() if v}}
        att = {
            b: {w: _ms(collect((split, "attention", b, w))) for w in ("attention", "share")} for b in (*BUCKETS, "all")
        }
        if any(v["attention"] for v in att.values()):
            out[split]["attention"] = att
    out["seconds"] = float(np.mean(collect(("seconds",))))
    return out


def _ms(vals: list[float]) -> dict[str, float] | None:
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)} if vals else None


def table1(ctx: Context, cfg: EvalConfig, done: Callable[[JSON], None] = lambda rows: None) -> JSON:
    """Each head: learning rate chosen on validation with seed 0, then every seed at that rate. `done` is
    given the rows so far after each row (a long table is written as it goes)."""
    rows: JSON = {}
    for name, row in HEADS.items():
        if (cfg.heads and not re.search(cfg.heads, name)) or (row.finetune and ctx.tuning is None):
            continue
        ft = row.finetune

        def run(lr: float, seed: int, row: Row = row, ft: bool = ft) -> JSON:
            return ctx.run(row.head, row.train(cfg.train, lr=lr, seed=seed), cfg.k, finetune=ft)

        lrs = (rows[row.lr_from]["lr"],) if row.lr_from in rows else cfg.lrs
        trials = {lr: run(lr, cfg.seeds[0]) for lr in lrs}
        lr = max(trials, key=lambda r: trials[r]["val"]["accuracy"]["all"])
        runs = [trials[lr]] + [run(lr, s) for s in cfg.seeds[1:]]
        rows[name] = {"lr": lr, "recipe": dict(row.recipe), **summarise(runs)}
        if ft and ctx.tuning is not None:
            rows[name]["finetune"] = ctx.tuning.cfg.to_dict()
            rows[name]["lr_from"] = row.lr_from if row.lr_from in rows else None
        log.info("%s: lr %g, test all %.1f", name, lr, rows[name]["test"]["accuracy"]["all"]["mean"])
        done(rows)
    return rows


def sweep_k(ctx: Context, cfg: EvalConfig, lrs: dict[str, float]) -> JSON:
    out: JSON = {}
    for name in cfg.sweep_heads:
        out[name] = {
            str(k): summarise(
                [ctx.run(HEADS[name].head, HEADS[name].train(cfg.train, lr=lrs[name], seed=s), k) for s in cfg.seeds]
            )
            for k in cfg.k_sweep
        }
    return out


def memory_ablation(prep: Prepared, base: Memory, cfg: EvalConfig, lrs: dict[str, float], cache_dir: Path) -> JSON:
    """The paper's Figure 3 questions: which memory, which values, how much text noise."""
    variants: dict[str, JSON] = {
        "downstream only": {"sources": ("downstream",)},
        "external only": {"sources": ("external",)},
        "both": {},
        "both, visual values (Lite2)": {"values": "visual"},
        **{f"both, noise {p}": {"noise": p} for p in cfg.noise_levels if p != 0.4},
    }
    out: JSON = {}
    for label, change in variants.items():
        args: JSON = {"sources": ("downstream", "external"), "values": "text", "noise": 0.4, **change}
        memory = base if not change else make_memory(prep, k=cfg.k, cache_dir=cache_dir, **args)
        ctx = Context.make(prep, memory, cfg.k)
        out[label] = {
            "memory": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
            | {"size": len(memory.items)},
            **{
                name: summarise(
                    [
                        ctx.run(HEADS[name].head, HEADS[name].train(cfg.train, lr=lrs[name], seed=s), cfg.k)
                        for s in cfg.seeds
                    ]
                )
                for name in cfg.sweep_heads
            },
        }
        log.info("memory %s done", label)
    return out


# ---------------------------------------------------------------- printing


def _cell(stat: object) -> str:
    if not isinstance(stat, dict):
        return "-"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown(results: JSON) -> str:
    """The tables as Markdown, for the terminal and the README."""
    lines: list[str] = []
    if "table1" in results:
        lines += [
            "Table 1: top-1 accuracy (%) on the balanced test set, mean ± std over seeds",
            "",
            "| head | lr | many | mid | few | all |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in results["table1"].items():
            acc = row["test"]["accuracy"]
            lines.append(
                f"| {name} | {row['lr']:g} | " + " | ".join(_cell(acc.get(b)) for b in (*BUCKETS, "all")) + " |"
            )
        lines += [
            "",
            "Attention mass on neighbours of the query's own class vs their share of the retrieved list (%, test)",
            "",
            "| head | many | mid | few | all |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in results["table1"].items():
            att = row["test"].get("attention")
            if att:
                cells = [
                    f"{att[b]['attention']['mean']:.1f} vs {att[b]['share']['mean']:.1f}"
                    if att[b]["attention"]
                    else "-"
                    for b in (*BUCKETS, "all")
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "k_sweep" in results:
        sweep = results["k_sweep"]
        ks = list(next(iter(sweep.values())).keys())
        lines += [
            "",
            "Sweep over k: test top-1 (all classes / few-shot)",
            "",
            "| head | " + " | ".join(f"k={k}" for k in ks) + " |",
            "| --- |" + " --- |" * len(ks),
        ]
        for name, by_k in sweep.items():
            cells = [
                f"{_cell(by_k[k]['test']['accuracy']['all'])} / {_cell(by_k[k]['test']['accuracy'].get('few'))}"
                for k in ks
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "memory" in results:
        lines += [
            "",
            "Memory ablation: test top-1 (all / many / mid / few)",
            "",
            "| memory | size | head | all | many | mid | few |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, row in results["memory"].items():
            for name in (n for n in row if n != "memory"):
                acc = row[name]["test"]["accuracy"]
                row_cells = " | ".join(_cell(acc.get(b)) for b in ("all", *BUCKETS))
                lines.append(f"| {label} | {row['memory']['size']} | {name} | {row_cells} |")
    return "\n".join(lines)


def run_all(
    prep: Prepared, memory: Memory, cfg: EvalConfig, only: str, cache_dir: Path, out: Path, tuning: Tuning | None = None
) -> JSON:
    """tuning: fine-tuning data; the rows that fine-tune the encoder run only where it is given."""
    k_max = max((*cfg.k_sweep, cfg.k)) if only in ("all", "k") else cfg.k
    ctx = Context.make(prep, memory, min(k_max, len(memory.items) - 1))
    ctx.tuning = tuning
    results: JSON = {
        "config": {"seeds": list(cfg.seeds), "lrs": list(cfg.lrs), "k": cfg.k, "train": cfg.train.to_dict()}
    }
    if tuning is not None:
        results["config"]["finetune"] = tuning.cfg.to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: JSON) -> None:
        out.write_text(json.dumps(results | {"table1": rows}, indent=1))

    table = table1(ctx, cfg, write)
    results["table1"] = table
    lrs = {name: float(row["lr"]) for name, row in table.items()}
    if only in ("all", "k"):
        results["k_sweep"] = sweep_k(ctx, cfg, lrs)
    if only in ("all", "memory"):
        results["memory"] = memory_ablation(prep, memory, cfg, lrs, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results
