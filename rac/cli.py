"""`rac`: one command for every verb. Heavy imports happen inside each verb, never at import.

rac build --out artifacts/demo            rac evaluate --artifacts artifacts/demo
rac train --artifacts artifacts/demo      rac serve --artifacts artifacts/demo
rac bench --artifacts artifacts/demo     (--frozen artifacts/frozen: a fine-tuned build's encoder cost)
rac build --finetune --out artifacts/ft   (the query encoder's last blocks trained with the head: models/finetune.py)
rac memory add|remove|tag|publish|list    (memory versions: see models/memory/ops.py, add.py)
rac keys add|list|remove                  (API keys: see service/auth.py)
rac serve --memory a=ROOT_A --memory b=ROOT_B   (several named memories on one model)
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

from rac import keys, memory
from service.artifacts import ArtifactError

if TYPE_CHECKING:  # light at import: the CLI loads each verb's modules only when it runs
    from models.build.artifact import BuildConfig
    from models.features import Prepared
    from models.finetune import FinetuneConfig, Tuning
    from models.heads import HeadConfig
    from models.memory.make import Memory
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
    from models.heads import HeadConfig
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


def _finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning the query encoder with the head (models/finetune.py)")
    g.add_argument("--finetune", action="store_true", help="train the encoder's last blocks with the head")
    g.add_argument("--ft-blocks", type=int, default=2, help="EfficientNet-Lite blocks trained (of 16)")
    g.add_argument("--ft-lr", type=float, default=3e-4, help="the encoder's learning rate (the head keeps --lr)")
    g.add_argument("--ft-augment", default="flip", choices=["none", "flip", "shift", "flip+shift"])
    g.add_argument("--ft-views", type=int, default=2, help="augmented views of each training image")
    g.add_argument("--ft-drop-connect", type=float, default=0.2, help="stochastic depth in the trained blocks")
    g.add_argument(
        "--ft-head",
        default="frozen",
        choices=["frozen", "trained"],
        help="the head conv and projection: kept frozen (one head computed for both tails) or trained",
    )


def _finetune_config(a: argparse.Namespace) -> FinetuneConfig | None:
    from models.finetune import FinetuneConfig

    if not a.finetune:
        return None
    return FinetuneConfig(
        blocks=a.ft_blocks,
        encoder_lr=a.ft_lr,
        augment=a.ft_augment,
        views=a.ft_views,
        drop_connect=a.ft_drop_connect,
        head=a.ft_head,
    )


def _tuning(a: argparse.Namespace, cfg: BuildConfig, prep: Prepared) -> Tuning | None:
    """The trunk features and frozen tail that fine-tuning rows need (None without --finetune)."""
    from models.finetune import make_tuning

    fcfg = _finetune_config(a)
    return None if fcfg is None else make_tuning(prep, cfg.encoder, fcfg, a.cache)


def cmd_build(a: argparse.Namespace) -> None:
    from models.build.artifact import BuildConfig, DataConfig, build

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
        finetune=_finetune_config(a),
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
    from models.build.artifact import build_memory, config_from_manifest, prepare
    from service.artifacts import ENCODER, read_manifest

    manifest = read_manifest(a.artifacts)
    cfg = config_from_manifest(manifest, a.artifacts, a.cache)
    # Another long-tail draw of the same data (a second split guards against choices fitted to one).
    data = replace(
        cfg.data,
        seed=cfg.data.seed if a.data_seed is None else a.data_seed,
        ratio=cfg.data.ratio if a.ratio is None else a.ratio,
    )
    cfg = replace(cfg, data=data)
    prep = prepare(cfg, a.artifacts / ENCODER, exported=manifest.encoder)
    return cfg, prep, build_memory(cfg, prep, max(k_max, cfg.k))


def cmd_evaluate(a: argparse.Namespace) -> None:
    if a.zero_shot:
        from models.zero_shot.report import cli_evaluate

        cli_evaluate(a.artifacts, a.cache, a.seeds, a.json or Path("results/zero_shot.json"))
        return
    from models.build.evaluate import EvalConfig, markdown, run_all

    a.json = a.json or Path("results/finetune.json" if a.finetune else "results/evaluation.json")
    # With --finetune, by default the fine-tuned rows and the frozen ones they are compared with.
    heads = a.heads or (r"^(Linear|MAM)( \+ FT)?$" if a.finetune else "")
    cfg = EvalConfig(seeds=tuple(int(s) for s in a.seeds.split(",")), heads=heads)
    bcfg, prep, memory = _context(a, max(cfg.k_sweep))
    results = run_all(prep, memory, cfg, a.only, a.cache, a.json, _tuning(a, bcfg, prep))
    print(markdown(results))
    print(f"\nwrote {a.json}")


def cmd_train(a: argparse.Namespace) -> None:
    """Train one head configuration on the artifact's memory and print its validation figures."""
    from models.build.evaluate import Context

    head, train = _head_config(a)
    cfg, prep, memory = _context(a, a.k)
    ctx = Context.make(prep, memory, a.k)
    ctx.tuning = _tuning(a, cfg, prep)
    runs = []
    for seed in (int(s) for s in a.seeds.split(",")):
        r = ctx.run(head, replace(train, seed=seed), a.k, finetune=ctx.tuning is not None)
        splits = ("val", "test") if a.test else ("val",)
        runs.append({"seed": seed, **{s: r[s] for s in splits}, "seconds": round(r["seconds"], 1)})
        print(json.dumps(runs[-1]))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        setup = {"head": head.to_dict(), "train": train.to_dict()}
        if ctx.tuning is not None:
            setup["finetune"] = ctx.tuning.cfg.to_dict()
        a.json.write_text(json.dumps(setup | {"runs": runs}, indent=1))


