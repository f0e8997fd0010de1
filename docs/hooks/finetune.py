"""Renderers of the fine-tuning tables (docs/finetune.md): the choices made on validation (rac train --finetune),
the test table of each split with the validation figure the choice rests on (rac evaluate --finetune), and the
serving cost of the second encoder tail (loadtests.encoder_cost); registered in tables.py."""

from __future__ import annotations

from collections.abc import Sequence

from figures import Doc, Rows, pm

BUCKETS = ("many", "mid", "few", "all")


def choices(docs: Sequence[Doc]) -> Rows:
    """One `rac train --finetune --seeds 0` run a row: its encoder configuration and validation top-1; the best
    validation figure over all classes in bold."""
    acc = ("runs", 0, "val", "accuracy")
    best = max(d.num(*acc, "all") for d in docs)
    rows = []
    for d in docs:
        ft = ("finetune",)
        views = d.num(*ft, "views")
        head = _head(d)
        cells = [f"{d.num(*acc, b):.2f}" for b in BUCKETS]
        if d.num(*acc, "all") == best:
            cells[-1] = f"**{cells[-1]}**"
        rows.append(
            [
                f"{d.num(*ft, 'blocks'):.0f}",
                f"{d.num(*ft, 'encoder_lr'):g}",
                f"{d.get(*ft, 'augment')}, {views:.0f} view{'s' if views != 1 else ''}",
                head,
                *cells,
            ]
        )
    return ["blocks", "encoder lr", "augmentation", "head conv, projection", *(f"val {b}" for b in BUCKETS)], rows


def _head(d: Doc) -> str:
    """Whether a run trained the head conv and projection (runs from before the option was recorded did)."""
    finetune = d.get("finetune")
    return str(finetune.get("head", "trained")) if isinstance(finetune, dict) else "trained"


def split(docs: Sequence[Doc]) -> Rows:
    """Table 1's frozen and fine-tuned rows of one split: test top-1 (mean ± std) and validation over all classes
    (the mean), which is what chose between them."""
    (d,) = docs
    heads = d.keys("table1")
    buckets = d.keys("table1", heads[0], "test", "accuracy")  # no few where the split has none
    rows = [
        [
            h,
            f"{d.num('table1', h, 'lr'):g}",
            *(pm(d, "table1", h, "test", "accuracy", b) for b in buckets),
            f"{d.num('table1', h, 'val', 'accuracy', 'all', 'mean'):.1f}",
        ]
        for h in heads
    ]
    return ["head", "lr", *buckets, "val all"], rows


def cost(docs: Sequence[Doc]) -> Rows:
    """Per image, the fine-tuned build's time over the frozen one's: one row a run (a tuned build's blocks and
    whether its head conv and projection were trained)."""
    keys = docs[0].keys("cost_ratio")
    rows = []
    for d in docs:
        blocks = d.num("finetune", "blocks")
        rows.append(
            [
                f"{blocks:.0f} block{'s' if blocks != 1 else ''}, head {_head(d)}",
                *(f"{d.num('cost_ratio', k):.2f}" for k in keys),
            ]
        )
    return ["per image, tuned / frozen time", *(k.replace("_", " ") for k in keys)], rows
