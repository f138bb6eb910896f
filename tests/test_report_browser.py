"""The report in a real browser: Debian's headless Chromium opens it from file://.

Chromium is driven over the Chrome DevTools Protocol (a websocket to the page
target). The test checks what only a browser can: no request leaves the file,
no console error, every image decodes, the Content-Security-Policy blocks a
remote load, and markup in slice names stays text. Screenshots go to
``artifacts/`` (git-ignored) for a person to look at.

Chromium comes from ``scripts/install_browser.sh``; without it this test fails
and says so, it never passes silently.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket
from report_fixtures import HOSTILE, hostile_results, make_audit

from audit.report import write_report

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]
WIDTH = 1280
START_SECONDS = 60
LOAD_SECONDS = 60
SCREENSHOTS = {
    "top": "body",
    "slices": "#slices",
    "charts": "#charts",
    "maps": "#maps",
    "examples": "#examples",
    "method": "#method",
}
NO_CHROMIUM = (
    "Chromium is not installed, so the report cannot be checked in a browser. "
    "Run scripts/install_browser.sh (Debian: apt-get install chromium), or set "
    "AUDIT_CHROMIUM to a Chromium binary."
)
PAGE_FACTS = """(() => {
  const images = [...document.images];
  const describe = (el) => el.outerHTML.slice(0, 120);
  return {
    lang: document.documentElement.lang,
    csp: (document.querySelector('meta[http-equiv="Content-Security-Policy"]')
          || {content: ""}).content,
    scripts: document.scripts.length,
    images: images.length,
    without_alt: images.filter((i) => !(i.getAttribute("alt") || "").trim())
                       .map(describe),
    not_decoded: images.filter((i) => !i.complete || i.naturalWidth === 0)
                       .map(describe),
    tables: document.querySelectorAll("table").length,
    tables_without_headers: [...document.querySelectorAll("table")]
        .filter((t) => !t.querySelector("th")).map(describe),
    headers_without_scope: [...document.querySelectorAll("th")]
        .filter((th) => !["col", "row", "colgroup", "rowgroup"]
                        .includes(th.getAttribute("scope"))).map(describe),
    broken_anchors: [...document.querySelectorAll('a[href^="#"]')]
        .map((a) => a.getAttribute("href").slice(1))
        .filter((id) => !document.getElementById(id)),
    text: document.body.innerText,
  };
})()"""


class DevToolsPage:
    """One page target of a running Chromium, spoken to over CDP."""

    def __init__(self, websocket_url: str):
        self._socket = websocket.create_connection(
            websocket_url, timeout=LOAD_SECONDS, suppress_origin=True
        )
        self._next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(
            json.dumps({"id": message_id, "method": method, "params": params})
        )
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not any(e["method"] == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {seconds} s")
            message = json.loads(self._socket.recv())
            if "method" in message:
                self.events.append(message)

    def settle(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds``."""
        self._socket.settimeout(0.2)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                try:
                    message = json.loads(self._socket.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if "method" in message:
                    self.events.append(message)
        finally:
            self._socket.settimeout(LOAD_SECONDS)

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", LOAD_SECONDS)
        self.settle(1.0)

    def screenshot(self, path: Path, selector: str, height: int) -> None:
        """A ``WIDTH`` x ``height`` picture of the page from ``selector``'s top."""
        top = self.evaluate(
            f"document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect().top + window.scrollY"
        )
        shot = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": top, "width": WIDTH, "height": height, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self._socket.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A page in a fresh headless Chromium, closed with the browser afterwards."""
    binary = os.environ.get("AUDIT_CHROMIUM") or shutil.which("chromium")
    if not binary:
        pytest.fail(NO_CHROMIUM, pytrace=False)
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port = _devtools_port(profile, process)
        session = DevToolsPage(_page_websocket(port))
        for domain in ("Page", "Network", "Runtime", "Log"):
            session.call(f"{domain}.enable")
        session.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        yield session
        session.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def realistic_report(tmp_path_factory):
    results, arrays = make_audit()
    return write_report(tmp_path_factory.mktemp("run"), results, arrays)


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    results, arrays = hostile_results(*make_audit(n_slices_hint=10))
    return write_report(tmp_path_factory.mktemp("hostile-run"), results, arrays)


def test_report_opens_offline_without_errors(page, realistic_report):
    url = realistic_report.as_uri()
    page.open(url)

    requested = _requested(page.events)
    assert url in requested, "the page's own load was not seen: is Network on?"
    assert [u for u in requested if u != url and not u.startswith("data:")] == []
    assert _errors(page.events) == []
    facts = page.evaluate(PAGE_FACTS)
    assert facts["lang"] == "en"
    assert "default-src 'none'" in facts["csp"]
    assert facts["scripts"] == 0
    assert facts["images"] > 500
    assert facts["without_alt"] == []
    assert facts["not_decoded"] == []
    assert facts["tables"] >= 5
    assert facts["tables_without_headers"] == []
    assert facts["headers_without_scope"] == []
    assert facts["broken_anchors"] == []
    assert "too few to judge (n = 24)" in facts["text"]

    ARTIFACTS.mkdir(exist_ok=True)
    for name, selector in SCREENSHOTS.items():
        page.screenshot(ARTIFACTS / f"report_{name}.png", selector, 1600)
        assert (ARTIFACTS / f"report_{name}.png").stat().st_size > 20_000


def test_content_security_policy_blocks_remote_loads(page, realistic_report):
    url = realistic_report.as_uri()
    page.open(url)
    remote = "http://127.0.0.1:9/probe.png"

    probe = f"Object.assign(new Image(), {{src: {json.dumps(remote)}}})"
    page.evaluate(f"document.body.append({probe})")
    page.settle(1.0)

    sent = {
        e["params"]["requestId"]: e["params"]["request"]["url"]
        for e in page.events
        if e["method"] == "Network.requestWillBeSent"
    }
    blocked = {
        e["params"]["requestId"]
        for e in page.events
        if e["method"] == "Network.loadingFailed"
        and e["params"].get("blockedReason") == "csp"
    }
    assert all(rid in blocked for rid, u in sent.items() if u == remote)
    assert any("Content Security Policy" in text for text in _errors(page.events))


def test_markup_in_data_shows_as_text(page, hostile_report):
    page.open(hostile_report.as_uri())

    assert not any(e["method"] == "Page.javascriptDialogOpening" for e in page.events)
    assert _errors(page.events) == []
    facts = page.evaluate(PAGE_FACTS)
    assert facts["scripts"] == 0
    assert HOSTILE in facts["text"]
    assert facts["without_alt"] == []


def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Chromium exited with code {process.returncode} at start")
        if marker.is_file():
            lines = marker.read_text().split()
            if lines:
                return int(lines[0])
        time.sleep(0.1)
    pytest.fail(f"Chromium did not open its DevTools port within {START_SECONDS} s")


def _page_websocket(port: int) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        targets = json.load(response)
    pages = [t for t in targets if t.get("type") == "page"]
    assert pages, f"Chromium listed no page target: {targets}"
    return pages[0]["webSocketDebuggerUrl"]


def _requested(events: list[dict]) -> list[str]:
    return [
        e["params"]["request"]["url"]
        for e in events
        if e["method"] == "Network.requestWillBeSent"
    ]


def _errors(events: list[dict]) -> list[str]:
    texts = []
    for e in events:
        params = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            texts.append(json.dumps(params.get("exceptionDetails", {}))[:300])
        elif e["method"] == "Runtime.consoleAPICalled" and params.get("type") in (
            "error",
            "assert",
        ):
            texts.append(json.dumps(params.get("args", []))[:300])
        elif e["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
            texts.append(params["entry"].get("text", ""))
    return texts
