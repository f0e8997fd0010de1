"""The item table (SQLite, read-only): an item's id -> its source, text, the class its text names, the user's
key and tags, and a thumbnail. Ids are the memory's stable ids: an item keeps its id in every version that
holds it, and a removed id is never given to another item.

Tables written before keys and tags existed (no `key` or `tags` column) still read: their items have none.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.artifacts import ArtifactError
from service.memory.filters import FilterIndex

# Ids per `IN (...)` query: under SQLite's smallest default bound on parameters (999), whatever B * k is.
SQL_CHUNK = 900
# The item table's columns, as `rac build` and `rac memory add` write them.
SCHEMA = (
    "CREATE TABLE items (id INTEGER PRIMARY KEY, source TEXT NOT NULL, text TEXT NOT NULL, label INTEGER NOT NULL,"
    " origin TEXT NOT NULL, thumbnail BLOB, key TEXT, tags TEXT)"
)
KEY_INDEX = "CREATE UNIQUE INDEX items_key ON items (key)"  # keys are unique within a memory (NULLs aside)


@dataclass(frozen=True)
class Item:
    id: int
    source: str
    text: str
    label: int  # the class the item's text names
    key: str | None = None  # the user's own key (a URL, a SKU, a path), unique within the memory
    tags: tuple[str, ...] = ()


def encode_tags(tags: list[str] | tuple[str, ...]) -> str | None:
    """The tags column: a JSON list, or NULL for none."""
    return json.dumps(sorted(set(tags))) if tags else None


def decode_tags(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def check_sqlite(path: Path) -> None:
    """The item table's size against its header (page size x page count): SQLite itself reads a truncated
    file without complaint and answers with rows missing."""
    if not path.exists():
        raise ArtifactError(f"{path} is missing")
    with path.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(b"SQLite format 3\0"):
        raise ArtifactError(f"{path} is not an SQLite database")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    size = path.stat().st_size
    header_valid = head[24:28] == head[92:96]  # the page count is trusted only then (SQLite's rule)
    if size % page or (header_valid and pages and size != page * pages):
        raise ArtifactError(f"{path} is {size} bytes, its header says {pages} pages of {page} bytes (truncated?)")


class ItemTable:
    def __init__(self, path: Path):
        check_sqlite(path)
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            (n_items,) = self._db.execute("SELECT COUNT(*) FROM items").fetchone()
            self.columns = {r[1] for r in self._db.execute("PRAGMA table_info(items)")}
        except sqlite3.Error as e:
            raise ArtifactError(f"{path} is not a readable item table: {e}") from e
        self.path = path
        self._lock = threading.Lock()
        self.size = int(n_items)
        key, tags = ("key" if "key" in self.columns else "NULL"), ("tags" if "tags" in self.columns else "NULL")
        self._fields = f"id, source, text, label, {key}, {tags}"

    def _rows(self, where: str, values: list[object]) -> list[Item]:
        """Items matching `where` (a condition over one `IN (?, ...)` list of `values`), asked in chunks."""
        out: list[Item] = []
        with self._lock:
            step = min(SQL_CHUNK, self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
            for s in range(0, len(values), step):
                chunk = values[s : s + step]
                query = f"SELECT {self._fields} FROM items WHERE {where} IN ({','.join('?' * len(chunk))})"
                out += [
                    Item(i, src, text, label, key, decode_tags(tags))
                    for i, src, text, label, key, tags in self._db.execute(query, chunk)
                ]
        return out

    def items(self, ids: list[int]) -> dict[int, Item]:
        return {item.id: item for item in self._rows("id", list(ids))}

    def item(self, item_id: int) -> Item | None:
        return self.items([item_id]).get(item_id)

    def by_keys(self, keys: list[str]) -> dict[str, Item]:
        """The items that carry these keys (a key the memory does not hold is absent)."""
        if "key" not in self.columns or not keys:
            return {}
        return {item.key: item for item in self._rows("key", list(keys)) if item.key is not None}

    def thumbnail(self, item_id: int) -> bytes | None:
        """The item's thumbnail (PNG bytes); None where it has none, or the table has no thumbnail column
        (memories built before thumbnails were stored)."""
        if "thumbnail" not in self.columns:
            return None
        with self._lock:
            row = self._db.execute("SELECT thumbnail FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def filter_index(self) -> FilterIndex:
        """Every item's id, source and tags, in id order: one pass over the table."""
        tags = "tags" if "tags" in self.columns else "NULL"
        ids = np.empty(self.size, np.int64)
        sources = np.empty(self.size, np.uint16)
        names: dict[str, int] = {}
        tagged: dict[str, list[int]] = {}
        with self._lock:
            cursor = self._db.execute(f"SELECT id, source, {tags} FROM items ORDER BY id")
            row = 0
            while batch := cursor.fetchmany(65536):
                for item_id, source, tag_text in batch:
                    ids[row] = item_id
                    sources[row] = names.setdefault(source, len(names))
                    if tag_text:
                        for t in json.loads(tag_text):
                            tagged.setdefault(t, []).append(row)
                    row += 1
        # Codes in name order, so that the same sources get the same codes in every version and shard.
        order = sorted(names)
        remap = np.zeros(max(len(names), 1), np.uint16)
        for name, code in names.items():
            remap[code] = order.index(name)
        return FilterIndex(ids, remap[sources], order, {t: np.asarray(r, np.int64) for t, r in tagged.items()})

    def close(self) -> None:
        self._db.close()
