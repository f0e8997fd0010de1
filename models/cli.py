"""`rac`: one command for every verb. Heavy imports happen inside each verb, never at import.

rac build --out artifacts/demo            rac evaluate --artifacts artifacts/demo
rac train --artifacts artifacts/demo      rac serve --artifacts artifacts/demo
rac bench --artifacts artifacts/demo
rac memory add|remove|publish|list        (memory versions: see models/memory_ops.py)
rac memory synth --from artifacts/demo --size 1000000 --out .cache/scale/1m
rac memory shard --from .cache/scale/1m --shards 2 --out .cache/scale/1m-shards
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from service.artifacts import ArtifactError

if TYPE_CHECKING:  # light at import: the CLI loads each verb's modules only when it runs
    from models.build import BuildConfig
    from models.features import Prepared
    from models.mam import HeadConfig
    from models.memory import Memory
    from models.train import TrainConfig


def _head_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("head and training")
    g.add_argument("--head", default="mam", choices=["linear", "mlp", "mean_knn", "mam"])
    g.add_argument("--layers", type=int, default=1, help="MAM layers (the paper uses 8)")
    g.add_argument("--attention", default="similarity", choices=["similarity", "projected", "both"])
    g.add_argument("--temperature-scale", type=float, default=10.0, help="MAM: the temperature's step scale")
    g.add_argument("--k", type=int, default=100, help="neighbours per query")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--tau", type=float, default=1.0, help="logit adjustment strength")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--balanced", action="store_true", help="class-balanced query sampling")
    g.add_argument(
        "--attn-supervision", type=float, default=0.0, help="weight of the attention-supervision loss (0: off)"
    )


def _head_config(a: argparse.Namespace) -> tuple[HeadConfig, TrainConfig]:
    from models.mam import HeadConfig
    from models.train import TrainConfig

    head = HeadConfig(kind=a.head, layers=a.layers, attention=a.attention, temperature_scale=a.temperature_scale)
    train = TrainConfig(
        epochs=a.epochs,
        lr=a.lr,
        tau=a.tau,
        label_smoothing=a.label_smoothing,
        balanced=a.balanced,
        attn_supervision=a.attn_supervision,
    )
    return head, train


def cmd_build(a: argparse.Namespace) -> None:
    from models.build import BuildConfig, DataConfig, build

    data = DataConfig(
        ratio=a.ratio,
        seed=a.seed,
        quick=a.quick,
        root=a.root,
        train_list=a.train_list,
        val_list=a.val_list,
        test_list=a.test_list,
        external_list=a.external_list,
        classes=a.classes,
    )
    head, train = _head_config(a)
    cfg = BuildConfig(
        out=a.out,
        cache=a.cache,
        data=data,
        encoder=a.encoder,
        checkpoint=a.checkpoint,
        input_size=a.input_size,
        grey=not a.rgb,
        pca_dim=a.pca_dim,
        sources=tuple(a.sources.split(",")),
        values=a.values,
        noise=a.noise,
        index=a.index,
        k=a.k,
        head=head,
        train=replace(train, seed=a.seed),
        zero_shot=a.zero_shot,
        image_tower=a.image_tower,
        text_tower=a.text_tower,
        tokenizer=a.tokenizer,
        preprocess=a.preprocess,
    )
    if a.image_tower is not None:
        cfg = replace(cfg, encoder=f"user: {a.image_tower.name}")
    try:
        cfg.user_pair()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rac build: {e}") from None
    manifest = build(cfg)
    acc = manifest.evaluation["test"]["accuracy"]
    print(
        f"built {a.out}: {manifest.memory.size} memory items, index {manifest.index.type}, "
        f"test top-1 {json.dumps({b: round(v, 1) for b, v in acc.items()})}"
    )


def _context(a: argparse.Namespace, k_max: int) -> tuple[BuildConfig, Prepared, Memory]:
    """The data, embeddings and memory an artifact directory was built with, re-created offline."""
    from models.build import build_memory, config_from_manifest, prepare
    from service import artifacts as A

    manifest = A.read_manifest(a.artifacts)
    cfg = config_from_manifest(manifest, a.artifacts, a.cache)
    # Another long-tail draw of the same data (a second split guards against choices fitted to one).
    data = replace(
        cfg.data,
        seed=cfg.data.seed if a.data_seed is None else a.data_seed,
        ratio=cfg.data.ratio if a.ratio is None else a.ratio,
    )
    cfg = replace(cfg, data=data)
    prep = prepare(cfg, a.artifacts / A.ENCODER, exported=manifest.encoder)
    return cfg, prep, build_memory(cfg, prep, max(k_max, cfg.k))


def cmd_evaluate(a: argparse.Namespace) -> None:
    if a.zero_shot:
        from models.zeroshot_eval import cli_evaluate

        cli_evaluate(a.artifacts, a.cache, a.seeds, a.json or Path("results/zero_shot.json"))
        return
    from models.evaluate import EvalConfig, markdown, run_all

    a.json = a.json or Path("results/evaluation.json")
    cfg = EvalConfig(seeds=tuple(int(s) for s in a.seeds.split(",")), heads=a.heads)
    _, prep, memory = _context(a, max(cfg.k_sweep))
    results = run_all(prep, memory, cfg, a.only, a.cache, a.json)
    print(markdown(results))
    print(f"\nwrote {a.json}")


def cmd_train(a: argparse.Namespace) -> None:
    """Train one head configuration on the artifact's memory and print its validation figures."""
    from models.evaluate import Context

    head, train = _head_config(a)
    _, prep, memory = _context(a, a.k)
    ctx = Context.make(prep, memory, a.k)
    runs = []
    for seed in (int(s) for s in a.seeds.split(",")):
        r = ctx.run(head, replace(train, seed=seed), a.k)
        splits = ("val", "test") if a.test else ("val",)
        runs.append({"seed": seed, **{s: r[s] for s in splits}, "seconds": round(r["seconds"], 1)})
        print(json.dumps(runs[-1]))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"head": head.to_dict(), "train": train.to_dict(), "runs": runs}, indent=1))


