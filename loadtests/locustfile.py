"""Locust users with a realistic mix: mostly new images (cache misses), some repeated ones (hits), some batch
calls, and a few bad inputs that must be refused with a 4xx; three users in four speak POST /classify, one in
four the Open Inference Protocol through the unmodified tritonclient.http.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000      # web UI
    python -m loadtests.run --users 16 --duration 60                     # headless, checked (make load)
"""

from __future__ import annotations

import base64
import random
import time

import numpy as np
import tritonclient.http as th
from locust import FastHttpUser, User, between, task
from tritonclient.utils import InferenceServerException

from loadtests import multipart
from loadtests.images import pngs

FRESH = pngs()  # shared by every user of this process: no two requests send the same new image
POPULAR = [next(FRESH) for _ in range(20)]  # the repeated images: a few items everybody asks about
BAD = {"not an image": b"%PDF-1.4 this is not an image", "truncated": POPULAR[0][: len(POPULAR[0]) // 2], "empty": b""}


class Client(FastHttpUser):
    weight = 3
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


class V2Client(User):
    """POST /v2/models/rac/infer through tritonclient.http, whose geventhttpclient runs on locust's gevent as
    FastHttpUser's does. Each call is reported to locust's statistics as a request of type "v2"."""

    weight = 1
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        assert self.host is not None
        self.client = th.InferenceServerClient(self.host.split("://", 1)[-1], network_timeout=60)

    def on_stop(self) -> None:
        self.client.close()

    def _infer(self, name: str, images: list[bytes], binary: bool = True, refused: bool = False) -> None:
        """One inference; with refused=True it succeeds when the server answers 400 naming the image."""
        tensor = th.InferInput("IMAGE", [len(images)], "BYTES")
        elements = images if binary else [base64.b64encode(d) for d in images]  # JSON: base64 text
        tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("PROBABILITIES", "LABELS")]
        error: Exception | None = None
        t = time.perf_counter()
        try:
            result = self.client.infer("rac", [tensor], outputs=outputs, parameters={"top_k": 3})
            labels = result.as_numpy("LABELS")
            if refused:
                error = AssertionError("a bad image was not refused")
            elif labels is None or labels.shape != (len(images), 3):
                error = AssertionError(f"LABELS came back as {None if labels is None else labels.shape}")
        except InferenceServerException as e:
            if not (refused and e.status() == "400" and "IMAGE[0]" in (e.message() or "")):
                error = e
        self.environment.events.request.fire(
            request_type="v2",
            name=name,
            response_time=(time.perf_counter() - t) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

    @task(10)
    def new_image(self) -> None:
        self._infer("v2 infer new", [next(FRESH)])

    @task(3)
    def repeated_image_json(self) -> None:
        self._infer("v2 infer repeated (JSON)", [random.choice(POPULAR)], binary=False)

    @task(2)
    def batch(self) -> None:
        self._infer("v2 infer batch", [next(FRESH) for _ in range(4)])

    @task(1)
    def bad_input(self) -> None:
        kind = random.choice(list(BAD))
        self._infer(f"v2 infer bad: {kind}", [BAD[kind]], refused=True)
