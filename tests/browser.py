"""A real headless Chromium (Debian's `chromium` package), driven over its DevTools protocol.

No browser-automation dependency: Chromium serves the protocol on a WebSocket, and
`websockets` is ours already. Enough for the status page's tests: open a page, send
headers, read the DOM with JavaScript, collect console errors and uncaught exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

# The flags the machines' notes give for headless Chromium as root on a closed network:
# without the background-networking ones it keeps trying Google's hosts.
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-allow-origins=*",
)  # fmt: skip


def chromium_or_skip() -> str:
    """The Chromium executable, or the test is skipped saying how to get it."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("Chromium is not installed: `apt-get install chromium` (Debian) enables the browser tests; .ci/run installs it")


class Page:
    """One tab, attached in flat mode: its messages carry its session id."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.console_errors: list[str] = []
        self.loaded = asyncio.Event()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console_errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Page.loadEventFired":
            self.loaded.set()

    async def goto(self, url: str, headers: dict[str, str] | None = None) -> None:
        if headers:
            await self.send("Network.setExtraHTTPHeaders", headers=headers)
        self.loaded.clear()
        answer = await self.send("Page.navigate", url=url)
        assert "errorText" not in answer, answer
        await asyncio.wait_for(self.loaded.wait(), 10)

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    async def text_of(self, element_id: str) -> str | None:
        return await self.evaluate(f"document.getElementById({json.dumps(element_id)})?.textContent ?? null")

    async def until(self, holds: Callable[[str | None], bool], element_id: str, timeout: float = 10.0) -> str | None:
        """Wait until what the element shows satisfies `holds` (the page refreshes by itself)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not holds(shown := await self.text_of(element_id)):
            assert asyncio.get_running_loop().time() < deadline, f"#{element_id} shows {shown!r}"
            await asyncio.sleep(0.05)
        return shown

    async def until_text(self, element_id: str, expected: str, timeout: float = 10.0) -> None:
        await self.until(lambda shown: shown == expected, element_id, timeout)


class Browser:
    """The browser process and its DevTools connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    async def send(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        answer = self._waiting[message_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps(message))
        return await asyncio.wait_for(answer, 15)

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message:
                waiting = self._waiting.pop(message["id"], None)
                if waiting is not None and not waiting.done():
                    if "error" in message:
                        waiting.set_exception(AssertionError(f"DevTools: {message['error']}"))
                    else:
                        waiting.set_result(message.get("result", {}))
            elif (page := self._pages.get(message.get("sessionId", ""))) is not None:
                page.on_event(message["method"], message.get("params", {}))

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = self._pages[attached["sessionId"]] = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.send(f"{domain}.enable")
        return page


@contextlib.asynccontextmanager
async def headless_chromium() -> AsyncIterator[Browser]:
    """Chromium started for the test in a profile of its own, ended by its PID after."""
    executable = chromium_or_skip()
    profile = tempfile.mkdtemp(prefix="termrelay-chromium-")
    process = await asyncio.create_subprocess_exec(
        executable, *_FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = asyncio.get_running_loop().time() + 20
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            assert process.returncode is None, f"chromium exited with {process.returncode}"
            assert asyncio.get_running_loop().time() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()
        async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, compression=None) as ws:
            browser = Browser(ws)
            try:
                yield browser
            finally:
                browser._reader.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.send(json.dumps({"id": 0, "method": "Browser.close"})), 2)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # its own session: its helper processes too
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        shutil.rmtree(profile, ignore_errors=True)
