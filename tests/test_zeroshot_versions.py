"""Zero-shot parts carried through memory versions: after `rac memory add` (new items with their own captions,
with captions the memory already holds, with a caption given twice) and `remove` (old and new items), the
derived version's text index and aligned texts are what a fresh `--zero-shot` build makes over the same final
items (same order, same vectors, the same text neighbours for every class prompt); the towers and fusion
modules are hard links; and a live swap to it keeps /classify/zero-shot answering, as that version answers
when served alone."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.memory import ops
from models.memory.add import add
from models.zero_shot.align import distinct_texts
from models.zero_shot.reco import text_index
from models.zero_shot.versions import embed_texts, item_texts
from service.artifacts import (
    EXAMPLES,
    ITEMS,
    ZS_FILES,
    ZS_MODEL_FILES,
    ZS_TEXT_ALIGNED,
    ZS_TEXT_INDEX,
    ZS_TEXT_ORDER,
    ZS_TEXT_TOWER,
    digest,
    read_manifest,
)
from service.core.zero_shot import text_tokenizer
from tests.helpers import client, wait_until, write_list

pytestmark = pytest.mark.slow

NEW_TEXTS = [
    "zebra-striped rain boots for toddlers",  # new to the memory
    "a photo of a sandal.",  # a caption the memory holds
    "zebra-striped rain boots for toddlers",  # the same new caption again
    None,  # the default: the class's prompt, which the memory holds too
    "a velvet evening clutch",
    "sandal",
]


@pytest.fixture(scope="module")
def derived(zs_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """v1 (the quick --zero-shot build) -> v2 (six items added) -> v3 (three old and two new items removed)."""
    tmp = tmp_path_factory.mktemp("zs-versions")
    examples = sorted((zs_artifacts / EXAMPLES).glob("*.png"))[: len(NEW_TEXTS)]
    add(zs_artifacts, write_list(examples, tmp / "new", NEW_TEXTS), tmp / "v2")
    n = read_manifest(zs_artifacts).memory.size
    (tmp / "ids.txt").write_text(" ".join(map(str, [0, 7, n - 1, n, n + 4])))
    ops.remove(tmp / "v2", tmp / "v3", tmp / "ids.txt")
    return tmp / "v2", tmp / "v3"


def fresh_text_index(directory: Path) -> tuple[faiss.Index, np.ndarray]:
    """What `rac build --zero-shot` makes over `directory`'s items: each distinct text embedded once by the
    frozen text encoder (torch), the index built in the seeded order (models/zero_shot/build.py)."""
    from models.encoders import TextEncoder

    texts, item_text = distinct_texts(item_texts(directory / ITEMS))
    return text_index(TextEncoder()(texts)[item_text], seed=0)


@pytest.mark.parametrize("which", [0, 1], ids=["add", "add+remove"])
def test_derived_text_parts_equal_a_fresh_build(zs_artifacts: Path, derived: tuple[Path, Path], which: int) -> None:
    version = derived[which]
    m1, m = read_manifest(zs_artifacts), read_manifest(version)
    info = m.zero_shot
    assert info is not None and m1.zero_shot is not None
    assert m.memory.size == m1.memory.size + len(NEW_TEXTS) - 5 * which
    for name in ZS_FILES:  # complete and checksummed
        assert digest(version / name) == info.files[name], name
    for name in ZS_MODEL_FILES:  # the model's files: hard links
        assert (version / name).stat().st_ino == (zs_artifacts / name).stat().st_ino, name
    assert info.evaluation == {"measured_on_version": m1.memory_version}
    assert {k: v for k, v in info.model_dump().items() if k not in ("files", "evaluation")} == {
        k: v for k, v in m1.zero_shot.model_dump().items() if k not in ("files", "evaluation")
    }

    index, order = faiss.read_index(str(version / ZS_TEXT_INDEX)), np.load(version / ZS_TEXT_ORDER)
    want_index, want_order = fresh_text_index(version)
    np.testing.assert_array_equal(order, want_order)
    vectors = [i.reconstruct_n(0, i.ntotal) for i in (index, want_index)]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=2e-5)
    # Every class prompt retrieves the same memory texts (ids), through the artifact's own text tower.
    prompts = [info.template.format(c.lower()) for c in m.classes] + ["zebra boots", "a clutch bag"]
    tokenizer = text_tokenizer(version, info)
    _, search = embed_texts(version / ZS_TEXT_TOWER, tokenizer, prompts)
    got = order[index.search(search, info.k)[1]]
    want = want_order[want_index.search(search, info.k)[1]]
    np.testing.assert_array_equal(got, want)
    texts = item_texts(version / ITEMS)
    assert any("zebra" in texts[i] for i in got[-2])  # added in v2 (twice), kept in v3 (once)
    assert any("clutch" in texts[i] for i in got[-1]) == (which == 0)  # added in v2, removed in v3

    # Aligned texts: the text tower's `embedding` of every item's text (float16); kept items' rows unchanged.
    aligned = np.load(version / ZS_TEXT_ALIGNED)
    assert aligned.dtype == np.float16 and aligned.shape == (m.memory.size, info.dim)
    np.testing.assert_allclose(
        aligned.astype(np.float32), embed_texts(version / ZS_TEXT_TOWER, tokenizer, texts)[0], atol=2e-3
    )
    parent = np.load(zs_artifacts / ZS_TEXT_ALIGNED)
    n = m1.memory.size
    rows, was = (np.arange(6), np.arange(1, 7)) if which else (np.arange(n), np.arange(n))  # v3: v1's 0 is gone
    np.testing.assert_array_equal(aligned[rows], parent[was])


def ask(c: TestClient, image: bytes, labels: list[str]) -> dict:
    form = [("labels", (None, label.encode())) for label in labels]
    r = c.post("/classify/zero-shot", files=[("image", ("x.png", image, "image/png")), *form], params={"neighbors": 5})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_swap_to_a_derived_version_keeps_zero_shot_answering(
    zs_artifacts: Path, derived: tuple[Path, Path], tmp_path: Path
) -> None:
    v1, v3 = read_manifest(zs_artifacts), read_manifest(derived[1])
    image = (zs_artifacts / str(v1.examples[5]["file"])).read_bytes()
    labels = [c.lower() for c in v1.classes] + ["rain boots"]
    with client(derived[1], max_wait_ms=5) as alone:
        want = ask(alone, image, labels)
    root = tmp_path / "root"
    ops.publish(zs_artifacts, root)
    with client(root, memory_poll_s=0.05, max_wait_ms=5) as c:
        assert ask(c, image, labels)["memory_version"] == v1.memory_version
        ops.publish(derived[1], root)
        wait_until(lambda: c.get("/info").json()["memory"]["version"] == v3.memory_version, 20, "the swap")
        assert c.get("/info").json()["supports"] == {"closed_set": True, "zero_shot": True}
        got = ask(c, image, labels)
        assert got["memory_version"] == v3.memory_version and got["cached"] == {"image": False, "labels": 0}
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        probs = [[p["probability"] for p in a["predictions"]] for a in (got, want)]
        np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)
        assert got["neighbors"] == want["neighbors"]
        assert ask(c, image, labels)["cached"] == {"image": True, "labels": len(labels)}
