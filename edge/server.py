"""The edge process: WebSockets and HTTP on one port, room state in KV, frames over NATS.

`Edge` wires the parts and runs the one lifecycle: bind the port, connect to NATS, open
storage and take the lease, serve, and on `stop()` the one shutdown path. The protocol's
decisions are in `edge.protocol`; each part here carries out one job:

- `edge.http_front`: what is answered before the upgrade (the checks of /ws, the HTTP API);
  `edge.status`: the operator's status page, and this edge's answer to it;
- `edge.sockets`: a socket's life; `edge.carrier`: carrying out its session's actions;
- `edge.delivery`, `edge.fastpath`: frames and events from NATS to sockets, and back;
  `edge.nats_move`: moving them to another NATS node when theirs goes lame-duck;
  `edge.internals`: the library internals their shortcuts use, probed at import;
- `edge.room_requests`: register and join against storage;
- `edge.leases` (on its own NATS connection, `edge.lease_connection`), `edge.upkeep`,
  `edge.last_seen`, `edge.usage`, `edge.account_watch`: the background work, each in the
  one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import nats.errors
from websockets import __version__ as websockets_version
from websockets.asyncio.server import Server, serve

from accounts.store import AccountStore
from edge.access import Access
from edge.account_watch import AccountWatch
from edge.api import HttpApi
from edge.carrier import Carrier
from edge.context import Connection, EdgeContext
from edge.delivery import Delivery
from edge.fastpath import FastPath
from edge.front import HttpConnection
from edge.http_front import HttpFront, ws_log
from edge.last_seen import LastSeen
from edge.leases import CannotServe, Leases
from edge.metering_link import MeteringLink
from edge.nats_move import NatsMove
from edge.protocol.meter import UsageMeter
from edge.protocol.parts import part_size
from edge.protocol.plans import drain_order, spread_plan
from edge.room_requests import RoomRequests
from edge.settings import EdgeSettings
from edge.sockets import Sockets
from edge.status import StatusPage
from edge.store import Presence, RoomStore, open_buckets
from edge.upkeep import Upkeep
from edge.usage import Usage
from metering.stream import open_usage_stream
from metering.usage import UsageReader, open_usage_bucket
from runtime.backoff import until_storage_opens
from runtime.connection import connect_for_service, where
from runtime.settings import redact_urls
from schemas.client import CloseCode, DisconnectReason
from schemas.subjects import FLEET_EDGES_SUBJECT, OVER_LIMIT_SUBJECT, edge_filter, edge_last_seen_subject, edge_undelivered_filter
from schemas.tiers import load_tiers

__all__ = ["CannotServe", "Edge"]

log = logging.getLogger("edge")


class Edge:
    """One edge process. `await Edge(settings).run()` serves until `stop()` is called."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        # A bad tiers file stops the start, with the reason.
        self.ctx = ctx = EdgeContext(settings, load_tiers(settings.tiers_file))
        self.port: int | None = None
        self.metrics_port: int | None = None  # where /metrics is served, if it is (RELAY_METRICS_PORT)
        self.carrier = carrier = Carrier(ctx)
        self.room_requests = RoomRequests(ctx, carrier)
        carrier.run_room_request = self.room_requests.carry_out
        self.delivery = Delivery(ctx, carrier)
        carrier.resume_delivery = self.delivery.resume
        self.fastpath = FastPath(ctx, carrier)
        self.usage = Usage(ctx, carrier)
        self.account_watch = AccountWatch(ctx, carrier)
        self.sockets = Sockets(ctx, carrier, self.fastpath, self.usage, self.account_watch.deleted_users)
        self.leases = Leases(ctx, carrier)
        self.upkeep = Upkeep(ctx, carrier, self.room_requests, self.delivery)
        self.last_seen = LastSeen(ctx)
        self.nats_move = NatsMove(ctx, self.delivery, self.last_seen, lambda nc: part_size(nc.max_payload))
        self.status = StatusPage(ctx)
        self.http = HttpFront(ctx, self.status)

    # What tests and tools read of a running edge.
    @property
    def ready(self) -> asyncio.Event:
        return self.ctx.ready

    @property
    def connections(self) -> dict[str, Connection]:
        return self.ctx.connections

    @property
    def live_edges(self) -> dict[str, str]:
        return self.ctx.live_edges

    @property
    def boot_id(self) -> str:
        return self.ctx.boot_id

    @property
    def meter(self) -> UsageMeter:
        return self.ctx.meter

    @property
    def serving(self) -> bool:
        """Whether the edge has been ready (and so has a graceful shutdown to run)."""
        return self.ctx.accepted

    def stop(self) -> None:
        """Begin the graceful shutdown, the drain: 503 to new connections, then sockets
        closed 1001 at a bounded pace (peers hear `server_restart`). Called again (a second
        SIGTERM), what is left closes at once."""
        if self.ctx.stopping.is_set():
            self.ctx.hurry.set()
        self.ctx.stopping.set()

    async def run(self) -> None:
        """Serve until `stop()`. The port is bound first: /healthz answers while NATS is awaited."""
        ctx, s = self.ctx, self.settings
        server = await serve(
            self.sockets.serve,
            s.host,
            s.port,
            process_request=self.http.process_request,
            compression=None,  # payloads are encrypted: compression costs memory, saves nothing
            max_size=s.max_frame_bytes,
            ping_interval=None,  # liveness is the protocol's heartbeat, as in the official relay
            close_timeout=ctx.close_timeout_s,
            server_header="termrelay",
            # POST and DELETE for the HTTP API; the per-socket limits, with this edge's shortcuts.
            create_connection=functools.partial(HttpConnection, shortcuts=ctx.shortcuts),
            logger=ws_log,
            # A reconnect storm (every client of a lost edge at once) overflows asyncio's
            # default of 100, and each dropped SYN costs its client a 1-3 s retry.
            backlog=s.listen_backlog,
        )
        self.port = server.sockets[0].getsockname()[1]
        metrics_server: Server | None = None
        try:
            metrics_server = await self.http.serve_metrics()
            if metrics_server is not None:
                self.metrics_port = metrics_server.sockets[0].getsockname()[1]
                log.info("edge %s serves /metrics on %s:%d", s.edge_id, s.metrics_host, self.metrics_port)
            log.info("edge %s connecting to NATS at %s", s.edge_id, redact_urls(s.nats_url))
            ctx.nc = await connect_for_service(
                s.nats_url,
                f"relay-edge {s.edge_id}",
                self._nats_error,
                s.nats_ping_interval_ms,
                disconnected_cb=self._nats_disconnected,
                reconnected_cb=self._nats_reconnected,
                lame_duck_mode_cb=self.nats_move.lame_duck,
            )
            ctx.frame_nc = ctx.nc
            await until_storage_opens(self._open_storage, log)
            self._learn_max_payload()
            async with asyncio.TaskGroup() as tg:
                ctx.tg = tg
                await self._serve(server, tg)
        finally:
            ctx.tg = None
            server.close()
            if metrics_server is not None:
                metrics_server.close()
            await self.nats_move.close_bridge()
            await self.leases.connection.close()
            if ctx.nc is not None and not ctx.nc.is_closed:  # drain: flush what we published, then close
                with contextlib.suppress(Exception):
                    await ctx.nc.drain()

    async def _serve(self, server: Server, tg: asyncio.TaskGroup) -> None:
        """Start the background work and the subscriptions, serve, then shut down."""
        ctx, s, nc = self.ctx, self.settings, self.ctx.nc
        watching, watching_accounts = asyncio.Event(), asyncio.Event()
        background = [
            tg.create_task(self.leases.watch(watching)),
            tg.create_task(self.leases.renew_loop()),
            *self.upkeep.start(tg),
            tg.create_task(self.account_watch.watch(watching_accounts)),
        ]
        if ctx.metering is not None:
            background.append(self.usage.start(tg))
            await nc.subscribe(OVER_LIMIT_SUBJECT, cb=self.usage.over_limit)
        # One subscription for everything addressed to this edge's sockets.
        await nc.subscribe(
            edge_filter(s.edge_id),
            cb=self.delivery.dispatch,
            pending_msgs_limit=0,  # no count limit; the bytes are bounded
            pending_bytes_limit=s.inbox_pending_bytes,
        )
        await nc.subscribe(edge_last_seen_subject(s.edge_id), cb=self.last_seen.answer)
        await nc.subscribe(FLEET_EDGES_SUBJECT, cb=self.status.answer)  # the status page's question
        # Where NATS (or the addressee's edge) says a frame of ours reached nobody.
        await nc.subscribe(edge_undelivered_filter(s.edge_id), cb=self.delivery.undelivered)
        await nc.flush()  # the server has our interest before anyone is told of a socket here
        await watching.wait()
        await watching_accounts.wait()
        ctx.accepted = True
        shortcuts = ctx.shortcuts
        if shortcuts.all_on or not s.library_shortcuts:
            log.info("edge %s: %s", s.edge_id, shortcuts.describe())
        else:
            log.warning("edge %s on websockets %s: %s; the public API instead", s.edge_id, websockets_version, shortcuts.describe())
        ctx.ready.set()
        log.info("edge %s ready on %s:%d (ws://%s:%d/ws)", s.edge_id, s.host, self.port, s.host, self.port)
        log.info(
            "edge %s: a graceful stop (SIGTERM) takes up to %.0f s with these settings; give the process a "
            "longer stop grace period (a second SIGTERM ends the drain at once)", s.edge_id, s.longest_graceful_stop_s,
        )  # fmt: skip
        await ctx.stopping.wait()
        ctx.ready.clear()
        await self._shutdown(server)
        for task in background:
            task.cancel()

    def _learn_max_payload(self) -> None:
        """Note the largest frame NATS carries in one message (checked per frame, so kept, not
        recomputed): at start and after each reconnect, since the server may be another one.
        Larger frames travel in parts (`edge.protocol.parts`)."""
        nc, bridge = self.ctx.nc, self.nats_move.bridge
        self.ctx.max_forward_bytes = min(part_size(c.max_payload) for c in (nc, bridge) if c is not None)
        if self.ctx.max_forward_bytes < self.settings.max_frame_bytes:
            log.info(
                "NATS max_payload is %d bytes: frames over %d bytes (up to RELAY_MAX_FRAME_BYTES, %d) travel in parts",
                nc.max_payload,
                self.ctx.max_forward_bytes,
                self.settings.max_frame_bytes,
            )

    async def _open_storage(self) -> None:
        """Open the buckets and take our lease (one attempt; `until_storage_opens` retries)."""
        ctx, s = self.ctx, self.settings
        js = ctx.nc.jetstream(timeout=s.jetstream_timeout_ms / 1000)
        rooms_kv, presence_kv = await open_buckets(js, s.kv_replicas)
        ctx.rooms = RoomStore(rooms_kv, js)
        ctx.presence = Presence(js, presence_kv, ctx.nc)
        accounts = await AccountStore.open(js, s.kv_replicas)
        usage = UsageReader(await open_usage_bucket(js, s.kv_replicas))
        ctx.access = Access(s, accounts, ctx.tiers)
        ctx.api = HttpApi(ctx.access, ctx.rooms, ctx.presence, usage, ctx.is_alive, self.last_seen.of_room)
        if s.auth == "none":
            await ctx.access.ensure_local_user()
        if s.metering:
            await open_usage_stream(js, s.kv_replicas)
            ctx.metering = MeteringLink(ctx.nc, js, s.edge_id, s.quota_check_timeout_ms / 1000, s.kv_replicas, ctx.metrics.quota_check_seconds)
        await self.leases.take()

    async def _shutdown(self, server: Server) -> None:
        """Drain, stop accepting, release every slot (peers hear `server_restart`), close 1001."""
        ctx = self.ctx
        await self._drain()
        server.close(close_connections=False)
        await self.carrier.close_all(CloseCode.GOING_AWAY, "server restarting", DisconnectReason.SERVER_RESTART)
        # The handlers are releasing slots and telling peers `server_restart`: the lease must
        # outlive that, or peers would hear `timeout` instead.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), ctx.close_timeout_s + self.settings.shutdown_release_ms / 1000)
        # Those that finish are charged before the last usage goes out; those given up are
        # still in nats-py's buffer and may go out at the drain, uncharged.
        await self.carrier.settle_waiting_publishes()
        await self.usage.flush_at_exit()
        await self.leases.drop()
        log.info("edge %s stopped", self.settings.edge_id)

    async def _drain(self) -> None:
        """Instead of a reconnect storm on the other edges: new connections get 503 (they go
        elsewhere) while the sockets here relay on for `drain_grace_ms`; then they are closed
        1001 spread over `drain_ms`, a room's sockets on this edge together."""
        ctx, s = self.ctx, self.settings
        if s.drain_grace_ms or s.drain_ms:
            log.info("edge %s draining %d sockets: new connections get 503", s.edge_id, len(ctx.connections))
        if await ctx.sleep(s.drain_grace_ms / 1000, until=ctx.hurry) or not s.drain_ms:
            return
        groups = drain_order([(c.session.room_id, c) for c in ctx.connections.values()])
        per_step, step_s = spread_plan(len(groups), s.drain_ms / 1000, max(1, len(groups)), s.spread_step_ms / 1000)
        for start in range(0, len(groups), per_step):
            for conn in (c for group in groups[start : start + per_step] for c in group):
                if conn.session.socket_id in ctx.connections and not conn.closing:
                    conn.session.ends_with(DisconnectReason.SERVER_RESTART)
                    ctx.spawn(self.carrier.close(conn, CloseCode.GOING_AWAY, "server restarting"), "drain a socket")
            if await ctx.sleep(step_s, until=ctx.hurry):
                log.info("edge %s: stopped again; closing the rest at once", s.edge_id)
                return

    # --- NATS callbacks ----------------------------------------------------------

    async def _nats_error(self, exc: Exception) -> None:
        events = self.ctx.metrics.nats_events
        if isinstance(exc, nats.errors.SlowConsumerError):
            events.labels(event="slow_consumer").inc()
            # Only an edge that has run out of CPU for a long while: messages were dropped.
            log.error("NATS dropped messages for this edge's sockets: the edge cannot keep up (%s)", exc.subject)
            return
        events.labels(event="error").inc()
        log.error("NATS error (%s): %s", redact_urls(self.settings.nats_url), exc or type(exc).__name__)

    async def _nats_disconnected(self) -> None:
        self.ctx.metrics.nats_events.labels(event="disconnected").inc()
        self.nats_move.main_disconnected()
        if not self.ctx.stopping.is_set():
            log.warning("disconnected from NATS; reconnecting")

    async def _nats_reconnected(self) -> None:
        ctx = self.ctx
        ctx.metrics.nats_events.labels(event="reconnected").inc()
        self._learn_max_payload()
        if self.nats_move.main_reconnected():
            # A bridge to another node carried every frame meanwhile (a move off a lame-duck
            # node): the sessions have no gap. What the main connection holds may have changed.
            log.info("reconnected to NATS on %s; the bridge carried the frames meanwhile", where(ctx.nc))
            self.leases.restart_watch()
            self.account_watch.restart()
            return
        # Core NATS delivers at most once: frames to or from our sockets may have been
        # lost while we were away, and an encrypted session with a gap is broken. Close
        # every socket with 1001 so both sides reconnect at once and start a fresh session.
        log.warning("reconnected to NATS; closing %d sockets so their sessions restart", len(ctx.connections))
        if ctx.connections:
            ctx.spawn(
                self.carrier.close_all(CloseCode.GOING_AWAY, "relay reconnected to NATS", DisconnectReason.SERVER_RESTART),
                "restart sessions after a NATS reconnect",
            )
        self.leases.restart_watch()
        self.account_watch.restart()
