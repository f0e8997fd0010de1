"""`rac memory add`: a new version with the items of a list added, embedded with the version's own encoder
and value encoder; the model is never retrained.

    rac memory add --from ROOT/v1 --list new.jsonl --images DIR --out ROOT/v2

The list is either lines of `relative/path.png label[<TAB>text]` (the format `rac build` reads), or JSON
Lines (a `.jsonl` file), one object per item:

    {"image": "shoes/1234.png", "label": "Sneaker", "key": "sku-1234", "tags": ["summer", "sale"]}
    {"image": "shoes/99.png", "text": "new sneaker for sale"}

`image` is relative to --images; `label` a class name or index, `text` the item's text (default: the label's
prompt); where only `text` is given, the label is the class it names. `key` (unique within the memory) and
`tags` are optional. An item whose key the memory already holds replaces it: the old item is removed in the
same new version and the new one gets a new id (an upsert).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from models.data import FileImages
from models.memory.make import PROMPT, thumbnail_bytes
from models.memory.ops import check_tag, derive, open_checked
from models.memory.rows import NewRows, retrained_type
from service.artifacts import ENCODER, ITEMS, ArtifactError, Manifest
from service.memory.items import ItemTable

log = logging.getLogger(__name__)

CHUNK = 8192  # items embedded per step
MAX_KEY = 512  # characters in a key


@dataclass
class Listed:
    """The items a list names, before embedding."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)


def named_class(text: str, classes: list[str]) -> int | None:
    """The class a text names (the longest class name it contains as words), or None."""
    found = [(len(c), i) for i, c in enumerate(classes) if re.search(rf"\b{re.escape(c.lower())}\b", text.lower())]
    return max(found)[1] if found else None


