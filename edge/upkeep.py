"""The edge's periodic work over its sockets: liveness (and overdue frame parts), lastSeen
writes, registration refreshes.

Each pass goes in slices with frames in between (`edge.protocol.plans.spread_plan`): a
pass over every socket at once, or a KV write for each at once, would hold up every frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from edge.carrier import Carrier
from edge.context import Connection, EdgeContext, Ending
from edge.delivery import Delivery
from edge.protocol.plans import spread_plan
from edge.room_requests import RoomRequests
from runtime.connection import STORAGE_ERRORS
from runtime.service import keep_running

log = logging.getLogger("edge")


class Upkeep:
    """Liveness sweeps, lastSeen flushes and registration refreshes, each a loop."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier, room_requests: RoomRequests, delivery: Delivery) -> None:
        self.ctx = ctx
        self.carrier = carrier
        self.room_requests = room_requests
        self.delivery = delivery

    def start(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """The loops, in `tg`. A bug or an unforeseen error in one must not turn into the end
        of every socket here: logged, and started again."""
        stopping = self.ctx.stopping
        return [
            tg.create_task(keep_running("liveness sweep", self._liveness_loop, stopping)),
            tg.create_task(keep_running("lastSeen flush", self._last_seen_loop, stopping)),
            tg.create_task(keep_running("registration refresh", self._registration_loop, stopping)),
        ]

    async def _liveness_loop(self) -> None:
        ctx = self.ctx
        threshold = ctx.settings.heartbeat_dead_threshold_ms / 1000
        slice_size = ctx.settings.upkeep_slice * 8  # a check is cheap: larger slices
        while not await ctx.sleep(ctx.settings.liveness_sweep_interval_s):
            now = time.monotonic()
            for n, conn in enumerate(list(ctx.connections.values())):
                try:
                    if conn.ending is Ending.OPEN and conn.session.is_silent(now, threshold):
                        conn.ending = Ending.TIMING_OUT  # one time-out per socket, however long its close takes
                        ctx.spawn(self.carrier.carry_out(conn, conn.session.time_out()), "time out a silent socket")
                    self.delivery.expire_parts(conn, now)
                except Exception:  # one socket's trouble must not keep the sweep from the rest
                    log.exception("liveness check of socket %s failed", conn.session.socket_id)
                if n % slice_size == slice_size - 1:
                    await asyncio.sleep(0)

    async def _last_seen_loop(self) -> None:
        """Write lastSeen of sockets that spoke since their last write: at most one write
        per socket per interval, spread over half of it (after a pause of the other half)."""
        ctx = self.ctx
        interval_s = ctx.settings.last_seen_interval_ms / 1000
        while not await ctx.sleep(interval_s / 2):
            if not ctx.nc.is_connected:
                continue  # nats-py would buffer these ahead of what matters at the reconnect
            try:
                if await self.spread(list(ctx.connections), interval_s / 2, self._write_last_seen, self._last_seen_due):
                    return
            except STORAGE_ERRORS as exc:
                log.warning("lastSeen flush stopped (%s); the next one retries", type(exc).__name__)

    @staticmethod
    def _last_seen_due(conn: Connection) -> bool:
        return conn.session.in_room and conn.last_message_ms > conn.last_seen_written_ms

    async def _write_last_seen(self, conn: Connection) -> None:
        await self.ctx.presence.put_last_seen_unacknowledged(
            conn.session.room_id, conn.session.role, conn.last_message_ms, self.ctx.seen_ttl_s
        )
        conn.last_seen_written_ms = conn.last_message_ms

    async def _registration_loop(self) -> None:
        """Refresh the room registrations of our registered Mac sockets well inside
        ROOM_REG_TTL, spread over half the refresh interval (like lastSeen, not in a burst)."""
        interval_s = self.ctx.settings.room_reg_refresh_interval_s
        while not await self.ctx.sleep(interval_s / 2):
            if await self.registration_pass(list(self.ctx.connections), interval_s / 2):
                return

    async def registration_pass(self, socket_ids: list[str], over_s: float) -> bool:
        """Refresh the registrations of those of `socket_ids` that hold a registered room."""
        return await self.spread(socket_ids, over_s, self.room_requests.refresh_registration, self.room_requests.holds_registered_room)

    async def spread(
        self,
        socket_ids: list[str],
        over_s: float,
        work: Callable[[Connection], Awaitable[None]],
        due: Callable[[Connection], bool],
    ) -> bool:
        """`work` on every socket of `socket_ids` that is still here and `due`, a slice at a
        time (a slice's at once), the slices spread evenly over `over_s` (`spread_plan`);
        True if the edge began to stop meanwhile (the rest is undone).

        `due` is asked slice by slice, just before the work: a socket that left, began to
        close or stopped being due since the pass began is skipped (a Mac whose room was
        deleted must not register it again). Ids, not sockets: a pass lasts up to minutes,
        and must not keep the sockets that left meanwhile in memory.
        """
        ctx, s = self.ctx, self.ctx.settings
        size, gap_s = spread_plan(len(socket_ids), over_s, s.upkeep_slice, s.spread_step_ms / 1000)
        for start in range(0, len(socket_ids), size):
            here = [
                conn
                for socket_id in socket_ids[start : start + size]
                if (conn := ctx.connections.get(socket_id)) is not None and not conn.closing and self._is_due(due, conn)
            ]
            results = await asyncio.gather(*(work(conn) for conn in here), return_exceptions=True)
            for conn, result in zip(here, results, strict=True):
                if result is None:
                    continue
                if isinstance(result, STORAGE_ERRORS) or not isinstance(result, Exception):
                    raise result  # storage trouble: the caller's to wait out; or a cancellation
                # One socket's trouble (a bug) must not keep the pass from the others.
                log.error("socket %s: %s", conn.session.socket_id, result, exc_info=result)
            if start + size < len(socket_ids) and await ctx.sleep(gap_s):
                return True
        return False

    @staticmethod
    def _is_due(due: Callable[[Connection], bool], conn: Connection) -> bool:
        try:
            return due(conn)
        except Exception:
            log.exception("socket %s: cannot tell whether it is due", conn.session.socket_id)
            return False
