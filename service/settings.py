"""The service's settings: the one place that reads the environment (variables prefixed RAC_)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAC_", frozen=True)

    # The artifact directory (`rac build --out`) or serving root (a `current` link) served as one memory named
    # `default`, where RAC_MEMORIES is unset.
    artifacts: Path = Path("artifacts/demo")
    # Several named memories served by one model: "a=ROOT_A,b=ROOT_B" (each a serving root or a flat artifact
    # directory; the first is the default a request gets unless it names one with ?memory=). Wins over artifacts.
    memories: str | None = None  # what `rac build` wrote, or a serving root (its `current` link)
    verify_checksums: bool = True  # check artifact files at start-up against the manifest
    # Hash every byte even of files with chunk digests (a 10M-item memory: minutes); else sizes + sampled chunks.
    verify_full: bool = False
    prefault: bool = True  # read the index, keys and values into memory before turning ready
    # A serving root (a `current` link to a version directory): how often each process looks at the link.
    memory_poll_s: float = 1.0
    # Bearer token for POST /admin/reload; unset: the admin routes are off (404). With a keys file it is one
    # more admin key.
    admin_token: str | None = None
    # The API keys file (`rac keys add`): set, every route but health, readiness and the page's static files
    # needs a key (service/auth.py); unset, the service is open. Read again when it changes.
    api_keys: Path | None = None
    api_keys_poll_s: float = 1.0  # how often, at most, the keys file is looked at for a change

    # Serving (`python -m service`)
    host: str = "127.0.0.1"  # where `python -m service` listens (the image sets 0.0.0.0)
    port: int = 8000  # its HTTP port: the API, the v2 REST routes, /metrics and the page
    # The Open Inference Protocol's gRPC service (service/v2/grpc.py), in every server process; 0: off.
    grpc_port: int = 8001
    # Server processes `python -m service` starts, each with its own pipeline; 0: one per core. Processes, not
    # threads, because one process spends much of its time holding the GIL (HTTP, decoding, batching) while
    # its cores wait. The encoder threads of each process share the cores among `workers` (a plain
    # `uvicorn --factory service.app:factory` is one process: it leaves this 0 and uses every core).
    workers: int = 0
    backlog: int = 2048  # connections the kernel queues for accepting, per listening socket
    # On SIGTERM: /readyz answers 503 at once and the server keeps serving this long (a load balancer's time
    # to notice), then stops accepting, finishes the requests in flight (at most shutdown_timeout_s) and exits.
    drain_s: float = 1.0
    shutdown_timeout_s: float = 10.0  # on SIGTERM, after drain_s: how long the requests in flight get

    # Compute
    device: Literal["auto", "cpu", "cuda"] = "auto"  # encoder: CUDA where a GPU is present, else CPU
    encoder_threads: int = 0  # onnxruntime intra-op threads per process; 0: the cores shared among the workers
    encoder_spin: bool = False  # let onnxruntime's idle threads spin (see service/core/encode.py)
    search_threads: int = 1  # FAISS OpenMP threads: small batches gain nothing from more
    head_threads: int = 1  # torch threads for the head
    # Objects allocated, net, between two passes of the garbage collector over its young generation (Python's
    # default: 700). The objects of the requests in flight are alive at every pass: at 700 a pass came every few
    # dozen requests, walked them and promoted them (what the passes cost: rac_gc_cpu_seconds; docs/speed.md).
    # Above what is ever in flight at once, the passes are rare; cyclic garbage is still collected.
    gc_young_objects: int = Field(default=50_000, ge=1)

    # Micro-batching and back-pressure
    max_batch: int = 32  # images per encode/search/head batch
    # How long a batch, once it holds its first image, may wait for images still on their way to the queue
    # (admitted, in their cache lookup); it takes what is queued at once, and goes when nothing more is coming.
    max_wait_ms: float = 2.0
    # Batches running at once: more than 1 only where a batch mostly waits (a sharded memory's round trips to
    # its shards, on machines of their own); where the shards share the ingress's cores it costs throughput.
    batches_in_flight: int = Field(default=1, ge=1)
    max_pending: int = 256  # images admitted (decoding or queued) at once, per process; beyond: wait at the door
    # A request that finds its process full waits at the door (its body unread, first come first served) at most
    # this long, then is refused with 503 and Retry-After; 0: refused at once (docs/overload.md).
    max_queue_s: float = Field(default=2.0, ge=0)
    max_waiting: int = Field(default=1024, ge=0)  # requests waiting at the door at once, per process; beyond: 503
    # Request bodies held in memory at once by one process (being read or waiting for their answer); beyond:
    # 503 before the body is read. At least one largest batch request fits.
    max_body_bytes: int = 512 * 1024 * 1024

    # Input limits
    max_image_bytes: int = 8 * 1024 * 1024  # per image; the request limit adds multipart overhead
    max_pixels: int = 40_000_000  # width x height, checked before decoding (decompression bombs)
    max_batch_images: int = 32  # images in one /classify/batch request

    # Zero-shot classification (POST /classify/zero-shot, where the artifacts have zero-shot parts)
    zero_shot_template: str = "a photo of a {}."  # default prompt; a request may send its own `template`
    zero_shot_max_labels: int = 64  # candidate labels in one request
    zero_shot_max_label_chars: int = 100  # characters in one label

    # Neighbour cache: Redis when a URL is set (REDIS_URL or RAC_REDIS_URL), else in-process LRU
    # The Redis URL of the neighbour cache, shared by the server processes; unset: each keeps its own LRU.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("RAC_REDIS_URL", "REDIS_URL"))
    cache_ttl_s: int = 24 * 3600  # a cache entry's lifetime, in Redis and in the LRU alike
    cache_entries: int = 50_000  # in-process LRU size
    # Answers kept in each process (0: none): an image sent again skips the batch and the head as well.
    answer_cache_entries: int = 2048
    redis_timeout_ms: float = 50.0  # per operation: a slow Redis costs at most this, then is skipped
    redis_retry_s: float = 1.0  # after a Redis failure, go without it this long, then try again

    @field_validator("memories")
    @classmethod
    def _memories(cls, value: str | None) -> str | None:
        if value is not None:
            parse_memories(value)
        return value

    def named_memories(self) -> list[tuple[str, Path]]:
        """(name, path) of every memory served, the default first."""
        return parse_memories(self.memories) if self.memories else [("default", self.artifacts)]

    @property
    def processes(self) -> int:
        """How many server processes `python -m service` starts."""
        return self.workers or cores()

    @property
    def max_request_bytes(self) -> int:
        return self.max_batch_images * self.max_image_bytes + 64 * 1024

    def body_limit(self, many: bool) -> int:
        """The byte limit of one request body: a batch of images, or one image (with multipart overhead)."""
        return self.max_request_bytes if many else self.max_image_bytes + 64 * 1024

    @property
    def zero_shot_body_bytes(self) -> int:
        """The byte limit of a zero-shot request: one image and its candidate labels, with multipart overhead."""
        labels = self.zero_shot_max_labels * (4 * self.zero_shot_max_label_chars + 256)
        return self.max_image_bytes + 64 * 1024 + labels


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_memories(text: str) -> list[tuple[str, Path]]:
    """ "a=ROOT_A,b=ROOT_B" -> [("a", Path("ROOT_A")), ...]; ValueError naming what is wrong."""
    out: list[tuple[str, Path]] = []
    for part in text.split(","):
        name, eq, path = part.strip().partition("=")
        if not eq or not NAME.match(name) or not path.strip():
            raise ValueError(f"memory {part.strip()!r}: expected NAME=PATH, NAME of letters, digits, '.', '_', '-'")
        if name in dict(out):
            raise ValueError(f"memory {name!r} is named twice")
        out.append((name, Path(path.strip())))
    if not out:
        raise ValueError("no memory named")
    return out


def cores() -> int:
    """The CPUs this process may use: its affinity set (a container's cpuset), capped by a cgroup v2 CPU
    quota (`docker run --cpus`, a Kubernetes limit) where there is one."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, round(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n
