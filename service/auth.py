"""API keys: who may call what. A keys file (`rac keys add|list|remove`, RAC_API_KEYS) holds, for each key, its
name, the SHA-256 of the key (never the key itself), its scope and the memories it reaches:

  classify  every route that reads: classify, batch, zero-shot, items and thumbnails, examples, /info, the
            Open Inference Protocol (REST and gRPC); only over its memories where the key names some
  admin     everything: the above over every memory, /metrics, /admin/*

With a keys file, every route but /healthz, /readyz and the page's static files needs
`Authorization: Bearer KEY` (gRPC: the `authorization` metadata): 401 without a known key, 403 for a key whose
scope or memories do not cover the request. RAC_ADMIN_TOKEN is an admin key too. The server reads the file again
when it changes (no restart). Keys are compared by their digests in constant time and never logged.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from service.errors import RequestError

log = logging.getLogger(__name__)

Scope = Literal["classify", "admin"]
SCOPES: tuple[Scope, ...] = ("classify", "admin")
PUBLIC = ("/healthz", "/readyz", "/", "/favicon.ico")  # and /static/...: the page itself
ADMIN = ("/metrics", "/admin/")  # prefixes only an admin key reaches


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    name: str
    sha256: str  # of the key; the key itself is shown once, when made, and stored nowhere
    scope: Scope
    memories: tuple[str, ...] | None = None  # the memories it reaches; None: every one
    created: str = ""


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a key's name, scope and memories."""

    name: str
    scope: Scope
    memories: tuple[str, ...] | None

    def reaches(self, memory: str) -> bool:
        return self.scope == "admin" or self.memories is None or memory in self.memories


OPEN = Principal("-", "admin", None)  # no keys file: the service is open, as it always was


def read_keys(path: Path) -> list[Key]:
    """The keys file; ValueError naming what is wrong."""
    try:
        doc = json.loads(path.read_text())
        keys = [
            Key(
                str(k["name"]),
                str(k["sha256"]),
                k["scope"],
                tuple(k["memories"]) if k.get("memories") is not None else None,
                str(k.get("created", "")),
            )
            for k in doc["keys"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a keys file (rac keys add makes one): {e!r}") from None
    for k in keys:
        if k.scope not in SCOPES or len(k.sha256) != 64:
            raise ValueError(f"{path}: key {k.name!r} has scope {k.scope!r} or a digest that is not SHA-256")
    if len({k.name for k in keys}) != len(keys):
        raise ValueError(f"{path}: two keys with the same name")
    return keys


def write_keys(path: Path, keys: list[Key]) -> None:
    """Atomically (a server reading it sees the old file or the new one), readable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    rows = [{k: v for k, v in asdict(key).items() if v is not None} for key in keys]
    tmp.write_text(json.dumps({"keys": rows}, indent=1) + "\n")
    tmp.chmod(0o600)
    os.replace(tmp, path)


def add_key(path: Path, name: str, scope: Scope, memories: list[str] | None) -> str:
    """A new random key, stored in `path` as its digest; returns the key (to be shown once)."""
    keys = read_keys(path) if path.exists() else []
    if any(k.name == name for k in keys):
        raise ValueError(f"{path} already has a key named {name!r}: remove it first to rotate it")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    key = "rac_" + secrets.token_urlsafe(32)
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    keys.append(Key(name, digest(key), scope, tuple(memories) if memories else None, created))
    write_keys(path, keys)
    return key


def remove_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise ValueError(f"{path} has no key named {name!r}")
    write_keys(path, [k for k in keys if k.name != name])


class Keys:
    """The server's keys: read from the file at start (a bad file stops the start), read again when the file
    changes (looked at no more than once every `poll_s`; a file that has turned bad keeps the last good keys
    and is logged)."""

    def __init__(self, path: Path | None, admin_token: str | None, poll_s: float = 1.0):
        self.path, self.poll_s = path, poll_s
        self._admin = [Key("admin-token", digest(admin_token), "admin")] if admin_token else []
        self._keys: list[Key] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0

    def load(self) -> None:
        """Read the keys file (at start-up: a bad or missing file is a ValueError that stops the start)."""
        if self.path is not None:
            self._stamp = self._stat()
            self._keys = read_keys(self.path)

    @property
    def enabled(self) -> bool:
        """Keys are required (a keys file is configured)."""
        return self.path is not None

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < self.poll_s:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._keys = read_keys(self.path)
            log.info("API keys read again from %s: %d keys", self.path, len(self._keys))
        except ValueError as e:
            log.error("keeping the API keys read before: %s", e)

    def principal(self, authorization: str | None) -> Principal | None:
        """The principal a request's Authorization value names; None where it names no known key."""
        if not self.enabled:
            return OPEN
        self._refresh()
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        wanted = digest(given.strip())
        found = None
        for key in [*self._keys, *self._admin]:  # every digest compared, in constant time each
            if hmac.compare_digest(wanted, key.sha256):
                found = key
        return None if found is None else Principal(found.name, found.scope, found.memories)

    def admin(self, authorization: str | None) -> Principal | None:
        """An admin principal (the keys file's admin keys, or RAC_ADMIN_TOKEN), whether or not keys are
        required for the rest."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        wanted = digest(given.strip())
        self._refresh()
        found = None
        for key in [*self._keys, *self._admin]:
            if hmac.compare_digest(wanted, key.sha256) and key.scope == "admin":
                found = key
        return None if found is None else Principal(found.name, found.scope, found.memories)


def route_scope(path: str) -> Scope | None:
    """What a path needs: None (public), "classify" or "admin"."""
    if path in PUBLIC or path.startswith("/static/"):
        return None
    if any(path == p or path.startswith(p) for p in ADMIN):
        return "admin"
    return "classify"


def check_memory(principal: Principal, memory: str) -> None:
    """RequestError 403 where the principal's key does not reach `memory`."""
    if not principal.reaches(memory):
        raise RequestError(403, f"key {principal.name!r} does not reach memory {memory!r}")
