"""The page's routes in-process over synthetic artifacts: the page and its files, example images, memory items
and their thumbnails (cache headers, bad ids), and memories built with and without thumbnails."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.build.artifact import config_from_manifest, load_data
from models.memory.make import thumbnail_bytes
from service.artifacts import EXAMPLES, ITEMS, MANIFEST, read_manifest
from tests.helpers import client
from tests.synthetic import CLASSES, item_image, make_artifacts, png


@pytest.fixture(scope="module")
def with_thumbnails(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thumbs")
    make_artifacts(out, thumbnails=True)
    # Two example images, as `rac build` writes them and lists them in the manifest.
    (out / EXAMPLES).mkdir()
    manifest = json.loads((out / MANIFEST).read_text())
    for n, label in enumerate(CLASSES[:2]):
        (out / EXAMPLES / f"0{n}-{label}.png").write_bytes(png(n))
        manifest["examples"].append({"file": f"examples/0{n}-{label}.png", "label": label, "predicted": label})
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def api(with_thumbnails: Path) -> Iterator[TestClient]:
    with client(with_thumbnails) as c:
        yield c


def rows(artifacts: Path) -> dict[int, tuple[str, str, int]]:
    with sqlite3.connect(artifacts / ITEMS) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, source, text, label FROM items")}


def test_the_page_its_files_and_the_api_docs(api: TestClient) -> None:
    r = api.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for ref in ('href="/static/page.css"', 'src="/static/page.js"', 'href="/docs"', 'type="file"'):
        assert ref in r.text
    for name, kind in (("page.css", "text/css"), ("page.js", "text/javascript")):
        got = api.get(f"/static/{name}")
        assert got.status_code == 200 and got.headers["content-type"].startswith(kind) and got.content
        again = api.get(f"/static/{name}", headers={"If-None-Match": got.headers["etag"]})
        assert again.status_code == 304 and not again.content
    for bad in ("index.html.bak", "..%2Fpages.py", "nothing.js"):
        r = api.get(f"/static/{bad}")
        assert r.status_code == 404 and isinstance(r.json()["detail"], str)
    assert api.get("/docs").status_code == 200
    assert "/items/{item_id}/thumbnail" in api.get("/openapi.json").json()["paths"]


def test_examples_are_listed_and_served_and_nothing_else_is(api: TestClient, with_thumbnails: Path) -> None:
    listed = api.get("/examples").json()["examples"]
    assert [e["label"] for e in listed] == CLASSES[:2]
    for e in listed:
        r = api.get(e["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == (with_thumbnails / EXAMPLES / e["name"]).read_bytes()
    r = api.get("/examples/99-none.png")
    assert r.status_code == 404 and "no example image" in r.json()["detail"]
    for bad in ("..%2Fmanifest.json", "%2E%2E%2Fitems.sqlite", "..%5Citems.sqlite"):
        assert api.get(f"/examples/{bad}").status_code == 404


def test_item_metadata_is_the_item_table_row(api: TestClient, with_thumbnails: Path) -> None:
    table = rows(with_thumbnails)
    version = api.get("/info").json()["memory"]["version"]
    for item_id in (0, 17, 299):
        body = api.get(f"/items/{item_id}").json()
        source, text, label = table[item_id]
        assert body == {
            "id": item_id,
            "memory": "default",
            "key": None,
            "tags": [],
            "text": text,
            "source": source,
            "label": CLASSES[label],
            "label_index": label,
            "memory_version": version,
            "thumbnail": f"/items/{item_id}/thumbnail?memory=default&v={version}",
        }


def test_the_neighbours_of_an_answer_resolve_to_items(api: TestClient) -> None:
    r = api.post("/classify", files={"image": ("x.png", png(3), "image/png")}, params={"neighbors": 5})
    for n in r.json()["neighbors"]:
        item = api.get(f"/items/{n['id']}").json()
        assert (item["text"], item["source"], item["label"]) == (n["text"], n["source"], n["label"])


@pytest.mark.parametrize("route", ["/items/{}", "/items/{}/thumbnail"])
def test_bad_and_unknown_ids(api: TestClient, route: str) -> None:
    for bad in ("abc", "-1", "1.5", "1e3", "%C2%B3", " 7"):
        r = api.get(route.format(bad))
        assert r.status_code == 422, bad
        detail = r.json()["detail"]
        assert isinstance(detail, str) and "item_id" in detail and "[0-9]" in detail, detail  # the digits it takes
    for unknown in ("300", "123456789", str(2**63), "9" * 40):
        r = api.get(route.format(unknown))
        assert r.status_code == 404, unknown
        assert r.json()["detail"].startswith("no memory item")


def test_thumbnails_with_cache_headers(api: TestClient) -> None:
    version = api.get("/info").json()["memory"]["version"]
    r = api.get(f"/items/42/thumbnail?v={version}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == thumbnail_bytes(item_image(42))
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (48, 32)  # 60x40 fitted into 48x48, aspect kept
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    again = api.get(f"/items/42/thumbnail?v={version}", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    # Without the version in the URL the same bytes, but asked again before each use.
    plain = api.get("/items/42/thumbnail")
    assert plain.content == r.content and plain.headers["cache-control"] == "no-cache"
    assert plain.headers["etag"] == r.headers["etag"]
    assert api.get("/items/43/thumbnail").content != r.content
    # An id names one item in every version: a URL made for another version still shows it.
    assert api.get("/items/42/thumbnail?v=0123456789ab").content == r.content
    assert api.get("/items/9999/thumbnail").status_code == 404


def test_a_memory_without_thumbnails_still_serves_items(synthetic_artifacts: Path, tmp_path: Path) -> None:
    """Built without thumbnails (NULL in the column), and built before the column existed: both load, answer
    item metadata, and refuse thumbnails with a 404 that says why."""
    old = tmp_path / "old"
    shutil.copytree(synthetic_artifacts, old)
    with sqlite3.connect(old / ITEMS) as db:
        db.execute("ALTER TABLE items DROP COLUMN thumbnail")
    db.close()
    for artifacts, checks in ((synthetic_artifacts, True), (old, False)):
        with client(artifacts, verify_checksums=checks) as c:
            assert c.get("/items/5").json()["thumbnail"] is None
            assert c.get("/items/5").json()["text"] == rows(artifacts)[5][1]
            r = c.get("/items/5/thumbnail")
            assert r.status_code == 404 and "has no thumbnail" in r.json()["detail"]
            assert c.get("/examples").json() == {"examples": []}


def test_thumbnail_bytes_keeps_small_images_and_shrinks_big_ones() -> None:
    cases = [
        (Image.new("L", (28, 28), 128), (28, 28), "L"),
        (Image.new("RGB", (200, 100), (1, 2, 3)), (48, 24), "RGB"),
        (Image.new("RGBA", (30, 90), (1, 2, 3, 4)), (16, 48), "RGB"),
        (Image.new("P", (64, 64)), (48, 48), "RGB"),
    ]
    for image, size, mode in cases:
        data = thumbnail_bytes(image)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == size and im.mode == mode
    assert len(thumbnail_bytes(Image.new("L", (28, 28), 128))) < 200


@pytest.mark.slow
def test_a_build_stores_each_items_thumbnail(quick_artifacts: Path, tmp_path: Path) -> None:
    """`rac build` writes a thumbnail for every memory item: the item's own image, from its origin."""
    cfg = config_from_manifest(read_manifest(quick_artifacts), quick_artifacts, tmp_path)
    dataset, _ = load_data(cfg.data)
    with sqlite3.connect(quick_artifacts / ITEMS) as db:
        stored = db.execute("SELECT id, origin, thumbnail FROM items ORDER BY id").fetchall()
    assert stored and all(t is not None for _, _, t in stored)
    for _, origin, thumb in stored[:: max(1, len(stored) // 25)]:
        pool, index = origin.split("/")
        assert thumb == thumbnail_bytes(dataset.pools[pool].image(int(index)))
