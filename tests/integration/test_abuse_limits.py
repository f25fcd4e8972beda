"""Caps on sockets and upgrades (issue 16 item 5) and the byte rate limit (item 9).

Real edges, a real nats-server, real WebSocket clients. The limits are settings,
shortened here; nothing is timed but what a token bucket's refill needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

from websockets.exceptions import InvalidStatus

from tests.harness import (
    Client,
    MacIdentity,
    http_get,
    make_account,
    new_room_id,
    paired,
    running_edges,
    until,
)
from tests.integration.test_control_frames import RawSocket


async def upgrade(edge, room_id: str | None = None, role: str | None = "ios", headers=None) -> tuple[int, Client | None, Any]:
    """(status, the open client on a 101, the refusal's headers otherwise)."""
    try:
        client = await Client.connect(edge, room_id or new_room_id(), role, headers)
    except InvalidStatus as exc:
        return exc.response.status_code, None, exc.response.headers
    return 101, client, {}


async def refusal_body(edge, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """The status and body a WebSocket upgrade request gets, read as plain HTTP."""
    return await http_get(
        edge.port,
        f"/ws?room_id={new_room_id()}&role=ios",
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )


# --- upgrades per client address per second ----------------------------------------------


async def test_upgrades_past_an_addresss_rate_are_refused_429_before_the_upgrade(nats_url, caplog):
    account = await make_account(nats_url)
    async with running_edges(
        nats_url, count=1, auth="required", address_upgrades_per_s=5, address_upgrade_burst=3
    ) as (edge,):
        statuses = []
        for _ in range(3):
            status, client, _ = await upgrade(edge, headers=account.auth)
            statuses.append(status)
            await client.close()
        assert statuses == [101] * 3  # the burst
        # The next one is refused before anything else is looked at, a good key and all.
        status, _, headers = await upgrade(edge, headers=account.auth)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert await refusal_body(edge, account.auth) == (429, "too many connections from this address; slow down\n")
        # Before the key is looked at: a wrong one is refused the same, and guesses nothing.
        wrong = {"Authorization": "Bearer rdkey_" + "0" * 32}
        assert (await refusal_body(edge, wrong))[0] == 429
        # Logged once for the address, not once per refusal.
        assert caplog.text.count("WebSocket upgrades past RELAY_ADDRESS_UPGRADES_PER_S") == 1
        # The rate refills: one more after a fifth of a second (5/s).
        await asyncio.sleep(0.25)
        status, client, _ = await upgrade(edge, headers=account.auth)
        assert status == 101
        await client.close()


# --- sockets per client address ----------------------------------------------------------


async def test_sockets_past_an_addresss_cap_are_refused_429_and_a_closed_one_frees_its_place(nats_url, caplog):
    async with running_edges(nats_url, count=1, address_socket_limit=3) as (edge,):
        opened = [await upgrade(edge) for _ in range(3)]
        assert [status for status, _, _ in opened] == [101] * 3
        status, _, headers = await upgrade(edge)
        assert status == 429 and headers["Retry-After"] == "5"
        assert await refusal_body(edge) == (429, "too many connections from this address on this relay server\n")
        assert caplog.text.count("holds 3 sockets on this edge, RELAY_ADDRESS_SOCKET_LIMIT") == 1
        await opened[0][1].close()
        await until(lambda: edge.ctx.access.sockets.held(None, "127.0.0.1")[1] == 2)
        status, client, _ = await upgrade(edge)
        assert status == 101
        assert len(edge.connections) == 3


async def test_upgrades_side_by_side_cannot_pass_the_address_cap_together(nats_url):
    # Twelve Macs' requests written at once: all of them wait on the checks before the 101
    # (the account and the room limit, read from storage) at the same time, each having
    # passed the early looks at the cap; only 5 may be let through.
    async with running_edges(nats_url, count=1, address_socket_limit=5) as (edge,):
        connections = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(12)]
        for _, writer in connections:
            writer.write(
                f"GET /ws?room_id={new_room_id()}&role=mac HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
        heads = await asyncio.gather(*(asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) for reader, _ in connections))
        assert sorted(int(head.split(b" ", 2)[1]) for head in heads) == [101] * 5 + [429] * 7
        await until(lambda: len(edge.connections) == 5)
        for _, writer in connections:
            writer.transport.abort()
        await until(lambda: edge.ctx.access.sockets.held(None, "127.0.0.1") == (0, 0))


async def test_an_upgrade_that_fails_after_the_checks_gives_its_place_back(nats_url):
    async with running_edges(nats_url, count=1, address_socket_limit=1) as (edge,):
        for _ in range(3):
            # Past every check of the edge's, then refused by websockets' own handshake
            # (no Upgrade header): the socket never opens, and its place comes back.
            status, _ = await http_get(edge.port, f"/ws?room_id={new_room_id()}&role=mac")
            assert status not in (101, 429), status
        await until(lambda: edge.ctx.access.sockets.held(None, "127.0.0.1") == (0, 0))
        status, client, _ = await upgrade(edge)
        assert status == 101


# --- sockets per user ----------------------------------------------------------------------


async def test_a_users_sockets_past_its_cap_are_refused_429_and_other_users_are_not(nats_url, tmp_path, caplog):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.free]\nmax_rooms = 1\n")  # 4 sockets per room: a cap of 4
    greedy, other = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(
        nats_url, count=1, auth="required", tiers_file=str(tiers), user_socket_limit=2
    ) as (edge,):
        opened = [await upgrade(edge, headers=greedy.auth) for _ in range(4)]
        assert [status for status, _, _ in opened] == [101] * 4
        status, _, headers = await upgrade(edge, headers=greedy.auth)
        assert status == 429 and headers["Retry-After"] == "5"
        assert await refusal_body(edge, greedy.auth) == (
            429, "too many connections for this account (4 on this relay server); close some\n"
        )
        assert caplog.text.count(f"user {greedy.user_id} holds 4 sockets on this edge") == 1
        # Another account from the same address is not held back by it.
        status, _, _ = await upgrade(edge, headers=other.auth)
        assert status == 101
        # Once one of its sockets is gone, the user may open one again.
        await opened[0][1].close()
        await until(lambda: edge.ctx.access.sockets.held(greedy.user_id, "127.0.0.1")[0] == 3)
        status, _, _ = await upgrade(edge, headers=greedy.auth)
        assert status == 101


