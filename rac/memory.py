"""`rac memory`: memory versions (add, remove, tag, publish, list: models/memory/ops.py, add.py) and scale
memories and shards for benchmarks and clusters (synth, shard: models/memory/scale.py, shards.py).

rac memory add --from ROOT/v1 --list new.jsonl --images DIR --out ROOT/v2 [--ray]
rac memory remove --from ROOT/v2 --ids gone.txt --out ROOT/v3
rac memory publish ROOT/v3 --root ROOT
rac memory synth --from artifacts/demo --size 1000000 --out .cache/scale/1m
rac memory shard --from .cache/scale/1m --shards 2 --out .cache/scale/1m-shards
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_memory_synth(a: argparse.Namespace) -> None:
    from models.memory.scale import SynthConfig, synth

    cfg = SynthConfig(size=a.size, noise=a.noise, index=a.index, pq_m=a.pq_m, opq=a.opq, nlist=a.nlist, nprobe=a.nprobe)
    m = synth(a.src, a.out, cfg)
    print(f"wrote {a.out}: {m.memory.size} items, index {m.index.type}, recall@{m.index.k} {m.index.recall_at_k}")


def cmd_memory_shard(a: argparse.Namespace) -> None:
    from models.memory.shards import shard

    dirs = shard(a.src, a.out, a.shards)
    print(f"wrote {len(dirs)} shards of {a.src} to {a.out}")


def _scale_args(mem: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """rac memory synth | shard: scale memories for benchmarks, and shards (models/memory/scale.py, shards.py)."""
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
        "shard", help="split a memory into shards sharing its trained index (served by service/cluster/app.py)"
    )
    sh.add_argument("--from", dest="src", type=Path, required=True, help="an artifact directory (IVF or flat index)")
    sh.add_argument("--shards", type=int, required=True)
    sh.add_argument("--out", type=Path, required=True)
    sh.set_defaults(func=cmd_memory_shard)


def cmd_memory(a: argparse.Namespace) -> None:
    """rac memory add|remove|tag|publish|list: memory versions (models/memory/ops.py, add.py)."""
    from models.memory import ops

    if a.op == "add":
        from models.memory.add import add

        m = add(a.source_dir, a.list, a.out, a.images, a.item_source, a.retrain_index, a.ray, a.lists)
    elif a.op == "remove":
        m = ops.remove(a.source_dir, a.out, a.ids, a.keys, a.missing_ok, a.of_source)
    elif a.op == "tag":
        m = ops.tag(a.source_dir, a.out, a.ids, a.keys, _names(a.add), _names(a.remove), a.missing_ok)
    elif a.op == "publish":
        target = ops.publish(a.version_dir, a.root)
        print(f"published {target} as {a.root / 'current'}")
        return
    else:
        rows = ops.list_versions(a.root)
        if a.json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            mark = "*" if r["current"] else " "
            print(
                f"{mark} {r['name']:<24} {r['memory_version']}  parent {r['parent_version'] or '-':<12}  "
                f"{r['items']:>9} items  {r['memory_mb']:>8} MB  {r['created']}  {r['sources']}"
            )
        return
    print(f"wrote {a.out}: memory version {m.memory_version} (parent {m.parent_version}), {m.memory.size} items")


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mem = sub.add_parser("memory", help="memory versions: add, remove, tag, publish, list")
    ops = mem.add_subparsers(dest="op", required=True)
    ad = ops.add_parser("add", help="a new version with the items of a list file added (new ids)")
    ad.add_argument(
        "--from",
        dest="source_dir",
        type=Path,
        required=True,
        help="the version to add to (a sharded one grows shard by shard)",
    )
    ad.add_argument(
        "--list",
        type=Path,
        required=True,
        help="JSON Lines (.jsonl: image, label or text, key, tags), or 'relative/path.png label[<TAB>text]' lines",
    )
    ad.add_argument(
        "--images",
        "--root",
        dest="images",
        type=Path,
        help="the folder the list's image paths are relative to (default: the list's)",
    )
    ad.add_argument("--out", type=Path, required=True, help="the new version directory")
    ad.add_argument("--source", dest="item_source", default="external", help="the items' source")
    ad.add_argument("--retrain-index", action="store_true", help="re-cluster the IVF lists over every key")
    ad.add_argument("--lists", type=int, default=0, help="with --retrain-index: IVF lists (default: as many as now)")
    ad.add_argument(
        "--ray",
        action="store_true",
        help="embed on the Ray cluster RAY_ADDRESS names (Ray Data; images and --from at the same path on every node)",
    )

    def naming(p: argparse.ArgumentParser, what: str, source: bool = False) -> None:
        named = p.add_mutually_exclusive_group(required=True)
        named.add_argument("--ids", type=Path, help=f"item ids to {what}, whitespace-separated")
        named.add_argument("--keys", type=Path, help=f"item keys to {what}, one a line")
        if source:
            named.add_argument("--source", dest="of_source", help=f"{what} every item of this source")
        p.add_argument("--missing-ok", action="store_true", help="skip ids or keys the version does not hold")
        p.add_argument("--from", dest="source_dir", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)

    naming(
        ops.add_parser("remove", help="a new version without the named items (by id, key or source)"), "remove", True
    )
    tg = ops.add_parser("tag", help="a new version whose named items carry other tags")
    naming(tg, "tag")
    tg.add_argument("--add", help="tags to add, comma-separated")
    tg.add_argument("--remove", help="tags to take off, comma-separated")
    pb = ops.add_parser("publish", help="check a version and switch ROOT/current to it atomically")
    pb.add_argument("version_dir", type=Path)
    pb.add_argument("--root", type=Path, required=True, help="the serving root")
    ls = ops.add_parser("list", help="a root's versions, sizes, and which is current")
    ls.add_argument("--root", type=Path, required=True, help="the serving root")
    ls.add_argument("--json", action="store_true")
    mem.set_defaults(func=cmd_memory)
    _scale_args(ops)
