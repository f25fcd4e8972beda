"""Real edges and real WebSocket clients for integration tests."""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from edge.server import Edge
from edge.settings import EdgeSettings

RECV_TIMEOUT_S = 5.0

# The local user of auth=none edges: one per test (set by conftest), shared by all the
# test's edges, so that tests do not share room registrations or room limits.
TEST_USER: ContextVar[str] = ContextVar("TEST_USER", default="local")


def new_test_user() -> str:
    return f"local-{secrets.token_hex(4)}"


def new_room_id() -> str:
    return secrets.token_hex(5).upper()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def b64_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A plain HTTP GET to 127.0.0.1:port; returns (status, body)."""
    return await http_request(port, "GET", path, headers)


def body_of_json(response: tuple[int, str]) -> Any:
    """The JSON body of a 200 answer (fails on any other status)."""
    status, body = response
    assert status == 200, response
    return json.loads(body)


async def http_request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, str]:
    """One HTTP/1.1 request to 127.0.0.1:port; returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", "Host: relay"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.decode().partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


async def until(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> None:
    """Wait until `predicate()` holds; fails the test if it does not within `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(step)


@asynccontextmanager
async def running_edges(nats_url: str, count: int = 2, **overrides: Any) -> AsyncIterator[list[Edge]]:
    """`count` edges in this process, each with its own NATS connection and port.

    Unless told otherwise they run with `auth=none` as the test's own local user, and serve
    /metrics on a free loopback port of their own (`edge.metrics_port`, see `metrics`).
    """
    if overrides.get("auth", "none") == "none":
        overrides.setdefault("auth", "none")
        overrides.setdefault("local_user_id", TEST_USER.get())
    overrides.setdefault("metrics_port", 0)
    # Stopped at once unless a test of the drain says otherwise.
    overrides.setdefault("drain_grace_ms", 0)
    overrides.setdefault("drain_ms", 0)
    edges = [
        Edge(EdgeSettings(nats_url=nats_url, host="127.0.0.1", port=0, edge_id=f"t{i}-{secrets.token_hex(3)}", **overrides))
        for i in range(count)
    ]
    tasks = [asyncio.create_task(edge.run()) for edge in edges]
    try:
        for edge, task in zip(edges, tasks, strict=True):
            ready = asyncio.create_task(edge.ready.wait())
            done, _ = await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises why the edge could not start
            if ready not in done:
                raise TimeoutError("edge did not become ready")
        yield edges
    finally:
        for edge in edges:
            edge.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def metrics(edge: Edge) -> dict[str, float]:
    """The edge's metrics, read from its /metrics port (see `metrics_at`)."""
    assert edge.metrics_port is not None, "this edge does not serve /metrics"
    return await metrics_at(edge.metrics_port)


async def metrics_at(port: int) -> dict[str, float]:
    """What a service's /metrics says, parsed by Prometheus' own text parser: each sample by
    its name (`relay_closes_total`), summed over its labels, and each labelled one also as
    `name{label="value",...}` (labels sorted)."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, (status, body)
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
            if sample.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def ws_url(edge: Edge, room_id: str, role: str | None = "mac", **query: str) -> str:
    params = {"room_id": room_id, **({"role": role} if role else {}), **query}
    return f"ws://127.0.0.1:{edge.port}/ws?" + "&".join(f"{k}={v}" for k, v in params.items())


@dataclass
class Client:
    """A WebSocket client speaking JSON, with helpers that fail loudly on the unexpected."""

    ws: ClientConnection

    @classmethod
    async def connect(
        cls, edge: Edge, room_id: str, role: str | None = "mac", headers: dict[str, str] | None = None, **query: str
    ) -> "Client":
        ws = await connect(
            ws_url(edge, room_id, role, **query),
            compression=None,
            max_size=None,
            open_timeout=5,
            additional_headers=headers,
        )
        return cls(ws)

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), "the relay must send text frames"
        return json.loads(raw)

    async def expect(self, type_: str, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        message = await self.recv(timeout)
        assert message["type"] == type_, f"expected {type_}, got {message}"
        return message

    async def expect_error(self, code: str) -> dict[str, Any]:
        message = await self.expect("error")
        assert message["code"] == code, message
        return message

    async def expect_silence(self, within: float = 0.3) -> None:
        try:
            message = await asyncio.wait_for(self.ws.recv(), within)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"expected nothing, got {message}")

    async def expect_close(self, timeout: float = RECV_TIMEOUT_S) -> tuple[int | None, str | None]:
        """Wait until the relay closes the socket (skipping messages); returns (code, reason)."""
        async def drain() -> None:
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass

        await asyncio.wait_for(drain(), timeout)
        rcvd = self.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)

    async def heartbeat(self) -> dict[str, Any]:
        await self.send(type="heartbeat")
        return await self.expect("heartbeat_ack")

    async def close(self) -> None:
        await self.ws.close()


@dataclass
class MacIdentity:
    """What a Mac agent keeps: its room's secret and its identity key."""

    room_id: str
    secret: str
    public_key: str

    @classmethod
    def new(cls) -> "MacIdentity":
        return cls(room_id=new_room_id(), secret=secrets.token_hex(16), public_key=b64_key())

    @property
    def secret_hash(self) -> str:
        return sha256_hex(self.secret)

    def register_message(self, **extra: Any) -> dict[str, Any]:
        return {
            "type": "register_room",
            "room_id": self.room_id,
            "secret_hash": self.secret_hash,
            "public_key": self.public_key,
            "session_nonce": b64_key(),
            "ephemeral_key": b64_key(),
            **extra,
        }


async def connect_mac(
    edge: Edge, mac: MacIdentity, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[Client, dict[str, Any]]:
    """A Mac socket that has registered; returns it and the register message it sent."""
    client = await Client.connect(edge, mac.room_id, "mac", headers)
    message = mac.register_message(**extra)
    await client.send(**message)
    await client.expect("room_registered")
    return client, message


def join_message(mac: MacIdentity, **extra: Any) -> dict[str, Any]:
    return {
        "type": "join_room",
        "room_id": mac.room_id,
        "public_key": b64_key(),
        "secret_hash": mac.secret_hash,
        "session_nonce": b64_key(),
        "ephemeral_key": b64_key(),
        **extra,
    }


async def connect_ios(
    edge: Edge, mac: MacIdentity, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[Client, dict[str, Any]]:
    """An iOS socket that has sent join_room (the caller reads what follows)."""
    client = await Client.connect(edge, mac.room_id, "ios", headers)
    message = join_message(mac, **extra)
    await client.send(**message)
    return client, message


async def paired(edge_mac: Edge, edge_ios: Edge, mac: MacIdentity | None = None) -> tuple[Client, Client, MacIdentity]:
    """A registered Mac and a joined iPhone that have both seen `peer_joined`."""
    mac = mac or MacIdentity.new()
    mac_client, _ = await connect_mac(edge_mac, mac)
    ios_client, _ = await connect_ios(edge_ios, mac)
    await ios_client.expect("peer_joined")
    await mac_client.expect("peer_joined")
    return mac_client, ios_client, mac


@dataclass
class Account:
    """A user made for a test, with a live API key."""

    user_id: str
    email: str
    api_key: str
    refresh_token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


async def make_account(nats_url: str, tier: str = "free", deleted: bool = False, **fields: Any) -> Account:
    """Create a user (as relay-admin would) and issue it an API key; returns both."""
    import nats

    from accounts.store import AccountStore
    from schemas.records import User

    user_id = f"u{secrets.token_hex(5)}"
    email = f"{user_id}@example.com"
    nc = await nats.connect(nats_url)
    try:
        store = await AccountStore.open(nc.jetstream())
        now = int(time.time() * 1000)
        await store.create_user(User(user_id=user_id, email=email, tier=tier, created_at=now, deleted=deleted, **fields))
        api_key, refresh = await store.issue_key(user_id, now, 30 * 86_400, 180 * 86_400)
    finally:
        await nc.close()
    return Account(user_id, email, api_key, refresh)


class ChildProcess:
    """A relay command run as a child process, for the tests that stop or kill one by PID.

    Logs go to a file: a pipe nobody reads would block the child once it fills.
    """

    module = ""  # what `python -m` runs
    name = ""

    #: The soft limit of open files the child starts with (None: this process's).
    open_files_soft: int | None = None

    def __init__(self, args: list[str], settings: dict[str, Any]) -> None:
        self.args = args
        for name, value in settings.items():
            self.args += ["--" + name.replace("_", "-"), str(value)]
        self.process: asyncio.subprocess.Process | None = None

    async def is_ready(self) -> bool:
        raise NotImplementedError

    async def start(self, timeout: float = 20.0) -> Any:
        import sys

        self.log_file = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)
        atexit.register(_remove, self.log_file.name)
        soft = self.open_files_soft

        def limit_open_files() -> None:  # in the child, before exec
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, *self.args, stdout=asyncio.subprocess.DEVNULL, stderr=self.log_file,
            preexec_fn=limit_open_files if soft is not None else None,
        )  # fmt: skip
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_text()[-1500:]}")
            if await self.is_ready():
                return self
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} did not become ready")

    async def stop(self, sig: int) -> int:
        """Send `sig` to this process (by PID) and wait for it to exit; returns the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), 20)

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(signal.SIGKILL)  # only if it is still running: by PID, ours alone

    def log_text(self) -> str:
        """Everything the process has logged so far."""
        with open(self.log_file.name, encoding="utf-8", errors="replace") as log:
            return log.read()


class EdgeProcess(ChildProcess):
    """A `relay-edge` child process. The harness's Client.connect needs only `.port`."""

    module, name = "edge.cli", "relay-edge"

    def __init__(self, nats_url: str, **settings: Any) -> None:
        from runtime.embedded_nats import free_port

        self.port = free_port()
        self.edge_id = settings.pop("edge_id", None) or f"proc-{secrets.token_hex(3)}"
        settings.setdefault("drain_grace_ms", 0)
        settings.setdefault("drain_ms", 0)
        if settings.get("auth", "none") == "none":
            settings.setdefault("auth", "none")
            settings.setdefault("local_user_id", TEST_USER.get())
        super().__init__(["--nats-url", nats_url, "--port", str(self.port), "--edge-id", self.edge_id], settings)

    async def is_ready(self) -> bool:
        try:
            return (await http_get(self.port, "/readyz"))[0] == 200
        except OSError:
            return False


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# --- metering ------------------------------------------------------------------------------