def cmd_serve(a: argparse.Namespace) -> None:
    """Settings from RAC_* variables, the options given here taking precedence; a refusal exits non-zero."""
    from service.serve import serve
    from service.settings import Settings

    given = {"artifacts": a.artifacts, "host": a.host, "port": a.port, "workers": a.workers}
    if a.memory:  # NAME=ROOT, repeated: several named memories (RAC_MEMORIES), the first the default
        given["memories"] = ",".join(a.memory)
    sys.exit(serve(Settings(**{k: v for k, v in given.items() if v is not None})))


def cmd_bench(a: argparse.Namespace) -> None:
    if a.frozen is not None:
        from loadtests.encoder_cost import main as encoder_cost

        encoder_cost(a.frozen, a.artifacts, a.json or Path("results/finetune_cost.json"), a.seconds)
        return
    if a.memory:
        from loadtests.memory_bench import main as memory_bench

        sizes = [int(n) for n in a.sizes.split(",")]
        memory_bench(a.artifacts, sizes, a.scale_cache, a.json or Path("results/memory_scale.json"), a.requests)
        return
    from loadtests.bench import main as bench

    bench(a.artifacts, a.json or Path("results/bench.json"), a.seconds, a.concurrency, a.overload)


def cmd_choices(a: argparse.Namespace) -> None:
    from models.build.choices import main as choices

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
    u = b.add_argument_group("a user's aligned image-text pair for --zero-shot (models/zero_shot/user_pair.py)")
    u.add_argument("--image-tower", type=Path, help="image ONNX: becomes the encoder (no PCA)")
    u.add_argument("--text-tower", type=Path, help="text ONNX, aligned with the image tower")
    u.add_argument("--tokenizer", type=Path, help="the text tower's tokenizer.json (tokenizers library)")
    u.add_argument("--preprocess", type=Path, help="JSON: image size, mean/std, channels; text max length, names")
    d = b.add_argument_group("a list-file dataset instead of Fashion-MNIST")
    for name in ("root", "train-list", "val-list", "test-list", "external-list", "classes"):
        d.add_argument(f"--{name}", type=Path)
    _head_args(b)
    _finetune_args(b)
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
        _finetune_args(e)
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
    s.add_argument(
        "--memory", action="append", metavar="NAME=ROOT", help="a named memory (repeatable; the first is the default)"
    )
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
    be.add_argument(
        "--frozen",
        type=Path,
        help="a frozen-only build: what the --artifacts fine-tuned build's encoder and pipeline cost against it, "
        "call by call (loadtests/encoder_cost.py; default --json results/finetune_cost.json)",
    )
    sc = be.add_argument_group("scale memories (--memory): the demo memory grown with synthetic items")
    sc.add_argument("--memory", action="store_true", help="latency, start-up and sizes by memory size")
    sc.add_argument("--sizes", default="100000,1000000,10000000")
    sc.add_argument("--scale-cache", type=Path, default=Path(".cache/scale"), help="where scale memories are kept")
    sc.add_argument("--requests", type=int, default=200, help="batch-1 requests per size (batch 32: an eighth)")
    be.set_defaults(func=cmd_bench)

    memory.add_parser(sub)
    keys.add_parser(sub)

    a = p.parse_args(argv)
    try:
        a.func(a)
    except (ArtifactError, FileExistsError, FileNotFoundError, ValueError) as e:
        if a.verb not in ("memory", "keys"):
            raise
        p.exit(2, f"rac {a.verb} {a.op}: {e}\n")


if __name__ == "__main__":
    main()
