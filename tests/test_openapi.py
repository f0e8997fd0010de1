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
from service.auth import add_key
from service.settings import Settings
from tests.helpers import wait_until
from tests.synthetic import png

pytestmark = pytest.mark.slow  # a uvicorn server, and a few hundred generated requests


@pytest.fixture(scope="module", params=["open", "keys"])
def served(
    request: pytest.FixtureRequest, synthetic_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """The app in a uvicorn server on a free port, in a thread of this process: open, and with API keys (the
    requests then carry an admin key); its base URL and the headers a request sends."""
    port = free_port()
    keys, headers = None, {}
    if request.param == "keys":
        keys = tmp_path_factory.mktemp("keys") / "keys.json"
        headers = {"Authorization": f"Bearer {add_key(keys, 'tester', 'admin', None)}"}
    app = create_app(Settings(artifacts=synthetic_artifacts, max_wait_ms=0, api_keys=keys))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, "readyz")
    yield url, headers
    server.should_exit = True
    thread.join(15)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_api_does_what_its_schema_says(
    served: tuple[str, dict[str, str]], mode: schemathesis.GenerationMode
) -> None:
    """Every operation, with requests that fit the schema and with requests that do not: all checks pass."""
    base_url, headers = served
    if headers and mode == schemathesis.GenerationMode.NEGATIVE:
        # Negative cases include ones that break the security scheme, which a key supplied to every request
        # would mend; the refusals without a key, or with another tenant's, are tests/test_tenancy.py's.
        pytest.skip("negative cases run against the open server")
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=dict(headers))
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
            # A copy: schemathesis adds to the dict it is given. A negative case that breaks the security
            # scheme carries its own (bad) Authorization: it is sent as generated.
            given = (
                {}
                if mode == schemathesis.GenerationMode.NEGATIVE and "Authorization" in (case.headers or {})
                else headers
            )
            case.call_and_validate(headers=dict(given))

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


def test_the_schema_states_the_real_limits(served: tuple[str, dict[str, str]]) -> None:
    base_url, headers = served
    doc = httpx.get(f"{base_url}/openapi.json", headers=headers).json()
    k = httpx.get(f"{base_url}/info", headers=headers).json()["index"]["k"]
    neighbors = next(p for p in doc["paths"]["/classify"]["post"]["parameters"] if p["name"] == "neighbors")
    assert neighbors["schema"]["maximum"] == k
    raw = {"content": png(1), "headers": {"content-type": "image/png", **headers}}
    r = httpx.post(f"{base_url}/classify", params={"neighbors": k + 1}, **raw)  # type: ignore[arg-type]
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    r = httpx.post(f"{base_url}/classify", params={"top_k": "x"}, **raw)  # type: ignore[arg-type]
    assert r.status_code == 422 and r.json()["detail"].startswith("top_k: ")
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert httpx.get(f"{base_url}/metrics", headers=headers).headers["content-type"].startswith("text/plain")
    if headers:
        assert doc["security"] == [{"bearer": []}] and httpx.get(f"{base_url}/info").status_code == 401


def test_an_empty_image_is_outside_the_schema_and_refused(served: tuple[str, dict[str, str]]) -> None:
    """The schema and the service agree: an image has at least one byte, and an empty one is a 400."""
    base_url, headers = served
    doc = httpx.get(f"{base_url}/openapi.json", headers=headers).json()
    classify = doc["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert classify["multipart/form-data"]["schema"]["properties"]["image"]["minLength"] == 1
    assert classify["image/png"]["schema"]["minLength"] == 1
    batch = doc["paths"]["/classify/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "minLength" not in batch["properties"]["images"]["items"]  # an empty one fails its own entry only
    r = httpx.post(f"{base_url}/classify/batch", files=[("images", ("x.png", b"", "image/png"))], headers=headers)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == 400
    zero_shot = doc["paths"]["/classify/zero-shot"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert zero_shot["schema"]["properties"]["image"]["minLength"] == 1
    r = httpx.post(f"{base_url}/classify", files={"image": ("x.png", b"", "image/png")}, headers=headers)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = httpx.post(f"{base_url}/classify", content=b"", headers={"content-type": "image/png", **headers})
    assert r.status_code == 400
