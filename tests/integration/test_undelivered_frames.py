"""Frames that reach nobody (issue 16 item 10): the sender hears `NO_PEER` at once and is
not charged, when the peer's edge is gone from NATS (its lease still alive) and when the
peer's edge no longer has the socket. Real edges, metering and a nats-server of the test's own.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import msgspec
import pytest

from edge.context import Ending
from runtime.embedded_nats import EmbeddedNatsServer
from tests.harness import (
    Client,
    EdgeProcess,
    MacIdentity,
    connect_ios,
    connect_mac,
    make_account,
    metrics,
    read_ledger,
    running_edges,
    running_metering,
    until,
)

FAST = {"usage_flush_interval_ms": 50, "usage_refund_window_ms": 200, "quota_check_timeout_ms": 3_000}


@pytest.fixture
def own_nats() -> Iterator[str]:
    with EmbeddedNatsServer() as server:
        yield server.url


async def message_credits_settled(url: str, user_id: str) -> int:
    """The user's message credits once metering has applied every flush (a few intervals)."""
    await asyncio.sleep(0.8)  # a refund window and a dozen flush intervals of FAST
    ledger = await read_ledger(url, user_id)
    return sum(w.message_tokens for w in ledger.windows)


async def paired_with_a_frame(a, b, account):
    """A Mac on edge `a` and an iPhone on `b`, paired, one frame relayed (charged: 1 credit)."""
    mac_identity = MacIdentity.new()
    mac, _ = await connect_mac(a, mac_identity, account.auth)
    ios, _ = await connect_ios(b, mac_identity, account.auth)
    await ios.expect("peer_joined")
    await mac.expect("peer_joined")
    await mac.send(type="relay", payload="before")
    assert (await ios.expect("relay"))["payload"] == "before"
    return mac, ios


async def test_frames_to_a_peer_whose_edge_died_get_no_peer_at_once_and_are_not_charged(own_nats):
    account = await make_account(own_nats, tier="premium")
    # Charged per payload: the refund must be the frame's own credits (a batch of 3 here).
    settings = {**FAST, "auth": "required", "charge_per_payload": True}
    async with running_metering(own_nats), running_edges(own_nats, 1, **settings) as (survivor,):
        async with EdgeProcess(own_nats, **settings) as doomed:  # its lease: 15 s by default
            mac, ios = await paired_with_a_frame(survivor, doomed, account)
            await doomed.stop(signal.SIGKILL)  # a crash: its lease lives on for 15 s
            sent = time.monotonic()
            await mac.send(type="relay_batch", payloads=["a", "b", "c"])
            assert await mac.expect("peer_disconnected", timeout=3) == {"type": "peer_disconnected", "reason": "timeout"}
            assert (await mac.expect_error("NO_PEER"))["message"] == "Peer not connected"
            assert time.monotonic() - sent < 3  # not at the lease's expiry
            for n in range(5):  # the peer is gone: later frames are answered, never sent
                await mac.send(type="relay", payload=f"after{n}")
                await mac.expect_error("NO_PEER")
            assert (await mac.heartbeat())["mac_connected"] is True
            counters = await metrics(survivor)
            assert counters["relay_frames_undelivered_total"] == 1
            assert counters["relay_frames_forwarded_total"] == 2
        assert await message_credits_settled(own_nats, account.user_id) == 1  # "before" alone


async def test_a_frame_to_a_socket_its_live_edge_no_longer_has_gets_no_peer_and_is_not_charged(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 2, auth="required", **FAST) as (a, b):
        mac, ios = await paired_with_a_frame(a, b, account)
        # The moment after the iPhone's socket left edge b and before b's peer_left reaches
        # the Mac (b frees the slot in KV first), held open: b no longer knows the socket.
        (ios_socket,) = [socket_id for socket_id, conn in b.connections.items() if conn.session.role == "ios"]
        held = b.connections.pop(ios_socket)
        await mac.send(type="relay", payload="lost")
        await mac.expect_error("NO_PEER")
        await ios.expect_silence()
        b.connections[ios_socket] = held  # for b's shutdown to close it
        assert (await metrics(a))["relay_frames_undelivered_total"] == 1
        assert await message_credits_settled(own_nats, account.user_id) == 1


