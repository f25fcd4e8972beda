"""The edge's side of metering: session time, usage handed to the stream, over-limit notices.

What is charged is decided in `edge.protocol.charging` and counted by `edge.protocol.meter`;
`edge.metering_link` publishes and asks. This module runs the loops between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import msgspec
from nats.aio.msg import Msg

from edge.carrier import Carrier
from edge.context import Connection, EdgeContext
from edge.protocol.charging import session_time_sample
from metering.windows import WINDOW_MS
from runtime.clock import now_ms
from schemas.client import encode
from schemas.metering import over_limit_decoder

log = logging.getLogger("edge")


class Usage:
    """Counts session time, hands usage to the stream, closes sockets past their quota."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier) -> None:
        self.ctx = ctx
        self.carrier = carrier
        self._loop: asyncio.Task[None] | None = None

    def count_session_time(self, conn: Connection, now: float, ending: bool = False) -> None:
        """Session time (§12 item 19) of a Mac socket, charged to the room's owner."""
        if not self.ctx.metering_on:
            return
        session = conn.session
        charged, conn.in_session_since = session_time_sample(conn.in_session_since, now, session.in_session, ending)
        if charged:
            self.ctx.meter.add_session_time(session.owner_user_id or session.user_id, charged)

    async def _tick(self) -> None:
        """Session time up to now, then close the meter's interval (frames go on meanwhile)."""
        slice_size = self.ctx.settings.upkeep_slice * 4
        for n, conn in enumerate(list(self.ctx.connections.values())):
            if conn.in_session_since is not None or conn.session.in_session:
                self.count_session_time(conn, time.monotonic())
            if n % slice_size == slice_size - 1:
                await asyncio.sleep(0)
        self.ctx.meter.tick(now_ms())

    def start(self, tg: asyncio.TaskGroup) -> asyncio.Task[None]:
        """Start handing usage to the stream, in `tg`, until `flush_at_exit`."""
        self._loop = tg.create_task(self._publish_loop())
        return self._loop

    async def _publish_loop(self) -> None:
        """Every flush interval (and at each window boundary), hand the usage to the stream."""
        interval_ms = self.ctx.settings.usage_flush_interval_ms
        while True:
            to_boundary = WINDOW_MS - now_ms() % WINDOW_MS
            await asyncio.sleep(min(interval_ms, to_boundary) / 1000)
            await self._tick()
            await self._publish_all()

    async def _publish_all(self) -> None:
        meter = self.ctx.meter
        while (batch := meter.next_batch(now_ms())) is not None:
            await self.ctx.metering.publish_until_acked(batch, self._tick)
            meter.acknowledged(batch)

    async def flush_at_exit(self) -> None:
        """At shutdown, after every socket left: the last usage to the stream, within a bound."""
        if self._loop is None:
            return
        self._loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop
        await self._tick()
        self.ctx.meter.release_held()  # every socket left: no refund can come now
        try:
            async with asyncio.timeout(self.ctx.settings.shutdown_usage_ms / 1000):
                await self._publish_all()
        except TimeoutError:
            log.error("usage not handed to metering at shutdown: %d credits lost", self.ctx.meter.unpublished_credits())

    async def over_limit(self, msg: Msg) -> None:
        """Metering says a user is past the quota (§12 item 20): close that user's sockets here."""
        try:
            notice = over_limit_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable over-limit notice")
            return
        farewell = encode(notice.exceeded)
        for conn in list(self.ctx.connections.values()):
            if conn.session.user_id == notice.user_id and not conn.closing:
                self.ctx.spawn(
                    self.carrier.decide_in_order(conn, functools.partial(conn.session.quota_exceeded, farewell)),
                    "close a socket past its quota",
                )