def cmd_serve(a: argparse.Namespace) -> None:
    """Settings from RAC_* variables, the options given here taking precedence; a refusal exits non-zero."""
    from service.serve import serve
    from service.settings import Settings

    given = {"artifacts": a.artifacts, "host": a.host, "port": a.port, "workers": a.workers}
    sys.exit(serve(Settings(**{k: v for k, v in given.items() if v is not None})))


def cmd_bench(a: argparse.Namespace) -> None:
    if a.memory:
        from loadtests.memory_bench import main as memory_bench

        sizes = [int(n) for n in a.sizes.split(",")]
        memory_bench(a.artifacts, sizes, a.scale_cache, a.json or Path("results/memory_scale.json"), a.requests)
        return
    from loadtests.bench import main as bench

    bench(a.artifacts, a.json or Path("results/bench.json"), a.seconds, a.concurrency, a.overload)


def cmd_memory_synth(a: argparse.Namespace) -> None:
    from models.scale import SynthConfig, synth

    cfg = SynthConfig(size=a.size, noise=a.noise, index=a.index, pq_m=a.pq_m, opq=a.opq, nlist=a.nlist, nprobe=a.nprobe)
    m = synth(a.src, a.out, cfg)
    print(f"wrote {a.out}: {m.memory.size} items, index {m.index.type}, recall@{m.index.k} {m.index.recall_at_k}")


def cmd_memory_shard(a: argparse.Namespace) -> None:
    from models.shards import shard

    dirs = shard(a.src, a.out, a.shards)
    print(f"wrote {len(dirs)} shards of {a.src} to {a.out}")


def _scale_args(mem: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """rac memory synth | shard: scale memories for benchmarks, and shards (models/scale.py, models/shards.py)."""
    sy = mem.add_parser("synth", help="a scale memory for benchmarks: the real items plus synthetic ones")
    sy.add_argument("--from", dest="src", type=Path, required=True, help="an artifact directory")
    sy.add_argument("--size", type=int, required=True, help="items in all, the real ones included")
    sy.add_argument("--out", type=Path, required=True)
    sy.add_argument("--noise", type=float, default=0.5, help="perturbation of the real keys")
    sy.add_argument("--index", default="auto", help="auto (IVF-Flat below 500k items, IVF-PQ above) or a factory")
    sy.add_argument("--pq-m", type=int, default=64, help="PQ bytes per item")
    sy.add_argument("--opq", action="store_true", help="an OPQ rotation before PQ")
    sy.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about sqrt(size))")
    sy.add_argument("--nprobe", type=int, default=0, help="0: the source's")
    sy.set_defaults(func=cmd_memory_synth)
    sh = mem.add_parser(
        "shard", help="split a memory into shards sharing its trained IVF index (served by service/ray_app.py)"
    )
    sh.add_argument("--from", dest="src", type=Path, required=True, help="an artifact directory with an IVF index")
    sh.add_argument("--shards", type=int, required=True)
    sh.add_argument("--out", type=Path, required=True)
    sh.set_defaults(func=cmd_memory_shard)


