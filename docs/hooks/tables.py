"""The docs' tables of measured figures: which results files each reads and how its rows are made (accuracy.py,
speed.py, cluster.py, ...), and which command wrote each file. A new measurement is a new entry here and a
`<!-- figure: name -->` marker in a page."""

from __future__ import annotations

import ab
import accuracy as a
import cluster as c
import finetune as ft
import speed as s
import store as m
from figures import Table

COMMANDS = {
    "bench.json": "rac bench --artifacts artifacts/demo --json results/bench.json",
    "build.json": "make results/build.json",  # rac build's manifest: its index and evaluation
    "choices.json": "rac choices --artifacts artifacts/demo --json results/choices.json",
    **{
        f"choices_train_{a}_scale{s}.json": f"rac train --artifacts artifacts/demo --seeds 0 --attention {a} "
        f"--temperature-scale {s} --json results/choices_train_{a}_scale{s}.json"
        for a, s in (("similarity", 10), ("similarity", 1), ("both", 10))
    },
    "evaluation.json": "rac evaluate --artifacts artifacts/demo --json results/evaluation.json",
    "recipe_split0.json": "rac evaluate --artifacts artifacts/demo --only table --heads '1 layer|similarity \\+ Q/K' "
    "--json results/recipe_split0.json",
    "recipe8_split0.json": "rac evaluate --artifacts artifacts/demo --only table --heads '8 layers\\), balanced' "
    "--json results/recipe8_split0.json",
    "recipe_split1.json": "rac evaluate --artifacts artifacts/demo --only table --data-seed 1 --ratio 100 "
    "--heads '^(Linear|MLP|Mean kNN|MAM|MAM \\(paper, 1 layer\\).*|MAM, similarity.*)$' "
    "--json results/recipe_split1.json",
    "recipe8_split1.json": "rac evaluate --artifacts artifacts/demo --only table --data-seed 1 --ratio 100 "
    "--heads '^MAM \\(paper, 8 layers\\)' --json results/recipe8_split1.json",
    "zero_shot.json": "rac evaluate --zero-shot --artifacts artifacts/demo --json results/zero_shot.json",
    **{
        f"finetune_choices/b{b}_lr{lr}_flip.json": "rac train --artifacts artifacts/demo --finetune --seeds 0 "
        f"--ft-blocks {b} --ft-lr {lr} --ft-head trained --json results/finetune_choices/b{b}_lr{lr}_flip.json"
        for b, lr in ((2, "3e-4"), (2, "1e-3"), (1, "1e-3"), (1, "3e-4"))
    },
    **{
        f"finetune_choices/b{b}_lr3e-4_flip_seeds3.json": "rac train --artifacts artifacts/demo --finetune "
        f"--seeds 0,1,2 --ft-blocks {b} --ft-lr 3e-4 --ft-head trained "
        f"--json results/finetune_choices/b{b}_lr3e-4_flip_seeds3.json"
        for b in (1, 2)
    },
    **{
        f"finetune_choices/b2_lr3e-4_flip_headfrozen{tail}.json": "rac train --artifacts artifacts/demo --finetune "
        f"--seeds {seeds} --ft-blocks 2 --ft-lr 3e-4 --ft-head frozen "
        f"--json results/finetune_choices/b2_lr3e-4_flip_headfrozen{tail}.json"
        for tail, seeds in (("", "0"), ("_seeds12", "1,2"))
    },
    "finetune_split0.json": "rac evaluate --artifacts artifacts/demo --only table --finetune "
    "--json results/finetune_split0.json",
    "finetune_split1.json": "rac evaluate --artifacts artifacts/demo --only table --finetune --data-seed 1 "
    "--ratio 100 --json results/finetune_split1.json",
    "finetune_cost.json": "make finetune-cost (rac bench --artifacts artifacts/demo --frozen artifacts/frozen "
    "--json results/finetune_cost.json)",
    "finetune_cost_head_trained.json": "rac bench --artifacts artifacts/fth --frozen artifacts/frozen "
    "--json results/finetune_cost_head_trained.json (artifacts/fth: rac build --finetune --ft-head trained "
    "--out artifacts/fth)",
    "memory_scale.json": "rac bench --memory --sizes 100000,1000000,10000000 --json results/memory_scale.json",
    "memory_curve.json": "python -m loadtests.memory_curve --artifacts artifacts/demo --json results/memory_curve.json",
    "memory_accuracy.json": "python -m loadtests.memory_accuracy --artifacts artifacts/demo "
    "--json results/memory_accuracy.json",
    "ray_bench.json": "python -m loadtests.ray_bench --artifacts artifacts/demo --shards-dir /tmp/rac-ray-bench/shards "
    "--json results/ray_bench.json",
    "ray_build.json": "python -m loadtests.ray_add --artifacts artifacts/demo --images 16000 "
    "--json results/ray_build.json",
    "ray_transport_ab.json": "python -m loadtests.ray_bench --shards-dir /tmp/rac-ray-bench/shards "
    "--checkout actor_calls=DIR --checkout connections=. --repeat 3 --json results/ray_transport_ab.json",
    "ray_calls.json": "python -m loadtests.ray_calls --shards-dir /tmp/rac-ray-bench/shards "
    "--json results/ray_calls.json",
    "profile.json": "python -m loadtests.profile --artifacts artifacts/demo --json results/profile.json",
    "grpc_http2_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --grpc-processes 0 "
    "--checkout grpc_aio=DIR --checkout http2=. --concurrency 16 --seconds 8 --repeat 3 "
    "--json results/grpc_http2_ab.json",
    "spread_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify --grpc-processes 0 "
    "--checkout hashed=DIR --checkout spread=. --concurrency 16 --seconds 6 --repeat 3 --json results/spread_ab.json",
    "protocols_drivers.json": "python -m loadtests.protocols --artifacts artifacts/demo --grpc-processes 0,1,4 "
    "--repeat 3 --json results/protocols_drivers.json",
    "classify_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify --grpc-processes '' "
    "--checkout before=DIR --checkout after=. --repeat 3 --json results/classify_ab.json",
    "request_path_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --hits --grpc-processes '' "
    "--checkout before=DIR --checkout after=. --concurrency 16 --seconds 6 --repeat 4 "
    "--json results/request_path_ab.json",
    "request_path_c64_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes '' --checkout before=DIR --checkout after=. --concurrency 64 --seconds 6 --repeat 3 "
    "--json results/request_path_c64_ab.json",
    "request_path_cuts_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes '' --checkout before=DIR --checkout after=. --concurrency 64 --seconds 6 --repeat 3 "
    "--json results/request_path_cuts_ab.json",
    "request_path_kept_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes '' --checkout before=DIR --checkout after=. --concurrency 64 --seconds 6 --repeat 3 "
    "--json results/request_path_kept_ab.json",
    "request_path_lean_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes '' --checkout before=DIR --checkout after=. --concurrency 64 --seconds 6 --repeat 5 "
    "--json results/request_path_lean_ab.json",
    "protocols_counted_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --grpc-processes 0 "
    "--checkout before=DIR --checkout after=. --concurrency 16 --seconds 8 --repeat 3 "
    "--json results/protocols_counted_ab.json",
    "v2_rest_classify.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes '' --concurrency 16 --seconds 10 --repeat 5 --json results/v2_rest_classify.json",
    "protocols_rounds.json": "python -m loadtests.protocols --artifacts artifacts/demo --grpc-processes 0 "
    "--concurrency 16 --seconds 10 --repeat 7 --json results/protocols_rounds.json",
    "protocols_lean_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --grpc-processes 0 "
    "--checkout before=DIR --checkout after=. --concurrency 16 --seconds 8 --repeat 3 "
    "--json results/protocols_lean_ab.json",
    "opcodes_ab.json": "python -m loadtests.opcodes --artifacts artifacts/demo --checkout before=DIR "
    "--checkout after=DIR --json results/opcodes_ab.json",
    **{
        f"opcodes_{name}_ab.json": f"python -m loadtests.opcodes --artifacts artifacts/demo --protocol {protocol} "
        f"--checkout before=DIR --checkout after=. --json results/opcodes_{name}_ab.json"
        for name, protocol in (("classify", "classify"), ("v2_http", "v2-http"), ("v2_grpc", "v2-grpc"))
    },
    "request_path_counted_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes 0 --checkout before=DIR --checkout after=. --concurrency 64 --seconds 6 --repeat 3 "
    "--json results/request_path_counted_ab.json",
    "v2_rest_plain_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify "
    "--grpc-processes 0 --checkout before=DIR --checkout after=. --concurrency 16 --seconds 6 --repeat 3 "
    "--json results/v2_rest_plain_ab.json",
    "gc_young_ab.json": "python -m loadtests.protocols --artifacts artifacts/demo --classify --grpc-processes '' "
    "--concurrency 64 --seconds 8 --warm 60 --repeat 3 --checkout young700=.,RAC_GC_YOUNG_OBJECTS=700 "
    "--checkout young50k=. --json results/gc_young_ab.json",
    "load/summary.json": "make load",
    "filters.json": "python -m loadtests.filters --artifacts artifacts/demo --scale .cache/scale/1m "
    "--json results/filters.json",
    "memories.json": "python -m loadtests.memories --artifacts artifacts/demo --json results/memories.json",
}

