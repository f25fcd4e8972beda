"""A client socket's life on this edge, from the 101 to the release of its slot.

`serve` is websockets' connection handler: it makes the socket's `Session`, feeds it what
the client sends, and when the socket is gone frees its room slot and tells its peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Container

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from edge.carrier import Carrier
from edge.connection_log import socket_event
from edge.context import Connection, EdgeContext, Ending, WsTarget
from edge.fastpath import FastPath
from edge.log_budget import WarningBudget
from edge.metrics import close_code_label
from edge.protocol import rooms
from edge.protocol.session import Session, other_role
from edge.slot_liveness import SlotLiveness
from edge.store import StorageConflict
from edge.usage import Usage
from runtime.backoff import Backoff
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS
from schemas.client import CloseCode, encode
from schemas.records import RoomRecord
from schemas.subjects import ROLES, room_subject

log = logging.getLogger("edge")
outage_log = WarningBudget(log)  # one per departed socket in an outage


class Sockets:
    """Serves each client socket, and cleans up after it."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier, fastpath: FastPath, usage: Usage, deleted_users: Container[str]) -> None:
        self.ctx = ctx
        self.carrier = carrier
        self.fastpath = fastpath
        self.usage = usage
        self.deleted_users = deleted_users  # accounts deleted while this edge watched

    async def serve(self, ws: ServerConnection) -> None:
        ctx = self.ctx
        target: WsTarget = ws.relay_target  # type: ignore[attr-defined]
        # The handshake's headers are not read again: kept, they were a fifth of an idle
        # socket's memory (issue 18). Emptied in place, since websockets' parser holds the
        # request too (and tells frames from the handshake by `ws.request` not being None).
        if ws.request is not None:
            ws.request.headers.clear()
        ws.response = None
        session = Session(
            room_id=target.room_id,
            role=target.role,
            socket_id=secrets.token_urlsafe(16),
            edge_id=ctx.settings.edge_id,
            boot_id=ctx.boot_id,
            user_id=target.user_id,
            last_message_at=time.monotonic(),
            rate=ws.rate,  # shared with the connection, which spends it on control frames
        )
        subjects = {role: room_subject(target.room_id, role) for role in ROLES}
        conn = Connection(ws=ws, session=session, target=target, subjects=subjects)
        ctx.connections[session.socket_id] = conn
        ws.on_shed = functools.partial(self._shed, conn)
        ws.check_outgoing = functools.partial(self._check_outgoing, conn)
        socket_event(session, "connected", address=target.address)
        try:
            if session.user_id in self.deleted_users:
                await self.carrier.carry_out(conn, session.account_deleted())
                return
            if ctx.metering is not None:
                # After the 101, before the first message (§6.4): a body cannot go with a 101.
                exceeded = await ctx.metering.check_quota(session.user_id)
                if exceeded is not None:
                    await self.carrier.carry_out(conn, session.quota_exceeded(encode(exceeded)))
                    return
            take_message_now = self.fastpath.taker_for(conn)
            while True:
                # Armed only while this waits with nothing queued: a message taken at once is
                # then in its place in the socket's order.
                ws.take_message_now = take_message_now
                try:
                    frame = await ws.recv()
                finally:
                    ws.take_message_now = None
                conn.last_message_ms = now_ms()  # any message is a sign of life (§4.7)
                if conn.closing:
                    continue  # sent after the edge began to close this socket: not acted on
                conn.received_at = now = time.monotonic()
                await self.carrier.carry_out(conn, session.receive(frame, now))
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("socket %s in room %s failed", session.socket_id, session.room_id)
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL, "Internal error")
        finally:
            await self._leave(conn)

    async def _leave(self, conn: Connection) -> None:
        """The socket is gone: free its slot if it still held one, tell the peer."""
        session = conn.session
        self.ctx.connections.pop(session.socket_id, None)
        code = ending_code(conn.ws)
        self.ctx.metrics.closes.labels(code=close_code_label(code)).inc()
        socket_event(
            session, "closed", code=code, duration_s=round(time.monotonic() - conn.opened_at, 3),
            frames_in=conn.frames_in, frames_out=conn.frames_out,
        )  # fmt: skip
        self.usage.count_session_time(conn, time.monotonic(), ending=True)
        conn.clear_backlog()  # nobody to write it to
        if not session.releases_slot_on_leave:
            return
        last_seen = max(conn.last_message_ms, conn.ws.last_dropped_ms) or now_ms()
        try:
            async with self.ctx.gates.departures.place():
                await self._release_and_announce(session, last_seen)
        except (*STORAGE_ERRORS, StorageConflict) as exc:
            outage_log.warning("release", "room %s: could not release the %s slot (%s); retrying", session.room_id, session.role, exc)
            self.ctx.spawn(self._retry_release(session, last_seen), "release a departed socket's slot")

    async def _release_and_announce(self, session: Session, last_seen_ms: int) -> None:
        """Free the session's slot if it still holds it, and tell the room's live peer why it left."""
        ctx = self.ctx
        role, holder, now = session.role, session.holder, now_ms()
        alive = SlotLiveness(ctx)

        def release(record: RoomRecord | None, _seen: tuple[int | None, ...]) -> tuple[RoomRecord | None, rooms.Release]:
            released = rooms.release(record, holder, role, now, alive)
            return released.record, released

        async def learn(record: RoomRecord) -> tuple[int | None, ...]:
            await alive.learn(record)
            return ()

        released, _ = await ctx.rooms.transact(session.room_id, release, learn)
        if released.peer is not None:
            await self.carrier.publish_event(session, released.peer, other_role(role), session.left_event())
        await ctx.presence.put_last_seen(session.room_id, role, last_seen_ms, ctx.seen_ttl_s)

    async def _retry_release(self, session: Session, last_seen_ms: int) -> None:
        """Keep trying to release a departed socket's slot while NATS is away, until the edge stops.

        Giving up would leave a slot naming a socket that is gone, on an edge that lives.
        """
        backoff = Backoff(1.0, 5.0)
        while not await self.ctx.sleep(backoff.next()):
            try:
                async with self.ctx.gates.departures.place():
                    await self._release_and_announce(session, last_seen_ms)
                log.info("room %s: released the %s slot of a departed socket", session.room_id, session.role)
                return
            except (*STORAGE_ERRORS, StorageConflict):
                pass

    def _shed(self, conn: Connection, passed: str) -> None:
        """The connection shed its socket for what it `passed` (pings or pongs past its rate
        limit, or bytes past its byte rate limit): it has answered 1008 and discards what
        follows, and what it sent before is not acted on either."""
        log.warning("socket %s in room %s: %s; closed 1008", conn.session.socket_id, conn.session.room_id, passed)
        conn.session.shed()
        conn.ending = Ending.CLOSING
        conn.ws.drop_messages = True

    def _check_outgoing(self, conn: Connection) -> None:
        """After a read while the socket's write buffer is over its high-water mark: what
        waits to be written to it (its backlog, and the write buffer, where websockets puts
        its pongs) must stay within RELAY_SOCKET_QUEUE_MAX_BYTES. Past it the connection is
        dropped at once, not closed: a client that lets that much pile up does not read,
        and would not read a close frame either; the buffer's memory comes back now."""
        ws = conn.ws
        waiting = conn.backlog_bytes + ws.transport.get_write_buffer_size()
        if waiting <= self.ctx.settings.socket_queue_max_bytes:
            return
        log.warning(
            "socket %s in room %s: %d bytes wait to be written to it, over RELAY_SOCKET_QUEUE_MAX_BYTES; dropped",
            conn.session.socket_id, conn.session.room_id, waiting,
        )
        ws.check_outgoing = None
        conn.ending = Ending.CLOSING
        conn.clear_backlog()
        conn.session.dropped_unread()
        ws.transport.abort()


def ending_code(ws: ServerConnection) -> int:
    """The close code that ended a socket: the edge's if it closed first, else the client's;
    1006 when no close frame went either way (dropped)."""
    protocol = ws.protocol
    sent, received = protocol.close_sent, protocol.close_rcvd
    if sent is not None and (received is None or not protocol.close_rcvd_then_sent):
        return sent.code
    if received is not None:
        return received.code
    return 1006
