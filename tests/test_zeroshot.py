"""Zero-shot classification (RECO): alignment and fusion training on tiny synthetic sets, the exports against
their torch references, and POST /classify/zero-shot end to end over real HTTP on a quick `--zero-shot` build."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from loadtests.server import exposition, serving
from models.zero_shot.align import AlignConfig, Pairs, project, seen_rows, train_alignment
from models.zero_shot.reco import Fusion, FusionConfig, FusionData, MemoryViews, train_reco
from service.artifacts import ITEMS, MANIFEST, ZS_FILES, ZS_TEXT_ALIGNED, ZS_TEXT_TOWER, ZS_TOKENIZER, read_manifest
from service.core.zero_shot import check_labels, load_tokenizer
from service.errors import RequestError


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny batches: a second thread only spins where the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_pairs(
    seed: int = 0, classes: int = 4, per_class: int = 150, d: int = 16, dt: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images around a centroid per class; texts: 3 templates per class, each a random frozen embedding
    near its class's; 20% of texts name a wrong class (noisy alt-text)."""
    rng = np.random.default_rng(seed)
    centres, words = rng.normal(size=(classes, d)), rng.normal(size=(classes, dt))
    true = np.repeat(np.arange(classes), per_class)
    named = np.where(rng.random(len(true)) < 0.2, rng.integers(0, classes, len(true)), true)
    z = centres[true] + 0.3 * rng.normal(size=(len(true), d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    table = np.repeat(words, 3, axis=0) + 0.2 * rng.normal(size=(3 * classes, dt))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    text = 3 * named + rng.integers(0, 3, len(true))
    return z.astype(np.float32), text.astype(np.int64), table.astype(np.float32), true, named


def test_alignment_learns_on_seen_classes_only() -> None:
    z, text, table, true, named = synthetic_pairs()
    rows = seen_rows(true, named, held_out=(3,))
    assert not np.isin(true[rows], [3]).any() and not np.isin(named[rows], [3]).any()
    assert len(rows) > 0.6 * len(true)
    proj, losses = train_alignment(Pairs(z[rows], text[rows], table), AlignConfig(epochs=30, batch_size=64, lr=1e-2))
    assert losses[-1] < losses[0] - 0.3, losses
    # The projected class texts now find the images of seen classes (chance: 25%).
    protos = project(proj, table[0:12:3])  # the first template of each class
    seen = ~np.isin(true, [3])
    acc = float(((z[seen] @ protos.T).argmax(1) == true[seen]).mean())
    assert acc > 0.5, acc


def test_fusion_starts_as_the_identity_and_its_torchscript_matches_eager() -> None:
    torch.manual_seed(0)
    fusion = Fusion(16, heads=4, ffn=32).eval()
    q = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    n = torch.randn(5, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(fusion(q, n), q)  # zero-initialised output: the query itself
        torch.nn.init.normal_(fusion.out.weight, std=0.3)
        scripted = torch.jit.script(fusion)
        torch.testing.assert_close(scripted(q, n), fusion(q, n), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fusion(q, n), q)


def test_fusion_training_lowers_the_contrastive_loss() -> None:
    z, text, table, _, _ = synthetic_pairs(seed=1)
    proj, _ = train_alignment(Pairs(z, text, table), AlignConfig(epochs=5, batch_size=64))
    aligned = project(proj, table)[text]
    rng = np.random.default_rng(0)
    nb = np.stack([rng.permutation(np.delete(np.arange(len(z)), i))[:5] for i in range(len(z))])
    data = FusionData(z, aligned, text, nb, nb)
    cfg = FusionConfig(heads=2, ffn=32, epochs=6, batch_size=64)
    _, losses = train_reco(data, MemoryViews(z, aligned), cfg, float(proj.scale.detach()))
    assert losses[-1] < losses[0], losses


def test_labels_are_checked() -> None:
    assert check_labels([" cat ", "dog"], "a {}", 5, 10) == ["cat", "dog"]
    for labels, template, status in (
        ([], "a {}", 422),
        (["a", "b", "c"], "a {}", 413),
        (["cat", " "], "a {}", 422),
        (["x" * 11], "a {}", 422),
        (["cat", "cat"], "a {}", 422),
        (["ca\x00t"], "a {}", 422),
        (["cat"], "no slot", 422),
    ):
        with pytest.raises(RequestError) as e:
            check_labels(labels, template, 2, 10)
        assert e.value.status == status


# ---------------------------------------------------------------- a quick --zero-shot build, served


@pytest.fixture(scope="module")
def zs_server(zs_artifacts: Path) -> Iterator[str]:
    with serving(zs_artifacts, RAC_WORKERS="1") as url:
        yield url


def png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def ask(url: str, image: bytes, labels: list[str], **data: str) -> httpx.Response:
    form = [("labels", (None, label.encode())) for label in labels] + [(k, (None, v.encode())) for k, v in data.items()]
    return httpx.post(f"{url}/classify/zero-shot", files=[("image", ("x.png", image, "image/png")), *form], timeout=60)


@pytest.mark.slow
def test_text_tower_onnx_matches_the_torch_text_encoder(zs_artifacts: Path) -> None:
    """`search` against sentence-transformers' all-MiniLM-L6-v2; `embedding` against the aligned texts the
    build computed in torch (text_aligned.npy)."""
    import sqlite3

    from models.encoders import TextEncoder

    with sqlite3.connect(zs_artifacts / ITEMS) as db:
        rows = db.execute("SELECT id, text FROM items ORDER BY id LIMIT 12").fetchall()
    texts = [t for _, t in rows] + ["a photo of a sandal.", "zebra-striped rain boots for toddlers"]
    info = read_manifest(zs_artifacts).zero_shot
    assert info is not None
    enc = load_tokenizer(zs_artifacts / ZS_TOKENIZER, info.max_tokens).encode_batch(texts)
    feeds = {
        "input_ids": np.asarray([e.ids for e in enc], np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
    }
    aligned, search = ort.InferenceSession(str(zs_artifacts / ZS_TEXT_TOWER)).run(None, feeds)
    np.testing.assert_allclose(search, TextEncoder()(texts), atol=2e-5)
    stored = np.load(zs_artifacts / ZS_TEXT_ALIGNED)[[i for i, _ in rows]].astype(np.float32)
    np.testing.assert_allclose(aligned[: len(rows)], stored, atol=2e-3)  # float16 storage


@pytest.mark.slow
def test_zero_shot_over_http(zs_server: str, zs_artifacts: Path) -> None:
    manifest = read_manifest(zs_artifacts)
    example = (zs_artifacts / str(manifest.examples[0]["file"])).read_bytes()
    labels = [c.lower() for c in manifest.classes]
    r = ask(zs_server, example, labels)
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(p["label"] for p in body["predictions"]) == sorted(labels)
    probs = [p["probability"] for p in body["predictions"]]
    assert abs(sum(probs) - 1) < 1e-4 and probs == sorted(probs, reverse=True)
    assert body["memory_version"] == manifest.memory_version and body["template"] == "a photo of a {}."
    assert len(body["neighbors"]) == min(10, manifest.zero_shot.k)  # type: ignore[union-attr]
    assert all({"id", "text", "similarity"} <= set(n) for n in body["neighbors"])
    assert body["cached"] == {"image": False, "labels": 0}
    assert {"decode", "queue", "encode", "search", "fuse_image", "labels", "score", "total"} <= set(body["timings_ms"])
    again = ask(zs_server, example, labels).json()
    assert again["cached"] == {"image": True, "labels": len(labels)}
    assert [p["label"] for p in again["predictions"]] == [p["label"] for p in body["predictions"]]
    assert np.allclose([p["probability"] for p in again["predictions"]], probs, atol=1e-6)
    # Another template is another cache entry and another answer.
    other = ask(zs_server, example, labels, template="{}").json()
    assert other["template"] == "{}" and other["cached"]["labels"] == 0
    info = httpx.get(f"{zs_server}/info").json()
    assert info["supports"] == {"closed_set": True, "zero_shot": True} and info["zero_shot"]["k"] >= 1
    metrics = exposition(zs_server)
    assert 'rac_stage_seconds_count{stage="zs_total"}' in metrics
    assert 'route="/classify/zero-shot",status="200"' in metrics


@pytest.mark.slow
def test_zero_shot_refuses_bad_input_with_4xx(zs_server: str) -> None:
    image = png()
    for labels, data, status in (
        ([], {}, 422),
        (["cat", ""], {}, 422),
        (["x" * 101], {}, 422),
        ([f"label {i}" for i in range(65)], {}, 413),
        (["cat", "cat"], {}, 422),
        (["cat"], {"template": "no slot"}, 422),
    ):
        r = ask(zs_server, image, labels, **data)
        assert r.status_code == status, (labels[:2], r.text)
        assert r.json()["detail"]
    assert ask(zs_server, b"not an image", ["cat"]).status_code == 415
    assert ask(zs_server, image[: len(image) // 2], ["cat"]).status_code == 400  # truncated PNG
    r = httpx.post(f"{zs_server}/classify/zero-shot", files=[("labels", (None, b"cat"))])
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = httpx.post(f"{zs_server}/classify/zero-shot", content=png(), headers={"content-type": "image/png"})
    assert r.status_code == 415


@pytest.mark.slow
def test_artifacts_without_zero_shot_parts_answer_404(zs_artifacts: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(zs_artifacts, plain)
    manifest = json.loads((plain / MANIFEST).read_text())
    manifest.pop("zero_shot")
    (plain / MANIFEST).write_text(json.dumps(manifest))
    for name in ZS_FILES:
        (plain / name).unlink()
    with serving(plain, RAC_WORKERS="1") as url:
        r = ask(url, png(), ["cat", "dog"])
        assert r.status_code == 404 and "rac build --zero-shot" in r.json()["detail"]
        assert httpx.get(f"{url}/info").json()["supports"] == {"closed_set": True, "zero_shot": False}
        assert httpx.post(f"{url}/classify", files={"image": ("x.png", png(), "image/png")}).status_code == 200


@pytest.mark.slow
def test_a_swap_to_a_version_without_zero_shot_parts_answers_404(zs_artifacts: Path, tmp_path: Path) -> None:
    """A version without zero-shot parts (here: a derived one whose manifest lost its section) is served for
    /classify; once it is, zero-shot answers 404 saying why."""
    from models.memory import ops
    from tests.helpers import client, root_without_zero_shot, wait_until

    root = root_without_zero_shot(zs_artifacts, tmp_path)
    form: list[tuple[str, tuple[str | None, bytes] | tuple[str | None, bytes, str]]] = [
        ("image", ("x.png", png(), "image/png")),
        ("labels", (None, b"cat")),
    ]
    with client(root, memory_poll_s=0.05, max_wait_ms=20) as c:
        assert c.post("/classify/zero-shot", files=form).status_code == 200
        ops.publish(root / "v2", root)
        wait_until(lambda: c.get("/info").json()["supports"]["zero_shot"] is False, 20, "the swap")
        r = c.post("/classify/zero-shot", files=form)
        assert r.status_code == 404 and "has no zero-shot parts" in r.json()["detail"]
        assert c.post("/classify", files={"image": ("x.png", png(), "image/png")}).status_code == 200