def cmd_memory(a: argparse.Namespace) -> None:
    """rac memory add|remove|publish|list: memory versions (models/memory_ops.py)."""
    from models import memory_ops as ops

    if a.op == "add":
        m = ops.add(a.source_dir, a.list, a.out, a.root, a.item_source, a.retrain_index)
    elif a.op == "remove":
        m = ops.remove(a.source_dir, a.ids, a.out)
    elif a.op == "publish":
        target = ops.publish(a.version_dir, a.root)
        print(f"published {target} as {a.root / 'current'}")
        return
    else:
        rows = ops.list_versions(a.root)
        if a.json:
            print(json.dumps(rows, indent=1))
        for r in rows:
            mark = "*" if r["current"] else " "
            print(
                f"{mark} {r['name']:<24} {r['memory_version']}  parent {r['parent_version'] or '-':<12}  "
                f"{r['items']:>9} items  {r['memory_mb']:>8} MB  {r['created']}  {r['sources']}"
            )
        return
    print(f"wrote {a.out}: memory version {m.memory_version} (parent {m.parent_version}), {m.memory.size} items")


def _memory_args(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mem = sub.add_parser("memory", help="memory versions: add, remove, publish, list")
    ops = mem.add_subparsers(dest="op", required=True)
    ad = ops.add_parser("add", help="a new version with the items of a list file added")
    ad.add_argument("--from", dest="source_dir", type=Path, required=True, help="the version to add to")
    ad.add_argument("--list", type=Path, required=True, help="'relative/path.png label[<TAB>text]' per line")
    ad.add_argument("--root", type=Path, help="the folder the list's paths are relative to (default: the list's)")
    ad.add_argument("--out", type=Path, required=True, help="the new version directory")
    ad.add_argument("--source", dest="item_source", default="external", help="the items' source column")
    ad.add_argument("--retrain-index", action="store_true", help="re-cluster the IVF lists over every key")
    rm = ops.add_parser("remove", help="a new version without the listed item ids")
    rm.add_argument("--from", dest="source_dir", type=Path, required=True)
    rm.add_argument("--ids", type=Path, required=True, help="item ids of the --from version, whitespace-separated")
    rm.add_argument("--out", type=Path, required=True)
    pb = ops.add_parser("publish", help="check a version and switch ROOT/current to it atomically")
    pb.add_argument("version_dir", type=Path)
    pb.add_argument("--root", type=Path, required=True)
    ls = ops.add_parser("list", help="a root's versions, sizes, and which is current")
    ls.add_argument("--root", type=Path, required=True)
    ls.add_argument("--json", action="store_true")
    mem.set_defaults(func=cmd_memory)
    _scale_args(ops)


def cmd_choices(a: argparse.Namespace) -> None:
    from models.choices import main as choices

    choices(a.artifacts, a.json, a.cache)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports a missing AVX2 module needlessly
    p = argparse.ArgumentParser(prog="rac", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)

    b = sub.add_parser("build", help="build an artifact directory")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--quick", action="store_true", help="a few hundred memory items (tests)")
    b.add_argument("--cache", type=Path, default=Path(".cache/rac"))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--ratio", type=float, default=1000.0, help="long-tail imbalance ratio")
    b.add_argument(
        "--encoder",
        default="efficientnet-lite0",
        help="efficientnet-lite0 | vit-hf | vit-timm | vit-s16 (random weights)",
    )
    b.add_argument("--checkpoint", type=Path, help="ViT weights: a Hugging Face folder or a timm file")
    b.add_argument("--input-size", type=int, default=64)
    b.add_argument("--rgb", action="store_true", help="keep colour (default: grey, as Fashion-MNIST)")
    b.add_argument("--pca-dim", type=int, default=256, help="0 keeps the encoder's dimension")
    b.add_argument("--sources", default="downstream,external")
    b.add_argument("--values", default="text", choices=["text", "visual"])
    b.add_argument("--noise", type=float, default=0.4)
    b.add_argument("--index", default="auto", help="auto, or a FAISS factory string such as IVF256,Flat")
    b.add_argument("--zero-shot", action="store_true", help="add the zero-shot parts (aligned text tower, RECO)")
    u = b.add_argument_group("a user's aligned image-text pair for --zero-shot (models/user_pair.py)")
    u.add_argument("--image-tower", type=Path, help="image ONNX: becomes the encoder (no PCA)")
    u.add_argument("--text-tower", type=Path, help="text ONNX, aligned with the image tower")
    u.add_argument("--tokenizer", type=Path, help="the text tower's tokenizer.json (tokenizers library)")
    u.add_argument("--preprocess", type=Path, help="JSON: image size, mean/std, channels; text max length, names")
    d = b.add_argument_group("a list-file dataset instead of Fashion-MNIST")
    for name in ("root", "train-list", "val-list", "test-list", "external-list", "classes"):
        d.add_argument(f"--{name}", type=Path)
    _head_args(b)
    b.set_defaults(func=cmd_build)

    for name, func, helptext in (
        ("evaluate", cmd_evaluate, "the paper's tables over an artifact's data"),
        ("train", cmd_train, "train one head and print validation figures"),
    ):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--artifacts", type=Path, required=True)
        e.add_argument("--cache", type=Path, default=Path(".cache/rac"))
        e.add_argument("--seeds", default="0,1,2" if name == "evaluate" else "0")
        e.add_argument("--data-seed", type=int, help="another long-tail draw than the build's (its seed)")
        e.add_argument("--ratio", type=float, help="another imbalance ratio than the build's")
        e.set_defaults(func=func)
    ev = sub.choices["evaluate"]
    ev.add_argument("--only", default="all", choices=["all", "table", "k", "memory"])
    ev.add_argument("--heads", default="", help="a regular expression: only the Table 1 rows it matches")
    ev.add_argument("--json", type=Path, help="default results/evaluation.json (zero-shot: results/zero_shot.json)")
    ev.add_argument("--zero-shot", action="store_true", help="the zero-shot table (RECO) instead")
    tr = sub.choices["train"]
    tr.add_argument("--test", action="store_true", help="also print test figures (not for choosing)")
    tr.add_argument("--json", type=Path, help="also write the configuration and figures here")
    _head_args(tr)

    s = sub.add_parser("serve", help="serve an artifact directory over HTTP")
    s.add_argument("--artifacts", type=Path, help="default RAC_ARTIFACTS, else artifacts/demo")
    s.add_argument("--host", help="default RAC_HOST, else 127.0.0.1")
    s.add_argument("--port", type=int, help="default RAC_PORT, else 8000")
    s.add_argument("--workers", type=int, help="server processes (default RAC_WORKERS, else one per core)")
    s.set_defaults(func=cmd_serve)

    ch = sub.add_parser("choices", help="the figures behind the README's design choices")
    ch.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    ch.add_argument("--json", type=Path, default=Path("results/choices.json"))
    ch.add_argument("--cache", type=Path, default=Path(".cache/rac"))
    ch.set_defaults(func=cmd_choices)

    be = sub.add_parser("bench", help="in-process ceiling, raw encoder, HTTP throughput, cache hits")
    be.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    be.add_argument("--json", type=Path, help="default results/bench.json (--memory: results/memory_scale.json)")
    be.add_argument("--seconds", type=float, default=10.0, help="per HTTP measurement")
    be.add_argument("--concurrency", default="1,4,16")
    be.add_argument("--overload", default="64,256,1024", help="connections for the overload runs ('' for none)")
    sc = be.add_argument_group("scale memories (--memory): the demo memory grown with synthetic items")
    sc.add_argument("--memory", action="store_true", help="latency, start-up and sizes by memory size")
    sc.add_argument("--sizes", default="100000,1000000,10000000")
    sc.add_argument("--scale-cache", type=Path, default=Path(".cache/scale"), help="where scale memories are kept")
    sc.add_argument("--requests", type=int, default=200, help="batch-1 requests per size (batch 32: an eighth)")
    be.set_defaults(func=cmd_bench)

    _memory_args(sub)

    a = p.parse_args(argv)
    try:
        a.func(a)
    except (ArtifactError, FileExistsError, FileNotFoundError, ValueError) as e:
        if a.verb != "memory":
            raise
        p.exit(2, f"rac memory {a.op}: {e}\n")


if __name__ == "__main__":
    main()