@asynccontextmanager
async def running_metering(nats_url: str, **overrides: Any) -> AsyncIterator[Any]:
    """A metering service in this process, ready to consume and answer."""
    from metering.service import Metering, MeteringSettings

    metering = Metering(MeteringSettings(nats_url=nats_url, **overrides))
    task = asyncio.create_task(metering.run())
    try:
        ready = asyncio.create_task(metering.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()
        if ready not in done:
            raise TimeoutError("metering did not become ready")
        yield metering
    finally:
        metering.stop()
        await asyncio.gather(task, return_exceptions=True)


class MeteringProcess(ChildProcess):
    """A `relay-metering` child process, for the tests that kill one by PID."""

    module, name = "metering.cli", "relay-metering"

    def __init__(self, nats_url: str, **settings: Any) -> None:
        super().__init__(["--nats-url", nats_url], settings)

    async def is_ready(self) -> bool:
        return "metering ready" in self.log_text()


async def read_ledger(nats_url: str, user_id: str) -> Any:
    """The user's usage ledger as metering wrote it (an empty one if none)."""
    import nats

    from metering.usage import UsageReader, open_usage_bucket

    nc = await nats.connect(nats_url)
    try:
        return await UsageReader(await open_usage_bucket(nc.jetstream(), 1)).ledger(user_id)
    finally:
        await nc.close()
