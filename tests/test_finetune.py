"""A fine-tuned build (models/finetune.py): the head reads the encoder's second output `query`, the search its
first, `embedding`, which stays the frozen encoder's. Synthetic artifacts for the service's side; a quick build
with a tiny fine-tune for the export and the whole path over real HTTP."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as th

from loadtests.server import free_port, serving
from models.build.artifact import config_from_manifest, prepare
from models.finetune import FinetuneConfig, export_served, make_tuning
from models.memory import ops
from service.artifacts import ENCODER, HEAD, ITEMS, KEYS, VALUES, read_manifest
from service.core.cache import Entry
from service.core.decode import InputSpec, decode, preprocess
from service.core.encode import Encoder
from tests.helpers import ROOT, classify, client, rows, wait_until
from tests.synthetic import make_artifacts, png


@pytest.fixture(scope="module")
def tuned_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tuned-synthetic")
    make_artifacts(out, query=True)
    return out


def reference(artifacts: Path, data: bytes, head_reads: str) -> tuple[np.ndarray, set[int]]:
    """decode -> ONNX (both outputs) -> exact search by the key -> scripted head on `head_reads`, by hand:
    probabilities sorted high to low, and the neighbour ids."""
    manifest = read_manifest(artifacts)
    x = decode(data, InputSpec.from_dict(manifest.encoder.input), 10**6)
    key, query = Encoder(artifacts / ENCODER, "cpu").both(x[None])  # (1, d) each
    keys, values = np.load(artifacts / KEYS).astype(np.float32), np.load(artifacts / VALUES).astype(np.float32)
    scores = key @ keys.T
    ids = np.argsort(-scores[0])[: manifest.index.k]
    head = torch.jit.load(str(artifacts / HEAD))
    z = query if head_reads == "query" else key
    with torch.no_grad():
        inputs = (z, scores[:, ids], keys[ids][None], values[ids][None])
        logits, _ = head(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
    return np.sort(torch.softmax(logits, -1)[0].numpy())[::-1], set(ids.tolist())


def test_the_head_reads_the_query_and_the_search_the_key(tuned_synthetic: Path) -> None:
    data = png(3)
    want, ids = reference(tuned_synthetic, data, "query")
    other, _ = reference(tuned_synthetic, data, "key")
    assert np.abs(want - other).max() > 1e-3  # which vector the head reads shows in the answer
    with client(tuned_synthetic) as c:
        got = classify(c, data, top_k=3, neighbors=10)
    assert np.allclose([p["probability"] for p in got["predictions"]], want, atol=1e-5)
    assert {n["id"] for n in got["neighbors"]} == ids


def test_a_cached_answer_equals_an_uncached_one(tuned_synthetic: Path) -> None:
    data = [png(20 + i) for i in range(6)]
    with client(tuned_synthetic, max_batch=1, max_wait_ms=0) as solo:
        alone = [classify(solo, d, top_k=3, neighbors=5) for d in data]
    with client(tuned_synthetic, max_wait_ms=20) as c:
        first = [classify(c, d, top_k=3, neighbors=5) for d in data]
        second = [classify(c, d, top_k=3, neighbors=5) for d in data]
        pipeline = c.app.state.pipeline  # type: ignore[attr-defined]
        version = pipeline.version
        entry = Entry(np.ones(16, np.float32), np.zeros(10, np.int64), np.zeros(10, np.float32))
        assert not pipeline.fits(entry, version)  # an entry without the query vector (a frozen build's) is not used
        assert pipeline.fits(Entry(entry.z, entry.ids, entry.sims, np.ones(16, np.float32)), version)
    assert [a["cached"] for a in first + second] == [False] * 6 + [True] * 6
    for a, b, s in zip(alone, first, second, strict=True):
        assert a["predictions"] == b["predictions"] == s["predictions"]
        assert a["neighbors"] == b["neighbors"] == s["neighbors"]


def test_cache_entries_carry_the_query_vector() -> None:
    rng = np.random.default_rng(0)
    z, q, sims = (rng.standard_normal(n).astype(np.float32) for n in (16, 8, 10))
    ids = np.arange(10, dtype=np.int64)
    back = Entry.unpack(Entry(z, ids, sims, q).pack())
    assert back.query is not None and np.array_equal(back.query, q) and np.array_equal(back.z, z)
    assert Entry.unpack(Entry(z, ids, sims).pack()).query is None
    old = struct.pack("<BHH", 1, 16, 10) + z.tobytes() + ids.astype("<i4").tobytes() + sims.tobytes()
    with pytest.raises(ValueError, match="another format"):  # the format before the query vector
        Entry.unpack(old)


def test_info_names_the_encoder_of_the_key_and_of_the_query(tuned_synthetic: Path, synthetic_artifacts: Path) -> None:
    with client(tuned_synthetic) as c:
        info = c.get("/info").json()["encoder"]
    assert "frozen (output `embedding`" in info["search_key"]
    assert "fine-tuned" in info["query_vector"] and "output `query`" in info["query_vector"]
    assert info["query"]["dim"] == 16
    with client(synthetic_artifacts) as c:
        assert c.get("/info").json()["encoder"]["query_vector"] == "the search key"


def test_rac_bench_frozen_times_both_builds(tuned_synthetic: Path, synthetic_artifacts: Path, tmp_path: Path) -> None:
    """`rac bench --frozen`: the fine-tuned build's encoder and pipeline against the frozen one's, written as
    ratios; a frozen build given as the fine-tuned one is refused, naming it."""
    out = tmp_path / "cost.json"
    cmd = [sys.executable, "-m", "rac.cli", "bench", "--artifacts", str(tuned_synthetic), "--seconds", "0.2"]
    subprocess.run([*cmd, "--frozen", str(synthetic_artifacts), "--json", str(out)], check=True, cwd=ROOT)
    cost = json.loads(out.read_text())
    assert cost["finetune"] == read_manifest(tuned_synthetic).encoder.query.finetune  # type: ignore[union-attr]
    assert set(cost["cost_ratio"]) == {"encoder_b1", "encoder_b8", "encoder_b32", "pipeline_b32"}
    for name in ("frozen", "tuned"):
        assert all(0 < v < float("inf") for v in cost["img_per_s"][name].values())
    for k, ratio in cost["cost_ratio"].items():
        assert ratio == pytest.approx(cost["img_per_s"]["frozen"][k] / cost["img_per_s"]["tuned"][k])
    refused = subprocess.run(
        [*cmd[:5], str(synthetic_artifacts), "--frozen", str(synthetic_artifacts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "is not a fine-tuned build" in refused.stderr


def test_a_memory_version_is_swapped_in_under_a_fine_tuned_model(tuned_synthetic: Path, tmp_path: Path) -> None:
    """`rac memory remove` and publish: the memory depends on the frozen key only, the model keeps serving."""
    root = tmp_path / "root"
    ops.publish(tuned_synthetic, root)
    (tmp_path / "ids.txt").write_text("\n".join(str(r[0]) for r in rows(tuned_synthetic / ITEMS)[:50]))
    ops.remove(tuned_synthetic, root / "v2", ids_file=tmp_path / "ids.txt")
    v2 = read_manifest(root / "v2").memory_version
    with client(root / "v2") as alone:
        want = classify(alone, png(5), top_k=3, neighbors=5)
    with client(root, memory_poll_s=0.05, max_wait_ms=20) as c:
        ops.publish(root / "v2", root)
        wait_until(lambda: classify(c, png(99))["memory_version"] == v2, 10, "the swap")
        got = classify(c, png(5), top_k=3, neighbors=5)
    assert got["predictions"] == want["predictions"] and got["neighbors"] == want["neighbors"]


# ---------------------------------------------------------------- a quick build with a tiny fine-tune


@pytest.fixture(scope="module")
def tuned_quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`rac build --quick --finetune` with one block trained and no augmented views: seconds of training."""
    out = tmp_path_factory.mktemp("tuned-quick") / "artifacts"
    cache = tmp_path_factory.mktemp("tuned-quick-cache")
    cmd = [sys.executable, "-m", "rac.cli", "build", "--quick", "--out", str(out), "--cache", str(cache)]
    cmd += ["--finetune", "--ft-blocks", "1", "--ft-augment", "none"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_the_served_encoder_equals_torch_for_key_and_query(tuned_quick: Path, tmp_path: Path, head: str) -> None:
    """onnxruntime against torch, 1e-4: the graph's key against the frozen encoder rebuilt in torch (and the
    key the memory was built with), its query against the fine-tuned tail run alone, at batch sizes it was not
    traced at. With the head frozen the graph runs one head for both tails; the reference runs each tail whole."""
    manifest = read_manifest(tuned_quick)
    cfg = config_from_manifest(manifest, tuned_quick, tmp_path / "cache")
    prep = prepare(cfg, tuned_quick / ENCODER, exported=manifest.encoder)
    tuning = make_tuning(prep, cfg.encoder, FinetuneConfig(blocks=2, augment="none", head=head), tmp_path / "cache")
    tuned = tuning.trainable()
    with torch.no_grad():  # a tail unlike the frozen one, as training makes it
        for p in tuned.tail.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "encoder.onnx"
    export_served(tuning, tuned.tail, prep, path)
    pool, test = prep.dataset.pools[prep.splits.test.pool], prep.splits.test.index
    encoder = Encoder(path, "cpu")
    for n in (1, 5):
        pixels = np.stack([preprocess(pool.image(int(i)), prep.spec) for i in test[:n]])
        key, query = encoder.both(pixels)
        with torch.no_grad():
            trunk = tuning.trunk(torch.from_numpy(pixels))
            want_key, want_query = tuning.key(trunk).numpy(), tuned.tail(trunk).numpy()
        assert np.abs(key - want_key).max() < 1e-4 and np.abs(query - want_query).max() < 1e-4
        assert np.abs(key - prep.emb[prep.splits.test.pool][test[:n]]).max() < 1e-4  # the memory's encoder
        assert np.abs(query - key).max() > 1e-2  # two outputs, not one twice
    if head == "frozen":  # a head that was trained cannot be shared
        tuned.tail.state_dict()["conv_head.weight"].add_(0.01)  # the parameter's own storage
        with pytest.raises(ValueError, match="differs from the frozen"):
            tuning.served(tuned.tail)


@pytest.mark.slow
def test_served_answers_equal_the_offline_ones_over_http(tuned_quick: Path, tmp_path: Path) -> None:
    """Every test image over HTTP: the build's test accuracy; the examples' probabilities by /classify and by
    the Open Inference Protocol over REST and gRPC (the unmodified tritonclient)."""
    manifest = read_manifest(tuned_quick)
    assert manifest.encoder.query is not None and manifest.encoder.query.finetune["blocks"] == 1
    cfg = config_from_manifest(manifest, tuned_quick, tmp_path / "cache")
    prep = prepare(cfg, tuned_quick / ENCODER, exported=manifest.encoder)
    pool, test = prep.dataset.pools[prep.splits.test.pool], prep.splits.test.index
    labels = pool.labels[test]
    examples = [(tuned_quick / str(ex["file"])).read_bytes() for ex in manifest.examples]
    want = np.array([ex["probabilities"] for ex in manifest.examples], np.float32)  # (n, C), the build's own
    grpc_port = free_port()
    with serving(tuned_quick, RAC_GRPC_PORT=str(grpc_port)) as url:
        for protocol, address in ((th, url.removeprefix("http://")), (tg, f"127.0.0.1:{grpc_port}")):
            v2 = protocol.InferenceServerClient(address)
            tensor = protocol.InferInput("IMAGE", [len(examples)], "BYTES")
            tensor.set_data_from_numpy(np.array(examples, dtype=object))
            got = v2.infer("rac", [tensor]).as_numpy("PROBABILITIES")
            assert got is not None and np.abs(got - want).max() < 1e-4, protocol.__name__

        def top(data: bytes, k: int = 1) -> list[dict]:
            r = httpx.post(f"{url}/classify", files={"image": ("x.png", data, "image/png")}, params={"top_k": k})
            assert r.status_code == 200, r.text
            return r.json()["predictions"]

        for ex in manifest.examples:
            got = {p["label"]: p["probability"] for p in top((tuned_quick / str(ex["file"])).read_bytes(), 10)}
            assert max(abs(got[c] - p) for c, p in zip(manifest.classes, ex["probabilities"], strict=True)) < 1e-4
        correct = 0
        for i, label in zip(test, labels, strict=True):
            buf = io.BytesIO()
            pool.image(int(i)).save(buf, "PNG")
            correct += int(top(buf.getvalue())[0]["index"] == label)
    assert 100 * correct / len(test) == pytest.approx(manifest.evaluation["test"]["accuracy"]["all"], abs=1e-9)


@pytest.mark.slow
def test_the_table_gains_rows_with_a_fine_tuned_encoder(tuned_quick: Path, tmp_path: Path) -> None:
    """`rac evaluate --finetune`: the fine-tuned rows beside the frozen ones, their heads at the frozen rows' lr."""
    out = tmp_path / "finetune.json"
    cmd = [sys.executable, "-m", "rac.cli", "evaluate", "--artifacts", str(tuned_quick), "--cache", str(tmp_path)]
    cmd += ["--only", "table", "--seeds", "0", "--finetune", "--ft-blocks", "1", "--ft-augment", "none"]
    subprocess.run([*cmd, "--json", str(out)], check=True, cwd=ROOT, env=os.environ | {"TQDM_DISABLE": "1"})
    table = json.loads(out.read_text())["table1"]
    assert list(table) == ["Linear", "MAM", "Linear + FT", "MAM + FT"]
    for name in ("Linear", "MAM"):
        tuned = table[f"{name} + FT"]
        assert tuned["lr"] == table[name]["lr"] and tuned["lr_from"] == name and tuned["finetune"]["blocks"] == 1
        assert 0 < tuned["test"]["accuracy"]["all"]["mean"] <= 100


@pytest.mark.slow
def test_the_index_accuracy_run_reads_the_query_output(tuned_quick: Path, tmp_path: Path) -> None:
    """loadtests.memory_accuracy over a fine-tuned build: with the served index its head reads the query output
    as the service does, so it reproduces the build's own test top-1 (from the key, it would not)."""
    from loadtests import memory_accuracy

    out = memory_accuracy.run(tuned_quick, tmp_path / "cache")
    served = out["variants"][read_manifest(tuned_quick).index.type]["test_top1"]
    assert abs(served - out["build_test_top1"]) < 0.01
