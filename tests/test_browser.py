"""The built book in a real browser, offline: headless Chromium (the Debian ``chromium`` package), with every
host but this one unreachable, opens a few pages and checks that the bundled MathJax typeset the math (no
raw TeX left in the visible text, no TeX errors), that every image loaded, and that the console shows no
errors (a page that fetched anything from a CDN would log one); and, on those pages and every other chapter,
that no display formula is wider than the text column.

Chromium is driven through its DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and
4), so the test needs no client library and opens no port. Where Chromium is missing, the test installs it
when it runs as root with apt-get (CI), and skips otherwise, saying why."""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

# The pages opened: the intro, the overview's generated table, a LoRA-family chapter, a mixture chapter with
# much display math, and the bibliography. The number says how many typeset formulas the page must have.
PAGES = {"book/intro.html": 0, "book/chapters/overview.html": 10, "book/chapters/lora.html": 10,
         "book/chapters/mixlora.html": 10, "book/references.html": 0}

# Network off: every host name resolves to nothing, and what still tries goes to a closed proxy port.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
                  "--mute-audio", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,900", "--remote-debugging-pipe"]

# Runs in the page once it has loaded: waits for MathJax and the images, then reports what the test checks.
PAGE_REPORT = r"""
(async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  await Promise.all(Array.from(document.images).map(img => img.decode().catch(() => null)));
  const skip = "pre, code, script, style, mjx-container, textarea";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip) || parent.getClientRects().length === 0) continue;
    for (const mark of ["\\(", "\\[", "$$"]) {
      if (node.textContent.includes(mark)) raw.push(node.textContent.trim().slice(0, 80));
    }
  }
  return {
    mathjax: Boolean(window.MathJax && MathJax.version),
    typeset: document.querySelectorAll("mjx-container").length,
    tex_errors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.getAttribute("data-mjx-error")),
    raw_tex: raw,
    images: document.images.length,
    broken_images: Array.from(document.images).filter(img => !(img.complete && img.naturalWidth > 0))
                        .map(img => img.src.slice(-80)),
    // display formulas wider than the article column: the reader would have to scroll them sideways
    wide_math: Array.from(document.querySelectorAll('mjx-container[display="true"]'))
                    .filter(m => m.scrollWidth > m.closest("article, main").clientWidth + 1)
                    .map(m => `${m.scrollWidth} px: ${m.textContent.slice(0, 60)}`),
  };
})()
"""


class DevTools:
    """A minimal DevTools-protocol client for one Chromium process over ``--remote-debugging-pipe``: JSON
    messages, each ended by a NUL byte; Chromium reads commands on fd 3 and writes replies and events on fd 4."""

    def __init__(self, binary: str, profile: Path) -> None:
        commands_r, self.commands = os.pipe()
        self.replies, replies_w = os.pipe()

        def on_fds_3_and_4() -> None:  # in the child, before exec
            for fd, target in ((os.dup(commands_r), 3), (os.dup(replies_w), 4)):
                os.dup2(fd, target)
                os.set_inheritable(target, True)

        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=on_fds_3_and_4)
        os.close(commands_r)
        os.close(replies_w)
        self.buffer, self.events, self.next_id = b"", [], 0

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.commands)
        os.close(self.replies)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") != self.next_id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            else:
                return reply["result"]

    def wait_for(self, method: str, session: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._receive(deadline))

    def console_errors(self, session: str) -> list[str]:
        """Errors of the page: console.error calls, uncaught exceptions, failed loads and other log errors."""
        errors = []
        for event in (e for e in self.events if e.get("sessionId") == session):
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description", details.get("text", "")))
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}".strip())
        return errors

    def open(self, url: str) -> tuple[dict[str, Any], list[str]]:
        """Load ``url`` in a new tab; the page's report (``PAGE_REPORT``) and its console errors."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        result = self.send("Runtime.evaluate", {"expression": PAGE_REPORT, "awaitPromise": True,
                                                "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"the page report failed on {url}: {result['exceptionDetails']}")
        time.sleep(0.5)  # late console messages (a font or script that failed after load)
        self.send("Runtime.evaluate", {"expression": "1"}, session)  # collects the events queued meanwhile
        self.send("Target.closeTarget", {"targetId": target})
        return result["result"]["value"], self.console_errors(session)


def chromium_binary() -> str:
    """The Chromium executable: installed with apt-get when missing and running as root (CI), else a skip."""
    binary = shutil.which("chromium")
    if binary:
        return binary
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed (Debian package `chromium`), and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode:
            pytest.skip(f"Chromium is not installed and `{' '.join(command)}` failed: {proc.stderr[-500:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium, but it is not on PATH")


@pytest.fixture(scope="session")
def chromium() -> str:
    return chromium_binary()


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    devtools = DevTools(chromium, tmp_path_factory.mktemp("chromium-profile"))
    yield devtools
    devtools.close()


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline(chromium, built_book, browser, page):
    assert built_book.returncode == 0, built_book.log
    report, errors = browser.open((built_book.html / page).as_uri())
    if PAGES[page]:  # Sphinx adds MathJax to the pages that have math
        assert report["mathjax"], "MathJax did not load"
    assert report["typeset"] >= PAGES[page], report
    assert not report["raw_tex"], f"raw TeX in the visible text: {report['raw_tex']}"
    assert not report["tex_errors"], f"TeX errors: {report['tex_errors']}"
    assert not report["broken_images"], f"images that did not load: {report['broken_images']}"
    assert not errors, f"console errors: {errors}"
    assert not report["wide_math"], f"display math wider than the column: {report['wide_math']}"


# The other chapters (PAGES' are checked above), at the window size above: no display formula is wider than
# the text column.
CHAPTERS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")
                  if f"book/chapters/{p.stem}.html" not in PAGES)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_display_math_fits_the_column(chapter, built_book, browser):
    assert built_book.returncode == 0, built_book.log
    report, _ = browser.open((built_book.html / "book" / "chapters" / f"{chapter}.html").as_uri())
    assert not report["wide_math"], f"display math wider than the column: {report['wide_math']}"
