"""A minimal reference relay: the yardstick the product's load figures are divided by.

    .venv/bin/python -m bench.reference_relay --nats-url nats://127.0.0.1:4222 --port 9000

One process, `websockets` (compression off) and core NATS, one subject per room and role
(`ref.room.<room>.<role>`), and none of the product's work: no KV, no accounts, no
checks. Each socket subscribes to its own subject; a frame is published as the raw text
it came in and the peer's socket writes it as is. Pairing is stateless: a Mac's
`register_room` is announced to the room's iPhone subject (an iPhone that has joined
answers with `peer_joined` both ways), and a `join_room` sends `peer_joined` both ways,
so pairs form in any order, as they must after a reconnect storm. Keys are dummies.

Prints `reference relay ready on PORT` once it serves; `GET /healthz` answers 200.
Runs until SIGTERM or SIGINT. Never part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import signal
from urllib.parse import parse_qs

import msgspec
import nats
from nats.aio.msg import Msg
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

ROLES = ("mac", "ios")
# Marks the one control message: "the Mac has (re)registered". Frames carry no headers.
HEADER_EVENT = "Ref-Event"
MAC_REGISTERED = "mac_registered"

ROOM_REGISTERED = b'{"type":"room_registered","max_sessions":-1}'
HEARTBEAT_ACK = b'{"type":"heartbeat_ack","mac_connected":true}'
PEER_JOINED = b'{"type":"peer_joined","public_key":"cmVm","session_nonce":"cmVm","ephemeral_key":"cmVm"}'
BAD_MESSAGE = b'{"type":"error","code":"BAD_MESSAGE","message":"bad message"}'


class _Typed(msgspec.Struct):
    """Only the `type` of a client message; the rest is skipped, not built."""

    type: str = ""


_decode_type = msgspec.json.Decoder(_Typed).decode


def subject(room_id: str, role: str) -> str:
    return f"ref.room.{room_id}.{role}"


class ReferenceRelay:
    """The relay: `await ReferenceRelay(nats_url, host, port).run()` serves until `stop()`."""

    def __init__(self, nats_url: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.nats_url, self.host, self.port = nats_url, host, port
        self._stopping = asyncio.Event()
        self._nc: nats.NATS | None = None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, on_ready=None) -> None:
        self._nc = await nats.connect(self.nats_url, name="reference-relay", max_reconnect_attempts=-1)
        try:
            async with serve(
                self._handle,
                self.host,
                self.port,
                process_request=self._process_request,
                compression=None,
                max_size=4 * 1024 * 1024,
                ping_interval=None,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                if on_ready is not None:
                    on_ready(self.port)
                await self._stopping.wait()
        finally:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == "/healthz":
            return ws.respond(http.HTTPStatus.OK, "ok\n")
        if path != "/ws":
            return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        params = {k: v[0] for k, v in parse_qs(query).items()}
        room_id, role = params.get("room_id", ""), params.get("role")
        if not room_id or "." in room_id or "*" in room_id or ">" in room_id or role not in ROLES:
            return ws.respond(http.HTTPStatus.BAD_REQUEST, "need room_id and role=mac|ios\n")
        ws.ref_target = (room_id, role)  # type: ignore[attr-defined]
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        room_id, role = ws.ref_target  # type: ignore[attr-defined]
        peer_role = "ios" if role == "mac" else "mac"
        own, peer = subject(room_id, role), subject(room_id, peer_role)
        nc = self._nc
        joined = False  # an iPhone that has joined answers a Mac's registration

        async def deliver(msg: Msg) -> None:
            try:
                if msg.headers and msg.headers.get(HEADER_EVENT) == MAC_REGISTERED:
                    if joined:
                        await ws.send(PEER_JOINED, text=True)
                        await nc.publish(peer, PEER_JOINED)
                    return
                await ws.send(msg.data, text=True)
            except ConnectionClosed:
                pass

        sub = await nc.subscribe(own, cb=deliver)
        try:
            async for frame in ws:
                try:
                    kind = _decode_type(frame).type
                except msgspec.DecodeError:
                    await ws.send(BAD_MESSAGE, text=True)
                    continue
                if kind == "relay" or kind == "relay_batch":
                    await nc.publish(peer, frame.encode() if isinstance(frame, str) else frame)
                elif kind == "heartbeat":
                    await ws.send(HEARTBEAT_ACK, text=True)
                elif kind == "register_room" and role == "mac":
                    await ws.send(ROOM_REGISTERED, text=True)
                    await nc.publish(peer, b"", headers={HEADER_EVENT: MAC_REGISTERED})
                elif kind == "join_room" and role == "ios":
                    joined = True
                    await ws.send(PEER_JOINED, text=True)
                    await nc.publish(peer, PEER_JOINED)
                else:
                    await ws.send(BAD_MESSAGE, text=True)
        except ConnectionClosed:
            pass
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


async def _main(args: argparse.Namespace) -> None:
    relay = ReferenceRelay(args.nats_url, args.host, args.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    await relay.run(on_ready=lambda port: print(f"reference relay ready on {port}", flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed when ready)")
    parser.add_argument(
        "--event-loop", choices=("asyncio", "uvloop"), default="uvloop",
        help="the event loop: uvloop by default, the same stack as the product's edge",
    )
    args = parser.parse_args()
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
