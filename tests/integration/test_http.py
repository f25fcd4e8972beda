"""GET /healthz, /readyz and /status on the edge's one port."""

from __future__ import annotations

import asyncio
import json
import time

from tests.harness import MacIdentity, connect_mac, paired, running_edges


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", "Host: relay"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.decode().partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


async def test_healthz_and_readyz_answer_200_once_connected_to_nats(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        assert await http_get(edge.port, "/healthz") == (200, "ok\n")
        assert await http_get(edge.port, "/readyz") == (200, "ready\n")
        assert (await http_get(edge.port, "/nowhere"))[0] == 404


async def test_status_reports_connection_flags_last_seen_and_idle_seconds(nats_url):
    async with running_edges(nats_url, last_seen_interval_ms=50) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        before = int(time.time() * 1000)
        await mac_client.heartbeat()
        await asyncio.sleep(0.2)  # a few lastSeen flush intervals
        status, body = await http_get(b.port, f"/status?room_id={mac.room_id}")
        assert status == 200
        report = json.loads(body)
        assert report["exists"] is True
        assert report["mac_connected"] is True and report["ios_connected"] is True
        assert before <= report["mac_last_seen"] <= int(time.time() * 1000)
        assert isinstance(report["ios_last_seen"], int)
        assert report["idle_seconds"] == 0
        await ios_client.close()
        await mac_client.expect("peer_disconnected")
        report = json.loads((await http_get(a.port, f"/status?room_id={mac.room_id}"))[1])
        assert report["mac_connected"] is True and report["ios_connected"] is False


async def test_status_of_unknown_room_says_exists_false(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        assert await http_get(edge.port, "/status?room_id=NOSUCHROOM") == (200, '{"exists":false}')


async def test_status_rejects_invalid_room_id_with_400(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        assert (await http_get(edge.port, "/status?room_id=a.b"))[0] == 400


async def test_status_requires_the_operator_token_when_one_is_set(nats_url):
    async with running_edges(nats_url, count=1, admin_token="op-token-123") as (edge,):
        mac = MacIdentity.new()
        await connect_mac(edge, mac)
        path = f"/status?room_id={mac.room_id}"
        assert (await http_get(edge.port, path))[0] == 401
        assert (await http_get(edge.port, path, {"Authorization": "Bearer wrong"}))[0] == 401
        status, body = await http_get(edge.port, path, {"Authorization": "Bearer op-token-123"})
        assert status == 200 and json.loads(body)["mac_connected"] is True
