"""Filtered search: which memory items a request's filter lets through, as a FAISS selector.

A `Filter` is what a request asks for: items of any of `sources`, carrying any of `tags`, except those whose
key is in `exclude_keys` (an empty part does not filter). A `FilterIndex` knows, for one memory (or one
shard), each item's source and tags; it resolves a filter into a `Selection`: how many items pass and a
FAISS `IDSelectorBitmap` over their ids, which the search itself applies (the k nearest among the items
that pass, never the unfiltered top k with some thrown away). Selections are kept per filter, so a filter
that repeats costs a dictionary lookup.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import faiss
import numpy as np

from service.errors import RequestError

SELECTIONS_KEPT = 64  # selections cached per memory: each holds a bitmap of an eighth of a byte per id
SHOWN = 20  # names listed in a refusal


@dataclass(frozen=True)
class Filter:
    sources: tuple[str, ...] = ()  # any of these sources
    tags: tuple[str, ...] = ()  # carrying any of these tags
    exclude_keys: tuple[str, ...] = ()  # none of these items

    @classmethod
    def of(
        cls, sources: list[str] | None = None, tags: list[str] | None = None, exclude_keys: list[str] | None = None
    ) -> Filter:
        """A filter with each part sorted and de-duplicated, so equal filters compare (and cache) alike."""
        return cls(*(tuple(sorted(set(part or []))) for part in (sources, tags, exclude_keys)))

    def __bool__(self) -> bool:
        return bool(self.sources or self.tags or self.exclude_keys)

    def key(self) -> str:
        """A short canonical form for cache keys ("" for no filter)."""
        if not self:
            return ""
        text = "\x1f".join("\x1e".join(part) for part in (self.sources, self.tags, self.exclude_keys))
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, eq=False)
class Selection:
    """A filter resolved against one memory: the ids its excluded keys have there, how many items pass, and
    the selector the search applies (None where the search happens elsewhere: a sharded memory's shards each
    resolve the same filter against their own items)."""

    filter: Filter
    excluded: tuple[int, ...]  # ids of the excluded keys that this memory holds
    count: int  # items that pass
    size: int  # items in the memory
    selector: faiss.IDSelector | None = field(default=None, repr=False)
    bitmap: np.ndarray | None = field(default=None, repr=False)  # the selector's bits: kept alive with it

    @property
    def key(self) -> str:
        return self.filter.key()


class FilterIndex:
    """Each item's source and tags, by row (rows are in id order), read once when a memory is loaded."""

    def __init__(self, ids: np.ndarray, sources: np.ndarray, source_names: list[str], tags: dict[str, np.ndarray]):
        self.ids = ids  # (N,) int64, increasing: the id of each row
        self.sources = sources  # (N,) uint16: the index of each row's source in source_names
        self.source_names = source_names
        self.tags = tags  # tag -> (m,) int64 rows carrying it
        self._selections: OrderedDict[tuple[Filter, tuple[int, ...]], Selection] = OrderedDict()
        self._lock = threading.Lock()  # selections are made on the event loop and in shard replicas' threads

    @property
    def size(self) -> int:
        return len(self.ids)

    def check(self, f: Filter) -> None:
        """RequestError 422 naming a source or tag this memory does not have, and what it has."""
        for kind, asked, known in (("source", f.sources, self.source_names), ("tag", f.tags, sorted(self.tags))):
            unknown = [name for name in asked if name not in set(known)]
            if unknown:
                shown = ", ".join(known[:SHOWN]) + (f" and {len(known) - SHOWN} more" if len(known) > SHOWN else "")
                has = f"its {kind}s are {shown}" if known else f"it has no {kind}s"
                raise RequestError(422, f"unknown {kind} {unknown[0]!r}: {has}")

    def select(self, f: Filter, excluded: tuple[int, ...]) -> Selection:
        """The items that pass `f` less the ids `excluded` (its excluded keys, resolved by the caller). A name
        this index does not know passes nothing (a shard may hold no item of a source the memory has: the
        caller checks names against the whole memory)."""
        cache_key = (f, excluded)
        with self._lock:
            found = self._selections.get(cache_key)
            if found is not None:
                self._selections.move_to_end(cache_key)
                return found
        passing = np.ones(self.size, bool)  # (N,) by row
        if f.sources:
            codes = [self.source_names.index(s) for s in f.sources if s in self.source_names]
            passing &= np.isin(self.sources, codes)
        if f.tags:
            tagged = np.zeros(self.size, bool)
            for t in f.tags:
                tagged[self.tags.get(t, [])] = True
            passing &= tagged
        if excluded:
            rows = np.searchsorted(self.ids, excluded)
            held = rows < self.size
            rows = rows[held][self.ids[rows[held]] == np.asarray(excluded)[held]]
            passing[rows] = False
        passed = self.ids[passing]
        bits = np.zeros(int(self.ids[-1]) + 1 if self.size else 1, bool)  # (max id + 1,) by id
        bits[passed] = True
        bitmap = np.packbits(bits, bitorder="little")  # FAISS reads bit (id & 7) of byte id >> 3
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # reads the bitmap in place
        selection = Selection(f, excluded, len(passed), self.size, selector, bitmap)
        with self._lock:
            self._selections[cache_key] = selection
            while len(self._selections) > SELECTIONS_KEPT:
                self._selections.popitem(last=False)
        return selection


class ByItemIds:
    """Ids and rows (positions in id order) through the item table's ids: how the served memory and the
    sharded one both find an item's row, whatever the memory's history of removals."""

    filters: FilterIndex

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """ids (any shape) -> their rows; ValueError for an id this memory does not hold."""
        ids = np.asarray(ids, np.int64)
        held_ids = self.filters.ids
        rows = np.minimum(np.searchsorted(held_ids, ids), self.filters.size - 1)
        held = held_ids[rows] == ids
        if not held.all():
            raise ValueError(f"ids {ids[~held][:5].tolist()} are not in this memory")
        return rows

    def contains(self, ids: np.ndarray) -> bool:
        """Every one of `ids` is an item of this memory."""
        try:
            self.rows(ids)
        except ValueError:
            return False
        return True

    def id_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """rows -> ids (-1 stays -1)."""
        return np.where(rows >= 0, self.filters.ids[np.maximum(rows, 0)], -1)
