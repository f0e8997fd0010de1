"""What a fine-tuned build's encoder costs against the frozen-only one, measured in one run on one machine.

    rac bench --artifacts artifacts/demo --frozen artifacts/frozen        # = make finetune-cost
    python -m loadtests.encoder_cost --frozen artifacts/frozen --tuned artifacts/demo --json results/finetune_cost.json

1. the encoder alone in onnxruntime (both outputs, as the service runs it), batch 1, 8 and 32, on one thread as
   each server process's encoder runs (one process a core), not spinning
2. the in-process pipeline of one process: decode + encode + search + head over distinct images, batches of 32

The two builds take turns call by call, and each figure is the median time of its calls: on a shared machine
the load moves from one second to the next, and alternating every call spreads it over both builds alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.images import pngs
from service.artifacts import ENCODER, read_manifest
from service.core.encode import Encoder
from service.core.pipeline import Job, Pipeline
from service.metrics import Metrics
from service.settings import Settings

Call = Callable[[int], object]  # one timed call; its argument numbers the call (which images to take)


def alternate(calls: dict[str, Call], seconds: float) -> dict[str, float]:
    """Median seconds a call of each, calling them in turn for about `seconds` (after one warm-up each)."""
    for call in calls.values():
        call(0)
    times: dict[str, list[float]] = {name: [] for name in calls}
    start, i = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or i < 5:
        i += 1
        for name, call in calls.items():
            t = time.perf_counter()
            call(i)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main(frozen: Path, tuned: Path, out: Path, seconds: float) -> dict[str, Any]:
    builds = {"frozen": frozen, "tuned": tuned}
    manifests = {name: read_manifest(path) for name, path in builds.items()}
    query = manifests["tuned"].encoder.query
    if query is None:
        raise SystemExit(f"{tuned} is not a fine-tuned build (its manifest has no encoder.query)")
    size = int(manifests["frozen"].encoder.input["size"])
    seconds_per_image: dict[str, dict[str, float]] = {name: {} for name in builds}
    encoders = {name: Encoder(path / ENCODER, "cpu", intra_threads=1, spin=False) for name, path in builds.items()}
    for b in (1, 8, 32):
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)

        def encode(e: Encoder, x: np.ndarray = x) -> Call:
            return lambda _: e.both(x)

        medians = alternate({name: encode(e) for name, e in encoders.items()}, seconds)
        for name, t in medians.items():
            seconds_per_image[name][f"encoder_b{b}"] = t / b
    images = list(itertools.islice(pngs(), 32 * 400))
    settings = {
        name: Settings(artifacts=path, workers=1, encoder_threads=1, encoder_spin=False)
        for name, path in builds.items()
    }
    pipelines = {name: Pipeline(s, Metrics()) for name, s in settings.items()}
    for p in pipelines.values():
        p.warmup()

    def batch(p: Pipeline) -> Call:
        def run(i: int) -> object:  # distinct images each call (no cache hits), 32 at a time
            chunk = images[32 * (i % 400) : 32 * (i % 400 + 1)]
            version = p.version
            return p.run_batch([Job(data, None, version) for data in chunk])

        return run

    medians = alternate({name: batch(p) for name, p in pipelines.items()}, 2 * seconds)
    for name, t in medians.items():
        seconds_per_image[name]["pipeline_b32"] = t / 32
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "builds": {name: str(path) for name, path in builds.items()},
        "finetune": query.finetune,
        "img_per_s": {name: {k: 1 / v for k, v in f.items()} for name, f in seconds_per_image.items()},
        # What the fine-tuned build costs an image against the frozen one (time ratio: > 1 is dearer).
        "cost_ratio": {
            k: seconds_per_image["tuned"][k] / seconds_per_image["frozen"][k] for k in seconds_per_image["frozen"]
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frozen", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--tuned", type=Path, required=True)
    p.add_argument("--json", type=Path, default=Path("results/finetune_cost.json"))
    p.add_argument("--seconds", type=float, default=10.0, help="per batch size: both builds, call by call")
    a = p.parse_args()
    main(a.frozen, a.tuned, a.json, a.seconds)
