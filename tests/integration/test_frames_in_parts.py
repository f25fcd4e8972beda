"""Frames of any size, whatever NATS's max_payload: a frame larger than the connected
server carries travels in parts and is put together on the receiving edge, in order with
the frames around it; a frame missing a part is never delivered (`edge.protocol.parts`).

Every test here runs against a nats-server at its default max_payload, 1 MiB.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from edge.protocol.parts import part_kind
from runtime.embedded_nats import EmbeddedNatsServer
from schemas.subjects import addressed_subject, room_subject
from tests.harness import (
    EdgeProcess,
    connect_mac,
    metrics,
    paired,
    running_edges,
    until,
)

NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024
MAX_FRAME_BYTES = 4 * 1024 * 1024  # RELAY_MAX_FRAME_BYTES's default


@pytest.fixture(scope="module")
def default_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedNatsServer(store_dir=tmp_path_factory.mktemp("nats"), max_payload=NATS_DEFAULT_MAX_PAYLOAD) as server:
        yield server.url


def _relay_of_size(size: int, fill: str) -> dict[str, Any]:
    """A `relay` whose JSON text is exactly `size` bytes."""
    overhead = len(json.dumps({"type": "relay", "payload": ""}))
    return {"type": "relay", "payload": fill * (size - overhead)}


def _batch_of_size(size: int, fill: str) -> dict[str, Any]:
    """A `relay_batch` of 8 payloads whose JSON text is exactly `size` bytes."""
    overhead = len(json.dumps({"type": "relay_batch", "payloads": [""] * 8}))
    each, rest = divmod(size - overhead, 8)
    return {"type": "relay_batch", "payloads": [fill * (each + (rest if n == 0 else 0)) for n in range(8)]}


async def test_frames_of_1_and_4_mib_travel_both_ways_in_parts_in_order_with_small_ones(default_nats):
    async with running_edges(default_nats) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        assert a.ctx.max_forward_bytes < NATS_DEFAULT_MAX_PAYLOAD
        for sender, receiver, fill in ((mac_client, ios_client, "M"), (ios_client, mac_client, "I")):
            sent = [
                {"type": "relay", "payload": f"{fill}-before"},
                _relay_of_size(NATS_DEFAULT_MAX_PAYLOAD, fill),  # just over what one message carries
                {"type": "relay", "payload": f"{fill}-between"},
                _batch_of_size(MAX_FRAME_BYTES, fill.lower()),  # the largest frame the relay takes
                _relay_of_size(NATS_DEFAULT_MAX_PAYLOAD * 2 + 17, fill),
                {"type": "relay", "payload": f"{fill}-after"},
            ]
            for message in sent:
                await sender.send(**message)
            assert [await receiver.recv(timeout=15) for _ in sent] == sent
        for edge in (a, b):
            counted = await metrics(edge)
            assert counted["relay_frames_forwarded_in_parts_total"] == 3
            assert counted["relay_frames_received_in_parts_total"] == 3
            assert counted["relay_frames_dropped_incomplete_total"] == 0
        # Both still open and relaying.
        await mac_client.send(type="relay", payload="still here")
        assert (await ios_client.expect("relay"))["payload"] == "still here"


async def test_frames_in_parts_between_two_sockets_of_one_edge(default_nats):
    async with running_edges(default_nats, count=1) as (a,):
        mac_client, ios_client, _ = await paired(a, a)
        big = _relay_of_size(3 * NATS_DEFAULT_MAX_PAYLOAD, "x")
        await mac_client.send(**big)
        await mac_client.send(type="relay", payload="small")
        assert await ios_client.recv(timeout=15) == big
        assert (await ios_client.expect("relay"))["payload"] == "small"


async def test_a_frame_over_max_frame_bytes_still_closes_1009(default_nats):
    async with running_edges(default_nats) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        await mac_client.send(**_relay_of_size(MAX_FRAME_BYTES + 1, "z"))
        assert (await mac_client.expect_close())[0] == 1009
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"


async def test_an_undelivered_frame_in_parts_is_refunded_once(default_nats):
    """Only the last part carries the reply subject: a frame for a socket that is gone is
    taken back (and its client told NO_PEER) once, not once per part."""
    async with running_edges(default_nats) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        ios_conn = next(iter(b.connections.values()))
        b.connections.pop(ios_conn.session.socket_id)  # as if it had just left, before its edge said so
        await mac_client.send(**_relay_of_size(2 * NATS_DEFAULT_MAX_PAYLOAD, "u"))
        await mac_client.expect_error("NO_PEER")
        await mac_client.expect_silence()
        assert (await metrics(a))["relay_frames_undelivered_total"] == 1


async def _inject_parts(nats_url: str, ios_edge_id: str, ios_socket: str, mac_socket: str, room_id: str, parts: list[tuple[int, bool, bytes]]) -> None:
    """Publish parts addressed to the iPhone's socket as the Mac's edge would: what an edge
    that died between two parts (or a NATS that lost one) leaves behind."""
    nc = await nats.connect(nats_url)
    try:
        prefix = addressed_subject(room_subject(room_id, "ios"), ios_edge_id, ios_socket, mac_socket, "")
        for index, last, data in parts:
            await nc.publish(prefix + part_kind(index, last), data)
        await nc.flush()
    finally:
        await nc.close()


async def test_a_frame_missing_its_last_part_is_never_delivered_and_the_next_comes_whole(default_nats):
    async with running_edges(default_nats) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        mac_socket = next(iter(a.connections))
        ios_socket, ios_conn = next(iter(b.connections.items()))
        # Two parts of a three-part frame, then the sender's edge is gone.
        await _inject_parts(default_nats, b.settings.edge_id, ios_socket, mac_socket, mac.room_id,
                            [(0, False, b'{"type":"relay","payload":"AAAA'), (1, False, b"BBBB")])
        await until(lambda: ios_conn.parts is not None and ios_conn.parts.under_way)
        # The same socket's next frame (here, a real one) shows the rest was lost.
        await mac_client.send(type="relay", payload="whole")
        assert await ios_client.recv() == {"type": "relay", "payload": "whole"}
        await ios_client.expect_silence()
        assert not ios_conn.parts.under_way
        assert (await metrics(b))["relay_frames_dropped_incomplete_total"] == 1


async def test_a_frame_whose_edge_died_between_parts_is_dropped_at_the_timeout(default_nats):
    async with running_edges(default_nats, frame_parts_timeout_ms=200) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        mac_socket = next(iter(a.connections))
        ios_socket, ios_conn = next(iter(b.connections.items()))
        await _inject_parts(default_nats, b.settings.edge_id, ios_socket, mac_socket, mac.room_id,
                            [(0, False, b"x" * 900_000)])
        await until(lambda: ios_conn.parts is not None and ios_conn.parts.under_way)
        await until(lambda: not ios_conn.parts.under_way, timeout=3)  # memory back, nothing sent
        assert (await metrics(b))["relay_frames_dropped_incomplete_total"] == 1
        # A late last part is not joined to anything.
        await _inject_parts(default_nats, b.settings.edge_id, ios_socket, mac_socket, mac.room_id, [(1, True, b"late")])
        await ios_client.expect_silence()
        await mac_client.send(type="relay", payload="after")
        assert (await ios_client.expect("relay"))["payload"] == "after"


async def test_a_takeover_mid_frame_delivers_no_part_of_the_old_macs_frame(default_nats):
    async with running_edges(default_nats) as (a, b):
        _, ios_client, mac = await paired(a, b)
        old_mac_socket = next(iter(a.connections))
        ios_socket, ios_conn = next(iter(b.connections.items()))
        await _inject_parts(default_nats, b.settings.edge_id, ios_socket, old_mac_socket, mac.room_id,
                            [(0, False, b'{"type":"relay","payload":"OLD')])
        await until(lambda: ios_conn.parts is not None and ios_conn.parts.under_way)
        new_mac_client, _ = await connect_mac(a, mac)  # the same Mac, a new socket: a takeover
        assert (await ios_client.expect("peer_joined"))["public_key"] == mac.public_key
        await new_mac_client.expect("peer_joined")
        big = _relay_of_size(2 * NATS_DEFAULT_MAX_PAYLOAD + 5, "N")
        await new_mac_client.send(**big)
        assert await ios_client.recv(timeout=15) == big
        assert (await metrics(b))["relay_frames_dropped_incomplete_total"] == 1


async def test_an_edge_killed_while_forwarding_frames_in_parts_leaves_no_partial_frame(default_nats):
    """The sending edge SIGKILLed while its Mac streams 3 MiB frames: the iPhone gets some
    frames, each whole and in order, then hears its peer is gone; nothing else."""
    async with EdgeProcess(default_nats, edge_lease_ttl_ms=1000) as mac_edge:
        async with running_edges(default_nats, count=1) as (ios_edge,):
            mac_client, ios_client, _ = await paired(mac_edge, ios_edge)
            frames = [_relay_of_size(3 * NATS_DEFAULT_MAX_PAYLOAD, chr(ord("a") + n % 26)) for n in range(40)]

            async def stream() -> None:
                for frame in frames:
                    await mac_client.send(**frame)

            streaming = asyncio.create_task(stream())
            received = [await ios_client.recv(timeout=15)]  # the stream has begun
            await mac_edge.stop(signal.SIGKILL)
            streaming.cancel()
            deadline = time.monotonic() + 10
            while (message := await ios_client.recv(timeout=max(0.1, deadline - time.monotonic())))["type"] == "relay":
                received.append(message)
            assert message == {"type": "peer_disconnected", "reason": "timeout"}
            assert received == frames[: len(received)] and len(received) < len(frames)


async def test_a_client_that_never_finishes_a_fragmented_message_is_closed_not_buffered(default_nats):
    """What a client sends in WebSocket fragments is buffered by the connection only up to
    RELAY_MAX_FRAME_BYTES, and a message never finished is no sign of life: the socket
    times out (4000) as a silent one does."""
    async with running_edges(default_nats, heartbeat_dead_threshold_ms=400) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        never_ends = asyncio.Event()

        async def fragments():
            yield '{"type":"relay","payload":"'
            yield "x" * 100_000
            await never_ends.wait()

        async def keep_alive() -> None:  # the iPhone speaks: only the Mac is silent
            while True:
                await ios_client.send(type="heartbeat")
                await asyncio.sleep(0.1)

        sending = asyncio.create_task(mac_client.ws.send(fragments()))
        heartbeats = asyncio.create_task(keep_alive())
        try:
            assert (await mac_client.expect_close(timeout=5))[0] == 4000
            # Nothing of the unfinished message reached the peer: acks, then the news.
            while (message := await ios_client.recv())["type"] == "heartbeat_ack":
                pass
            assert message == {"type": "peer_disconnected", "reason": "timeout"}
        finally:
            sending.cancel()
            heartbeats.cancel()
