"""Carrying out what a socket's session decided: frames, sends, room requests, events, closes.

The session decides (`edge.protocol.session`); this module only does it, in order, and
is the one place that publishes a socket's frames and control events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import nats.errors
from websockets.exceptions import ConnectionClosed

from edge.connection_log import socket_event
from edge.context import Connection, EdgeContext, Ending
from edge.metrics import FRAME_SAMPLE_MASK
from edge.protocol.actions import Action, Close, Forward, Notify, RoomRequest, Send
from edge.protocol.charging import frame_credits
from edge.protocol.parts import cut, part_kind
from edge.protocol.session import Session
from schemas.client import CloseCode, JoinRoom, RegisterRoom
from schemas.edge_events import KIND_EVENT, KIND_FRAME
from schemas.records import SlotHolder
from schemas.subjects import addressed_subject, frame_reply, room_subject, undelivered_reply_prefix

log = logging.getLogger("edge")

# The answer to a control event or frame for a socket this edge no longer has (the socket is
# gone: nobody to tell, as when a whole edge is gone and NATS answers "no responders").
NO_SUCH_SOCKET = b"gone"

RoomRequestRunner = Callable[[Connection, RegisterRoom | JoinRoom], Awaitable[None]]


class Carrier:
    """Carries out a session's actions for its connection."""

    def __init__(self, ctx: EdgeContext) -> None:
        self.ctx = ctx
        # Set at wiring (`edge.room_requests.RoomRequests.carry_out`): room requests run
        # against storage and come back here with the session's decision.
        self.run_room_request: RoomRequestRunner | None = None
        # Set at wiring (`edge.delivery.Delivery.resume`): what came from NATS for a socket
        # while its room request was in flight waits in its backlog until the decision.
        self.resume_delivery: Callable[[Connection], None] | None = None
        self._waiting_publishes: set[asyncio.Task[None]] = set()

    @property
    def publishes_waiting(self) -> int:
        """Frames taken at once whose publish waits for nats-py's flush."""
        return len(self._waiting_publishes)

    async def carry_out(self, conn: Connection, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is Forward:  # by far the most common: first, and lean
                await self.forward(conn, action)
            elif isinstance(action, Send):
                with contextlib.suppress(ConnectionClosed):
                    await conn.ws.send(action.data, text=True)
            elif isinstance(action, RoomRequest):
                assert self.run_room_request is not None
                try:
                    await self.run_room_request(conn, action.message)
                finally:
                    if self.resume_delivery is not None:
                        self.resume_delivery(conn)
            elif isinstance(action, Notify):
                await self.publish_event(conn.session, action.to, action.role, action.event)
            elif isinstance(action, Close):
                await self.close(conn, action.code, action.reason, action.farewell)

    async def decide_in_order(self, conn: Connection, decide: Callable[[], list[Action]]) -> None:
        """Let the session decide (`decide()`) and carry out its decision, both under the socket's
        write lock: a delivered frame checks the session's peer without the lock when nobody
        holds it, so the peer may change only while what it changed is being written."""
        async with conn.write_lock:
            await self.carry_out(conn, decide())

    async def forward(self, conn: Connection, action: Forward, at_once: bool = False) -> None:
        """Publish a frame for the peer; does not wait unless nats-py's buffer is full."""
        ctx, session = self.ctx, conn.session
        to = action.to.socket_id
        if to != conn.forward_to:  # the subjects change only with the peer
            conn.forward_to = to
            conn.forward_subject = addressed_subject(
                conn.subjects[session.peer_role], action.to.edge_id, to, session.socket_id, KIND_FRAME
            )
            conn.forward_reply = undelivered_reply_prefix(ctx.settings.edge_id, session.socket_id, to)
        credits = frame_credits(action.payloads, ctx.settings.charge_per_payload)
        if ctx.frames_paused is not None:  # the frame path is changing NATS connections
            await ctx.frames_paused.wait()
        # With a reply subject, which nobody answers while the frame is delivered: NATS answers
        # it at once (503) when nobody subscribes for the addressee, and so does its edge if
        # it has no such socket (`Delivery.undelivered`). No request, no wait, a few bytes more.
        if len(action.data) <= ctx.max_forward_bytes:
            conn.sent += 1
            await ctx.frame_nc.publish(conn.forward_subject, action.data, frame_reply(conn.forward_reply, credits, conn.sent))
        else:
            await self._publish_in_parts(conn, action.data, credits)
        counters = ctx.counters
        if at_once:
            counters.forwarded_at_once += 1
        else:
            counters.forwarded_by_handler += 1
        counters.bytes_forwarded += len(action.data)
        conn.frames_in += 1
        if not (counters.forwarded_at_once + counters.forwarded_by_handler) & FRAME_SAMPLE_MASK:
            ctx.metrics.frame_publish_seconds.observe(time.monotonic() - conn.received_at)
        if ctx.metering_on:
            ctx.meter.charge_messages(session.user_id, credits)

    async def _publish_in_parts(self, conn: Connection, data: bytes, credits: int) -> None:
        """Publish a frame larger than NATS carries in consecutive parts, its credits with the
        last (see `edge.protocol.parts`). Only a socket's handler forwards frames this large,
        one at a time, so nothing of the same socket comes between its parts."""
        ctx = self.ctx
        prefix = conn.forward_subject[: -len(KIND_FRAME)]
        parts = cut(data, ctx.max_forward_bytes)
        last = len(parts) - 1
        for index, part in enumerate(parts):
            if ctx.frames_paused is not None:
                await ctx.frames_paused.wait()
            conn.sent += 1
            reply = frame_reply(conn.forward_reply, credits if index == last else 0, conn.sent)
            await ctx.frame_nc.publish(prefix + part_kind(index, index == last), part, reply)
        ctx.counters.forwarded_in_parts += 1

    def spawn_publish(self, publish: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Finish a publish that waits for nats-py's flush; shutdown bounds the wait."""
        task = self.ctx.spawn(publish, "publish a frame")
        if task is not None:
            self._waiting_publishes.add(task)
            task.add_done_callback(self._waiting_publishes.discard)
        return task

    async def settle_waiting_publishes(self) -> None:
        """At shutdown: publishes still waiting for NATS get the close timeout, then end.
        (With NATS gone, nats-py's flush waits for the reconnect, which may never come.)"""
        if self._waiting_publishes:
            _, late = await asyncio.wait(set(self._waiting_publishes), timeout=self.ctx.close_timeout_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("%d frames not confirmed published at shutdown", len(late))

    async def publish_event(self, session: Session, to: SlotHolder, role: str, event: Any) -> None:
        """Send a control event to the socket `to`, until its edge has it.

        Core NATS delivers at most once, and a lost `peer_left` or `peer_joined` would leave
        a client believing in a peer that is gone (or never hearing of one that came). So
        control events are requests that the addressee's edge acknowledges on receipt; a
        repeat is harmless (sessions ignore news they already have). Frames are not: a
        lost frame is handled by restarting the session (see `Edge.nats_reconnected`).
        """
        s = self.ctx.settings
        data = msgspec.json.encode(event)
        subject = addressed_subject(
            room_subject(session.room_id, role), to.edge_id, to.socket_id, session.socket_id, KIND_EVENT
        )
        for _ in range(s.event_attempts):
            if self.ctx.frames_paused is not None:  # in order with the frames: see `forward`
                await self.ctx.frames_paused.wait()
            try:
                reply = await self.ctx.frame_nc.request(subject, data, timeout=s.event_ack_timeout_ms / 1000)
            except nats.errors.NoRespondersError:
                reply = None  # that edge is gone
            except nats.errors.TimeoutError:
                continue
            if reply is None or reply.data == NO_SUCH_SOCKET:
                # Nobody holds that socket any more: there is no one to tell.
                log.info("room %s: no %s socket to take a %s event", session.room_id, role, type(event).__name__)
            return
        log.warning("room %s: a %s event to a %s socket went unacknowledged", session.room_id, type(event).__name__, role)

    async def close(self, conn: Connection, code: int, reason: str, farewell: bytes | None = None) -> None:
        """Close a socket within the close timeout, whatever the client does."""
        if conn.closing:
            return
        if code == CloseCode.REPLACED:
            socket_event(conn.session, "replaced", code=code)
        conn.ending = Ending.CLOSING
        timeout = self.ctx.close_timeout_s
        # What the client sends from now on is not acted on: drop it as it comes, and read on
        # if a full queue had stopped reading (the handler may be the one waiting here).
        conn.ws.drop_messages = True
        conn.ws.transport.resume_reading()
        try:
            if farewell is not None:
                await asyncio.wait_for(conn.ws.send(farewell, text=True), timeout)
            await asyncio.wait_for(conn.ws.close(code, reason), timeout)
        except asyncio.TimeoutError:
            # A client that reads nothing cannot take a close frame either (websockets
            # waits for the write buffer to drain before it starts its own timer).
            conn.ws.transport.abort()
        except Exception:
            log.debug("closing socket %s failed", conn.session.socket_id, exc_info=True)

    async def close_all(self, code: int, reason: str, leave_reason: str, unless_boot: str | None = None) -> None:
        """Close every socket (but those of incarnation `unless_boot`) at once; peers hear `leave_reason`."""
        conns = [c for c in self.ctx.connections.values() if c.session.boot_id != unless_boot]
        for conn in conns:
            conn.session.ends_with(leave_reason)
        async with asyncio.TaskGroup() as tg:
            for conn in conns:
                tg.create_task(self.close(conn, code, reason))