def _label(value: object, classes: list[str], where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
        return value
    if isinstance(value, str):
        if value.isdigit() and int(value) < len(classes):
            return int(value)
        lowered = {c.lower(): i for i, c in enumerate(classes)}
        if value.lower() in lowered:
            return lowered[value.lower()]
    raise ValueError(f"{where}: label {value!r} is not one of the classes {classes} (or their index)")


def read_jsonl(path: Path, root: Path, classes: list[str]) -> Listed:
    out = Listed()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise ValueError(f'{where}: expected an object with "image" (a path) and "label" or "text"')
        unknown = set(obj) - {"image", "label", "text", "key", "tags"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        text = obj.get("text")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError(f"{where}: text must be a non-empty string")
        if "label" in obj:
            label = _label(obj["label"], classes, where)
        elif text is not None:
            named = named_class(text, classes)
            if named is None:
                raise ValueError(f"{where}: the text names none of the classes {classes}: give a label")
            label = named
        else:
            raise ValueError(f'{where}: give "label" or "text"')
        key, tags = obj.get("key"), obj.get("tags", [])
        if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY or key != key.strip()):
            raise ValueError(f"{where}: key must be a string of 1 to {MAX_KEY} characters without outer spaces")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{where}: tags must be a list of strings")
        for t in tags:
            check_tag(t)
        out.paths.append(obj["image"])
        out.labels.append(label)
        out.texts.append(text.strip() if text else PROMPT.format(classes[label].lower()))
        out.keys.append(key)
        out.tags.append(sorted(set(tags)))
    return out


def read_lines(path: Path, classes: list[str]) -> Listed:
    """`relative/path.png label` per line, optionally followed by a tab and the item's text."""
    out = Listed()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        head, tab, text = line.partition("\t")
        rel, _, label = head.strip().rpartition(" ")
        if not rel or not label.isdigit() or int(label) >= len(classes):
            raise ValueError(f"{path}:{n}: expected 'relative/path label[<TAB>text]' with a label < {len(classes)}")
        out.paths.append(rel)
        out.labels.append(int(label))
        out.texts.append(text.strip() if tab and text.strip() else PROMPT.format(classes[int(label)].lower()))
        out.keys.append(None)
        out.tags.append([])
    return out


def read_list(path: Path, root: Path, classes: list[str]) -> Listed:
    listed = read_jsonl(path, root, classes) if path.suffix == ".jsonl" else read_lines(path, classes)
    if not listed.paths:
        raise ValueError(f"{path} lists no items")
    for rel in listed.paths:
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{path}: {root / rel} not found")
    given = [k for k in listed.keys if k is not None]
    if len(set(given)) != len(given):
        twice = sorted({k for k in given if given.count(k) > 1})
        raise ValueError(f"{path}: keys listed more than once: {twice[:5]}")
    return listed


def embed_here(
    encoder_path: Path, spec: dict[str, Any], images: FileImages, texts: list[str], dims: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """keys (m, d) and values (m, dv) float32 of the listed items, in this process."""
    from models.encoders import TextEncoder
    from models.features import embed
    from service.core.decode import InputSpec
    from service.core.encode import Encoder

    encoder, text, input_spec = Encoder(encoder_path, "auto"), TextEncoder(), InputSpec.from_dict(spec)
    m = len(texts)
    keys, values = np.empty((m, dims[0]), np.float32), np.empty((m, dims[1]), np.float32)
    for s in tqdm(range(0, m, CHUNK), desc="embed new items", unit="chunk"):
        rows = np.arange(s, min(s + CHUNK, m))
        keys[rows] = embed(images.subset(rows), encoder, input_spec)  # (b, d) float32, as queries are embedded
        values[rows] = text([texts[i] for i in rows])
    return keys, values


def add(
    src: Path,
    list_file: Path,
    out: Path,
    image_root: Path | None = None,
    source: str = "external",
    retrain: bool = False,
    on_ray: bool = False,
    lists: int = 0,
) -> Manifest:
    """A new version: src's memory and the listed items (new ids), embedded with src's own encoder and value
    encoder, here or on the Ray cluster this process reaches (on_ray: models/memory/ray_embed.py). Listed keys
    the memory holds replace their items. retrain: the IVF lists clustered again over every key, into `lists`
    lists (0: as many as src's)."""
    from models.encoders import TextEncoder

    parent = open_checked(src)
    if lists < 0 or (lists and not retrain):
        raise ArtifactError(f"{lists} lists: give a positive number of lists, and only with a re-clustering")
    if retrain:
        retrained_type(parent.index.type, lists)  # a flat index has no lists to re-cluster into: refused now
    if parent.memory.value_encoder != TextEncoder.name:
        raise ArtifactError(f"{src}: adding to a memory of {parent.memory.value_encoder} values is not supported")
    root = image_root or list_file.parent
    listed = read_list(list_file, root, parent.classes)
    images = FileImages(root, listed.paths, np.asarray(listed.labels, np.int64))
    table = ItemTable(src / ITEMS)
    try:  # upsert: the items whose keys are listed again go, the listed ones come with new ids
        replaced = table.by_keys([k for k in listed.keys if k is not None])
    finally:
        table.close()
    m, dims = len(listed.paths), (parent.encoder.dim, parent.memory.value_dim)
    if lists > parent.memory.size - len(replaced) + m:  # refused before anything is embedded
        raise ArtifactError(f"{parent.memory.size - len(replaced) + m} keys cannot be clustered into {lists} lists")
    thumbnails: list[bytes | None]
    if on_ray:
        from models.memory.ray_embed import embed_on_ray

        keys, values, thumbnails = embed_on_ray(
            src / ENCODER, parent.encoder.input, root, listed.paths, listed.texts, dims
        )
    else:
        keys, values = embed_here(src / ENCODER, parent.encoder.input, images, listed.texts, dims)
        thumbnails = [thumbnail_bytes(images.image(i)) for i in range(m)]  # the page shows them
    new = NewRows(
        keys,
        values,
        listed.texts,
        listed.labels,
        source,
        listed.paths,
        listed.keys,
        listed.tags,
        thumbnails,
        retrain,
        lists,
    )
    gone = np.asarray(sorted(item.id for item in replaced.values()), np.int64)
    op = {"op": "add", "items": m, "replaced": len(gone), "list": str(list_file), "retrain_index": retrain}
    if lists:
        op["lists"] = lists
    manifest = derive(src, out, parent, gone, new, op)
    log.info(
        "added %d items (%d replacing items with the same key) to %s: %s, memory version %s",
        m,
        len(gone),
        src,
        out,
        manifest.memory_version,
    )
    return manifest
