"""What NATS brings for this edge's sockets: frames and control events, written in order.

Never waits for a socket: a frame is written at once when that cannot wait (the
`write_at_once` shortcut of `edge.internals`), else it joins the socket's backlog, which
a task of that socket writes. So a slow socket never holds up the others, and the order
of one socket's messages is kept.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import msgspec
import nats.errors
from msgspec import Struct
from nats.aio.msg import Msg
from websockets.exceptions import ConnectionClosed

from edge import internals
from edge.carrier import NO_SUCH_SOCKET, Carrier
from edge.connection_log import socket_event
from edge.context import Connection, EdgeContext, Ending
from edge.metrics import FRAME_SAMPLE_MASK
from edge.protocol.actions import Undelivered
from edge.protocol.moves import MAIN, TwoStreams
from edge.protocol.parts import FrameParts
from edge.protocol.plans import backlog_over_bounds
from schemas.edge_events import KIND_EVENT, KIND_FRAME, edge_event_decoder
from schemas.subjects import addressee_sender_and_kind, sender_addressee_and_credits, sequence_of

log = logging.getLogger("edge")

# The status NATS gives the reply of a message nobody subscribes for ("no responders").
NO_RESPONDERS = "503"


class Delivery:
    """Delivers NATS messages to this edge's sockets, each socket's in arrival order."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier) -> None:
        self.ctx = ctx
        self.carrier = carrier
        # Off: every frame goes through the socket's backlog and `ws.send`.
        self.write_at_once = ctx.shortcuts.write_at_once
        # While the edge moves off a NATS node, messages come on two connections (`edge.nats_move`).
        self.streams: TwoStreams | None = None
        self._frames = 0  # frames delivered, for sampling their timings

    async def dispatch(self, msg: Msg, source: str = MAIN) -> None:
        """Everything NATS brings for this edge's sockets, in the order it comes (on the main
        connection, or on the bridge of a move: `edge.nats_move`)."""
        to, sender, kind = addressee_sender_and_kind(msg.subject)
        if self.streams is not None and not self._takes(source, sender, kind, msg.reply):
            return  # a copy, or from a stream still warming
        conn = self.ctx.connections.get(to)
        if kind == KIND_EVENT:
            if msg.reply:
                # Acknowledged on receipt, not after processing: the sender may be holding
                # its own socket's write lock while it waits for this.
                await msg.respond(b"" if conn is not None else NO_SUCH_SOCKET)
            if conn is None:
                return
            try:
                event = edge_event_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.error("undecodable control event on %s", msg.subject)
                return
            self.enqueue(conn, event, sender, 0)
            return
        if conn is None or not conn.takes_frames:
            # Gone, or closing (nothing more is written to it): the sender's edge takes back
            # the charge and tells its client NO_PEER, rather than the frame vanishing.
            await self._answer_gone(msg.reply)
            return
        data = msg.data
        if kind != KIND_FRAME:
            data = self._put_together(conn, sender, kind, data)
            if data is None:
                return
        elif conn.parts is not None and conn.parts.under_way:
            self._dropped(conn, conn.parts.interrupt(sender))
        self._frames += 1
        started = time.monotonic() if not self._frames & FRAME_SAMPLE_MASK else 0.0  # timed: one in FRAME_SAMPLE
        if self.write_at_once and not conn.session.busy and internals.can_write_now(conn, len(data)):
            if conn.session.accepts_frame_from(sender):
                internals.write_now(conn, data)
                conn.frames_out += 1
                if started:
                    self.ctx.metrics.frame_write_seconds.observe(time.monotonic() - started)
            else:
                await self._not_from_peer(msg.reply)
        else:
            self.enqueue(conn, data, sender, len(data), started, msg.reply)

    def _takes(self, source: str, sender: str, kind: str, reply: str) -> bool:
        streams = self.streams
        if kind == KIND_EVENT:
            return streams.takes_event(source)
        return streams.takes_frame(source, sender, sequence_of(reply, sender) if reply else None)

    def _put_together(self, conn: Connection, sender: str, kind: str, data: bytes) -> bytes | None:
        """A part of a frame larger than NATS's max_payload: the whole frame once its last
        part is in, else None."""
        parts = conn.parts
        if parts is None:
            parts = conn.parts = FrameParts(self.ctx.settings.max_frame_bytes)
        frame, dropped = parts.add(sender, kind, data, time.monotonic())
        self._dropped(conn, dropped)
        if frame is not None:
            self.ctx.counters.received_in_parts += 1
        return frame

    def _dropped(self, conn: Connection, why: str | None) -> None:
        if why is not None:
            self.ctx.counters.parts_dropped += 1
            log.warning("socket %s: a frame arriving in parts was dropped: %s", conn.session.socket_id, why)

    def expire_parts(self, conn: Connection, now: float) -> None:
        """Drop the frame under way for `conn` if its last part is overdue (see `FrameParts`)."""
        if conn.parts is not None:
            self._dropped(conn, conn.parts.expired(now, self.ctx.settings.frame_parts_timeout_ms / 1000))

    def enqueue(
        self, conn: Connection, item: bytes | Any, sender: str, size: int, started: float = 0.0, reply: str = ""
    ) -> None:
        """Queue `item` for the socket's drainer; a socket that cannot keep up is closed 1013.
        `started`: when a timed frame arrived (0: not timed); `reply`: a frame's reply subject."""
        if not conn.takes_frames:
            return
        conn.backlog.append((item, sender, started, reply))
        conn.backlog_bytes += size
        s = self.ctx.settings
        # What waits for the socket in all: its backlog and its transport's write buffer.
        waiting = conn.backlog_bytes + conn.ws.transport.get_write_buffer_size()
        if backlog_over_bounds(len(conn.backlog), waiting, s.socket_queue_max_msgs, s.socket_queue_max_bytes):
            log.warning("socket %s cannot keep up; closing it", conn.session.socket_id)
            conn.ending = Ending.TOO_SLOW  # said once; what comes for it until the close is dropped
            conn.clear_backlog()
            self.ctx.spawn(self.carrier.carry_out(conn, conn.session.too_slow()), "close a slow socket")
            return
        self.resume(conn)

    def resume(self, conn: Connection) -> None:
        """Write the socket's backlog, unless it is being written or waits for the session."""
        if conn.backlog and conn.drainer is None and not conn.session.busy and self.ctx.tg is not None:
            try:
                conn.drainer = self.ctx.tg.create_task(self._drain(conn))
            except RuntimeError:  # the edge's TaskGroup is finishing: its sockets are closed
                conn.clear_backlog()

    async def _drain(self, conn: Connection) -> None:
        """Write the socket's backlog in order: frames (after any news being written) and
        control events (decided and written under the write lock)."""
        session = conn.session
        try:
            while conn.backlog:
                if session.busy:
                    # A register or join is in flight: its peer may send at once, before the
                    # decision names it, and must not be dropped as a stranger. The rest
                    # waits, in order, for the decision (`resume`).
                    break
                item, sender, started, reply = conn.backlog.popleft()
                if type(item) is bytes:
                    conn.backlog_bytes -= len(item)
                    if conn.write_lock.locked():
                        async with conn.write_lock:
                            await self._write_frame(conn, item, sender, reply)
                    else:
                        await self._write_frame(conn, item, sender, reply)
                    if started:
                        self.ctx.metrics.frame_write_seconds.observe(time.monotonic() - started)
                else:
                    async with conn.write_lock:
                        await self.carrier.carry_out(conn, session.receive_event(item, sender))
                    if isinstance(item, Struct):  # news from the peer's edge, not of an undelivered frame
                        socket_event(session, item.__struct_config__.tag, peer=sender)
        except Exception:
            log.exception("socket %s: writing its backlog failed", session.socket_id)
        finally:
            conn.drainer = None

    async def _write_frame(self, conn: Connection, data: bytes, sender: str, reply: str) -> None:
        """Write a frame from NATS to the client if it comes from the session's current peer."""
        if not conn.session.accepts_frame_from(sender):
            await self._not_from_peer(reply)
            return
        try:
            await conn.ws.send(data, text=True)
            conn.frames_out += 1
        except ConnectionClosed:
            pass

    async def _not_from_peer(self, reply: str) -> None:
        """A frame from a socket that is not the addressee's peer (any more, or yet: a room
        record read while a slot's release waited for storage named a peer that is gone)
        is dropped; its sender's edge is told, as for a socket that is gone, so that the
        charge is taken back and the client hears NO_PEER rather than the frame vanishing."""
        self.ctx.counters.not_from_peer += 1
        await self._answer_gone(reply)

    async def _answer_gone(self, reply: str) -> None:
        """Tell a frame's sender's edge that nobody here got it (credits back, NO_PEER)."""
        if reply:
            with contextlib.suppress(nats.errors.Error):
                await self.ctx.frame_nc.publish(reply, NO_SUCH_SOCKET)

    async def undelivered(self, msg: Msg, source: str = MAIN) -> None:
        """A frame one of our sockets forwarded reached nobody: NATS answered its reply subject
        "no responders" (nobody subscribes for the addressee: its edge crashed, or lost NATS),
        or the addressee's edge said it has no such socket. The frame's credits are taken back,
        and the session decides, in order with what else comes for the socket, what its client
        hears (`Session.receive_event`, `Undelivered`): `NO_PEER`, and when the peer's edge is
        gone `peer_disconnected` first, without waiting for that edge's lease to expire."""
        edge_gone = msg.headers is not None and msg.headers.get("Status") == NO_RESPONDERS
        if not edge_gone and msg.data != NO_SUCH_SOCKET:
            return
        try:
            sender, to, credits = sender_addressee_and_credits(msg.subject)
        except ValueError:
            return
        if credits == 0:
            return  # a part of a frame but its last: the last one's news is the frame's
        if self.streams is not None and not self.streams.takes_undelivered(source, msg.subject):
            return
        conn = self.ctx.connections.get(sender)
        if conn is None:
            return  # gone too, its user charged for it: rare, and no one left to tell
        self.ctx.counters.undelivered += 1
        if self.ctx.metering_on:
            self.ctx.meter.refund_messages(conn.session.user_id, credits)
        self.enqueue(conn, Undelivered(to, edge_gone), to, 0)
