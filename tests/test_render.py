"""The rendered book, read like a reader reads it: offline, in a real browser.

Builds the HTML from the notebooks' stored outputs (execution off, so it takes seconds) into a
temporary folder, opens every page of ``_toc.yml`` in headless Chromium with all network
access blocked (host names do not resolve: what an offline reader, or a reader whose CDN is
down, sees), waits for MathJax, and fails on:

* raw table syntax in the visible text (a Markdown table printed as a paragraph of pipes);
* math that MathJax did not typeset (``\\(``, ``\\[`` or ``$$`` left in the text, a math
  element without its ``mjx-container``, a TeX error);
* images that do not load (``naturalWidth`` 0, or a remote ``src``) and other page resources
  that fail to load offline;
* a Python traceback in a cell output;
* the Colab install cell shown on the page (it is tagged ``remove-cell``).

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it; ``make test`` installs
nothing system-wide): without it these tests are skipped. ``BRPG_CHROMIUM`` names another
Chromium/Chrome binary. The browser is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``), one browser for all pages, no extra Python package.

Machine: exact. The book is rendered from stored outputs; no number is computed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from brpg.book import tools as booktools

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 300
PAGE_TIMEOUT_S = 40

# JavaScript errors that do not change what a reader sees. sphinx-thebe 0.3 (pulled in by
# jupyter-book, unused here: no live-code button) writes its `const` settings script twice into
# every page; the second copy throws and the first one stands.
HARMLESS_JS_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)

RAW_TABLE = re.compile(r"\|\s*:?-{3,}:?\s*\||\|\s*[—–]+\s*\|")
RAW_MATH = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$")

# Runs in the page once it has loaded: waits for MathJax and the images, then reports.
PROBE_JS = r"""
(async () => {
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const mj = window.MathJax;
  const hasMathJax = !!(mj && mj.startup && mj.startup.promise);
  if (hasMathJax) await Promise.race([mj.startup.promise, wait(20000)]);
  const imgs = [...document.images];
  imgs.forEach((i) => { i.loading = "eager"; });
  await Promise.race([
    Promise.all(imgs.map((i) => i.complete ? null : new Promise((r) => {
      i.addEventListener("load", r); i.addEventListener("error", r);
    }))),
    wait(10000),
  ]);
  const main = document.querySelector("article.bd-article") || document.body;
  const short = (t) => t.replace(/\s+/g, " ").trim().slice(0, 100);
  const math = [...main.querySelectorAll(".math")];
  const report = {
    hasMathJax,
    mathElements: math.length,
    mjxContainers: main.querySelectorAll("mjx-container").length,
    untypeset: math.filter((e) => !e.querySelector("mjx-container")).map((e) => short(e.textContent)),
    texErrors: [...main.querySelectorAll("mjx-merror")].map(
      (e) => short(e.getAttribute("data-mjx-error") || e.textContent)),
    images: imgs.map((i) => ({
      src: i.getAttribute("src"), url: i.currentSrc || i.src, width: i.naturalWidth,
      complete: i.complete,
    })),
    tracebacks: [...main.querySelectorAll(".cell_output")]
      .filter((e) => /Traceback \(most recent call last\)/.test(e.textContent)
        || e.querySelector(".traceback"))
      .map((e) => short(e.textContent)),
    installCellShown: main.innerText.includes("INSTALL_URL"),
  };
  // The visible prose: what is left once code, scripts and typeset math are taken out.
  main.querySelectorAll("pre, code, script, style, mjx-container").forEach((e) => e.remove());
  report.text = main.innerText;
  return report;
})()
"""


def _chromium() -> str | None:
    if exe := os.environ.get("BRPG_CHROMIUM"):
        return shutil.which(exe) or pytest.fail(f"BRPG_CHROMIUM={exe} is not an executable")
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def _pages() -> list[str]:
    """Every page of ``_toc.yml``, as its document name (``book/02_mean_teacher``)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [c["file"] for c in part["chapters"]]
    return pages


PAGES = _pages()


