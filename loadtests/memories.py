"""What several named memories cost in memory: one server (two processes) serving one memory, then three.

    python -m loadtests.memories --artifacts artifacts/demo --json results/memories.json

The three memories are the demo's and two versions derived from it (its downstream items only, its external
items only), each published to a serving root of its own. For each server: every process's RSS and PSS, and
PSS split into anonymous and file-backed memory (/proc/PID/smaps_rollup), beside the memory files' sizes. The
index, keys and values are memory-mapped, so the page cache holds each memory's files once, whatever the
number of processes: PSS (which shares each page among the processes that map it) should grow by about the
files' sizes, not by that times the processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import psutil

from loadtests.protocols import server_tree
from loadtests.server import serving
from models.memory import ops
from service.artifacts import IDS, INDEX, ITEMS, KEYS, VALUES, read_manifest

MB = 1 << 20


def smaps(pid: int) -> dict[str, float]:
    """RSS, PSS, and PSS anonymous / file-backed of one process, in MB."""
    fields = {"Rss": "rss_mb", "Pss": "pss_mb", "Pss_Anon": "pss_anon_mb", "Pss_File": "pss_file_mb"}
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            out[fields[name]] = round(int(rest.split()[0]) / 1024, 1)  # kB
    return out


def memory_mb(directory: Path) -> float:
    return round(
        sum((directory / f).stat().st_size for f in (INDEX, KEYS, VALUES, ITEMS, IDS) if (directory / f).exists()) / MB,
        1,
    )


def derived(src: Path, work: Path, source: str) -> Path:
    """A serving root whose version holds src's items of one source only."""
    with sqlite3.connect(f"file:{src / ITEMS}?mode=ro", uri=True) as db:
        gone = [str(i) for (i,) in db.execute("SELECT id FROM items WHERE source != ?", (source,))]
    db.close()
    (work / f"{source}.ids").write_text("\n".join(gone))
    ops.remove(src, work / f"{source}-v1", work / f"{source}.ids")
    ops.publish(work / f"{source}-v1", work / source)
    return work / source


def measure(roots: dict[str, Path]) -> dict[str, Any]:
    env = {"RAC_MEMORIES": ",".join(f"{n}={r}" for n, r in roots.items()), "RAC_WORKERS": "2"}
    with serving(next(iter(roots.values())), **env) as url:
        # The server processes uvicorn spawned (not its supervisor, nor multiprocessing's resource tracker).
        procs = [smaps(p.pid) for p in server_tree(url) if "spawn_main" in " ".join(p.cmdline())]
    total = {k: round(sum(p[k] for p in procs), 1) for k in procs[0]}
    files = {name: memory_mb((root / "current").resolve()) for name, root in roots.items()}
    return {"memories": files, "memory_files_mb": round(sum(files.values()), 1), "processes": procs, "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--json", type=Path, default=Path("results/memories.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rac-memories-") as tmp:
        work = Path(tmp)
        ops.publish(a.artifacts, work / "demo")
        roots = {"demo": work / "demo"}
        one = measure(roots)
        roots |= {
            "downstream": derived(a.artifacts, work, "downstream"),
            "external": derived(a.artifacts, work, "external"),
        }
        three = measure(roots)
    result = {
        "command": f"python -m loadtests.memories --artifacts {a.artifacts} --json {a.json}",
        "host": {
            "cpus": psutil.cpu_count(),
            "machine": platform.machine(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "items": read_manifest(a.artifacts).memory.size,
        "one": one,
        "three": three,
        "pss_growth_mb": round(three["total"]["pss_mb"] - one["total"]["pss_mb"], 1),
        "files_growth_mb": round(three["memory_files_mb"] - one["memory_files_mb"], 1),
    }
    print(json.dumps(result, indent=1))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
