"""Logs an operator can use: a line per connection event at INFO (logger `edge.connections`),
RELAY_LOG_FORMAT=json, RELAY_LOG_LEVEL, a readable settings line; and never a secret, at
DEBUG too."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.harness import (
    Client,
    EdgeProcess,
    MacIdentity,
    MeteringProcess,
    connect_ios,
    connect_mac,
    http_get,
    http_request,
    make_account,
    paired,
    running_edges,
    sha256_hex,
    until,
)


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, socket_id: str) -> list[str]:
        return [r.event for r in self.records if getattr(r, "socket", None) == socket_id]


@pytest.fixture
def connection_events() -> Iterator[_Events]:
    logger = logging.getLogger("edge.connections")
    handler, level = _Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_every_connection_event_is_one_info_line_naming_the_socket_id_that_its_peer_sees(nats_url, connection_events):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        mac_socket, ios_socket = next(iter(a.connections)), next(iter(b.connections))
        # The Mac's edge names the iPhone's socket id as the sender of the news it got.
        await until(lambda: "peer_joined" in connection_events.of(mac_socket))
        heard = [r for r in connection_events.records if getattr(r, "socket", None) == mac_socket and r.event == "peer_joined"]
        assert heard[0].peer == ios_socket
        assert (await http_get(a.port, "/ws?room_id=a.b&role=mac"))[0] == 400
        new_mac, _ = await connect_mac(a, mac)  # a takeover: the first Mac socket is replaced
        assert (await mac_client.expect_close())[0] == 4001
        await until(lambda: "closed" in connection_events.of(mac_socket))
        for n in range(3):
            await new_mac.send(type="relay", payload=f"p{n}")
        await ios_client.expect("peer_joined")
        for _ in range(3):
            await ios_client.expect("relay")
        await ios_client.close()
        await until(lambda: "closed" in connection_events.of(ios_socket))
    events = connection_events.of(mac_socket)
    assert events[:3] == ["connected", "registered", "peer_joined"] and set(events[3:]) == {"replaced", "closed"}
    assert connection_events.of(ios_socket)[:2] == ["connected", "joined"] and connection_events.of(ios_socket)[-1] == "closed"
    closed = next(r for r in connection_events.records if getattr(r, "socket", None) == mac_socket and r.event == "closed")
    assert closed.code == 4001 and closed.duration_s >= 0 and closed.room == mac.room_id and closed.role == "mac"
    ios_closed = next(r for r in connection_events.records if getattr(r, "socket", None) == ios_socket and r.event == "closed")
    assert ios_closed.code == 1000 and ios_closed.frames_out == 3 and ios_closed.frames_in == 0
    refused = [r for r in connection_events.records if r.event == "refused"]
    assert len(refused) == 1 and refused[0].status == 400 and refused[0].address == "127.0.0.1"
    assert all(r.levelno == logging.INFO for r in connection_events.records)


async def test_a_refused_register_is_logged_with_its_error_code(nats_url, connection_events):
    async with running_edges(nats_url, count=1) as (a,):
        mac = MacIdentity.new()
        await connect_mac(a, mac)
        thief = await Client.connect(a, mac.room_id, "mac")
        await thief.send(**MacIdentity(mac.room_id, "wrong-secret", mac.public_key).register_message())
        await thief.expect("error")
        await until(lambda: any(r.event == "register_refused" for r in connection_events.records))
        refused = next(r for r in connection_events.records if r.event == "register_refused")
        assert refused.code == "AUTH_FAILED"


async def test_a_flood_of_refused_upgrades_is_logged_at_a_bounded_rate(nats_url, connection_events):
    async with running_edges(nats_url, count=1) as (a,):
        for _ in range(60):
            assert (await http_get(a.port, "/ws?room_id=a.b&role=mac"))[0] == 400
    lines = [r for r in connection_events.records if r.event == "refused"]
    assert 20 <= len(lines) < 60  # the burst, and what refilled meanwhile


async def test_json_log_format_is_one_json_object_per_line_with_the_events_fields(nats_url):
    async with EdgeProcess(nats_url, log_format="json", admin_token="op-secret-9") as edge:
        mac_client, ios_client, _ = await paired(edge, edge)
        await mac_client.send(type="relay", payload="x")
        await ios_client.expect("relay")
        await mac_client.close()
        await ios_client.expect("peer_disconnected")
        deadline = time.monotonic() + 5
        while '"closed' not in edge.log_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        lines = [json.loads(line) for line in edge.log_text().splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    settings = next(line for line in lines if line["message"].startswith("settings: "))
    assert settings["settings"]["admin_token"] == "***" and "op-secret-9" not in json.dumps(lines)
    assert "admin_token=***" in settings["message"] and "{" not in settings["message"]
    closed = next(line for line in lines if line.get("event") == "closed" and line.get("role") == "mac")
    assert closed["code"] == 1000 and closed["frames_in"] == 1 and closed["logger"] == "edge.connections"


async def test_log_level_warning_logs_no_info_and_a_bad_level_stops_the_start_in_one_line(nats_url):
    async with EdgeProcess(nats_url, log_level="warning") as edge:
        await paired(edge, edge)
        assert " INFO " not in edge.log_text()
    done = subprocess.run(
        [sys.executable, "-m", "edge.cli", "--nats-url", nats_url, "--log-level", "loud"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert ("log_level (--log-level / RELAY_LOG_LEVEL) must be one of debug, info, warning, error, got 'loud'") in done.stderr.strip().splitlines()[-1]


async def test_no_secret_appears_in_any_log_at_debug(nats_url):
    """A whole session with accounts: keys, a refresh, pairing by token, secret hashes, the
    admin token; the logs of the edge and of metering, at DEBUG, hold none of them."""
    admin_token = "adm-" + secrets.token_hex(12)
    account = await make_account(nats_url, tier="premium")
    async with MeteringProcess(nats_url, log_level="debug") as metering, EdgeProcess(
        nats_url, auth="required", log_level="debug", admin_token=admin_token
    ) as edge:
        mac = MacIdentity.new()
        pairing_token = secrets.token_urlsafe(24)
        mac_client, _ = await connect_mac(
            edge, mac, account.auth, pairing_token_hash=sha256_hex(pairing_token), pairing_token_expires_at=int(time.time()) + 300
        )
        ios_client, _ = await connect_ios(edge, mac, account.auth, secret_hash=None, pairing_token_hash=sha256_hex(pairing_token))
        await ios_client.expect("peer_joined")
        await mac_client.expect("peer_joined")
        await mac_client.send(type="relay", payload="cGF5bG9hZA==")
        await ios_client.expect("relay")
        status, body = await http_request(
            edge.port, "POST", "/auth/refresh", {}, json.dumps({"refresh_token": account.refresh_token}).encode()
        )
        assert status == 200
        fresh = json.loads(body)
        assert (await http_get(edge.port, "/profile", {"Authorization": f"Bearer {fresh['api_key']}"}))[0] == 200
        assert (await http_get(edge.port, f"/status?room_id={mac.room_id}", {"Authorization": f"Bearer {admin_token}"}))[0] in (200, 404)
        await http_get(edge.port, "/profile", {"Authorization": "Bearer rdkey_not-a-real-key"})  # a refused one
        await mac_client.close()
        await ios_client.close()
        await asyncio.sleep(0.3)
        logs = edge.log_text() + metering.log_text()
    assert "log_level=debug" in logs  # DEBUG was on
    for secret in (account.api_key, account.refresh_token, fresh["api_key"], fresh["refresh_token"], admin_token,
                   mac.secret, mac.secret_hash, pairing_token, sha256_hex(pairing_token), "rdkey_not-a-real-key"):  # fmt: skip
        assert secret not in logs, f"a secret ({secret[:6]}…) is in the logs"
