"""Frames taken as they arrive: a `relay` that reaches a socket whose handler is waiting
with nothing queued is published from websockets' data callback, without waking the
handler; anything else, and whatever arrives behind it, goes through the handler.

Real edges, a real nats-server, real WebSocket clients. Several messages "in one write"
are framed by the client's websockets and handed to its transport at once, so the edge
reads them together, as it does from a fast sender.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats

import edge.internals
from edge.internals import run_eagerly
from tests.harness import Client, metrics_at, paired, running_edges, until


def _send_in_one_write(client: Client, *messages: dict[str, Any]) -> None:
    for message in messages:
        client.ws.protocol.send_text(json.dumps(message).encode())
    client.ws.send_data()


async def _metric(port: int, name: str) -> float:
    return (await metrics_at(port))[name]


async def test_relays_reaching_a_waiting_socket_are_forwarded_as_they_arrive(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        for n in range(20):
            await mac_client.send(type="relay", payload=f"p{n}")
            assert (await ios_client.expect("relay"))["payload"] == f"p{n}"
        assert await _metric(a.metrics_port, "relay_frames_forwarded_total") == 20
        assert await _metric(a.metrics_port, "relay_frames_forwarded_at_once_total") == 20


async def test_messages_written_together_keep_their_order_across_both_paths(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        relays = [{"type": "relay", "payload": f"p{n}"} for n in range(12)]
        _send_in_one_write(
            mac_client,
            relays[0],
            {"type": "nonsense"},  # for the handler: what follows queues behind it
            relays[1],
            {"type": "heartbeat"},  # answered by the handler, in its turn
            *relays[2:],
        )
        assert [(await ios_client.expect("relay"))["payload"] for _ in relays] == [
            r["payload"] for r in relays
        ]
        await mac_client.expect_error("BAD_MESSAGE")
        assert (await mac_client.expect("heartbeat_ack"))["mac_connected"] is True
        assert await _metric(a.metrics_port, "relay_heartbeats_answered_at_once_total") == 0
        # Later, with the handler waiting again, relays are taken as they arrive again.
        taken_before = await _metric(a.metrics_port, "relay_frames_forwarded_at_once_total")
        assert 1 <= taken_before < len(relays)
        await mac_client.send(type="relay", payload="later")
        assert (await ios_client.expect("relay"))["payload"] == "later"
        assert (
            await _metric(a.metrics_port, "relay_frames_forwarded_at_once_total")
            == taken_before + 1
        )
        assert await _metric(a.metrics_port, "relay_frames_forwarded_total") == len(relays) + 1
        await mac_client.send(type="heartbeat")
        assert (await mac_client.expect("heartbeat_ack"))["mac_connected"] is True
        assert await _metric(a.metrics_port, "relay_heartbeats_answered_at_once_total") == 1


def _waiting_with_nothing_queued(conn: Any) -> bool:
    """The socket's handler waits for its next message, and nothing is being written to it
    (just after pairing, the news of the peer may still be on its way out)."""
    return conn.ws.take_message_now is not None and conn.drainer is None and not conn.write_lock.locked()


async def test_heartbeats_reaching_a_waiting_socket_are_answered_as_they_arrive(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        mac_conn, ios_conn = (next(iter(edge.connections.values())) for edge in (a, b))
        await until(lambda: _waiting_with_nothing_queued(mac_conn) and _waiting_with_nothing_queued(ios_conn))
        for n in range(10):
            await mac_client.send(type="heartbeat")
            await ios_client.send(type="heartbeat")
            assert await mac_client.expect("heartbeat_ack") == {"type": "heartbeat_ack", "mac_connected": True, "account_match": "match"}
            assert await ios_client.expect("heartbeat_ack") == {"type": "heartbeat_ack", "mac_connected": True, "account_match": "match"}
        assert await _metric(a.metrics_port, "relay_heartbeats_answered_at_once_total") == 10
        assert await _metric(b.metrics_port, "relay_heartbeats_answered_at_once_total") == 10
        # The Mac leaves: the iPhone's next answer says so, from the same fast path.
        await mac_client.close()
        await ios_client.expect("peer_disconnected")
        await until(lambda: _waiting_with_nothing_queued(ios_conn))
        await ios_client.send(type="heartbeat")
        assert (await ios_client.expect("heartbeat_ack"))["mac_connected"] is False
        assert await _metric(b.metrics_port, "relay_heartbeats_answered_at_once_total") == 11


async def test_a_heartbeat_for_a_socket_with_frames_queued_is_answered_by_its_handler(nats_url):
    """The fast path writes an answer only when nothing of the socket's is queued or being
    written; otherwise the heartbeat goes the handler's way, and is answered all the same."""
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        conn = next(c for c in b.connections.values() if c.session.role == "ios")
        async with conn.write_lock:  # as while news about its peer is written: frames queue
            for n in range(5):
                await mac_client.send(type="relay", payload=f"p{n}")
            await until(lambda: conn.drainer is not None)
            await ios_client.send(type="heartbeat")
            assert (await ios_client.expect("heartbeat_ack"))["mac_connected"] is True
        assert [(await ios_client.expect("relay"))["payload"] for _ in range(5)] == [f"p{n}" for n in range(5)]
        assert b.ctx.counters.heartbeats_answered_at_once == 0


