"""A headless Chromium driven over the DevTools protocol on a pipe (no extra packages).

`--dump-dom` cannot read a running workflow's page: the UI keeps a long poll open, and virtual time stands
still while a fetch is pending. Here the test reads the page's text until it shows what it waits for.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    def __init__(self, executable: str, profile: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def as_fd_3_and_4() -> None:  # --remote-debugging-pipe reads fd 3 and writes fd 4
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=as_fd_3_and_4, pass_fds=(3, 4))
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if not select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"chromium did not answer {method} in {timeout}s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buffer += chunk

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def text(self, page: str) -> str:
        """Every text node of the page, iframes included (the UI renders markdown details in one)."""
        root = self.call("DOM.getDocument", {"depth": -1, "pierce": True}, session=page)["root"]
        texts, stack = [], [root]
        while stack:
            node = stack.pop()
            if node.get("nodeType") == 3:
                texts.append(node.get("nodeValue", ""))
            stack.extend(reversed([*node.get("children", []), *filter(None, [node.get("contentDocument")]),
                                   *node.get("shadowRoots", [])]))
        return " ".join(" ".join(texts).split())

    def wait_for_text(self, page: str, wanted: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(page)
            if wanted in text or time.monotonic() > deadline:
                return text
            time.sleep(0.3)

    def screenshot(self, page: str, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session=page)["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)
