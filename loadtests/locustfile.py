"""Locust users with a realistic mix: mostly new images (cache misses), some repeated ones (hits), some batch
calls, and a few bad inputs that must be refused with a 4xx.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000      # web UI
    python -m loadtests.run --users 16 --duration 60                     # headless, checked (make load)
"""

from __future__ import annotations

import random

from locust import FastHttpUser, between, task

from loadtests import multipart
from loadtests.images import pngs

FRESH = pngs()  # shared by every user of this process: no two requests send the same new image
POPULAR = [next(FRESH) for _ in range(20)]  # the repeated images: a few items everybody asks about
BAD = {"not an image": b"%PDF-1.4 this is not an image", "truncated": POPULAR[0][: len(POPULAR[0]) // 2], "empty": b""}


class Client(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def _post(self, path: str, parts: list[tuple[str, bytes]], name: str, **params: int):  # type: ignore[no-untyped-def]
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.client.post(
            f"{path}?{query}" if query else path,
            data=multipart.encode(parts),  # type: ignore[arg-type]  # bytes go out as they are
            name=name,
            headers={"Content-Type": multipart.CONTENT_TYPE},
            catch_response=True,
        )

    def _classify(self, data: bytes, name: str, **params: int) -> None:
        with self._post("/classify", [("image", data)], name, **params) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif not r.json().get("predictions"):
                r.failure("no predictions")

    @task(14)
    def new_image(self) -> None:
        self._classify(next(FRESH), "/classify new", top_k=3)

    @task(3)
    def repeated_image(self) -> None:
        self._classify(random.choice(POPULAR), "/classify repeated", top_k=3, neighbors=5)

    @task(2)
    def batch(self) -> None:
        with self._post("/classify/batch", [("images", next(FRESH)) for _ in range(4)], "/classify/batch") as r:
            if r.status_code != 200 or [e["status"] for e in r.json()["results"]] != [200] * 4:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def bad_input(self) -> None:
        """A bad request succeeds when it is refused with a 4xx and a message, fails otherwise."""
        kind = random.choice(list(BAD))
        with self._post("/classify", [("image", BAD[kind])], f"/classify bad: {kind}") as r:
            if 400 <= r.status_code < 500 and r.json().get("detail"):
                r.success()
            else:
                r.failure(f"expected a 4xx with a message, got {r.status_code}")
