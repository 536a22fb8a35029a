"""A headless Chromium driven by Playwright, for the browser tests of the page.

Playwright cannot download its own browsers here, so it launches an installed Chromium
(Debian's ``chromium``; or the path in ``STEERSERVE_CHROMIUM``). Without a Chromium or the
``playwright`` package the browser tests are skipped — unless ``STEERSERVE_REQUIRE_BROWSER=1``
(set by ``.ci/run``), which makes that a failure. Screenshots go to ``.test-home/screenshots/``.

Test modules import the fixtures (``from tests.service.browser import browser, page, shots``) and the
few steps every test takes (open a view, wait for a generation, read what the page sent).
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import pytest

from tests.conftest import TEST_HOME

SCREENSHOTS = TEST_HOME / "screenshots"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    configured = os.environ.get("STEERSERVE_CHROMIUM")
    if configured:
        return configured if os.path.exists(configured) else None
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def _unavailable(reason: str):
    if os.environ.get("STEERSERVE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"STEERSERVE_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    executable = find_chromium()
    if executable is None:
        _unavailable("no Chromium found (apt-get install chromium, or set STEERSERVE_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture()
def shots():
    """``shots("name")`` → the path of a screenshot of this run."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return lambda name: str(SCREENSHOTS / f"{name}.png")


class Watcher:
    """What a page did: requests to other hosts, script errors, console errors."""

    def __init__(self, page, origin: str):
        self.origin, self.foreign, self.errors = origin, [], []
        page.on("request", self._request)
        page.on("pageerror", lambda err: self.errors.append(f"page error: {err}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))

    def _request(self, request) -> None:
        url = urlparse(request.url)
        if url.scheme in ("data", "blob", "about"):
            return
        if f"{url.scheme}://{url.netloc}" != self.origin:
            self.foreign.append(request.url)


@pytest.fixture()
def page(browser, server):
    """A fresh 1280×800 page; at the end, it must have loaded nothing from another host and raised
    no script error (console errors of refused requests are the test's business: see ``expected``)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    new_page = context.new_page()
    new_page.set_default_timeout(60_000)
    # assertions wait for what a user would see; on a loaded 2-core machine that can take seconds
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    origin = "{0.scheme}://{0.netloc}".format(urlparse(server))
    watcher = Watcher(new_page, origin)
    new_page.watcher = watcher
    yield new_page
    context.close()
    assert watcher.foreign == [], f"the page loaded from other hosts: {watcher.foreign}"
    unexpected = [e for e in watcher.errors if not e.startswith("console: Failed to load resource")]
    assert unexpected == [], unexpected


# --- what the tests do on a page ---------------------------------------------------------------------

def open_view(page, url: str, heading: str) -> None:
    """Go to ``url`` and wait for the view's heading."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()


def wait_generated(page) -> None:
    """Wait until both playground columns have finished (or failed)."""
    import re

    from playwright.sync_api import expect

    for column in ("baseline", "steered"):
        expect(page.get_by_test_id(column)).to_have_attribute("data-state", re.compile("done|error"))


def column_texts(page) -> dict:
    """The generated text each playground column shows, once done."""
    return {column: page.get_by_test_id(column).get_attribute("data-text") for column in ("baseline", "steered")}


def sent_generations(page) -> list:
    """Record the JSON bodies of the page's POSTs to /v1/generate (the playground's two streams)."""
    bodies = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/generate")
            and bodies.append(r.post_data_json))
    return bodies
