"""GET /healthz, /readyz and /status on the edge's one port."""

from __future__ import annotations

import asyncio
import json
import time

from tests.harness import MacIdentity, connect_mac, http_get, paired, running_edges

TOKEN = "op-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_healthz_and_readyz_answer_200_once_connected_to_nats(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        assert await http_get(edge.port, "/healthz") == (200, "ok\n")
        assert await http_get(edge.port, "/readyz") == (200, "ready\n")
        assert (await http_get(edge.port, "/nowhere"))[0] == 404


async def test_status_reports_connection_flags_last_seen_and_idle_seconds(nats_url):
    async with running_edges(nats_url, last_seen_interval_ms=50, admin_token=TOKEN) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        before = int(time.time() * 1000)
        await mac_client.heartbeat()
        await asyncio.sleep(0.2)  # a few lastSeen flush intervals
        status, body = await http_get(b.port, f"/status?room_id={mac.room_id}", AUTH)
        assert status == 200
        report = json.loads(body)
        assert report["exists"] is True
        assert report["mac_connected"] is True and report["ios_connected"] is True
        assert before <= report["mac_last_seen"] <= int(time.time() * 1000)
        assert isinstance(report["ios_last_seen"], int)
        assert report["idle_seconds"] == 0
        await ios_client.close()
        await mac_client.expect("peer_disconnected")
        report = json.loads((await http_get(a.port, f"/status?room_id={mac.room_id}", AUTH))[1])
        assert report["mac_connected"] is True and report["ios_connected"] is False


async def test_status_asks_the_edges_holding_the_sockets_for_their_exact_last_seen(nats_url):
    # KV gets a connected socket's lastSeen only every RELAY_LAST_SEEN_INTERVAL_MS (here: not
    # during the test); /status asks the edge holding each socket, wherever it is.
    async with running_edges(nats_url, last_seen_interval_ms=600_000, admin_token=TOKEN) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        before = int(time.time() * 1000)
        await mac_client.heartbeat()
        await ios_client.heartbeat()
        after = int(time.time() * 1000)
        for edge in (a, b):  # the Mac's edge is a, the iPhone's b: one of them is asked
            report = json.loads((await http_get(edge.port, f"/status?room_id={mac.room_id}", AUTH))[1])
            assert before <= report["mac_last_seen"] <= after
            assert before <= report["ios_last_seen"] <= after
            assert report["idle_seconds"] == 0


async def test_status_of_unknown_room_says_exists_false(nats_url):
    async with running_edges(nats_url, count=1, admin_token=TOKEN) as (edge,):
        assert await http_get(edge.port, "/status?room_id=NOSUCHROOM", AUTH) == (200, '{"exists":false}')


async def test_status_rejects_invalid_room_id_with_400(nats_url):
    async with running_edges(nats_url, count=1, admin_token=TOKEN) as (edge,):
        assert (await http_get(edge.port, "/status?room_id=a.b", AUTH))[0] == 400


async def test_status_with_auth_none_answers_the_local_user_for_its_rooms(nats_url):
    # With authentication off every request is the local user, who owns every room.
    async with running_edges(nats_url, count=1) as (edge,):
        mac = MacIdentity.new()
        await connect_mac(edge, mac)
        status, body = await http_get(edge.port, f"/status?room_id={mac.room_id}")
        assert status == 200 and json.loads(body)["mac_connected"] is True


async def test_base_url_with_a_trailing_slash_still_reaches_the_websocket(nats_url):
    from websockets.asyncio.client import connect

    async with running_edges(nats_url, count=1) as (edge,):
        # The Mac agent appends "/ws" to its RELAY_SERVER_URL as written.
        async with connect(f"ws://127.0.0.1:{edge.port}//ws?room_id=SLASHROOM1&role=mac", open_timeout=5) as ws:
            await ws.send('{"type":"heartbeat"}')
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "heartbeat_ack"
