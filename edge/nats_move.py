"""Moving off a NATS node in lame-duck mode without closing a socket.

A nats-server told to stop gracefully (lame-duck mode: a rolling restart or upgrade of the
cluster) says so to its clients, stops taking connections, and after its grace period
closes them. nats-py then reconnects to another node; but while it is away nothing
addressed to the edge's sockets reaches it (core NATS keeps nothing for a subscriber that
is not there), and an encrypted session with a gap is broken, so a plain reconnect costs
the edge every socket (`Edge._nats_reconnected`). Told in advance, the edge instead:

1. opens a *bridge* connection to another node and subscribes there for its sockets too;
   what the bridge brings is dropped until the interest is known across the cluster (a
   probe sent through the old node comes back on the bridge, and a short settle);
2. takes what comes first on either connection, the copy dropped
   (`edge.protocol.moves.TwoStreams`); the frame path publishes on the bridge, after a
   flush of everything it published on the old connection (so nothing overtakes it);
3. lets the old node close its connection: nats-py reconnects it to another node, and
   meanwhile the bridge carries every frame. Storage, leases and watchers are on the main
   connection and wait out its reconnect, as for any short outage;
4. once the main connection is back and its interest known, moves the frame path back
   to it, unsubscribes the bridge, and closes it when the last copies are in.

If the main connection went away before the bridge was live, or the bridge did too, frames
may have been lost: the reconnect closes every socket as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable
from urllib.parse import urlunparse

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from edge.context import EdgeContext
from edge.delivery import Delivery
from edge.last_seen import LastSeen
from edge.protocol.moves import BRIDGE, MAIN, TwoStreams
from runtime.connection import liveness_options, where
from schemas.subjects import edge_filter, edge_last_seen_subject, edge_probe_subject, edge_undelivered_filter

log = logging.getLogger("edge")


class NatsMove:
    """The edge's moves off NATS nodes in lame-duck mode, one at a time."""

    def __init__(self, ctx: EdgeContext, delivery: Delivery, last_seen: LastSeen, forward_limit: Callable[[NATS], int]) -> None:
        self.ctx = ctx
        self.delivery = delivery
        self.last_seen = last_seen
        self.forward_limit = forward_limit
        self.bridge: NATS | None = None
        self._task: asyncio.Task[None] | None = None
        self._main_back = asyncio.Event()
        self._probes: dict[str, asyncio.Event] = {}
        self._main_probe_sub: Subscription | None = None
        # Whether the bridge carried every frame while the main connection was away: if not,
        # frames may be lost, and the reconnect restarts every session.
        self._covered = False

    @property
    def under_way(self) -> bool:
        return self._task is not None

    # --- nats-py's callbacks on the main connection --------------------------------

    async def lame_duck(self) -> None:
        """The main connection's node entered lame-duck mode."""
        ctx = self.ctx
        ctx.metrics.nats_events.labels(event="lame_duck").inc()
        if self._task is not None or ctx.tg is None or ctx.stopping.is_set():
            return
        log.warning("NATS node %s entered lame-duck mode; moving this edge's frames to another node", where(ctx.nc))
        self._task = ctx.spawn(self._move(), "move off a NATS node in lame-duck mode")

    def main_disconnected(self) -> None:
        """Whatever the main connection brings from now on comes from a new subscription."""
        streams = self.delivery.streams
        if streams is not None:
            self._covered = BRIDGE in streams.live
            streams.warming(MAIN)

    def main_reconnected(self) -> bool:
        """The main connection is back: True if the bridge carried the frames meanwhile (the
        move goes on), False if the sessions must restart."""
        if self._task is None:
            return False
        covered = self._covered and self.bridge is not None and self.bridge.is_connected
        self._main_back.set()
        return covered

    # --- the move ------------------------------------------------------------------

    async def _move(self) -> None:
        ctx, main = self.ctx, self.ctx.nc
        try:
            bridge = await self._open_bridge(main)
            if bridge is None:
                return
            self.delivery.streams = streams = TwoStreams()
            self._covered = False
            self._main_back.clear()
            bridge_subs = await self._subscribe_bridge(bridge)
            if self._main_probe_sub is None:
                # Kept for good: nats-py subscribes it again at each reconnect.
                self._main_probe_sub = await main.subscribe(edge_probe_subject(ctx.settings.edge_id, "main"), cb=self._probe_came)
            # 1. The bridge's stream is warming until the old node, and the cluster, know of it.
            if not main.is_connected or not await self._until_known(main, bridge, "bridge"):
                # Frames may have been lost (`main_disconnected` noted it): the reconnect
                # restarts the sessions; the bridge carries on meanwhile all the same.
                log.warning("the NATS node went away before the bridge was ready")
            streams.goes_live(BRIDGE)
            await self._switch_publishing(main, bridge)
            log.info("frames now travel over NATS node %s; waiting for the main connection to move", where(bridge))
            # 3. The old node closes the main connection; nats-py reconnects it elsewhere.
            if not await self._wait(self._main_back):
                return  # the edge stops: the bridge is closed after the shutdown
            # 4. Back: the main connection's new subscriptions warm up, then take over again.
            await self._until_known(bridge, main, "main")
            streams.goes_live(MAIN)
            await self._switch_publishing(bridge, main)
            for sub in bridge_subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await bridge.flush(timeout=2)
            # Copies of what the bridge delivered may still be on their way over the main one.
            await self.ctx.sleep(ctx.settings.nats_move_settle_ms / 1000)
            self.delivery.streams = None
            ctx.counters.nats_moves += 1
            log.info("moved off the lame-duck NATS node: main connection on %s, no socket closed", where(main))
            await self.close_bridge()
        finally:
            self._task = None

    async def _open_bridge(self, main: NATS) -> NATS | None:
        ctx = self.ctx
        here = main.connected_url
        others = [urlunparse(uri) for uri in main.servers if here is None or uri.netloc != here.netloc]
        if not others:
            log.warning("no other NATS node is known: this edge's sockets restart when the node goes")
            return None

        async def on_error(exc: Exception) -> None:
            log.warning("NATS bridge: %s", exc or type(exc).__name__)

        async def on_disconnect() -> None:
            if self.delivery.streams is not None and MAIN not in self.delivery.streams.live:
                self._covered = False  # neither connection is there: frames may be lost

        try:
            self.bridge = bridge = await nats.connect(
                servers=others,
                name=f"relay-edge {ctx.settings.edge_id} (bridge)",
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                connect_timeout=2,
                **liveness_options(ctx.settings.nats_ping_interval_ms),
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
            )
        except Exception as exc:
            log.warning("cannot open a NATS bridge to another node (%s): sockets restart when the node goes", exc)
            return None
        ctx.max_forward_bytes = min(ctx.max_forward_bytes, self.forward_limit(bridge))
        return bridge

    async def _subscribe_bridge(self, bridge: NATS) -> list[Subscription]:
        ctx, s, delivery = self.ctx, self.ctx.settings, self.delivery
        subs = [
            await bridge.subscribe(
                edge_filter(s.edge_id),
                cb=functools.partial(delivery.dispatch, source=BRIDGE),
                pending_msgs_limit=0,
                pending_bytes_limit=s.inbox_pending_bytes,
            ),
            await bridge.subscribe(edge_undelivered_filter(s.edge_id), cb=functools.partial(delivery.undelivered, source=BRIDGE)),
            await bridge.subscribe(edge_last_seen_subject(s.edge_id), cb=self.last_seen.answer),
            await bridge.subscribe(edge_probe_subject(s.edge_id, "bridge"), cb=self._probe_came),
        ]
        await bridge.flush()
        return subs

    async def _until_known(self, through: NATS, to: NATS, name: str) -> bool:
        """Until a probe sent through `through` (another node) arrives on `to`'s subscription,
        and a settle for the rest of the cluster; False if it never does."""
        ctx = self.ctx
        token = secrets.token_hex(6)
        arrived = self._probes[token] = asyncio.Event()
        try:
            for _ in range(max(1, ctx.settings.nats_move_probe_attempts)):
                with contextlib.suppress(nats.errors.Error):
                    await through.publish(edge_probe_subject(ctx.settings.edge_id, name), token.encode())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 0.1)
                    await ctx.sleep(ctx.settings.nats_move_settle_ms / 1000)
                    return True
            return False
        finally:
            self._probes.pop(token, None)

    async def _probe_came(self, msg: Msg) -> None:
        arrived = self._probes.get(msg.data.decode(errors="replace"))
        if arrived is not None:
            arrived.set()

    async def _switch_publishing(self, old: NATS, new: NATS) -> None:
        """The frame path publishes on `new` from now on; first, what it published on `old`
        goes out (frames wait meanwhile), so that nothing on `new` overtakes it."""
        ctx = self.ctx
        paused = ctx.frames_paused = asyncio.Event()
        try:
            if old.is_connected:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await old.flush(timeout=max(0.1, ctx.settings.event_ack_timeout_ms / 1000))
            ctx.frame_nc = new
        finally:
            ctx.frames_paused = None
            paused.set()

    async def _wait(self, event: asyncio.Event) -> bool:
        """Until `event`; False if the edge stops first."""
        stopping = asyncio.ensure_future(self.ctx.stopping.wait())
        waiting = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({stopping, waiting}, return_when=asyncio.FIRST_COMPLETED)
            return event.is_set()
        finally:
            stopping.cancel()
            waiting.cancel()

    async def close_bridge(self) -> None:
        """Close the bridge, if there is one (at the end of a move, and at the edge's exit,
        after the drain)."""
        bridge, self.bridge = self.bridge, None
        if bridge is None:
            return
        if self.ctx.frame_nc is bridge:
            self.ctx.frame_nc = self.ctx.nc
        with contextlib.suppress(Exception):
            await bridge.drain()
