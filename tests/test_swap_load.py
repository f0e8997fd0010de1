"""A memory version published under load: real `python -m service` (two processes), the neighbour cache in a
real Redis, real HTTP. No request fails; every answer names the old version or the new one and equals the
offline prediction for that version, batched or not; after the removal, no removed item is ever a neighbour."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
import torch

from models import memory_ops as ops
from service import artifacts as A
from service.decode import InputSpec, decode
from service.encode import Encoder
from tests.test_memory_ops import rows

pytestmark = pytest.mark.slow


def offline_probs(version: Path, images: list[bytes]) -> np.ndarray:
    """(n, C): decode -> encoder -> exact FAISS search (index loaded whole) -> head, without the service."""
    m = A.read_manifest(version)
    spec = InputSpec.from_dict(m.encoder.input)
    z = Encoder(version / A.ENCODER, "cpu")(np.stack([decode(b, spec, 10**7) for b in images]))
    index = faiss.read_index(str(version / A.INDEX))
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = m.index.nprobe
    sims, ids = index.search(z, m.index.k)
    values = np.load(version / A.VALUES).astype(np.float32)[ids]
    keys = np.load(version / A.KEYS).astype(np.float32)[ids] if m.head.uses_keys else np.empty((len(z), 0, 0))
    head = torch.jit.load(str(version / A.HEAD))
    with torch.no_grad():
        logits, _ = head(*(torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (z, sims, keys, values)))
    return torch.softmax(logits, -1).numpy()


def test_publish_under_load(quick_artifacts: Path, tmp_path: Path, redis_url: str) -> None:
    from loadtests.server import serving

    root = tmp_path / "root"
    v1 = ops.publish(quick_artifacts, root)
    # v2: without every external item whose text names the class external items name most.
    items = rows(v1 / A.ITEMS)
    label = Counter(r[3] for r in items if r[1] == "external").most_common(1)[0][0]
    removed = [r[0] for r in items if r[1] == "external" and r[3] == label]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, removed)))
    ops.remove(v1, tmp_path / "ids.txt", root / "v2")
    v2 = root / "v2"
    classes = A.read_manifest(v1).classes
    images = [p.read_bytes() for p in sorted((v1 / A.EXAMPLES).glob("*.png"))]
    ids = {A.read_manifest(v).memory_version: v for v in (v1, v2)}
    want = {version: offline_probs(path, images) for version, path in ids.items()}

    env = {"RAC_WORKERS": "2", "REDIS_URL": redis_url, "RAC_MEMORY_POLL_S": "0.2", "RAC_MAX_WAIT_MS": "5"}
    with serving(root, **env) as url:
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
        time.sleep(2.0)
        before = len(answers)
        ops.publish(v2, root)  # while requests flow
        deadline = time.monotonic() + 30
        v2_id = A.read_manifest(v2).memory_version
        while time.monotonic() < deadline and sum(a["memory_version"] == v2_id for _, a in answers[-20:]) < 20:
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics", timeout=5).text

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
    swaps = [line for line in metrics.splitlines() if line.startswith("rac_memory_swaps_total ")]
    assert swaps and float(swaps[0].split()[-1]) == 2  # one swap in each process