async def test_frames_from_a_peer_that_joined_while_the_register_was_in_flight_arrive_after_peer_joined(own_nats):
    # After a NATS node died (issue 15), registers took seconds: an iPhone joined on another
    # edge meanwhile, found the Mac's new slot and sent at once, and its frames reached the
    # Mac's socket before the Mac's own register returned, as if from a stranger: dropped.
    async with running_edges(own_nats, 2) as (a, b):
        mac_identity = MacIdentity.new()
        slot_written = asyncio.Event()
        refresh = a.room_requests.refresh_registration

        async def refresh_slowly(conn):  # the register's slot is in KV; its answer is late
            slot_written.set()
            await asyncio.sleep(1.0)
            await refresh(conn)

        a.room_requests.refresh_registration = refresh_slowly
        mac = await Client.connect(a, mac_identity.room_id, "mac")
        await mac.send(**mac_identity.register_message())
        await asyncio.wait_for(slot_written.wait(), 10)
        ios, _ = await connect_ios(b, mac_identity)
        assert (await ios.expect("peer_joined"))["type"] == "peer_joined"
        for n in range(3):
            await ios.send(type="relay", payload=f"early{n}")
        await mac.expect("room_registered")
        await mac.expect("peer_joined")
        assert [(await mac.expect("relay"))["payload"] for _ in range(3)] == ["early0", "early1", "early2"]
        await mac.send(type="relay", payload="reply")
        assert (await ios.expect("relay"))["payload"] == "reply"


async def test_a_frame_to_a_socket_whose_close_has_begun_gets_no_peer_and_is_not_charged(own_nats):
    # The peer's edge closes its sockets (a NATS reconnect, a drain, a lost lease): a frame
    # that comes for one of them meanwhile is written to nobody, and used to vanish, charged.
    account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 2, auth="required", **FAST) as (a, b):
        mac, ios = await paired_with_a_frame(a, b, account)
        (ios_conn,) = [conn for conn in b.connections.values() if conn.session.role == "ios"]
        open_state, ios_conn.ending = ios_conn.ending, Ending.CLOSING  # held at the moment its close began
        await mac.send(type="relay", payload="lost")
        await mac.expect_error("NO_PEER")
        ios_conn.ending = open_state
        await ios.expect_silence()
        assert (await metrics(a))["relay_frames_undelivered_total"] == 1
        assert await message_credits_settled(own_nats, account.user_id) == 1


async def test_a_frame_from_a_socket_that_is_not_the_addressees_peer_gets_no_peer_and_is_not_charged(own_nats):
    # The sender takes the addressee for its peer, the addressee has another (a room
    # record read while a slot's release waited for storage, as after a whole NATS cluster
    # restarted, named a peer that had moved on): the frame is dropped, and used to vanish,
    # charged. Once written at once, once from the addressee's backlog.
    account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 2, auth="required", **FAST) as (a, b):
        mac, ios = await paired_with_a_frame(a, b, account)
        (ios_conn,) = [conn for conn in b.connections.values() if conn.session.role == "ios"]
        its_peer = ios_conn.session.peer
        ios_conn.session.peer = msgspec.structs.replace(its_peer, socket_id="another-mac-socket")
        await mac.send(type="relay", payload="stranger-at-once")
        await mac.expect_error("NO_PEER")
        async with ios_conn.write_lock:  # news about its peer being written: the frame waits
            await mac.send(type="relay", payload="stranger-queued")
            await until(lambda: ios_conn.drainer is not None)  # it took the frame, and waits for the lock
        await mac.expect_error("NO_PEER")
        ios_conn.session.peer = its_peer
        await ios.expect_silence()
        assert (await metrics(b))["relay_frames_not_from_peer_total"] == 2
        assert (await metrics(a))["relay_frames_undelivered_total"] == 2
        await mac.send(type="relay", payload="peer-again")
        assert (await ios.expect("relay"))["payload"] == "peer-again"
        assert await message_credits_settled(own_nats, account.user_id) == 2  # "before", "peer-again"
