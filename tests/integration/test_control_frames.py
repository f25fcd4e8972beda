"""WebSocket control frames from abusive clients (issue 16, items 2 and 3), and the lease
of an edge under pressure. Real edges, real nats-server, raw WebSocket clients: a ping
flood comes from a raw socket, as an attacker would send it, not through a client library
that paces its pings."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
import socket
import struct

import nats
import nats.js.errors

from edge import internals
from schemas.subjects import PRESENCE_BUCKET, edge_lease_key
from tests.harness import MacIdentity, paired, running_edges, until


def _pings(count: int, payload: bytes = b"") -> bytes:
    """`count` client ping frames, masked with a zero key (which leaves the payload as is)."""
    return (bytes([0x89, 0x80 | len(payload)]) + b"\0\0\0\0" + payload) * count


class RawSocket:
    """A WebSocket client on a bare TCP connection: it sends what it is told, byte for byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, room_id: str, receive_buffer: int | None = None) -> "RawSocket":
        sock = socket.socket()
        if receive_buffer is not None:  # a client that reads nothing holds little in its kernel
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        writer.write(
            f"GET /ws?room_id={room_id}&role=mac HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frames_until_closed(self, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every frame the edge sends until it closes the connection."""
        frames = []

        async def read_all() -> None:
            while True:
                try:
                    head = await self.reader.readexactly(2)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                frames.append((head[0] & 0x0F, await self.reader.readexactly(length)))

        await asyncio.wait_for(read_all(), timeout)
        return frames

    def close(self) -> None:
        self.writer.transport.abort()


async def _relay_both_ways(mac_client, ios_client, count: int) -> None:
    """`count` frames each way, all of them delivered, in order."""
    for n in range(count):
        await mac_client.send(type="relay", payload=f"m{n}")
        await ios_client.send(type="relay", payload=f"i{n}")
    for n in range(count):
        assert (await ios_client.expect("relay"))["payload"] == f"m{n}"
        assert (await mac_client.expect("relay"))["payload"] == f"i{n}"


async def _flood_is_closed_1008(edge, burst: int, slack: int) -> None:
    flooder = await RawSocket.connect(edge.port, MacIdentity.new().room_id)
    try:
        flooder.writer.write(_pings(200_000))  # 1.2 MB: ~30 reads of the edge's, were it to answer them all
        frames = await flooder.frames_until_closed()
    finally:
        flooder.close()
    pongs = [payload for opcode, payload in frames if opcode == 0xA]
    text = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
    close = [payload for opcode, payload in frames if opcode == 0x8]
    # The burst's worth of pings is answered (and what the rate refilled meanwhile, and with
    # the fallback the rest of one read), then the flooder hears why, and the close.
    assert burst <= len(pongs) <= burst + slack, len(pongs)
    assert text == [{"type": "error", "code": "RATE_LIMITED", "message": "Too many control frames; slow down"}]
    assert close and struct.unpack("!H", close[0][:2])[0] == 1008 and close[0][2:] == b"rate limit exceeded"


async def test_a_ping_flood_is_closed_1008_and_a_victim_pair_across_edges_loses_nothing(nats_url, caplog):
    async with running_edges(nats_url, socket_rate_limit_per_s=50, socket_rate_burst=500, edge_lease_ttl_ms=1000) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)  # the victim: its Mac on the flooded edge
        boot_id, lease_revision = a.boot_id, a.leases.revision
        flood = asyncio.create_task(_flood_is_closed_1008(a, burst=500, slack=100))
        await _relay_both_ways(mac_client, ios_client, 20)
        await flood
        await _relay_both_ways(mac_client, ios_client, 20)
        # The edge kept its lease all along: same incarnation, renewed since, nobody told `timeout`.
        await until(lambda: a.leases.revision != lease_revision)
        assert a.boot_id == boot_id and "lost its lease" not in caplog.text
        await mac_client.expect_silence()
        await ios_client.expect_silence()
        assert len(a.connections) == 1  # the flooder is gone, the victim's Mac stays
        assert "control frames (pings, pongs) past its rate limit; closed 1008" in caplog.text


async def test_a_ping_flood_is_closed_1008_where_the_parse_cannot_be_watched(nats_url, monkeypatch):
    # The fallback for a websockets release that parses differently: control frames are
    # counted as events, once a read was parsed and answered.
    monkeypatch.setattr(internals, "PROBED", dataclasses.replace(internals.PROBED, watch_parse=False, why_not="test"))
    async with running_edges(nats_url, count=1, socket_rate_limit_per_s=50, socket_rate_burst=500) as (edge,):
        await _flood_is_closed_1008(edge, burst=500, slack=50_000)  # a read holds up to ~43,000
        await until(lambda: not edge.connections)


