"""The published OpenAPI document says what the API does: schemathesis generates requests from it (valid and
invalid ones) against a real uvicorn server over the synthetic artifacts, and runs all its checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from loadtests.server import free_port
from service.app import create_app
from service.settings import Settings
from tests.conftest import wait_until
from tests.synthetic import png

pytestmark = pytest.mark.slow  # a uvicorn server, and a few hundred generated requests


@pytest.fixture(scope="module")
def base_url(synthetic_artifacts: Path) -> Iterator[str]:
    """The app in a uvicorn server on a free port, in a thread of this process."""
    port = free_port()
    app = create_app(Settings(artifacts=synthetic_artifacts, max_wait_ms=0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, "readyz")
    yield url
    server.should_exit = True
    thread.join(15)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_api_does_what_its_schema_says(base_url: str, mode: schemathesis.GenerationMode) -> None:
    """Every operation, with requests that fit the schema and with requests that do not: all checks pass."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    # Every published route: the classify API, the Open Inference Protocol, zero-shot, items and examples.
    assert {"/classify", "/v2/models/{model_name}/infer", "/items/{item_id}", "/info"} <= {op.path for op in operations}
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and not (len(op.query) or len(op.body)):
            continue  # nothing to get wrong

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            if mode == schemathesis.GenerationMode.POSITIVE:
                with_images(case)
            case.call_and_validate()

        try:
            check()
        except Unsatisfiable:  # no request can break this operation's schema (only free-form strings)
            assert mode == schemathesis.GenerationMode.NEGATIVE


def with_images(case: schemathesis.Case) -> None:
    """A schema can say "binary" but not "a PNG": the generated files of a valid request become images."""
    body: Any = case.body
    if isinstance(body, bytes):
        case.body = png(len(body))
    elif isinstance(body, dict):
        for field in ("image", "images"):
            value = body.get(field)
            if isinstance(value, list):
                body[field] = [png(len(v)) for v in value]
            elif value is not None:
                body[field] = png(len(value))


def test_the_schema_states_the_real_limits(base_url: str) -> None:
    doc = httpx.get(f"{base_url}/openapi.json").json()
    k = httpx.get(f"{base_url}/info").json()["index"]["k"]
    neighbors = next(p for p in doc["paths"]["/classify"]["post"]["parameters"] if p["name"] == "neighbors")
    assert neighbors["schema"]["maximum"] == k
    raw = {"content": png(1), "headers": {"content-type": "image/png"}}
    r = httpx.post(f"{base_url}/classify", params={"neighbors": k + 1}, **raw)  # type: ignore[arg-type]
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    r = httpx.post(f"{base_url}/classify", params={"top_k": "x"}, **raw)  # type: ignore[arg-type]
    assert r.status_code == 422 and r.json()["detail"].startswith("top_k: ")
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert httpx.get(f"{base_url}/metrics").headers["content-type"].startswith("text/plain")
