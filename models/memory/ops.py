"""Memory versions offline: remove items from a version, tag them, publish a version to a serving root, list a
root's versions; and `derive`, the one way a version is made from another (`rac memory add`, in add.py, uses
it too). The model (encoder, head, classes, zero-shot towers) is fixed; each operation writes a new, complete,
checksummed version directory (the model files hard-linked; zero-shot text index and aligned texts made for its
items) and never touches its source.

rac memory add --from ROOT/v1 --list new.jsonl [--images DIR] --out ROOT/v2
rac memory remove --from ROOT/v2 --ids takedown.txt --out ROOT/v3      (or --keys FILE)
rac memory tag --from ROOT/v3 --keys featured.txt --add featured --out ROOT/v4
rac memory publish ROOT/v4 --root ROOT
rac memory list --root ROOT

An item's id is given once, when it enters a memory, and keeps its meaning in every later version: `remove`
takes ids (or keys) of items the `--from` version holds and fails naming any it does not; `add` gives new items
ids above every id the memory's lineage ever gave (`next_id` in the manifest), so a removed id never comes back.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from models.memory import shards
from models.memory.naming import named_ids
from models.memory.rows import NewRows, derive_memory, retrained_type
from service.artifacts import (
    CHECKED_FILES,
    CURRENT,
    ENCODER,
    EXAMPLES,
    HEAD,
    IDS,
    INDEX,
    ITEMS,
    KEYS,
    MANIFEST,
    VALUES,
    ZS_FILES,
    ZS_MODEL_FILES,
    ArtifactError,
    Manifest,
    ZeroShotInfo,
    digest,
    model_identity,
    model_mismatch,
    read_manifest,
    verify_files,
    version_id,
)
from service.memory.integrity import digest_chunks
from service.memory.items import decode_tags, encode_tags
from service.memory.shards import SHARDS, shard_dirs
from service.memory.store import Memory
from service.memory.versions import check_memory

log = logging.getLogger(__name__)

MODEL_FILES = (ENCODER, HEAD)


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


def link_model(src: Path, out: Path, parent: Manifest) -> None:
    zero_shot = ZS_MODEL_FILES if parent.zero_shot is not None else ()
    for name in MODEL_FILES + zero_shot:
        link_or_copy(src / name, out / name)
    if (src / EXAMPLES).is_dir():
        link_or_copy(src / EXAMPLES, out / EXAMPLES)


def open_checked(directory: Path) -> Manifest:
    """A version to build on (or to publish): its manifest, checksums, and sizes; of a sharded memory (`rac
    memory shard --out`), the ingress's files and the shards' places and versions."""
    if (directory / SHARDS).exists():
        return shards.checked(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    memory = Memory(directory, manifest.index.nprobe)
    try:
        check_memory(directory, manifest, memory, manifest.encoder.dim)
    finally:
        memory.close()
    return manifest


def counts(items: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Items per source and per tag."""
    with sqlite3.connect(f"file:{items}?mode=ro", uri=True) as db:
        sources = {str(s): int(n) for s, n in db.execute("SELECT source, COUNT(*) FROM items GROUP BY source")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        tags: dict[str, int] = {}
        if "tags" in columns:
            query = "SELECT t.value, COUNT(*) FROM items, json_each(items.tags) t GROUP BY t.value"
            tags = {str(t): int(n) for t, n in db.execute(query)}
    db.close()
    return dict(sorted(sources.items())), dict(sorted(tags.items()))


def finish(
    out: Path,
    parent: Manifest,
    size: int,
    next_id: int,
    op: dict[str, object],
    zero_shot: ZeroShotInfo | None,
    shard_files: list[dict[str, str]] | None = None,
) -> Manifest:
    """The new version's manifest: the parent's model, new files, checksums and memory version. shard_files:
    a sharded memory's shards' file digests (its index, keys and values are theirs, not the directory's)."""
    files, chunks = {}, {}
    for name in CHECKED_FILES if shard_files is None else (ENCODER, HEAD, ITEMS):
        if name in parent.chunks:  # a large memory's files: sampled by chunk at start (service/memory/integrity.py)
            files[name], chunks[name] = digest_chunks(out / name)
        else:
            files[name] = digest(out / name)
    made_of = files
    if shard_files is not None:  # the version: every shard's files, and the ingress's item table
        made_of = files | {n: "".join(f[n] for f in shard_files) for n in (INDEX, KEYS, VALUES, IDS)}
    history = [*parent.build.get("memory_ops", []), op]
    sources, tags = counts(out / ITEMS)
    memory = parent.memory.model_copy(update={"size": size, "sources": sources, "tags": tags, "next_id": next_id})
    manifest = parent.model_copy(
        update={
            "memory_version": version_id(made_of),
            "parent_version": parent.memory_version,
            "model_id": model_identity(parent),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "memory": memory,
            "files": files,
            "chunks": chunks,
            # The build's figures were measured with the parent's memory: they do not describe this one.
            "evaluation": {"measured_on_version": parent.evaluation.get("measured_on_version", parent.memory_version)},
            "examples": [{"file": e["file"], "label": e["label"]} for e in parent.examples],
            "build": parent.build | {"memory_ops": history},
            "zero_shot": zero_shot,
        }
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest


def next_id(manifest: Manifest) -> int:
    """The id the next added item gets (a memory written before ids were stable: its size)."""
    return manifest.memory.next_id if manifest.memory.next_id is not None else manifest.memory.size


def derive(
    src: Path, out: Path, parent: Manifest, gone: np.ndarray, new: NewRows | None, op: dict[str, object]
) -> Manifest:
    """A new version: src's items less the ids `gone`, plus `new` items with new ids. Keys, values, ids, the
    index (its trained coarse quantizer reused) and the item table; the zero-shot parts made again. Of a
    sharded memory, shard by shard (models/memory/shards.py)."""
    added = len(new.texts) if new is not None else 0
    new_ids = np.arange(next_id(parent), next_id(parent) + added, dtype=np.int64)
    sharded = (src / SHARDS).exists()
    with writing(out) as tmp:
        link_model(src, tmp, parent)
        shard_files = None
        if sharded:
            kept_rows, shard_files = shards.derive_shards(src, tmp, gone, new, new_ids)
        else:
            kept_rows = derive_memory(src, tmp, gone, new, new_ids)
        zero_shot = None
        if parent.zero_shot is not None:
            from models.zero_shot.versions import carry

            zero_shot = carry(src, tmp, parent.zero_shot, parent.memory_version, kept_rows, new.texts if new else [])
        if new is not None and new.retrain:  # the manifest names the index the re-clustering made
            kind = retrained_type(parent.index.type, new.lists)
            nprobe = min(parent.index.nprobe, new.lists) if new.lists else parent.index.nprobe
            index = parent.index.model_copy(update={"type": kind, "nprobe": nprobe})
            parent = parent.model_copy(update={"index": index})
        manifest = finish(tmp, parent, len(kept_rows) + added, next_id(parent) + added, op, zero_shot, shard_files)
        if sharded:
            shards.stamp(src, tmp, manifest.memory_version)
    return manifest


# ---------------------------------------------------------------- remove, tag


def remove(
    src: Path,
    out: Path,
    ids_file: Path | None = None,
    keys_file: Path | None = None,
    missing_ok: bool = False,
    source: str | None = None,
) -> Manifest:
    """A new version without the named items (by id, by key, or every item of a source): gone from the index,
    keys, values, ids and item table. Every other item keeps its id."""
    if ids_file is None and keys_file is None and source is None:
        raise ValueError("name the items to remove: --ids FILE, --keys FILE or --source NAME")
    parent = open_checked(src)
    gone = named_ids(src, ids_file, keys_file, missing_ok, source)
    named = {"ids": str(ids_file)} if ids_file is not None else {"keys": str(keys_file)}
    if source is not None:
        named = {"source": source}
    manifest = derive(src, out, parent, gone, None, {"op": "remove", "items": len(gone), **named})
    log.info("removed %d items from %s: %s, memory version %s", len(gone), src, out, manifest.memory_version)
    return manifest


def tag(
    src: Path,
    out: Path,
    ids_file: Path | None,
    keys_file: Path | None,
    add: list[str],
    drop: list[str],
    missing_ok: bool = False,
) -> Manifest:
    """A new version whose named items carry `add` and no longer `drop` (tags): the same items, ids, keys,
    values and index (hard-linked); only the item table changes."""
    for t in add:
        check_tag(t)
    if (src / SHARDS).exists():
        raise ArtifactError(f"{src} is sharded: tag the unsharded memory and shard it again (`rac memory shard`)")
    parent = open_checked(src)
    chosen = named_ids(src, ids_file, keys_file, missing_ok)
    with writing(out) as tmp:
        link_model(src, tmp, parent)
        for name in (INDEX, KEYS, VALUES, IDS):
            if (src / name).exists():
                link_or_copy(src / name, tmp / name)
        if parent.zero_shot is not None:  # the same items in the same rows: the same zero-shot parts
            for name in ZS_FILES:
                if not (tmp / name).exists():
                    link_or_copy(src / name, tmp / name)
        shutil.copyfile(src / ITEMS, tmp / ITEMS)
        with sqlite3.connect(tmp / ITEMS) as db:
            if "tags" not in {r[1] for r in db.execute("PRAGMA table_info(items)")}:
                db.execute("ALTER TABLE items ADD COLUMN tags TEXT")
            db.execute("CREATE TEMP TABLE chosen (id INTEGER PRIMARY KEY)")
            db.executemany("INSERT INTO chosen VALUES (?)", [(int(i),) for i in chosen])
            rows = db.execute("SELECT id, tags FROM items WHERE id IN (SELECT id FROM chosen)").fetchall()
            updates = [
                (encode_tags(sorted((set(decode_tags(text)) | set(add)) - set(drop))), item_id)
                for item_id, text in rows
            ]
            db.executemany("UPDATE items SET tags = ? WHERE id = ?", updates)
        db.close()
        op = {"op": "tag", "items": len(chosen), "add": add, "remove": drop}
        manifest = finish(tmp, parent, parent.memory.size, next_id(parent), op, parent.zero_shot)
    log.info("tagged %d items of %s: %s, memory version %s", len(chosen), src, out, manifest.memory_version)
    return manifest


def check_tag(tag: str) -> None:
    """A tag is a short name: what a filter's `tag=` and the protocol's comma-separated parameter can say."""
    if not tag or len(tag) > 64 or "," in tag or any(ord(c) < 32 for c in tag) or tag != tag.strip():
        raise ValueError(f"tag {tag!r}: 1 to 64 characters, no commas, control characters or outer spaces")


# ---------------------------------------------------------------- publish, list


def publish(new: Path, root: Path) -> Path:
    """Check `new`, place it in `root` (hard links) unless it is there, and point ROOT/current at it with
    one rename(2): a server sees the old version or the new one, never a mix. Returns the version dir."""
    manifest = open_checked(new)
    root.mkdir(parents=True, exist_ok=True)
    current = root / CURRENT
    if current.exists():
        served = read_manifest(current.resolve())
        if why := model_mismatch(served, manifest):
            raise ArtifactError(f"refusing to publish {new} to {root}: {why}")
    if new.resolve().parent == root.resolve():
        target = new.resolve()
    else:
        target = root / new.resolve().name
        if target.exists():
            if read_manifest(target).memory_version != manifest.memory_version:
                raise FileExistsError(f"{target} exists and holds another version")
        else:
            with writing(target) as tmp:
                link_or_copy(new, tmp)
    if target.name == CURRENT or target.name.startswith("."):
        raise ValueError(f"a version directory cannot be called {target.name!r}")
    link = root / f".{CURRENT}.{os.getpid()}"
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
    served = (root / CURRENT).resolve() if (root / CURRENT).exists() else None
    rows: list[dict[str, object]] = []
    for d in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
        if d.is_symlink() or not d.is_dir() or not (d / MANIFEST).exists():
            continue
        m = read_manifest(d)
        places = [d, *(shard_dirs(d) if (d / SHARDS).exists() else [])]  # a sharded one: its shards too
        memory_bytes = sum(
            (p / f).stat().st_size for p in places for f in (INDEX, KEYS, VALUES, ITEMS, IDS) if (p / f).exists()
        )
        rows.append(
            {
                "name": d.name,
                "memory_version": m.memory_version,
                "parent_version": m.parent_version,
                "items": m.memory.size,
                "sources": m.memory.sources,
                "tags": len(m.memory.tags),
                "memory_mb": round(memory_bytes / 2**20, 1),
                "created": m.created,
                "current": d.resolve() == served,
            }
        )
    return rows
