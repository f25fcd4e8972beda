"""The frame path's shortcuts: a frame written the moment it arrives from NATS, and a
message taken from the client the moment it is parsed, without a task or a wait.

Most frames take these; everything else goes the handler's way (`edge.sockets`) and the
socket's backlog (`edge.delivery`), which the shortcuts must never overtake. What they
need of websockets' and asyncio's internals is in `edge.internals`; an edge whose
`ctx.shortcuts` lack one takes no message at once.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from edge import internals
from edge.carrier import Carrier
from edge.context import Connection, EdgeContext
from edge.protocol.actions import Send
from runtime.clock import now_ms
from schemas.client import CloseCode

log = logging.getLogger("edge")

# Longer than any `heartbeat_ack` (its longest has every optional field).
HEARTBEAT_ACK_MAX = 128


class FastPath:
    """Takes a socket's messages as they arrive, while its handler waits with nothing queued."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier) -> None:
        self.ctx = ctx
        self.carrier = carrier
        shortcuts = ctx.shortcuts
        # Taking at once needs writing at once: a heartbeat taken is answered there and then.
        self.on = shortcuts.take_at_once and shortcuts.write_at_once
        self.run = internals.run_eagerly if shortcuts.eager else internals.run_in_a_task

    def taker_for(self, conn: Connection) -> Callable[[bytes], bool] | None:
        """The connection's `take_message_now`, built once per socket, not per frame; None
        when this edge does not take messages at once."""
        if not self.on:
            return None
        can_answer_now = functools.partial(internals.can_write_now, conn, HEARTBEAT_ACK_MAX)
        return functools.partial(self.take_message_now, conn, can_answer_now)

    def take_message_now(self, conn: Connection, can_answer_now: Callable[[], bool], data: bytes) -> bool:
        """A whole text message, as it arrives: a `relay` or `relay_batch` for a present peer
        is published here and now, a `heartbeat` answered here and now when the answer can
        be written at once (no wake-up of the handler, no task); anything else is declined
        (False), for the handler.
        """
        ctx = self.ctx
        if len(data) > ctx.max_forward_bytes or ctx.tg is None or not ctx.frame_nc.is_connected:
            return False  # the handler's way says why (1009), or waits for NATS
        try:
            text = data.decode()  # as websockets would for the handler: text frames are UTF-8
        except UnicodeDecodeError:
            return False  # the handler's `recv` fails the connection with 1007
        try:
            conn.received_at = now = time.monotonic()
            taken = conn.session.take_now(text, now, can_answer_now)
            if taken is None:
                return False
            conn.last_message_ms = now_ms()
            if type(taken) is Send:
                internals.write_now(conn, taken.data)
                ctx.counters.heartbeats_answered_at_once += 1
                return True
            waiting = self.run(self.carrier.forward(conn, taken, at_once=True), self.carrier.spawn_publish)
        except Exception:
            # As the handler does with what it raises: this socket ends (1011), nothing else.
            # Raised out of websockets' data callback, it would abort the connection (1006)
            # and lose the rest of what arrived with it.
            log.exception("socket %s in room %s failed", conn.session.socket_id, conn.session.room_id)
            conn.ws.take_message_now = None
            ctx.spawn(self.carrier.close(conn, CloseCode.INTERNAL, "Internal error"), "close a failed socket")
            return True
        if waiting is not None:
            # nats-py's buffer is full: the frame is in it, in order, but the publish waits
            # for the flush. Like the handler's own wait, this socket's next message goes
            # to the handler, which waits too: what a fast sender floods stays bounded.
            conn.ws.take_message_now = None
        return True
