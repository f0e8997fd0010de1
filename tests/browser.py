"""Debian's chromium driven by Playwright, for the tests of the page (tests/test_page_browser.py, and the page
against the Ray ingress in tests/test_ray.py). Chromium comes from `make browser` (apt, as root); without it
those tests skip, except in CI (CI=true or RAC_REQUIRE_BROWSER=1), where they fail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, unavailable

RESULTS = ROOT / "results"
CHROMIUM = Path("/usr/bin/chromium")
# Headless and quiet: no GPU, no sandbox (root in CI), nothing fetched from the network by the browser itself.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
WAIT_MS = 30_000

THUMBS_LOADED = """n => {
  const imgs = [...document.querySelectorAll('#neighbor-grid img.thumb')];
  return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


def chromium() -> Iterator[Any]:
    """A headless chromium for the module's tests (the `browser` fixture of tests/conftest.py)."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed: pip install -e '.[dev]'"
    if why is None and not CHROMIUM.exists():
        why = f"no {CHROMIUM}: `make browser` installs Debian's chromium (as root)"
    if why is not None:
        unavailable(why, "RAC_REQUIRE_BROWSER")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def open_page(browser: Any, url: str, starting: int = 0, **context: Any) -> tuple[Any, list[str]]:
    """A fresh page on `url`, once it shows what is served; with the script errors it raises, if any.
    starting: answer the page's first `starting` /info requests with the 503 of a service still loading."""
    page = browser.new_context(**context).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    refused: list[int] = []

    def info(route: Any) -> None:
        if len(refused) < starting:
            refused.append(1)
            route.fulfill(status=503, headers={"Retry-After": "1"}, body='{"detail": "not ready"}')
        else:
            route.continue_()

    page.route("**/info", info)
    page.goto(f"{url}/")
    page.wait_for_function("document.querySelectorAll('#examples button').length > 0", timeout=WAIT_MS)
    return page, errors
