"""Drive headless Chromium from a test over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

No extra package: Chromium reads commands from its fd 3 and writes replies and events to its fd 4, as JSON
messages ending in a NUL byte. Enough of the protocol for the report's browser test: open a page, run
JavaScript, and move or click the real mouse at an element's centre (``Input.dispatchMouseEvent``, the
events a user's pointer makes, not a synthetic ``element.click()``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

#: Flags for Chromium as root in a container: no sandbox, no GPU, no first-run, update or sync traffic.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--disable-quic", "--host-resolver-rules=MAP * ~NOTFOUND")


APT_HINT = "apt-get update && apt-get install -y --no-install-recommends chromium"
REQUIRE_BROWSER = os.environ.get("EXPERTSCOPE_REQUIRE_BROWSER", "") not in ("", "0")


def find_chromium() -> str | None:
    """The headless browser: $EXPERTSCOPE_CHROMIUM, else chromium/chromium-browser on PATH."""
    explicit = os.environ.get("EXPERTSCOPE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> str:
    """Chromium's path; skips the test without it (fails under ``EXPERTSCOPE_REQUIRE_BROWSER=1``, as in CI)."""
    import pytest

    exe = find_chromium()
    if exe is None:
        reason = f"no chromium on PATH: the report's browser tests need it; install it with `{APT_HINT}`"
        if REQUIRE_BROWSER:
            pytest.fail(f"{reason} (EXPERTSCOPE_REQUIRE_BROWSER=1 makes this test mandatory)")
        pytest.skip(reason)
    return exe


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page. Use as a context manager; ``timeout`` bounds every wait."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0, size: tuple[int, int] = (1280, 900)):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium expects the pipe at fds 3 (its input) and 4 (its output): moved there in the child, via
        # copies above 9 so neither move overwrites the other's source.
        def move_fds() -> None:
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
               f"--window-size={size[0]},{size[1]}", "about:blank"]
        profile.mkdir(parents=True, exist_ok=True)
        self._log = profile / "chromium-stderr.log"  # a file, not a pipe: a full pipe would block Chromium
        with open(self._log, "wb") as log:
            # close_fds=False keeps the moved fds 3 and 4; Python's own fds are not inheritable (PEP 446).
            self.proc = subprocess.Popen(cmd, preexec_fn=move_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        self._events: list[dict[str, Any]] = []
        self.session: str | None = None

    # ----- the protocol ---------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no answer from Chromium in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    err = self._log.read_text(errors="replace")[-2000:]
                    raise BrowserError(f"Chromium closed the pipe: {err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command (to the page's session unless ``session=False``) and return its result."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev.get("method") == method:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    # ----- what a test needs ----------------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Open ``url`` in a new page and wait for its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression[:80]}: {res['exceptionDetails'].get('text')}"
                               f" {res['exceptionDetails'].get('exception', {}).get('description', '')}")
        return res["result"].get("value")

    def centre(self, selector: str) -> tuple[float, float]:
        """Scroll the first element matching ``selector`` into view; its centre in viewport coordinates."""
        box = self.eval(f"(function(){{var el=document.querySelector({json.dumps(selector)});"
                        "if(!el)return null;el.scrollIntoView({block:'center',inline:'center'});"
                        "var r=el.getBoundingClientRect();return [r.left+r.width/2,r.top+r.height/2];})()")
        if box is None:
            raise BrowserError(f"no element matches {selector}")
        return float(box[0]), float(box[1])

    def hover(self, selector: str) -> None:
        x, y = self.centre(selector)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, selector: str) -> None:
        x, y = self.centre(selector)
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):
            self.send("Browser.close", session=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
