"""The web console's browser tests: Playwright for Python driving the system Chromium (never
`playwright install`; `make chromium` installs Debian's package), against real broker processes.

Each `tab` collects the page's console errors and uncaught exceptions and fails the test if any
appeared, except HTTP error statuses the test said it provokes (Chromium logs every 4xx fetch as
a console error). Screenshots go to tests/console/artifacts/ (or $CONSOLE_ARTIFACTS).
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from broker.launcher import BrokerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("CONSOLE_ARTIFACTS") or Path(__file__).with_name("artifacts"))
WAIT_MS = 15_000   # how long an expectation waits for the page (not a timing assertion)
_HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium for one module's tests. Not session-wide: Playwright's sync API keeps its event
    loop marked running in this thread while it is open, and pytest-asyncio's tests of other
    modules cannot start their own loop then."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make chromium` installs it (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def console_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One RocksDB broker (in a temporary directory) for a module's tests."""
    proc = BrokerProcess(tmp_path_factory.mktemp("console-broker") / "data").start()
    yield proc
    proc.stop(30)


@dataclass
class Tab:
    """A browser tab on a broker's console, with what went wrong in it."""
    page: Any
    base: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    allowed_statuses: set[int] = field(default_factory=set)

    def open(self, route: str = "streams") -> Any:
        self.page.goto(f"{self.base}/console/#/{route}")
        return self.page

    def go(self, route: str) -> Any:
        self.page.evaluate("route => { location.hash = '#/' + route; }", route)
        return self.page

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def unexpected_errors(self) -> list[str]:
        out = []
        for text in self.errors:
            m = _HTTP_ERROR.search(text)
            if m is None or int(m.group(1)) not in self.allowed_statuses:
                out.append(text)
        return out


@pytest.fixture
def new_tab(browser: Any) -> Iterator[Any]:
    """new_tab(broker) -> a Tab in a fresh browser context (its own sessionStorage)."""
    contexts: list[Any] = []
    tabs: list[Tab] = []

    def make(proc: BrokerProcess, context: Any = None) -> Tab:
        if context is None:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(WAIT_MS)
            contexts.append(context)
        page = context.new_page()
        tab = Tab(page, proc.http_url)
        page.on("console", lambda msg: tab.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: tab.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda req: tab.requests.append(f"{req.method} {req.url}"))
        tabs.append(tab)
        return tab

    yield make
    try:
        for tab in tabs:
            assert tab.unexpected_errors() == [], "errors in the browser log"
    finally:
        for context in contexts:
            context.close()


def http(proc: BrokerProcess, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One JSON request to the broker: (status, decoded body or None)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(proc.http_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")