TABLES: dict[str, Table] = {
    "bench_ceiling": Table(("bench.json",), s.bench_ceiling, "Batches of 32 distinct images, no HTTP."),
    "bench_encoder": Table(("bench.json",), s.bench_encoder, "The raw encoder in onnxruntime, 2 threads."),
    "bench_http": Table(("bench.json",), s.bench_http, "Distinct images (cache misses) unless marked."),
    "bench_overload": Table(("bench.json",), s.bench_overload),
    "bench_protocols": Table(("bench.json",), s.bench_protocols, "The run of the HTTP table, one image a request."),
    "bench_targets": Table(("bench.json",), s.bench_targets),
    "table1": Table(("evaluation.json",), a.eval_table1, "Test top-1 %, mean ± std over seeds."),
    "attention": Table(("evaluation.json",), a.eval_attention, "Attention mass vs share, %, test."),
    "k_sweep": Table(("evaluation.json",), a.eval_k, "Test top-1 %, all classes / few-shot."),
    "memory_ablation": Table(("evaluation.json",), a.eval_memory, "Test top-1 %, a head trained per memory."),
    "recipes_split0": Table(("recipe_split0.json", "recipe8_split0.json"), a.recipes, "Test top-1 %, 3 seeds."),
    "recipes_split1": Table(("recipe_split1.json", "recipe8_split1.json"), a.recipes, "Test top-1 %, 3 seeds."),
    "zero_shot": Table(("zero_shot.json",), a.zero_shot, "Zero-shot test top-1 %, mean ± std over seeds."),
    "zero_shot_k": Table(("zero_shot.json",), a.zero_shot_k, "RECO on both sides, top-1 %."),
    "finetune_choices": Table(
        tuple(
            f"finetune_choices/{n}.json"
            for n in (
                "b2_lr3e-4_flip_headfrozen",
                "b2_lr3e-4_flip",
                "b2_lr1e-3_flip",
                "b1_lr1e-3_flip",
                "b1_lr3e-4_flip",
            )
        ),
        ft.choices,
        "Validation top-1 %, seed 0; MAM head, lr 1e-3.",
    ),
    "finetune_split0": Table(
        ("finetune_split0.json",), ft.split, "Test top-1 %, mean ± std over 3 seeds; val all: validation, the mean."
    ),
    "finetune_split1": Table(
        ("finetune_split1.json",), ft.split, "Test top-1 %, mean ± std over 3 seeds; val all: validation, the mean."
    ),
    "finetune_cost": Table(("finetune_cost.json", "finetune_cost_head_trained.json"), ft.cost, "One run each."),
    "nprobe": Table(("build.json",), a.nprobe, "The demo build's sweep, validation queries."),
    "scale": Table(("memory_scale.json",), s.scale),
    "scale_search": Table(("memory_scale.json",), s.scale_search),
    "scale_target": Table(("memory_scale.json",), s.scale_target),
    "memory_curve": Table(("memory_curve.json",), a.memory_curve, "Test top-1 % through HTTP, one head throughout."),
    "memory_accuracy": Table(("memory_accuracy.json",), a.memory_accuracy),
    "ray": Table(("ray_bench.json",), c.ray, "Distinct images (cache misses), over HTTP on loopback."),
    "ray_ab": Table(("ray_transport_ab.json",), c.ray_ab, "HAProxy, throughput optimized; new images (cache misses)."),
    "ray_build": Table(("ray_build.json",), c.ray_build, "Decode, embed, text and thumbnail, per image."),
    "profile": Table(("profile.json",), ab.profile),
    "grpc_http2_ab": Table(("grpc_http2_ab.json",), ab.protocols, "16 connections, new images (cache misses)."),
    "spread_ab": Table(("spread_ab.json",), ab.spread_ab, "New images (cache misses)."),
    "protocol_drivers": Table(("protocols_drivers.json",), ab.protocol_drivers, "16 connections."),
    "classify_ab": Table(("classify_ab.json",), ab.classify_ab),
    "request_path_ab": Table(("request_path_ab.json",), ab.request_path_ab),
    "request_path_c64_ab": Table(("request_path_c64_ab.json",), ab.request_path_c64_ab),
    "request_path_cuts_ab": Table(("request_path_cuts_ab.json",), ab.request_path_c64_ab),
    "request_path_kept_ab": Table(("request_path_kept_ab.json",), ab.request_path_c64_ab),
    "request_path_lean_ab": Table(("request_path_lean_ab.json",), ab.request_path_c64_ab),
    "opcodes_ab": Table(("opcodes_ab.json",), ab.opcodes_ab, "/classify at 8 connections, new images, one process."),
    "opcodes_protocols_ab": Table(
        ("opcodes_classify_ab.json", "opcodes_v2_http_ab.json", "opcodes_v2_grpc_ab.json"),
        ab.opcodes_protocols_ab,
        "8 connections, new images, one process.",
    ),
    "request_path_counted_ab": Table(("request_path_counted_ab.json",), ab.outside_ab, "64 connections, new images."),
    "v2_rest_plain_ab": Table(("v2_rest_plain_ab.json",), ab.v2_rest_plain_ab),
    "gc_young_ab": Table(("gc_young_ab.json",), ab.gc_young_ab, "64 connections, new images, after 60 s of them."),
    "load": Table(("load/summary.json",), s.load),
    "filters": Table(("filters.json",), m.filters, "/classify at 16 connections, new images (cache misses)."),
    "filters_accuracy": Table(("filters.json",), m.filters_accuracy, "Test top-1 % through HTTP, balanced test set."),
    "memories": Table(("memories.json",), m.memories, "All the server's processes, after start-up and pre-fault."),
}