async def test_a_relay_behind_a_frame_larger_than_nats_carries_comes_after_it(tmp_path):
    """The large frame goes the handler's way (it is cut into parts there); the relay behind
    it, in the same read, must not overtake it by the fast path."""
    from runtime.embedded_nats import EmbeddedNatsServer

    with EmbeddedNatsServer(store_dir=tmp_path / "nats", max_payload=64 * 1024) as small:
        async with running_edges(small.url) as (a, b):
            mac_client, ios_client, _ = await paired(a, b)
            _send_in_one_write(
                mac_client,
                {"type": "relay", "payload": "C" * 100_000},
                {"type": "relay", "payload": "behind"},
            )
            assert (await ios_client.expect("relay"))["payload"] == "C" * 100_000
            assert (await ios_client.expect("relay"))["payload"] == "behind"


async def test_a_relay_behind_a_frame_over_max_frame_bytes_is_never_forwarded(nats_url):
    async with running_edges(nats_url, max_frame_bytes=50_000) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        _send_in_one_write(
            mac_client,
            {"type": "relay", "payload": "C" * 60_000},
            {"type": "relay", "payload": "behind"},
        )
        assert (await mac_client.expect_close())[0] == 1009
        # The socket's order ends at the frame it was closed for.
        assert await ios_client.expect("peer_disconnected") == {"type": "peer_disconnected", "reason": "client_left"}


async def test_sustained_relay_excess_closes_the_socket_1008(nats_url):
    async with running_edges(
        nats_url, socket_rate_limit_per_s=20, socket_rate_burst=10
    ) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        _send_in_one_write(
            mac_client, *({"type": "relay", "payload": f"p{n}"} for n in range(40))
        )
        assert await mac_client.expect_error("RATE_LIMITED")
        assert (await mac_client.expect_close())[0] == 1008
        received = []
        while (message := await ios_client.recv())["type"] == "relay":
            received.append(message["payload"])
        assert message["type"] == "peer_disconnected"
        # The burst (less the token register_room spent), and at most what the bucket
        # refilled meanwhile (20/s), in order; then nothing of what the client sent after.
        assert 9 <= len(received) <= 11 and received == [
            f"p{n}" for n in range(len(received))
        ]


