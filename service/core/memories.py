"""The named memories one model serves (`RAC_MEMORIES="a=ROOT_A,b=ROOT_B"`, or `RAC_ARTIFACTS` as one memory
named `default`). Each is a serving root, followed and swapped on its own, or a flat directory served as it is;
all of them fit the one model (encoder, head, classes), or the server refuses to start, naming the memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from service.artifacts import ArtifactError, Manifest, resolve
from service.auth import Principal, check_memory
from service.errors import RequestError
from service.memory.versions import Follower, MemoryVersion, OpenMemory, ServedMemory
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class Memories:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        open_memory: OpenMemory,
        model: Manifest,
        encoder_dim: int,
        warm: Callable[[MemoryVersion], Awaitable[None]],
    ):
        """Open every named memory; the first is where the model was read from. ArtifactError naming the
        memory that does not fit."""
        self.settings, self.metrics, self.open_memory = settings, metrics, open_memory
        self.model, self.encoder_dim, self.warm = model, encoder_dim, warm
        self.served: dict[str, ServedMemory] = {}
        named = settings.named_memories()
        self.default = named[0][0]
        for i, (name, path) in enumerate(named):
            directory = resolve(path)
            try:
                version = open_memory(directory, settings, None if i == 0 else model, encoder_dim)
            except ArtifactError as e:
                self.close()
                raise ArtifactError(f"memory {name!r} ({path}): {e}") from e
            version.name = name
            follower = None
            if directory != path:  # a serving root: its `current` link is followed
                follower = Follower(
                    name, path, self._served_dir(name), self._swapper(name), settings.memory_poll_s, metrics
                )
            self.served[name] = ServedMemory(name, path, version, follower)
            metrics.memory_version.labels(name, version.id).set(1)

    def _served_dir(self, name: str) -> Callable[[], Path]:
        return lambda: self.served[name].version.directory

    def _swapper(self, name: str) -> Callable[[Path], Awaitable[None]]:
        return lambda directory: self.swap(name, directory)

    @property
    def names(self) -> list[str]:
        return list(self.served)

    def get(self, name: str | None) -> ServedMemory:
        """The memory a request names (None: the default); RequestError 404 naming the ones there are."""
        found = self.served.get(name if name is not None else self.default)
        if found is None:
            raise RequestError(404, f"no memory {name!r}: this server serves {', '.join(map(repr, self.served))}")
        return found

    def reachable(self, name: str | None, principal: Principal) -> str:
        """The memory a request names (None: the default), checked against its key: 404 for one the server does
        not have (naming those the key reaches), 403 for one the key does not reach."""
        if name is not None and name not in self.served:
            reached = ", ".join(repr(m) for m in self.served if principal.reaches(m)) or "none"
            raise RequestError(404, f"no memory {name!r}: this key reaches {reached}")
        found = self.get(name).name
        check_memory(principal, found)
        return found

    def followers(self) -> list[Follower]:
        return [m.follower for m in self.served.values() if m.follower is not None]

    def start(self) -> None:
        for follower in self.followers():
            follower.start()

    async def stop(self) -> None:
        for follower in self.followers():
            await follower.stop()

    def close(self) -> None:
        for m in self.served.values():
            m.version.retire()

    async def swap(self, name: str, directory: Path) -> None:
        """Load `directory` beside the version `name` serves, check it against the model, pre-fault and warm
        it (in the batch worker, between two batches), then serve it. Raises ArtifactError. The other
        memories are not touched."""
        served = self.served[name]
        new = await asyncio.to_thread(self.open_memory, directory, self.settings, self.model, self.encoder_dim)
        new.name = name
        try:
            await self.warm(new)
        except Exception as e:
            new.retire()
            raise ArtifactError(f"{directory}: warm-up failed: {e}") from e
        old, served.version = served.version, new  # requests admitted from now on take the new version
        self.metrics.memory_version.labels(name, old.id).set(0)
        self.metrics.memory_version.labels(name, new.id).set(1)  # after: the two may hold the same memory
        old.retire()  # closed when the last request holding it is answered
