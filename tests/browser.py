"""Headless Chromium for tests, driven over the DevTools protocol on a pipe (stdlib only).

Needs the Debian package ``chromium`` (``make sysdeps``); the ``chromium`` fixture in
``conftest.py`` skips with the reason otherwise. Chromium reads NUL-separated JSON commands
on fd 3 and writes replies on fd 4 (``--remote-debugging-pipe``), so no Python dependency is needed.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with ``start_new_session=True`` and all its children."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children (uvicorn workers) may outlive the leader for a moment: take the group down.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (stdlib only)."""

    def __init__(self, exe: str, profile: Path, log: Path, size: tuple[int, int] = (1600, 1000)):
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        # Chromium reads commands from fd 3 and writes replies to fd 4; hand it our pipe ends
        # there (moved above 10 first, so the redirections cannot clash).
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(res_w)
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        redirect = f"3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-"
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" {redirect}', "chromium", *args],
                pass_fds=(child_r, child_w),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(child_r)
        os.close(child_w)
        self._out, self._in = cmd_w, res_r
        self._buf = b""
        self._id = 0
        self.session: str | None = None
        try:
            targets = self.send("Target.getTargets", browser=True)["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self.session = self.send(
                "Target.attachToTarget",
                {"targetId": page["targetId"], "flatten": True},
                browser=True,
            )["sessionId"]
        except BaseException:
            self.close()
            raise

    def send(
        self, method: str, params: dict | None = None, timeout: float = 30, browser: bool = False
    ) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # replies and events interleave; keep ours, drop the events
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout}s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe (crashed?)")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the page may be navigating
                value = self.js(expression)
                if value:
                    return value
            time.sleep(0.3)
        raise TimeoutError(f"page never showed {what or expression} within {timeout}s")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def click(self, element_js: str) -> bool:
        """Click the element an expression finds; False when there is none."""
        return bool(
            self.js(f"(() => {{ const e = {element_js}; if (e) e.click(); return !!e; }})()")
        )

    def click_text(self, text: str, selector: str = "button") -> bool:
        return self.click(
            f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)})"
        )

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", browser=True, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        kill_group(self.proc, timeout=5)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