async def test_a_nats_publish_with_room_in_its_buffer_finishes_without_waiting(
    nats_url,
):
    """What makes taking a frame at once cheap: nats-py's `publish` only appends to its
    buffer while there is room. A nats-py release that waits in every publish fails here
    by name (the edge would still be right, but pay a task per frame)."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe("test.eager.publish")
        for n in range(100):
            assert run_eagerly(nc.publish("test.eager.publish", b"%d" % n), asyncio.create_task) is None
        assert [(await sub.next_msg(timeout=2)).data for _ in range(100)] == [
            b"%d" % n for n in range(100)
        ]
    finally:
        await nc.close()


async def test_a_relay_that_is_not_utf8_closes_the_socket_1007_and_reaches_nobody(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        mac_client.ws.protocol.send_text(b'{"type":"relay","payload":"\xff"}')  # a text frame that is not UTF-8
        mac_client.ws.protocol.send_text(b'{"type":"relay","payload":"behind"}')
        mac_client.ws.send_data()
        assert (await mac_client.expect_close())[0] == 1007
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"
        bystander_mac, bystander_ios, _ = await paired(a, b)  # the edge serves on
        await bystander_mac.send(type="relay", payload="fine")
        assert (await bystander_ios.expect("relay"))["payload"] == "fine"


async def test_publishes_waiting_for_a_stalled_nats_do_not_hold_the_shutdown(tmp_path, caplog):
    """Frames taken at once while NATS does not read: nats-py's buffer fills and the
    publishes wait for a flush that may never come. At shutdown they get the close
    timeout, then end (logged); the rest of the shutdown goes on."""
    import os
    import signal

    from runtime.embedded_nats import EmbeddedNatsServer

    with EmbeddedNatsServer(store_dir=tmp_path / "nats") as server:
        async with running_edges(
            server.url, count=1, close_timeout_ms=300, shutdown_release_ms=300, metering=False
        ) as (edge,):
            mac_client, _ios_client, _ = await paired(edge, edge)
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                payload = "W" * 300_000
                for _ in range(200):  # ~60 MB at most; the socket buffers and nats-py's 2 MiB fill long before
                    taken = edge.ctx.counters.forwarded_at_once + edge.carrier.publishes_waiting
                    await mac_client.send(type="relay", payload=payload)
                    for _ in range(200):  # until the edge took it (it takes one at a time here)
                        if edge.carrier.publishes_waiting or edge.ctx.counters.forwarded_at_once > taken:
                            break
                        await asyncio.sleep(0.005)
                    if edge.carrier.publishes_waiting:
                        break
                assert edge.carrier.publishes_waiting, "nats-py's buffer never filled"
                edge.stop()
                # The shutdown first closes the sockets (their slots cannot be released
                # while NATS is stalled: each leave gives up after its JetStream timeouts).
                for _ in range(1500):
                    if "not confirmed published at shutdown" in caplog.text:
                        break
                    await asyncio.sleep(0.01)
                assert "1 frames not confirmed published at shutdown" in caplog.text
            finally:
                os.kill(server.process.pid, signal.SIGCONT)


async def test_a_heartbeat_behind_which_the_client_closes_is_left_to_the_handler(nats_url, caplog):
    """A close frame read with the heartbeat puts websockets in CLOSING before the heartbeat
    is looked at: nothing may be written then (websockets would raise in its data
    callback); the handler takes the heartbeat and the close ends cleanly."""
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        conn = next(iter(a.connections.values()))
        await until(lambda: _waiting_with_nothing_queued(conn))
        mac_client.ws.protocol.send_text(b'{"type":"heartbeat"}')
        mac_client.ws.protocol.send_close(1000, "bye")
        mac_client.ws.send_data()
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"
        await until(lambda: not a.connections)
        assert a.ctx.counters.heartbeats_answered_at_once == 0
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_an_error_while_answering_a_heartbeat_at_once_ends_that_socket_only(nats_url, monkeypatch):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        other_mac, other_ios, _ = await paired(a, b)
        failing = next(c for c in a.connections.values() if c.session.room_id == mac.room_id)
        await until(lambda: _waiting_with_nothing_queued(failing))

        real_write_now = edge.internals.write_now

        def broken_write(conn, data):
            if conn is failing:
                raise RuntimeError("a bug")
            real_write_now(conn, data)

        monkeypatch.setattr(edge.internals, "write_now", broken_write)
        await mac_client.send(type="heartbeat")
        assert (await mac_client.expect_close())[0] == 1011
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"
        assert (await other_mac.heartbeat())["mac_connected"] is True  # the others go on
        await other_mac.send(type="relay", payload="still here")
        assert (await other_ios.expect("relay"))["payload"] == "still here"
