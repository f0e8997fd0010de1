"""Renderers of the accuracy tables: the paper's (rac evaluate), zero-shot, the build's nprobe sweep, and the
memory's accuracy as it changes (registered in tables.py)."""

from __future__ import annotations

from collections.abc import Sequence

from figures import Doc, Rows, n, pm

# --- the paper's tables (rac evaluate: results/evaluation.json, recipe*.json) ---


def _buckets(d: Doc, *row: str) -> list[str]:
    return d.keys(*row, "test", "accuracy")  # many, mid, few, all (no few where the split has none)


def _attention(d: Doc, *row: str, bucket: str) -> str:
    a = (*row, "test", "attention", bucket)
    return f"{d.num(*a, 'attention', 'mean'):.1f} vs {d.num(*a, 'share', 'mean'):.1f}"


def eval_table1(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    heads = d.keys("table1")
    buckets = _buckets(d, "table1", heads[0])
    rows = [
        [h, f"{d.num('table1', h, 'lr'):g}", *(pm(d, "table1", h, "test", "accuracy", b) for b in buckets)]
        for h in heads
    ]
    return ["head", "lr", *buckets], rows


def eval_attention(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    heads = [h for h in d.keys("table1") if "attention" in d.keys("table1", h, "test")]
    buckets = _buckets(d, "table1", heads[0])
    return ["head", *buckets], [[h, *(_attention(d, "table1", h, bucket=b) for b in buckets)] for h in heads]


def eval_k(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    heads = d.keys("k_sweep")
    ks = d.keys("k_sweep", heads[0])

    def cell(h: str, k: str) -> str:
        acc = ("k_sweep", h, k, "test", "accuracy")
        return f"{pm(d, *acc, 'all')} / {pm(d, *acc, 'few')}"

    return ["head", *(f"k={k}" for k in ks)], [[h, *(cell(h, k) for k in ks)] for h in heads]


def eval_memory(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for mem in d.keys("memory"):
        heads = [h for h in d.keys("memory", mem) if h != "memory"]
        for h in heads:
            acc = ("memory", mem, h, "test", "accuracy")
            rows.append(
                [
                    mem,
                    n(d.num("memory", mem, "memory", "size")),
                    h,
                    *(pm(d, *acc, b) for b in ("all", "many", "mid", "few")),
                ]
            )
    return ["memory", "items", "head", "all", "many", "mid", "few"], rows


def recipes(docs: Sequence[Doc]) -> Rows:
    """Table 1's columns for the rows of several `rac evaluate --only table` runs on one split."""
    rows: list[list[str]] = []
    buckets = _buckets(docs[0], "table1", docs[0].keys("table1")[0])
    for d in docs:
        for h in d.keys("table1"):
            row = ("table1", h)
            att = ""
            if "attention" in d.keys(*row, "test"):
                att = _attention(d, *row, bucket="all")
                if "few" in buckets:  # the split with few-shot classes: mid-shot is where the heads differ
                    att += f" (mid {_attention(d, *row, bucket='mid')})"
            rows.append([h, f"{d.num(*row, 'lr'):g}", *(pm(d, *row, "test", "accuracy", b) for b in buckets), att])
    return ["head", "lr", *buckets, "attention vs share (all)"], rows


# --- zero-shot (results/zero_shot.json) ---


def zero_shot(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    cols = ("seen", "held_out", "all")
    rows = [[m, *(pm(d, "table", m, "test", c) for c in cols)] for m in d.keys("table")]
    return ["method", "seen", "held-out", "all"], rows


def zero_shot_k(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for k in d.keys("k_sweep"):
        s = ("k_sweep", k)
        rows.append(
            [
                k,
                pm(d, *s, "test", "held_out"),
                pm(d, *s, "test", "all"),
                f"{d.num(*s, 'val', 'held_out', 'mean'):.1f}",
                f"{d.num(*s, 'val', 'all', 'mean'):.1f}",
            ]
        )
    return ["k", "test held-out", "test all", "validation held-out (mean)", "validation all (mean)"], rows


# --- the build's own figures (results/build.json) ---


def nprobe(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    sweep = ("evaluation", "nprobe", "sweep")
    chosen = f"{d.num('evaluation', 'nprobe', 'chosen'):.0f}"
    rows = [
        [
            f"**{p}** (served)" if p == chosen else p,
            f"{d.num(*sweep, p, 'recall'):.3f}",
            f"{d.num(*sweep, p, 'val_top1'):.2f}",
        ]
        for p in d.keys(*sweep)
    ]
    return ["nprobe", f"recall@{d.num('index', 'k'):.0f} vs exact", "validation top-1 %"], rows


# --- the memory as it changes (loadtests.memory_curve, loadtests.memory_accuracy) ---


def memory_curve(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    rows = []
    for i in range(d.count("rows")):
        r: tuple[str | int, ...] = ("rows", i)
        rows.append(
            [
                str(d.get(*r, "memory")),
                n(d.num(*r, "items")),
                n(d.num(*r, "external_items")),
                *(f"{d.num(*r, 'test_top1', b):.2f}" for b in ("all", "many", "mid", "few")),
            ]
        )
    return ["memory served (published live)", "items", "external items", "all", "many", "mid", "few"], rows


def memory_accuracy(docs: Sequence[Doc]) -> Rows:
    (d,) = docs
    v = ("variants",)
    return ["neighbours from", "test top-1 %", "recall@k vs exact"], [
        [name, f"{d.num(*v, name, 'test_top1'):.2f}", f"{d.num(*v, name, 'recall_at_k'):.3f}"] for name in d.keys(*v)
    ]
