"""A TCP proxy in front of a nats-server that can hold back what the server sends to some
clients, or refuse them: a connection whose reader has fallen behind (its server-side
buffer filling, its answers late), or a client that cannot reach the server, without
touching the client library.

Clients are told apart by the `name` in their CONNECT (the first thing a NATS client sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass(eq=False)
class ProxiedClient:
    name: str = ""
    # Set while what the server sends to this client is passed on; cleared, it waits.
    passing: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None


class NatsProxy:
    """`url` leads to the server; `hold_back(matches)` stops what the server sends to the
    clients whose name matches (new ones too) until `release()`; `refuse(matches)` closes
    them and every later one whose name matches."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 4222)
        self._server: asyncio.Server | None = None
        self.clients: list[ProxiedClient] = []
        self._held: Callable[[str], bool] = lambda name: False
        self._refused: Callable[[str], bool] = lambda name: False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"nats://{host}:{port}"

    def hold_back(self, matches: Callable[[str], bool]) -> None:
        self._held = matches
        for client in self.clients:
            if matches(client.name):
                client.passing.clear()

    def release(self) -> None:
        self._held = lambda name: False
        for client in self.clients:
            client.passing.set()

    def refuse(self, matches: Callable[[str], bool]) -> None:
        self._refused = matches
        for client in self.clients:
            if matches(client.name) and client.writer is not None:
                client.writer.transport.abort()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in self.clients:
            if client.writer is not None:
                client.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = ProxiedClient(writer=writer)
        client.passing.set()
        self.clients.append(client)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        to_server = asyncio.create_task(self._client_to_server(client, reader, up_writer))
        to_client = asyncio.create_task(self._server_to_client(client, up_reader, writer))
        self._tasks |= {to_server, to_client}
        try:
            await asyncio.wait({to_server, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_server, to_client):
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _client_to_server(self, client: ProxiedClient, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        seen = b""
        while data := await reader.read(65536):
            if not client.name and b"CONNECT " in (seen := seen + data):
                line = seen[seen.index(b"CONNECT ") :].split(b"\r\n", 1)[0]
                with contextlib.suppress(ValueError):
                    client.name = json.loads(line[len(b"CONNECT ") :]).get("name") or "?"
                if self._refused(client.name):
                    return
                if self._held(client.name):
                    client.passing.clear()
            up.write(data)
            await up.drain()

    async def _server_to_client(self, client: ProxiedClient, up: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await client.passing.wait()
            data = await up.read(65536)
            if not data:
                return
            await client.passing.wait()  # held back meanwhile: this read waits too
            writer.write(data)
            await writer.drain()


@asynccontextmanager
async def nats_proxy(upstream: str) -> AsyncIterator[NatsProxy]:
    proxy = NatsProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
