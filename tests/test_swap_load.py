"""A memory version published under load: real `python -m service` (two processes), the neighbour cache in a
real Redis, real HTTP. No request fails; every answer names the old version or the new one and equals the
offline prediction for that version, batched or not; after the removal, no removed item is ever a neighbour."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
import torch

from models.memory import ops
from service.artifacts import ENCODER, EXAMPLES, HEAD, IDS, INDEX, ITEMS, KEYS, VALUES, read_manifest
from service.core.decode import InputSpec, decode
from service.core.encode import Encoder
from tests.helpers import rows, sample, serving_in, wait_until

pytestmark = pytest.mark.slow


def offline_probs(version: Path, images: list[bytes]) -> np.ndarray:
    """(n, C): decode -> encoder -> exact FAISS search (index loaded whole) -> head, without the service."""
    m = read_manifest(version)
    spec = InputSpec.from_dict(m.encoder.input)
    z = Encoder(version / ENCODER, "cpu")(np.stack([decode(b, spec, 10**7) for b in images]))
    index = faiss.read_index(str(version / INDEX))
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = m.index.nprobe
    sims, ids = index.search(z, m.index.k)
    rows = np.searchsorted(np.load(version / IDS), ids)  # the index answers stable ids; keys and values are by row
    values = np.load(version / VALUES).astype(np.float32)[rows]
    keys = np.load(version / KEYS).astype(np.float32)[rows] if m.head.uses_keys else np.empty((len(z), 0, 0))
    head = torch.jit.load(str(version / HEAD))
    with torch.no_grad():
        logits, _ = head(*(torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (z, sims, keys, values)))
    return torch.softmax(logits, -1).numpy()


def test_publish_under_load(quick_artifacts: Path, tmp_path: Path, redis_url: str) -> None:
    from loadtests.server import serving

    root = tmp_path / "root"
    v1 = ops.publish(quick_artifacts, root)
    # v2: without every external item whose text names the class external items name most.
    items = rows(v1 / ITEMS)
    label = Counter(r[3] for r in items if r[1] == "external").most_common(1)[0][0]
    removed = [r[0] for r in items if r[1] == "external" and r[3] == label]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, removed)))
    ops.remove(v1, root / "v2", tmp_path / "ids.txt")
    v2 = root / "v2"
    classes = read_manifest(v1).classes
    images = [p.read_bytes() for p in sorted((v1 / EXAMPLES).glob("*.png"))]
    ids = {read_manifest(v).memory_version: v for v in (v1, v2)}
    v1_id = read_manifest(v1).memory_version
    want = {version: offline_probs(path, images) for version, path in ids.items()}

    env = {"RAC_WORKERS": "2", "REDIS_URL": redis_url, "RAC_MEMORY_POLL_S": "0.2", "RAC_MAX_WAIT_MS": "5"}
    with serving(root, **env) as url:
        wait_until(lambda: serving_in(url, 2, "default", v1_id), 60, "both server processes to serve v1")
        answers: list[tuple[int, dict]] = []  # (image, answer)
        failures: list[str] = []
        stop = threading.Event()

        def client(n: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                i = n
                while not stop.is_set():
                    params = {"top_k": len(classes), "neighbors": 30}
                    try:
                        if i % 2:
                            picked = [(i + j) % len(images) for j in range(3)]
                            files = [("images", (f"{j}.png", images[j], "image/png")) for j in picked]
                            r = http.post("/classify/batch", files=files, params=params)
                            results = r.json()["results"] if r.status_code == 200 else []
                            if r.status_code != 200 or any(e["status"] != 200 for e in results):
                                failures.append(r.text[:200])
                            answers.extend((j, e["result"]) for j, e in zip(picked, results, strict=True))
                        else:
                            j = i % len(images)
                            files_ = {"image": ("x.png", images[j], "image/png")}
                            r = http.post("/classify", files=files_, params=params)
                            if r.status_code != 200:
                                failures.append(r.text[:200])
                            else:
                                answers.append((j, r.json()))
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
                    i += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(answers) >= 40, 60, "traffic before the publish")
        before = len(answers)
        ops.publish(v2, root)  # while requests flow
        v2_id = read_manifest(v2).memory_version
        wait_until(lambda: sum(a["memory_version"] == v2_id for _, a in answers[-20:]) == 20, 30, "the new version")
        swapped = len(answers)
        wait_until(lambda: len(answers) >= swapped + 20, 30, "traffic after the swap")
        stop.set()
        for t in threads:
            t.join()

        def swaps() -> float:  # a process that took no request may finish its swap later
            return sample(httpx.get(f"{url}/metrics", timeout=5).text, "rac_memory_swaps_total", memory="default")

        wait_until(lambda: swaps() == 2, 30, "one swap in each process")
        assert serving_in(url, 2, "default", v2_id) and serving_in(url, 0, "default", v1_id)

    assert not failures, failures[:3]
    seen = Counter(a["memory_version"] for _, a in answers)
    assert set(seen) == set(ids) and before > 0, seen  # both versions answered, nothing else
    assert all(a["memory_version"] == v2_id for _, a in answers[-20:])  # every process swapped
    for j, a in answers:
        probs = np.array([p["probability"] for p in sorted(a["predictions"], key=lambda p: p["index"])])
        np.testing.assert_allclose(probs, want[a["memory_version"]][j], atol=2e-4)
        if a["memory_version"] == v2_id:
            assert not any(n["source"] == "external" and n["label"] == classes[label] for n in a["neighbors"])
    assert any(n["source"] == "external" and n["label"] == classes[label] for _, a in answers for n in a["neighbors"])