class Chromium:
    """Headless Chromium driven over the DevTools protocol: commands on fd 3, replies on fd 4,
    each a JSON message ending in a NUL byte."""

    def __init__(self, exe: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child: its pipe ends on fds 3 and 4
            r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [
            exe,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-pipe",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no host name resolves
            f"--user-data-dir={profile}",
            "--window-size=1400,2400",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,
            close_fds=False,  # fds 3/4 are inherited; os.pipe()'s own fds are not inheritable
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=self.session)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)

    def _read(self, deadline: float) -> dict | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select(
                [self._from_chrome], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (rc {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = PAGE_TIMEOUT_S,
    ) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_chrome, data) :]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply is None:
                raise TimeoutError(f"chromium: no answer to {method} in {timeout} s")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = PAGE_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            msg = self._read(deadline)
            if msg is None:
                raise TimeoutError(f"chromium: no {event} in {timeout} s")
            self.events.append(msg)

    def read_page(self, url: str) -> dict:
        """Open ``url``, run ``PROBE_JS`` in it; its report plus resources that failed."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, self.session)
        self.wait_for("Page.loadEventFired")
        res = self.call(
            "Runtime.evaluate",
            {"expression": PROBE_JS, "awaitPromise": True, "returnByValue": True},
            self.session,
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"probe failed on {url}: {res['exceptionDetails']}")
        report = res["result"]["value"]
        urls = {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        }
        report["failed"] = [
            f"{urls.get(e['params']['requestId'], '?')} ({e['params'].get('errorText')})"
            for e in self.events
            if e.get("method") == "Network.loadingFailed" and not e["params"].get("canceled")
        ]
        report["jsErrors"] = [
            e["params"]["exceptionDetails"].get("exception", {}).get("description")
            or e["params"]["exceptionDetails"].get("text")
            for e in self.events
            if e.get("method") == "Runtime.exceptionThrown"
        ]
        return report


def page_problems(report: dict) -> list[str]:
    """What a reader would see wrong on a page, from ``Chromium.read_page``'s report."""
    out = []
    text = report["text"]
    for m in RAW_TABLE.finditer(text):
        ctx = text[max(0, m.start() - 60) : m.end() + 20].replace("\n", " ")
        out.append(f"raw table syntax in the text: ...{ctx}...")
        break
    for m in RAW_MATH.finditer(text):
        ctx = text[max(0, m.start() - 40) : m.end() + 40].replace("\n", " ")
        out.append(f"raw math in the text: ...{ctx}...")
        break
    if report["untypeset"]:
        out.append(
            f"{len(report['untypeset'])} of {report['mathElements']} math elements not typeset"
            f" (MathJax loaded: {report['hasMathJax']}), e.g. {report['untypeset'][0]}"
        )
    if report["mathElements"] and not report["mjxContainers"]:
        out.append("the page has math but no mjx-container: MathJax typeset nothing")
    out += [f"TeX error: {e}" for e in report["texErrors"]]
    for img in report["images"]:
        if not img["url"].startswith("file:"):
            out.append(f"remote image (an offline reader sees nothing): {img['src']}")
        elif not img["width"]:
            out.append(f"image does not load: {img['src']}")
    out += [f"resource failed to load: {f}" for f in report["failed"]]
    out += [
        f"JavaScript error: {e}"
        for e in report["jsErrors"]
        if not any(h in str(e) for h in HARMLESS_JS_ERRORS)
    ]
    out += [f"Python traceback in an output: {t}" for t in report["tracebacks"]]
    if report["installCellShown"]:
        out.append("the Colab install cell is shown (tag it remove-cell)")
    return out


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The book built from the stored outputs (execution off), in a temporary folder."""
    tmp = tmp_path_factory.mktemp("book")
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    cfg["execute"]["execute_notebooks"] = "off"
    (tmp / "_config.yml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-c",
        "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
        "build",
        str(ROOT),
        "--config",
        str(tmp / "_config.yml"),
        "--path-output",
        str(tmp),
        "-W",
        "-n",
        "--keep-going",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if run.returncode:
        pytest.fail(
            f"jupyter-book build failed (rc {run.returncode}):\n{(run.stdout + run.stderr)[-4000:]}"
        )
    return tmp / "_build" / "html"


@pytest.fixture(scope="module")
def reports(request, tmp_path_factory) -> dict[str, dict]:
    """Every page's report, read in one headless Chromium."""
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "Chromium is not installed (apt-get install chromium, or set BRPG_CHROMIUM):"
            " the rendered pages are not checked"
        )
    html = request.getfixturevalue("html")
    browser = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    try:
        return {
            page: browser.read_page((html / f"{page}.html").as_uri())
            for page in PAGES
            if (html / f"{page}.html").exists()
        }
    finally:
        browser.close()


def test_mathjax_is_local():
    """The build serves MathJax from the repository, not from a CDN (``make mathjax``)."""
    local = ROOT / booktools.VENDOR_DIR / booktools.MATHJAX_LOCAL
    assert local.is_file(), f"{local.relative_to(ROOT)} is missing: run `make mathjax`"


def test_mathjax_path_in_pages(html):
    page = (html / "book" / "02_mean_teacher.html").read_text()
    assert "../_static/mathjax/tex-mml-chtml.js" in page, "the page does not load the local MathJax"
    assert "cdn.jsdelivr.net" not in page


@pytest.mark.parametrize("page", PAGES)
def test_page_reads_right(page, reports):
    assert page in reports, f"{page}.html was not built"
    found = page_problems(reports[page])
    assert not found, f"{page}.html, as an offline reader sees it:\n  " + "\n  ".join(found)
