"""Edges told to use only websockets' and asyncio's public API (RELAY_LIBRARY_SHORTCUTS=false),
as for a websockets release their internals do not fit: the same protocol, the slower way.
Messages reach the handler through `ws.recv`, frames from NATS go through the socket's
backlog and `ws.send`, and pings are counted once a read was parsed.

Real edges, a real nats-server, real WebSocket clients; the ping flood from a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import logging

from tests.harness import paired, running_edges, until
from tests.integration.test_control_frames import _flood_is_closed_1008, _relay_both_ways


def _assert_nothing_went_the_fast_path(*edges) -> None:
    for edge in edges:
        assert edge.ctx.counters.forwarded_at_once == 0
        assert edge.ctx.counters.heartbeats_answered_at_once == 0


async def test_edges_without_shortcuts_say_so_at_start_and_pair_relay_and_answer_heartbeats(nats_url, caplog):
    caplog.set_level(logging.INFO, logger="edge")
    async with running_edges(nats_url, library_shortcuts=False) as (a, b):
        for edge in (a, b):
            assert (
                f"edge {edge.settings.edge_id}: library shortcuts off: watch_parse, write_at_once, "
                "take_at_once, eager (RELAY_LIBRARY_SHORTCUTS is false)"
            ) in caplog.text
        assert not a.ctx.shortcuts.take_at_once and not b.ctx.shortcuts.write_at_once
        mac_client, ios_client, _ = await paired(a, b)
        await _relay_both_ways(mac_client, ios_client, 20)
        # Several messages in one write, as from a fast sender: all through the handler, in order.
        for n in range(10):
            mac_client.ws.protocol.send_text(json.dumps({"type": "relay", "payload": f"w{n}"}).encode())
        mac_client.ws.send_data()
        for n in range(10):
            assert (await ios_client.expect("relay"))["payload"] == f"w{n}"
        assert (await mac_client.heartbeat())["mac_connected"] is True
        assert (await ios_client.heartbeat())["mac_connected"] is True
        assert all(conn.ws.take_message_now is None for edge in (a, b) for conn in edge.connections.values())
        _assert_nothing_went_the_fast_path(a, b)
        assert a.ctx.counters.forwarded_by_handler >= 30 and b.ctx.counters.forwarded_by_handler >= 20


async def test_an_edge_with_and_one_without_shortcuts_in_one_process_each_keep_their_own(nats_url):
    async with running_edges(nats_url, count=1, library_shortcuts=False) as (plain,):
        async with running_edges(nats_url, count=1) as (fast,):
            mac_client, ios_client, _ = await paired(plain, fast)
            ios_conn = next(iter(fast.connections.values()))
            # Once the news of the peer is written, its handler waits with nothing queued.
            await until(lambda: ios_conn.ws.take_message_now is not None)
            for n in range(10):
                await ios_client.send(type="relay", payload=f"i{n}")
                assert (await mac_client.expect("relay"))["payload"] == f"i{n}"
                await mac_client.send(type="relay", payload=f"m{n}")
                assert (await ios_client.expect("relay"))["payload"] == f"m{n}"
            assert fast.ctx.counters.forwarded_at_once == 10
            _assert_nothing_went_the_fast_path(plain)


async def test_a_ping_flood_is_still_closed_1008_without_shortcuts(nats_url, caplog):
    async with running_edges(
        nats_url, library_shortcuts=False, socket_rate_limit_per_s=50, socket_rate_burst=500
    ) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)  # the victim: its Mac on the flooded edge
        flood = asyncio.create_task(_flood_is_closed_1008(a, burst=500, slack=50_000))  # a read holds up to ~43,000
        await _relay_both_ways(mac_client, ios_client, 20)
        await flood
        await until(lambda: len(a.connections) == 1)  # the flooder is gone, the victim's Mac stays
        await _relay_both_ways(mac_client, ios_client, 20)
        assert "control frames (pings, pongs) past its rate limit; closed 1008" in caplog.text
        _assert_nothing_went_the_fast_path(a, b)


async def test_a_slow_reader_is_still_closed_1013_without_shortcuts(nats_url, caplog):
    async with running_edges(nats_url, library_shortcuts=False, socket_queue_max_msgs=20, close_timeout_ms=300) as (a, b):
        fast_mac, slow_ios, mac = await paired(a, b)
        other_mac, other_ios, _ = await paired(a, b)
        slow_conn = next(c for c in b.connections.values() if c.session.room_id == mac.room_id)
        # slow_ios never reads; its client stops reading from TCP after a few frames.
        payload = "A" * 65536
        for _ in range(300):
            await fast_mac.ws.send(f'{{"type":"relay","payload":"{payload}"}}')
            await other_mac.send(type="relay", payload="still-flowing")
            assert (await other_ios.expect("relay"))["payload"] == "still-flowing"
            if "cannot keep up; closing it" in caplog.text:
                break
        assert (await fast_mac.expect("peer_disconnected", timeout=15))["reason"] == "timeout"
        assert "cannot keep up; closing it" in caplog.text
        await until(lambda: slow_conn.ws.protocol.close_sent is not None)
        assert slow_conn.ws.protocol.close_sent.code == 1013
        _assert_nothing_went_the_fast_path(a, b)
