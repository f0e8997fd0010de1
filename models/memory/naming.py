"""Naming items: by id (stable, 64-bit, never reused) or by the user's key, or every item of a source; what
`rac memory remove` and `tag` act on. A name the version does not hold fails loudly, never maps to another item.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np

from models.memory.rows import parent_ids
from service.artifacts import ITEMS
from service.memory.items import ItemTable

log = logging.getLogger(__name__)


class MissingItems(ValueError):
    """Ids or keys that the version does not hold: nothing is written."""


def read_ids(path: Path) -> np.ndarray:
    """Item ids, whitespace-separated (one a line is fine)."""
    try:
        return np.unique(np.asarray(path.read_text().split(), np.int64))
    except ValueError as e:
        raise ValueError(f"{path}: item ids must be integers: {e}") from None


def read_keys(path: Path) -> list[str]:
    """Item keys, one a line (keys may hold spaces)."""
    return list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))


def named_ids(
    src: Path, ids_file: Path | None, keys_file: Path | None, missing_ok: bool, source: str | None = None
) -> np.ndarray:
    """The ids of the items a file names, by id or by key (or every item of a source); MissingItems for any the
    version does not hold (unless missing_ok: then they are reported and skipped), never another item."""
    held = parent_ids(src)
    found: list[np.ndarray] = []
    missing: list[str] = []
    if source is not None:
        with sqlite3.connect(f"file:{src / ITEMS}?mode=ro", uri=True) as db:
            of_source = [i for (i,) in db.execute("SELECT id FROM items WHERE source = ?", (source,))]
        db.close()
        if not of_source and not missing_ok:
            raise MissingItems(f"{src} holds no item of source {source!r}: nothing written")
        found.append(np.asarray(of_source, np.int64))
    if ids_file is not None:
        ids = read_ids(ids_file)
        present = np.isin(ids, held)
        found.append(ids[present])
        missing += [str(i) for i in ids[~present]]
    if keys_file is not None:
        keys = read_keys(keys_file)
        table = ItemTable(src / ITEMS)
        try:
            by_key = table.by_keys(keys)
        finally:
            table.close()
        found.append(np.asarray([by_key[k].id for k in keys if k in by_key], np.int64))
        missing += [repr(k) for k in keys if k not in by_key]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        message = f"{src} holds no item {shown}"
        if not missing_ok:
            raise MissingItems(message + ": nothing written (--missing-ok skips them)")
        log.warning("%s: skipped", message)
    return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