async def test_pongs_a_pinging_client_never_reads_stay_bounded_and_its_socket_is_dropped(nats_url, caplog):
    bound = 1024 * 1024
    # No rate limit here: the bound on what waits to be written must hold on its own.
    async with running_edges(nats_url, socket_rate_limit_per_s=0, socket_queue_max_bytes=bound) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        flooder_room = MacIdentity.new().room_id
        flooder = await RawSocket.connect(a.port, flooder_room, receive_buffer=4096)
        await until(lambda: len(a.connections) == 2)
        conn = next(c for c in a.connections.values() if c.session.room_id == flooder_room)
        chunk = _pings(8000, b"p" * 125)  # 1 MB of pings: as much of pongs for the edge to write
        largest, dropped = 0, False
        try:
            for _ in range(64):  # 64 MB at most: far more than the kernel's buffers hold
                flooder.writer.write(chunk)
                await flooder.writer.drain()
                largest = max(largest, conn.ws.transport.get_write_buffer_size())
                if conn.ws.transport.is_closing():
                    break
        except ConnectionError:
            dropped = True
        finally:
            flooder.close()
        await until(lambda: len(a.connections) == 1)  # only the victim's Mac
        assert dropped or conn.ws.transport.is_closing()
        # Its whole outgoing buffer stayed within the bound, give or take one read's pongs.
        assert largest <= bound + 256 * 1024, largest
        assert "over RELAY_SOCKET_QUEUE_MAX_BYTES; dropped" in caplog.text
        await _relay_both_ways(mac_client, ios_client, 10)


async def test_renewals_that_keep_losing_to_reads_that_say_the_lease_is_ours_are_paced_and_fence_after_a_ttl(nats_url, caplog):
    # Seen while a NATS node rejoined its cluster: every renewal lost its compare-and-set
    # and every read said the lease was still ours, at the revision just refused. The edge
    # renewed again at once, thousands of times a second, a warning each.
    async with running_edges(nats_url, count=1, edge_lease_ttl_ms=2000, jetstream_timeout_ms=500) as (a,):
        mac_client, ios_client, _ = await paired(a, a)
        presence_beside = a.leases.connection.presence_beside
        attempts = 0

        class ReadsFromBehind:
            def __init__(self, presence):
                self.presence = presence

            async def renew_lease(self, *args):
                nonlocal attempts
                attempts += 1
                raise nats.js.errors.KeyWrongLastSequenceError()

            async def read_lease(self, edge_id):
                return await self.presence.read_lease(edge_id)

        async def behind(main):
            return ReadsFromBehind(await presence_beside(main))

        a.leases.connection.presence_beside = behind
        try:
            # Fenced a TTL after the last renewal, or started over once the lease expired
            # (its sockets closed when no new lease came within an attempt's bound).
            assert (await mac_client.expect_close(timeout=10))[0] == 1001
        finally:
            a.leases.connection.presence_beside = presence_beside
        assert a.ctx.counters.leases_lost >= 1
        assert attempts < 60, attempts  # paced at the retry delay (0.13 s here), not spinning
        assert caplog.text.count("a lease renewal landed unseen") == 1


async def test_a_lease_renewal_that_landed_unseen_costs_the_edge_nothing(nats_url, caplog):
    # Under CPU pressure a renewal can land while its answer comes too late for the edge
    # (timed out): the lease's revision moved on without the edge knowing. That is not a
    # lost lease; the edge must not close its sockets and start over.
    async with running_edges(nats_url, edge_lease_ttl_ms=1500) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        boot_id = a.boot_id
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(PRESENCE_BUCKET)
            key = edge_lease_key(a.settings.edge_id)
            for _ in range(20):  # as the edge's own renewal would write it (unless the edge renews first)
                entry = await kv.get(key)
                try:
                    ours = await nc.jetstream().publish(
                        f"$KV.{PRESENCE_BUCKET}.{key}",
                        entry.value,
                        msg_ttl=1.5,
                        headers={"Nats-Expected-Last-Subject-Sequence": str(entry.revision)},
                    )
                    break
                except nats.js.errors.APIError:
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("could not renew the lease as the edge would")
        finally:
            await nc.close()
        await until(lambda: a.leases.revision > ours.seq)  # the edge renewed after it
        await mac_client.expect_silence(0.5)
        await ios_client.expect_silence()
        assert a.boot_id == boot_id and "lost its lease" not in caplog.text
        assert "a lease renewal landed unseen" in caplog.text
        await _relay_both_ways(mac_client, ios_client, 5)
