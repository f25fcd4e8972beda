"""Delivery through the edge's one NATS subscription: no socket holds up another.

Real edges, a real nats-server, real TCP sockets. Where a test needs a client that
reads exactly as many bytes as it chooses (a phone on a slow link), it speaks
WebSocket itself over a plain socket with websockets' sans-I/O client.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.harness import (
    MacIdentity,
    connect_mac,
    join_message,
    paired,
    running_edges,
    until,
    ws_url,
)


class RawClient:
    """A WebSocket client over a plain non-blocking socket: it reads only when told to."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock, self.protocol = sock, protocol
        self.loop = asyncio.get_running_loop()
        self.messages: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, rcvbuf: int = 4096) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf
        )  # before connect: a small window
        sock.setblocking(False)
        uri = parse_uri(url)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        protocol = ClientProtocol(uri, max_size=None)
        client = cls(sock, protocol)
        protocol.send_request(protocol.connect())
        await client._flush()
        while protocol.state is not State.OPEN:
            await client.read(65536)
            assert protocol.handshake_exc is None, protocol.handshake_exc
        return client

    async def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                await self.loop.sock_sendall(self.sock, data)

    async def send(self, **message: Any) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        await self._flush()

    async def read(self, n: int) -> int:
        """Read at most `n` bytes from the socket (whatever it has) and parse them."""
        data = await asyncio.wait_for(self.loop.sock_recv(self.sock, n), 5)
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if getattr(event, "opcode", None) is Opcode.TEXT:
                self.messages.append(json.loads(event.data))
        await self._flush()
        return len(data)

    async def expect(self, type_: str) -> dict[str, Any]:
        while not self.messages:
            await self.read(65536)
        message = self.messages.pop(0)
        assert message["type"] == type_, message
        return message

    def close(self) -> None:
        self.sock.close()


def _server_side(edge, room_id: str, role: str):
    conns = [
        c
        for c in edge.connections.values()
        if c.session.room_id == room_id and c.session.role == role
    ]
    assert len(conns) == 1, conns
    return conns[0]


async def test_a_slow_reader_paused_between_its_buffer_marks_does_not_stall_other_sockets_of_its_edge(
    nats_url,
):
    """Found in review: a transport that went over its high-water mark stays paused until it
    is down to the low one (high // 4). A frame written straight from the edge's one delivery
    callback to a socket in between would wait in websockets' drain(), and with it every
    other socket of the edge. Such a frame must go to the socket's backlog instead.
    """
    async with running_edges(nats_url, close_timeout_ms=300) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        phone = await RawClient.connect(ws_url(b, mac.room_id, "ios"))
        try:
            await phone.send(**join_message(mac))
            await phone.expect("peer_joined")
            await mac_client.expect("peer_joined")
            # An independent room on the same two edges, delivered by the same callback on b.
            other_mac, other_ios, _ = await paired(a, b)

            conn = _server_side(b, mac.room_id, "ios")
            ws = conn.ws
            # A small send buffer for this one TCP connection (as on a slow mobile link): what
            # the kernel takes from the transport's buffer comes in steps of a few KiB.
            ws.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            high = ws.write_limit_high
            low = ws.transport.get_write_buffer_limits()[0]

            # A large frame: it goes to the backlog; the drainer writes it and waits in drain().
            await mac_client.send(type="relay", payload="A" * 200_000)
            await until(lambda: ws.transport.get_write_buffer_size() > high)
            # The phone reads a little, until the buffer is between the marks, then reads no more.
            await until(lambda: not conn.backlog)
            while not (low + 2048 < ws.transport.get_write_buffer_size() < high - 4096):
                await phone.read(2048)
                await asyncio.sleep(0.005)
            assert ws.paused  # still paused: resume happens only at the low-water mark

            # A small frame for the phone: empty backlog, lock free, OPEN, under high -> written at once.
            await mac_client.send(type="relay", payload="small")
            await asyncio.sleep(0.3)

            # Another room entirely: its frame must still flow through edge b.
            await other_mac.send(type="relay", payload="still-flowing")
            try:
                delivered = await other_ios.expect("relay", timeout=3)
            except TimeoutError:
                raise AssertionError(
                    "edge b delivers nothing: its dispatch callback waits in drain() of one slow socket "
                    f"(drain waiters on it: {len(ws.drain_waiters)}; its buffer "
                    f"{ws.transport.get_write_buffer_size()} B, low {low}, high {high})"
                ) from None
            assert delivered["payload"] == "still-flowing"
        finally:
            phone.close()


async def test_the_websockets_internals_a_direct_write_relies_on_are_there(nats_url):
    """The edge writes a frame it can write at once as `ws.send` would, minus its waits:
    with websockets' `protocol.send_text` and `send_data`, after checking `paused`,
    `send_in_progress` and `write_limit_high`. A websockets release that renames one of
    these fails here, by name, rather than as a stall or a lost frame elsewhere."""
    async with running_edges(nats_url, count=1) as (edge,):
        mac_client, ios_client, mac = await paired(edge, edge)
        ws = _server_side(edge, mac.room_id, "ios").ws
        assert ws.paused is False and ws.send_in_progress is None
        assert isinstance(ws.write_limit_high, int) and ws.write_limit_high > 0
        assert callable(ws.protocol.send_text) and callable(ws.send_data)
        await mac_client.send(type="relay", payload="direct")
        assert (await ios_client.expect("relay"))["payload"] == "direct"