async def test_the_local_user_of_auth_none_is_never_capped_per_user(nats_url, tmp_path):
    # Every connection of an auth=none edge is the one local user: a cap on that user would
    # be a cap on the whole edge. Here its tier would allow it a single socket.
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.tiny]\ncredits_per_window = -1\nmax_rooms = 0\nmax_sessions = 1\n")
    async with running_edges(
        nats_url, count=1, tiers_file=str(tiers), local_user_tier="tiny", user_socket_limit=1
    ) as (edge,):
        opened = [await upgrade(edge) for _ in range(4)]
        assert [status for status, _, _ in opened] == [101] * 4


# --- bytes per socket per second ---------------------------------------------------------


def _text_frame(payload: bytes) -> bytes:
    """A client text frame, masked with a zero key (which leaves the payload as is)."""
    return b"\x81\xff" + struct.pack("!Q", len(payload)) + b"\0\0\0\0" + payload


async def test_a_socket_past_its_byte_rate_is_closed_1008_and_a_victim_pair_across_edges_loses_nothing(nats_url, caplog):
    caplog.set_level(logging.WARNING)
    # 256 KiB/s, bursts of 1 MiB; the message rate limit stays at its default (200/s): the
    # flooder sends few messages, only large ones (a 400 kB heartbeat is a valid heartbeat).
    async with running_edges(
        nats_url, socket_bytes_per_s=256 * 1024, socket_bytes_burst=1024 * 1024, max_frame_bytes=512 * 1024
    ) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)  # the victim: its Mac on the flooder's edge
        flooder = await RawSocket.connect(a.port, MacIdentity.new().room_id)
        try:
            heavy = _text_frame(json.dumps({"type": "heartbeat", "pad": "x" * 400_000}).encode())
            flooder.writer.write(heavy * 40)  # 16 MB at once: sixteen bursts' worth
            frames = await flooder.frames_until_closed(timeout=10)
        finally:
            flooder.close()
        text = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
        close = [payload for opcode, payload in frames if opcode == 0x8]
        assert text[-1] == {"type": "error", "code": "RATE_LIMITED", "message": "Too much data; slow down"}
        assert all(m["type"] == "heartbeat_ack" for m in text[:-1])
        assert 2 <= len(text) - 1 <= 5, text  # a burst's worth answered (1 MiB: two, and what refilled)
        assert close and struct.unpack("!H", close[0][:2])[0] == 1008 and close[0][2:] == b"rate limit exceeded"
        assert "inbound bytes past its byte rate limit (RELAY_SOCKET_BYTES_PER_S); closed 1008" in caplog.text
        await until(lambda: len(a.connections) == 1)  # the flooder is gone, the victim's Mac stays
        for n in range(20):
            await mac_client.send(type="relay", payload=f"m{n}")
            await ios_client.send(type="relay", payload=f"i{n}")
        for n in range(20):
            assert (await ios_client.expect("relay"))["payload"] == f"m{n}"
            assert (await mac_client.expect("relay"))["payload"] == f"i{n}"
        await mac_client.expect_silence()
        await ios_client.expect_silence()


async def test_a_macs_heaviest_output_is_relayed_within_the_default_byte_rate(nats_url):
    # protocol.md §9: a PTY chunk of 32 KiB becomes a payload of ~58 kB; the Mac batches
    # up to 20 of them, and under heavy output sends such batches back to back. Two
    # seconds of that at 20 batches a second of four chunks each, sent as fast as it goes.
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        payloads = ["P" * 58_000] * 4
        for _ in range(40):  # 9.3 MB
            await mac_client.send(type="relay_batch", payloads=payloads)
        for _ in range(40):
            assert (await ios_client.expect("relay_batch", timeout=10))["payloads"] == payloads
        await mac_client.heartbeat()
