"""Memory versions offline: add items to a version, remove items from one, publish a version to a serving
root, list a root's versions. The model (encoder, head, classes, zero-shot towers) is fixed; each operation
writes a new, complete, checksummed version directory (the model files hard-linked; zero-shot text index and
aligned texts made for its items) and never touches its source.

rac memory add --from ROOT/v1 --list new.txt [--root IMAGES] --out ROOT/v2
rac memory remove --from ROOT/v2 --ids takedown.txt --out ROOT/v3
rac memory publish ROOT/v3 --root ROOT
rac memory list --root ROOT

Item ids are row numbers of the version they belong to: `remove` renumbers the items after a removed one
(their order is kept), `add` appends. A neighbour's `id` in an answer is the id in the item table of the
`memory_version` that answer names; an item's `origin` column says where it came from across versions.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from models.data import FileImages
from models.memory import PROMPT, thumbnail_bytes
from service import artifacts as A
from service.memory import Memory, open_array
from service.versions import check_memory

log = logging.getLogger(__name__)

CHUNK = 8192  # rows per step when streaming keys and values: the memory is never in RAM at once
MODEL_FILES = (A.ENCODER, A.HEAD)


# ---------------------------------------------------------------- a version directory, written safely


@contextmanager
def writing(out: Path) -> Iterator[Path]:
    """Write into OUT.partial, rename to OUT when complete: a failure never leaves a half-written version."""
    if out.exists():
        raise FileExistsError(f"{out} exists: versions are immutable, choose a new directory")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (unchanged files cost no space), a copy across file systems."""
    if src.is_dir():
        dst.mkdir(exist_ok=True)
        for child in src.iterdir():
            link_or_copy(child, dst / child.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_model(src: Path, out: Path, parent: A.Manifest) -> None:
    zero_shot = A.ZS_MODEL_FILES if parent.zero_shot is not None else ()
    for name in MODEL_FILES + zero_shot:
        link_or_copy(src / name, out / name)
    if (src / A.EXAMPLES).is_dir():
        link_or_copy(src / A.EXAMPLES, out / A.EXAMPLES)


def open_checked(directory: Path) -> A.Manifest:
    """A version to build on: its manifest, checksums, and sizes."""
    manifest = A.read_manifest(directory)
    A.verify_files(directory, manifest)
    memory = Memory(directory, manifest.index.nprobe)
    try:
        check_memory(directory, manifest, memory, manifest.encoder.dim)
    finally:
        memory.close()
    return manifest


def finish(
    out: Path,
    parent: A.Manifest,
    size: int,
    sources: dict[str, int],
    op: dict[str, object],
    zero_shot: A.ZeroShotInfo | None,
) -> A.Manifest:
    """The new version's manifest: the parent's model, new files, checksums and memory version."""
    files = {name: A.digest(out / name) for name in A.CHECKED_FILES}
    history = [*parent.build.get("memory_ops", []), op]
    manifest = parent.model_copy(
        update={
            "memory_version": A.version_id(files),
            "parent_version": parent.memory_version,
            "model_id": A.model_identity(parent),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "memory": parent.memory.model_copy(update={"size": size, "sources": sources}),
            "files": files,
            # The build's figures were measured with the parent's memory: they do not describe this one.
            "evaluation": {"measured_on_version": parent.evaluation.get("measured_on_version", parent.memory_version)},
            "examples": [{"file": e["file"], "label": e["label"]} for e in parent.examples],
            "build": parent.build | {"memory_ops": history},
            "zero_shot": zero_shot,
        }
    )
    (out / A.MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest


def carry_zero_shot(
    src: Path, out: Path, parent: A.Manifest, keep: np.ndarray, new_texts: list[str]
) -> A.ZeroShotInfo | None:
    """The parent's zero-shot parts made for the new item set (models/zeroshot_versions.py), if it has them."""
    if parent.zero_shot is None:
        return None
    from models.zeroshot_versions import carry

    return carry(src, out, parent.zero_shot, parent.memory_version, keep, new_texts)


def source_counts(db: sqlite3.Connection) -> dict[str, int]:
    return {str(s): int(n) for s, n in db.execute("SELECT source, COUNT(*) FROM items GROUP BY source ORDER BY source")}


# ---------------------------------------------------------------- add


@dataclass
class NewItems:
    images: FileImages
    texts: list[str]
    origins: list[str]


def read_add_list(path: Path, root: Path, classes: list[str]) -> NewItems:
    """`relative/path.png label` per line, as `rac build` reads, optionally followed by a tab and the item's
    text (default: the label's prompt, "a photo of a {class}.")."""
    paths, labels, texts = [], [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        head, tab, text = line.partition("\t")
        rel, _, label = head.strip().rpartition(" ")
        if not rel or not label.isdigit() or int(label) >= len(classes):
            raise ValueError(f"{path}:{n}: expected 'relative/path label[<TAB>text]' with a label < {len(classes)}")
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{path}:{n}: {root / rel} not found")
        paths.append(rel)
        labels.append(int(label))
        texts.append(text.strip() if tab and text.strip() else PROMPT.format(classes[int(label)].lower()))
    if not paths:
        raise ValueError(f"{path} lists no items")
    return NewItems(FileImages(root, paths, np.asarray(labels, np.int64)), texts, paths)


def add(
    src: Path,
    list_file: Path,
    out: Path,
    image_root: Path | None = None,
    source: str = "external",
    retrain: bool = False,
) -> A.Manifest:
    """A new version: src's memory and the listed items, embedded with src's own encoder and value encoder."""
    from models.encoders import TextEncoder
    from models.features import embed
    from service.decode import InputSpec
    from service.encode import Encoder

    parent = open_checked(src)
    if parent.memory.value_encoder != TextEncoder.name:
        raise A.ArtifactError(f"{src}: adding to a memory of {parent.memory.value_encoder} values is not supported")
    new = read_add_list(list_file, image_root or list_file.parent, parent.classes)
    spec = InputSpec.from_dict(parent.encoder.input)
    encoder, text = Encoder(src / A.ENCODER, "auto"), TextEncoder()
    old_keys, old_values = open_array(src / A.KEYS), open_array(src / A.VALUES)
    n, m = len(old_keys), len(new.texts)
    index = faiss.read_index(str(src / A.INDEX))  # the trained coarse quantizer is reused
    with writing(out) as tmp:
        link_model(src, tmp, parent)
        keys = np.lib.format.open_memmap(tmp / A.KEYS, "w+", np.float16, (n + m, old_keys.shape[1]))
        values = np.lib.format.open_memmap(tmp / A.VALUES, "w+", np.float16, (n + m, old_values.shape[1]))
        for s in tqdm(range(0, n, CHUNK), desc="copy memory", unit="chunk"):
            e = min(s + CHUNK, n)
            keys[s:e], values[s:e] = old_keys[s:e], old_values[s:e]
        for s in tqdm(range(0, m, CHUNK), desc="embed new items", unit="chunk"):
            rows = np.arange(s, min(s + CHUNK, m))
            z = embed(new.images.subset(rows), encoder, spec)  # (b, d) float32, as queries are embedded
            keys[n + rows] = z
            values[n + rows] = text([new.texts[i] for i in rows])
            if not retrain:
                index.add(z)
        if retrain:
            index = retrained(index, keys)
        keys.flush()
        values.flush()
        del keys, values
        faiss.write_index(index, str(tmp / A.INDEX))
        shutil.copyfile(src / A.ITEMS, tmp / A.ITEMS)
        with sqlite3.connect(tmp / A.ITEMS) as db:
            rows_ = zip(range(n, n + m), [source] * m, new.texts, new.images.labels.tolist(), new.origins, strict=True)
            db.executemany("INSERT INTO items (id, source, text, label, origin) VALUES (?, ?, ?, ?, ?)", rows_)
            if "thumbnail" in {r[1] for r in db.execute("PRAGMA table_info(items)")}:  # the page shows them
                thumbs = ((thumbnail_bytes(new.images.image(i)), n + i) for i in range(m))
                db.executemany("UPDATE items SET thumbnail = ? WHERE id = ?", thumbs)
            sources = source_counts(db)
        db.close()
        zero_shot = carry_zero_shot(src, tmp, parent, np.arange(n), new.texts)
        op = {"op": "add", "items": m, "list": str(list_file), "retrain_index": retrain}
        manifest = finish(tmp, parent, n + m, sources, op, zero_shot)
    log.info("added %d items to %s: %s, memory version %s", m, src, out, manifest.memory_version)
    return manifest


def retrained(index: faiss.Index, keys: np.ndarray) -> faiss.Index:
    """The same kind of index, its coarse quantizer trained again on (a sample of) every key."""
    d = keys.shape[1]
    if isinstance(index, faiss.IndexIVF):
        factory = f"IVF{index.nlist},Flat"
        nprobe = index.nprobe
    else:
        factory, nprobe = "Flat", 0
    new = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not new.is_trained:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.permutation(len(keys))[: 256 * 1024])
        new.train(np.asarray(keys[sample], np.float32))
    for s in tqdm(range(0, len(keys), CHUNK), desc="index", unit="chunk"):
        new.add(np.asarray(keys[s : s + CHUNK], np.float32))
    if isinstance(new, faiss.IndexIVF):
        new.nprobe = nprobe
    return new


# ---------------------------------------------------------------- remove


def read_ids(path: Path, size: int) -> np.ndarray:
    """Item ids, whitespace-separated (one a line is fine), each in [0, size)."""
    ids = np.unique(np.asarray(path.read_text().split(), np.int64))
    bad = ids[(ids < 0) | (ids >= size)]
    if len(bad):
        raise ValueError(f"{path}: ids {bad[:5].tolist()} are not in a memory of {size} items")
    return ids


def remove(src: Path, ids_file: Path, out: Path) -> A.Manifest:
    """A new version without the listed items: they are gone from the index, keys, values and item table."""
    parent = open_checked(src)
    n = parent.memory.size
    gone = read_ids(ids_file, n)
    keep = np.ones(n, bool)
    keep[gone] = False
    renumber = np.cumsum(keep) - 1  # old id -> new id (meaningful where kept)
    old_keys, old_values = open_array(src / A.KEYS), open_array(src / A.VALUES)
    kept = int(keep.sum())
    with writing(out) as tmp:
        link_model(src, tmp, parent)
        keys = np.lib.format.open_memmap(tmp / A.KEYS, "w+", np.float16, (kept, old_keys.shape[1]))
        values = np.lib.format.open_memmap(tmp / A.VALUES, "w+", np.float16, (kept, old_values.shape[1]))
        for s in tqdm(range(0, n, CHUNK), desc="compact memory", unit="chunk"):
            mask = keep[s : s + CHUNK]
            to = renumber[s : s + CHUNK][mask]
            keys[to], values[to] = old_keys[s : s + CHUNK][mask], old_values[s : s + CHUNK][mask]
        keys.flush()
        values.flush()
        del keys, values
        index = faiss.read_index(str(src / A.INDEX))
        remove_from_index(index, gone, renumber)
        faiss.write_index(index, str(tmp / A.INDEX))
        sources = copy_items(src / A.ITEMS, tmp / A.ITEMS, keep, renumber)
        zero_shot = carry_zero_shot(src, tmp, parent, np.flatnonzero(keep), [])
        op = {"op": "remove", "items": len(gone), "ids": str(ids_file)}
        manifest = finish(tmp, parent, kept, sources, op, zero_shot)
    log.info("removed %d items from %s: %s, memory version %s", len(gone), src, out, manifest.memory_version)
    return manifest


def remove_from_index(index: faiss.Index, gone: np.ndarray, renumber: np.ndarray) -> None:
    """FAISS remove_ids, then ids renumbered to rows: a flat index compacts itself; an IVF index keeps the
    old ids in its lists, rewritten here in place list by list."""
    removed = index.remove_ids(faiss.IDSelectorBatch(gone))
    if removed != len(gone):
        raise A.ArtifactError(f"the index held {removed} of the {len(gone)} ids to remove")
    if isinstance(index, faiss.IndexFlat):
        return
    if not isinstance(index, faiss.IndexIVF):
        raise A.ArtifactError(f"removing from a {type(index).__name__} index is not supported")
    lists = index.invlists
    assert lists is not None
    for lst in range(index.nlist):
        size = lists.list_size(lst)
        if size:
            ptr = lists.get_ids(lst)
            ids = faiss.rev_swig_ptr(ptr, size)  # a view of the list's ids: rewritten in place
            ids[:] = renumber[ids]
            lists.release_ids(lst, ptr)  # type: ignore[attr-defined]


def copy_items(src: Path, dst: Path, keep: np.ndarray, renumber: np.ndarray) -> dict[str, int]:
    """The kept rows, renumbered, every column copied whatever the table holds."""
    with sqlite3.connect(dst) as db:
        db.execute("ATTACH DATABASE ? AS old", (f"file:{src}?mode=ro",))
        (schema,) = db.execute("SELECT sql FROM old.sqlite_master WHERE type='table' AND name='items'").fetchone()
        db.execute(schema)
        cols = [r[1] for r in db.execute("PRAGMA old.table_info(items)") if r[1] != "id"]
        db.execute("CREATE TEMP TABLE kept (old INTEGER PRIMARY KEY, new INTEGER)")
        pairs = np.flatnonzero(keep)
        db.executemany("INSERT INTO kept VALUES (?, ?)", zip(pairs.tolist(), renumber[pairs].tolist(), strict=True))
        names = ", ".join(f'"{c}"' for c in cols)
        selected = ", ".join(f'i."{c}"' for c in cols)
        db.execute(
            f"INSERT INTO items (id, {names}) SELECT k.new, {selected} FROM old.items i JOIN kept k ON i.id = k.old"
        )
        db.commit()
        db.execute("DETACH DATABASE old")
        sources = source_counts(db)
    db.close()
    return sources


# ---------------------------------------------------------------- publish, list


def publish(new: Path, root: Path) -> Path:
    """Check `new`, place it in `root` (hard links) unless it is there, and point ROOT/current at it with
    one rename(2): a server sees the old version or the new one, never a mix. Returns the version dir."""
    manifest = open_checked(new)
    root.mkdir(parents=True, exist_ok=True)
    current = root / A.CURRENT
    if current.exists():
        served = A.read_manifest(current.resolve())
        if why := A.model_mismatch(served, manifest):
            raise A.ArtifactError(f"refusing to publish {new} to {root}: {why}")
    if new.resolve().parent == root.resolve():
        target = new.resolve()
    else:
        target = root / new.resolve().name
        if target.exists():
            if A.read_manifest(target).memory_version != manifest.memory_version:
                raise FileExistsError(f"{target} exists and holds another version")
        else:
            with writing(target) as tmp:
                link_or_copy(new, tmp)
    if target.name == A.CURRENT or target.name.startswith("."):
        raise ValueError(f"a version directory cannot be called {target.name!r}")
    link = root / f".{A.CURRENT}.{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(target.name, link)  # relative: the root can be moved or mounted elsewhere
    os.replace(link, current)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)  # the new link survives a crash
    finally:
        os.close(fd)
    log.info("published %s (memory version %s) as %s", target, manifest.memory_version, current)
    return target


def list_versions(root: Path) -> list[dict[str, object]]:
    """The version directories in a root, oldest first, with sizes and which one `current` points at."""
    served = (root / A.CURRENT).resolve() if (root / A.CURRENT).exists() else None
    rows: list[dict[str, object]] = []
    for d in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
        if d.is_symlink() or not d.is_dir() or not (d / A.MANIFEST).exists():
            continue
        m = A.read_manifest(d)
        memory_bytes = sum((d / f).stat().st_size for f in (A.INDEX, A.KEYS, A.VALUES, A.ITEMS))
        rows.append(
            {
                "name": d.name,
                "memory_version": m.memory_version,
                "parent_version": m.parent_version,
                "items": m.memory.size,
                "sources": m.memory.sources,
                "memory_mb": round(memory_bytes / 2**20, 1),
                "created": m.created,
                "current": d.resolve() == served,
            }
        )
    return rows
