"""The edge process: WebSockets and HTTP on one port, room state in KV, frames over NATS.

Everything protocol-related is decided in `edge.rooms` and `edge.session`; this module
only carries out their actions and keeps the process's background work (lease,
liveness sweep, lastSeen flushes, lease watcher) in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import http
import logging
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from websockets import __version__ as websockets_version
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from accounts.store import AccountStore
from accounts.tiers import load_tiers
from edge import guessing, rooms
from edge.access import STORAGE_ERRORS, Access, Principal, Refusal
from edge.api import BAD_ROOM_ID, ApiRequest, HttpApi, HttpReply
from edge import ws_hooks
from edge.eager import run_eagerly
from edge.front import HttpConnection
from edge.limits import TokenBucket
from edge.meter import UsageMeter
from edge.metering_link import MeteringLink
from edge.session import (
    Action,
    Close,
    Forward,
    Notify,
    RoomRequest,
    Send,
    Session,
    Undelivered,
    other_role,
)
from edge.settings import EdgeSettings, redact_urls
from edge.kv import get_present
from edge.store import Presence, RoomStore, StorageConflict, now_ms, open_buckets
from metering.stream import open_usage_stream
from metering.usage import UsageReader, open_usage_bucket
from metering.windows import WINDOW_MS
from schemas.client import (
    CloseCode,
    DisconnectReason,
    Error,
    ErrorCode,
    JoinRoom,
    RegisterRoom,
    encode,
)
from schemas.edge_events import (
    KIND_EVENT,
    KIND_FRAME,
    LastSeenAnswer,
    LastSeenQuery,
    PeerLeftEvent,
    edge_event_decoder,
    last_seen_answer_decoder,
    last_seen_query_decoder,
)
from schemas.metering import over_limit_decoder
from schemas.records import EdgeLease, RoomRecord, SlotHolder, user_decoder
from schemas.subjects import (
    ACCOUNTS_BUCKET,
    OVER_LIMIT_SUBJECT,
    ROLES,
    USER_FILTER,
    addressed_subject,
    addressee_sender_and_kind,
    edge_filter,
    edge_id_of_lease_key,
    edge_incarnation_subject,
    edge_lease_key,
    edge_last_seen_subject,
    edge_undelivered_filter,
    is_valid_room_id,
    room_subject,
    sender_addressee_and_credits,
    undelivered_reply_prefix,
)

log = logging.getLogger("edge")


class _RedactCredentials(logging.Filter):
    """websockets logs request headers at DEBUG: keep API keys and tokens out of the log."""

    _HEADERS = frozenset({"authorization", "proxy-authorization", "x-sandbox-key", "cookie"})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in self._HEADERS:
            record.args = (args[0], "***")
        return True


# The logger websockets uses for our server's connections (handshakes included).
_ws_log = logging.getLogger("edge.websockets")
_ws_log.addFilter(_RedactCredentials())

# How long one JetStream request may take; short, so that the budget allows retries.
_JETSTREAM_TIMEOUT_S = 2.0
# Control events are acknowledged by the addressee's edge; these bound the waiting.
_EVENT_ACK_TIMEOUT_S = 1.0
_EVENT_ATTEMPTS = 3
# Everything before the 101 (authentication, room limit, API calls) must answer within
# this, inside websockets' 10 s open timeout.
_REQUEST_BUDGET_S = 8.0
# How many deleted accounts an edge remembers (for sockets admitted during a deletion).
_DELETED_USERS_KEPT = 10_000
# Periodic work over many sockets (lastSeen writes, liveness, session time) goes in slices
# of this many, with frames in between: a slice holds frames back ~0.2 ms, where one pass
# over 2000 sockets held them 2 ms (and showed in the p99 latency).
_SLICE = 25
# Spread passes (lastSeen writes, registration refreshes) do one slice at least this far
# apart, smaller slices when the pass has time: 25 acknowledged registration writes at once
# held frames ~10 ms every few seconds (bench/README.md, latency timeline); one write every
# 150 ms is felt by nobody.
_SPREAD_STEP_S = 0.05
# Longer than any `heartbeat_ack` (its longest has every optional field).
_HEARTBEAT_ACK_MAX = 128
# A failure of a long-running task this long after its (re)start does not follow the last one.
_FAILURES_APART_S = 5.0
# How long shutdown tries to hand the last usage to the stream before it gives up (and logs).
_SHUTDOWN_USAGE_S = 10.0
# The answer to a control event or frame for a socket this edge no longer has (the socket is
# gone: nobody to tell, as when a whole edge is gone and NATS answers "no responders").
_NO_SUCH_SOCKET = b"gone"
# What may wait in NATS's client for the edge's one subscription before it drops (and
# logs): only an edge out of CPU gets near it, since delivering never waits for a socket.
_INBOX_PENDING_BYTES = 512 * 1024 * 1024
# How long /status and /api/rooms wait for another edge to say when its sockets last spoke.
_LAST_SEEN_QUERY_TIMEOUT_S = 0.5
# The largest WebSocket frame header the server writes (no mask): 2 + 8 bytes.
_FRAME_HEADER_MAX = 10
# The largest a client writes (masked): 2 + 8 + 4 bytes.
_CLIENT_FRAME_HEADER_MAX = 14
# What an incarnation answers on its incarnation subject (see `_take_lease`), and how long
# an edge taking the id waits for the answer.
_RUNNING = b"running"
_STOPPING = b"stopping"
_INCARNATION_PROBE_TIMEOUT_S = 1.0
# The status NATS gives the reply of a message nobody subscribes for ("no responders").
_NO_RESPONDERS = "503"


class CannotServe(Exception):
    """The edge cannot start, or cannot go on; the message is one line: the cause and what to do."""


@dataclass(eq=False)
class Connection:
    """A live client socket on this edge: the socket, its protocol state, what waits to be written to it."""

    ws: HttpConnection
    session: Session
    target: "WsTarget"
    # role → the room subject of that role, built once (the room id was validated at the
    # upgrade; re-validating it per forwarded frame would be work on the hot path).
    subjects: dict[str, str] = field(default_factory=dict)
    last_message_ms: int = 0  # wall clock of the last inbound frame, for lastSeen
    last_seen_written_ms: int = 0
    closing: bool = False
    timed_out: bool = False
    registered_at: int | None = None  # epoch ms of this Mac socket's first room registration
    in_session_since: float | None = None  # monotonic s: session time counted up to here (Mac sockets)
    forward_to: str = ""  # the peer socket that `forward_subject` addresses
    forward_subject: str = ""
    # Its frames' reply subject, for one credit (`undelivered_reply_prefix` + "1").
    forward_reply: str = ""
    # Held while writing what the session decided about its peer, and while writing a
    # frame from NATS, so that the client never sees a peer's frame before its peer_joined.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What arrived from NATS for this socket and could not be written at once (the socket
    # is slow, or news about the peer is being written), in arrival order: a frame's bytes
    # or a control event, each with its sender. Written by `drainer`; bounded.
    backlog: deque[tuple[bytes | Any, str]] = field(default_factory=deque)
    backlog_bytes: int = 0
    drainer: asyncio.Task[None] | None = None
    closing_slow: bool = False  # being closed 1013 for a backlog over its bounds


@dataclass(frozen=True)
class WsTarget:
    """What the upgrade request asked for, validated and authenticated before the 101."""

    room_id: str
    role: str | None
    principal: Principal
    # The room limit needs no look at the first register: the room was registered already
    # (a reconnection) or the tier has no limit.
    room_settled: bool = False

    @property
    def user_id(self) -> str:
        return self.principal.user_id


def spread_plan(count: int, over_s: float) -> tuple[int, float]:
    """(sockets per slice, seconds from one slice to the next) for a pass over `count`
    sockets spread over `over_s`: slices at least `_SPREAD_STEP_S` apart, of at most
    `_SLICE` sockets (more sockets than that allows: slices closer together)."""
    if count == 0 or over_s <= 0:
        return _SLICE, 0.0
    size = max(1, min(_SLICE, math.ceil(count * _SPREAD_STEP_S / over_s)))
    return size, over_s / math.ceil(count / size)


class Edge:
    """One edge process. `await Edge(settings).run()` serves until `stop()` is called."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.tiers = load_tiers(settings.tiers_file)  # a bad file stops the start, with the reason
        self.boot_id = secrets.token_hex(8)
        self.port: int | None = None
        self.metrics_port: int | None = None  # where /metrics is served, if it is (RELAY_METRICS_PORT)
        self.ready = asyncio.Event()
        self.connections: dict[str, Connection] = {}
        # edge_id → boot_id of every edge incarnation whose lease is alive.
        self.live_edges: dict[str, str] = {}
        self._stopping = asyncio.Event()
        self._lease_dropping = asyncio.Event()  # set by the shutdown once the slots are released
        self._nc: NATS | None = None
        self._rooms: RoomStore | None = None
        self._presence: Presence | None = None
        self._presence_kv: Any = None  # the presence bucket, to read our own lease back
        self._lease_revision = 0
        # The incarnations this process has been, each answering on its subject until the
        # next one holds the lease (see `_take_lease`).
        self._incarnations: dict[str, Any] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._accepted = False
        self._lease_watcher: Any = None
        self._max_forward_bytes = 0  # see _learn_max_payload
        self._access: Access | None = None
        self._api: HttpApi | None = None
        self._account_watch_wake = asyncio.Event()  # set: recreate the account watcher
        # Accounts deleted while this edge watched: a socket admitted just before its
        # account's deletion arrived is closed when it starts.
        self._deleted_users: OrderedDict[str, None] = OrderedDict()
        self.meter = UsageMeter(settings.edge_id, self.boot_id, settings.session_ms_per_credit)
        self._metering: MeteringLink | None = None  # with settings.metering, once NATS is there
        self._usage_task: asyncio.Task[None] | None = None
        self._charge_per_payload = settings.charge_per_payload
        self._metering_on = settings.metering  # off: nothing is counted (nothing would take it)
        self.frames_forwarded_at_once = 0  # taken as they arrived, see _take_message_now
        self.heartbeats_answered_at_once = 0
        self.frames_forwarded_by_handler = 0
        self.frames_undelivered = 0  # NATS or the addressee's edge said nobody got them; not charged
        self._waiting_publishes: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Whether the edge has been ready (and so has a graceful shutdown to run)."""
        return self._accepted

    def stop(self) -> None:
        """Begin the graceful shutdown: sockets get 1001, peers hear `server_restart`."""
        self._stopping.set()

    async def run(self) -> None:
        """Serve until `stop()`. The port is bound first: /healthz answers while NATS is awaited."""
        s = self.settings
        server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            compression=None,  # payloads are encrypted: compression costs memory, saves nothing
            max_size=s.max_frame_bytes,
            ping_interval=None,  # liveness is the protocol's heartbeat, as in the official relay
            close_timeout=self._close_timeout_s,
            server_header="termrelay",
            create_connection=HttpConnection,  # POST and DELETE for the HTTP API
            logger=_ws_log,
            # A reconnect storm (every client of a lost edge at once) overflows asyncio's
            # default of 100, and each dropped SYN costs its client a 1-3 s retry.
            backlog=s.listen_backlog,
        )
        self.port = server.sockets[0].getsockname()[1]
        metrics_server: Server | None = None
        try:
            metrics_server = await self._serve_metrics()
            log.info("edge %s connecting to NATS at %s", s.edge_id, redact_urls(s.nats_url))
            # Retries forever, also at start: an edge may well start before its NATS cluster.
            self._nc = await nats.connect(
                servers=[u.strip() for u in s.nats_url.split(",")],
                name=f"relay-edge {s.edge_id}",
                error_cb=self._nats_error,
                disconnected_cb=self._nats_disconnected,
                reconnected_cb=self._nats_reconnected,
                max_reconnect_attempts=-1,
                connect_timeout=5,
            )
            await self._open_storage()
            self._learn_max_payload()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                watching, watching_accounts = asyncio.Event(), asyncio.Event()
                background = [
                    tg.create_task(self._watch_leases(watching)),
                    tg.create_task(self._renew_lease_loop()),
                    # Upkeep that a bug or an unforeseen error must not turn into the end
                    # of every socket here: logged, and started again.
                    tg.create_task(self._keep_running("liveness sweep", self._liveness_loop)),
                    tg.create_task(self._keep_running("lastSeen flush", self._last_seen_loop)),
                    tg.create_task(self._keep_running("registration refresh", self._registration_loop)),
                    tg.create_task(self._watch_accounts(watching_accounts)),
                ]
                if self._metering is not None:
                    self._usage_task = tg.create_task(self._usage_loop())
                    background.append(self._usage_task)
                    await self._nc.subscribe(OVER_LIMIT_SUBJECT, cb=self._over_limit)
                # One subscription for everything addressed to this edge's sockets.
                await self._nc.subscribe(
                    edge_filter(s.edge_id),
                    cb=self._dispatch,
                    pending_msgs_limit=0,  # no count limit; the bytes are bounded
                    pending_bytes_limit=_INBOX_PENDING_BYTES,
                )
                await self._nc.subscribe(edge_last_seen_subject(s.edge_id), cb=self._answer_last_seen)
                # Where NATS (or the addressee's edge) says a frame of ours reached nobody.
                await self._nc.subscribe(edge_undelivered_filter(s.edge_id), cb=self._undelivered)
                await self._nc.flush()  # the server has our interest before anyone is told of a socket here
                await watching.wait()
                await watching_accounts.wait()
                self._accepted = True
                if not ws_hooks.HOOKED:
                    log.warning(
                        "websockets %s parses frames unlike what edge.ws_hooks expects: control frames "
                        "are counted after each read instead of as they are parsed",
                        websockets_version,
                    )
                self.ready.set()
                log.info("edge %s ready on %s:%d (ws://%s:%d/ws)", s.edge_id, s.host, self.port, s.host, self.port)
                await self._stopping.wait()
                self.ready.clear()
                await self._shutdown(server)
                for task in background:
                    task.cancel()
        finally:
            self._tg = None
            server.close()
            if metrics_server is not None:
                metrics_server.close()
            if self._nc is not None and not self._nc.is_closed:  # drain: flush what we published, then close
                with contextlib.suppress(Exception):
                    await self._nc.drain()

    def _learn_max_payload(self) -> None:
        """Note the largest frame NATS carries (checked per frame, so kept, not recomputed):
        at start and after each reconnect, since the server may be another one."""
        # Some room below NATS's max_payload for the protocol line.
        self._max_forward_bytes = self._nc.max_payload - 1024
        if self._max_forward_bytes < self.settings.max_frame_bytes:
            log.error(
                "NATS max_payload is %d bytes, below RELAY_MAX_FRAME_BYTES (%d): larger frames will be "
                "closed 1009. Set max_payload: 8MB on the NATS servers (see deploy/nats.conf).",
                self._nc.max_payload,
                self.settings.max_frame_bytes,
            )

    async def _open_storage(self) -> None:
        """Open the buckets and take our lease, waiting out a JetStream that is not ready yet
        (a cluster elects its leaders for some seconds after it starts)."""
        js = self._nc.jetstream(timeout=_JETSTREAM_TIMEOUT_S)
        backoff = 0.2
        while True:
            try:
                rooms_kv, presence_kv = await open_buckets(js, self.settings.kv_replicas)
                self._rooms = RoomStore(rooms_kv, js)
                self._presence = Presence(js, presence_kv, self._nc)
                self._presence_kv = presence_kv
                accounts = await AccountStore.open(js, self.settings.kv_replicas)
                usage = UsageReader(await open_usage_bucket(js, self.settings.kv_replicas))
                self._access = Access(self.settings, accounts, self.tiers)
                self._api = HttpApi(
                    self._access, self._rooms, self._presence, usage, self._is_alive, self._live_last_seen
                )
                if self.settings.auth == "none":
                    await self._access.ensure_local_user()
                if self.settings.metering:
                    await open_usage_stream(js, self.settings.kv_replicas)
                    self._metering = MeteringLink(
                        self._nc, js, self.settings.edge_id, self.settings.quota_check_timeout_ms / 1000,
                        self.settings.kv_replicas,
                    )
                await self._take_lease()
                return
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("JetStream not ready (%s); retrying in %.1fs", exc or type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _shutdown(self, server: Server) -> None:
        """Stop accepting, release every slot (peers hear `server_restart`), close 1001."""
        server.close(close_connections=False)
        await self._close_all(CloseCode.GOING_AWAY, "server restarting", DisconnectReason.SERVER_RESTART)
        # The handlers are releasing slots and telling peers `server_restart`: the lease must
        # outlive that, or peers would hear `timeout` instead.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), self._close_timeout_s + self.settings.shutdown_release_ms / 1000)
        # Those that finish are charged before the last usage goes out; those given up are
        # still in nats-py's buffer and may go out at the drain, uncharged.
        await self._settle_waiting_publishes()
        await self._flush_usage_at_exit()
        self._lease_dropping.set()
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=2)
            await self._presence.drop_lease(self.settings.edge_id, self.boot_id)
        log.info("edge %s stopped", self.settings.edge_id)

    # --- HTTP before the upgrade -------------------------------------------------

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Answer a request before the upgrade (or let the upgrade go on: None).

        Bounded in time, so that slow storage gives a 503 inside websockets' open timeout
        (which would drop the connection without a word), and never raising: websockets
        would log a traceback per request, a flood anyone could cause.
        """
        try:
            async with asyncio.timeout(_REQUEST_BUDGET_S):
                return await self._answer_request(ws, request)
        except TimeoutError:
            log.warning("%s: storage too slow; answered 503", request.path.partition("?")[0])
            return _reply(HttpReply.text(503, "storage unavailable; try again"))
        except Exception as exc:
            log.error("%s failed: %s", request.path.partition("?")[0], type(exc).__name__)
            return _reply(HttpReply.text(500, "internal error"))

    async def _answer_request(self, ws: ServerConnection, request: Request) -> Response | None:
        # Not urlsplit: it would read "//ws" as a host name. The Mac builds
        # "\(serverURL)/ws", so a base URL with a trailing slash gives "//ws".
        raw_path, _, raw_query = request.path.partition("?")
        query = {name: values[0] for name, values in parse_qs(raw_query).items()}
        path = "/" + "/".join(part for part in raw_path.split("/") if part)
        method = getattr(ws, "http_method", "GET")
        if path == "/ws":
            if method != "GET":
                return _reply(HttpReply.text(405, "use GET with a WebSocket upgrade"))
            return await self._admit(ws, request, query)
        if path == "/healthz":
            return _reply(HttpReply.text(200, "ok"))
        if path == "/readyz":
            if self.ready.is_set() and self._nc is not None and self._nc.is_connected:
                return _reply(HttpReply.text(200, "ready"))
            return _reply(HttpReply.text(503, "not ready"))
        if self._api is None or not self.ready.is_set():
            return _reply(HttpReply.text(503, "relay is not ready"))
        route = self._api.route(method, path)
        if route is None:
            return _reply(HttpReply.text(404, "not found"))
        if isinstance(route, HttpReply):
            return _reply(route)
        api_request = ApiRequest(
            method=method,
            path=path,
            query=query,
            headers=request.headers,
            body=getattr(ws, "http_body", b""),
            address=self._access.client_address(ws.remote_address[0], request.headers),
        )
        return _reply(await self._api.handle(route, api_request))

    async def _serve_metrics(self) -> Server | None:
        """/metrics on a port of its own (RELAY_METRICS_HOST, RELAY_METRICS_PORT), never the
        public one: the counters are the operator's. None when it is not served."""
        s = self.settings
        if s.metrics_port < 0:
            return None
        try:
            server = await serve(
                _never_upgraded, s.metrics_host, s.metrics_port,
                process_request=self._answer_metrics, compression=None, server_header="termrelay", logger=_ws_log,
            )  # fmt: skip
        except OSError as exc:
            raise CannotServe(
                f"cannot serve /metrics on {s.metrics_host}:{s.metrics_port} ({exc.strerror or exc}); "
                "choose another --metrics-port / RELAY_METRICS_PORT (-1: not served) or --metrics-host"
            ) from exc
        self.metrics_port = server.sockets[0].getsockname()[1]
        log.info("edge %s serves /metrics on %s:%d", s.edge_id, s.metrics_host, self.metrics_port)
        return server

    async def _answer_metrics(self, ws: ServerConnection, request: Request) -> Response:
        if request.path.partition("?")[0] == "/metrics":
            return _reply(HttpReply.text(200, self._metrics()))
        return _reply(HttpReply.text(404, "not found: this port serves /metrics only"))

    def _metrics(self) -> str:
        """A few counters in Prometheus' text format, for the operator's scraper."""
        link = self._metering
        values = {
            "relay_connections": len(self.connections),
            "relay_frames_forwarded_total": self.frames_forwarded_at_once + self.frames_forwarded_by_handler,
            "relay_frames_forwarded_at_once_total": self.frames_forwarded_at_once,
            "relay_heartbeats_answered_at_once_total": self.heartbeats_answered_at_once,
            "relay_frames_undelivered_total": self.frames_undelivered,
            "relay_quota_checks_unanswered_total": link.quota_checks_unanswered if link else 0,
            "relay_usage_batches_published_total": link.usage_batches_published if link else 0,
            "relay_usage_publish_failures_total": link.usage_publish_failures if link else 0,
            "relay_usage_unpublished_credits": self.meter.unpublished_credits(),
        }
        return "".join(f"{name} {value}\n" for name, value in values.items())

    async def _admit(self, ws: ServerConnection, request: Request, query: dict[str, str]) -> Response | None:
        """The checks before the 101 (protocol.md §2.3, §4.2): the request, the key, the room
        limit, and this edge's caps (issue 16 item 5): upgrades per address per second first
        (cheap, before any storage), then sockets per address and per user."""
        if self._stopping.is_set() or not self.ready.is_set():
            return _reply(HttpReply.text(503, "relay is not ready"))
        access = self._access
        address = access.client_address(ws.remote_address[0], request.headers)
        room_id, role = query.get("room_id", ""), query.get("role")
        try:
            access.refuse_if_upgrading_too_fast(address, time.monotonic())
            if not is_valid_room_id(room_id):
                return _reply(HttpReply.text(400, BAD_ROOM_ID))
            if role not in (None, *ROLES):
                return _reply(HttpReply.text(400, "role must be mac or ios"))
            access.refuse_if_over_socket_caps(None, address)
            principal = await access.authenticate(request.headers, query.get("user_id"), address)
            if principal.user is None:
                raise Refusal(400, "the operator token acts for a user: add ?user_id=USER")
            access.refuse_if_over_socket_caps(principal, address)
            room_settled = role == "mac" and await access.check_room_limit(principal, room_id)
            # Checked and counted in one step, after the last wait: upgrades side by side
            # cannot all take one last place. Given back when the connection is gone.
            ws.hold_until_lost(access.hold_socket(principal, address))
        except Refusal as refusal:
            return _reply(HttpReply.text(refusal.status, refusal.message, refusal.headers))
        ws.relay_target = WsTarget(room_id=room_id, role=role, principal=principal, room_settled=room_settled)  # type: ignore[attr-defined]
        # The socket's rate limit, from its first frame after the 101: its messages (the
        # session's) and its pings and pongs (the connection's) spend the same tokens.
        if self.settings.socket_rate_limit_per_s > 0:
            ws.rate = TokenBucket(self.settings.socket_rate_limit_per_s, self.settings.socket_rate_burst)
        # And its bytes, as read (issue 16 item 9); room for the largest frame's header too.
        if self.settings.socket_bytes_per_s > 0:
            ws.byte_rate = TokenBucket(self.settings.socket_bytes_per_s, self.settings.socket_bytes_burst + _CLIENT_FRAME_HEADER_MAX)
        return None

    # --- a socket's life ---------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        target: WsTarget = ws.relay_target  # type: ignore[attr-defined]
        session = Session(
            room_id=target.room_id,
            role=target.role,
            socket_id=secrets.token_urlsafe(16),
            edge_id=self.settings.edge_id,
            boot_id=self.boot_id,
            user_id=target.user_id,
            last_message_at=time.monotonic(),
            rate=ws.rate,  # shared with the connection, which spends it on control frames
        )
        subjects = {role: room_subject(target.room_id, role) for role in ROLES}
        conn = Connection(ws=ws, session=session, target=target, subjects=subjects)
        self.connections[session.socket_id] = conn
        ws.on_shed = functools.partial(self._shed, conn)
        ws.check_outgoing = functools.partial(self._check_outgoing, conn)
        try:
            if session.user_id in self._deleted_users:
                await self._carry_out(conn, session.account_deleted())
                return
            if self._metering is not None:
                # After the 101, before the first message (§6.4): a body cannot go with a 101.
                exceeded = await self._metering.check_quota(session.user_id)
                if exceeded is not None:
                    await self._carry_out(conn, session.quota_exceeded(encode(exceeded)))
                    return
            # Built once per socket, not per frame: the fast path runs for nearly every frame.
            can_answer_now = functools.partial(self._can_write_now, conn, _HEARTBEAT_ACK_MAX)
            take_message_now = functools.partial(self._take_message_now, conn, can_answer_now)
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
                await self._carry_out(conn, session.receive(frame, time.monotonic()))
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("socket %s in room %s failed", session.socket_id, session.room_id)
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL, "Internal error")
        finally:
            await self._leave(conn)

    async def _leave(self, conn: Connection) -> None:
        """The socket is gone: free its slot if it still held one, tell the peer, unsubscribe."""
        session = conn.session
        self.connections.pop(session.socket_id, None)
        self._count_session_time(conn, time.monotonic(), ending=True)
        conn.backlog.clear()  # nobody to write it to
        conn.backlog_bytes = 0
        if not (session.in_room or session.uncertain) or session.replaced or session.role is None:
            return
        last_seen = max(conn.last_message_ms, conn.ws.last_dropped_ms) or now_ms()
        try:
            await self._release_and_announce(session, last_seen)
        except (nats.errors.Error, asyncio.TimeoutError, StorageConflict) as exc:
            log.warning("room %s: could not release the %s slot (%s); retrying", session.room_id, session.role, exc)
            self._spawn(self._retry_release(session, last_seen), "release a departed socket's slot")

    async def _release_and_announce(self, session: Session, last_seen_ms: int) -> None:
        """Free the session's slot if it still holds it, and tell the room's live peer why it left."""
        role, holder, now = session.role, session.holder, now_ms()
        released, _ = await self._rooms.transact(
            session.room_id,
            lambda record, _seen: _released(rooms.release(record, holder, role, now, self._is_alive)),
        )
        if released.peer is not None:
            event = PeerLeftEvent(reason=session.leave_reason)
            await self._publish_event(session, released.peer, other_role(role), event)
        await self._presence.put_last_seen(session.room_id, role, last_seen_ms, self._seen_ttl_s)

    async def _retry_release(self, session: Session, last_seen_ms: int) -> None:
        """Keep trying to release a departed socket's slot while NATS is away, until the edge stops.

        Giving up would leave a slot naming a socket that is gone, on an edge that lives.
        """
        backoff = 1.0
        while not await self._sleep(backoff):
            try:
                await self._release_and_announce(session, last_seen_ms)
                log.info("room %s: released the %s slot of a departed socket", session.room_id, session.role)
                return
            except (nats.errors.Error, asyncio.TimeoutError, StorageConflict):
                backoff = min(backoff * 2, 5.0)

    async def _dispatch(self, msg: Msg) -> None:
        """Everything NATS brings for this edge's sockets, in the order it comes.

        Never waits for a socket: a frame is written at once when that cannot wait (the
        socket is keeping up and no news about its peer is being written), else it joins
        the socket's backlog, which the socket's own drainer writes. So a slow socket never
        holds up the others, and the order of one socket's messages is kept.
        """
        to, sender, kind = addressee_sender_and_kind(msg.subject)
        conn = self.connections.get(to)
        if kind == KIND_EVENT:
            if msg.reply:
                # Acknowledged on receipt, not after processing: the sender may be holding
                # its own socket's write lock while it waits for this.
                await msg.respond(b"" if conn is not None else _NO_SUCH_SOCKET)
            if conn is None:
                return
            try:
                event = edge_event_decoder.decode(msg.data)
            except msgspec.DecodeError:
                log.error("undecodable control event on %s", msg.subject)
                return
            self._enqueue(conn, event, sender, 0)
            return
        if conn is None:
            if msg.reply:  # the sender's edge takes back the charge and tells its client NO_PEER
                await self._nc.publish(msg.reply, _NO_SUCH_SOCKET)
            return
        if self._can_write_now(conn, len(msg.data)):
            if conn.session.accepts_frame_from(sender):
                self._write_now(conn, msg.data)
        else:
            self._enqueue(conn, msg.data, sender, len(msg.data))

    @staticmethod
    def _can_write_now(conn: Connection, size: int) -> bool:
        """Whether a text frame of `size` bytes can be written to the socket at once, in
        order: nothing of the socket's is queued or being written, it is open, not paused
        (from over the high-water mark until down to the low one), and this write keeps it
        under the high-water mark."""
        ws = conn.ws
        return (
            conn.drainer is None  # else it holds an item taken from the backlog: after it
            and not conn.write_lock.locked()
            and not ws.paused
            and ws.send_in_progress is None
            and ws.protocol.state is State.OPEN
            and ws.transport.get_write_buffer_size() + size + _FRAME_HEADER_MAX < ws.write_limit_high
        )

    @staticmethod
    def _write_now(conn: Connection, data: bytes) -> None:
        """What `ws.send` would do once `_can_write_now`, without its waits (there is nothing
        to wait for) and without its per-call context manager, the largest cost of a delivery."""
        conn.ws.protocol.send_text(data)
        conn.ws.send_data()

    def _enqueue(self, conn: Connection, item: bytes | Any, sender: str, size: int) -> None:
        """Queue `item` for the socket's drainer; a socket that cannot keep up is closed 1013."""
        if conn.closing or conn.closing_slow:
            return
        conn.backlog.append((item, sender))
        conn.backlog_bytes += size
        s = self.settings
        if (
            len(conn.backlog) > s.socket_queue_max_msgs
            # What waits for the socket in all: its backlog and its transport's write buffer.
            or conn.backlog_bytes + conn.ws.transport.get_write_buffer_size() > s.socket_queue_max_bytes
        ):
            log.warning("socket %s cannot keep up; closing it", conn.session.socket_id)
            conn.closing_slow = True  # said once; what comes for it until the close is dropped
            conn.backlog.clear()
            conn.backlog_bytes = 0
            # Frames for it are being dropped: its session is broken, and to its peer it timed out.
            conn.session.leave_reason = DisconnectReason.TIMEOUT
            self._spawn(self._close(conn, CloseCode.TRY_AGAIN_LATER, "too slow"), "close a slow socket")
            return
        if conn.drainer is None and self._tg is not None:
            try:
                conn.drainer = self._tg.create_task(self._drain(conn))
            except RuntimeError:  # the edge's TaskGroup is finishing: its sockets are closed
                conn.backlog.clear()
                conn.backlog_bytes = 0

    async def _drain(self, conn: Connection) -> None:
        """Write the socket's backlog in order: frames (after any news being written) and
        control events (decided and written under the write lock)."""
        session = conn.session
        try:
            while conn.backlog:
                item, sender = conn.backlog.popleft()
                if type(item) is bytes:
                    conn.backlog_bytes -= len(item)
                    if conn.write_lock.locked():
                        async with conn.write_lock:
                            await self._write_frame(conn, item, sender)
                    else:
                        await self._write_frame(conn, item, sender)
                else:
                    async with conn.write_lock:
                        await self._carry_out(conn, session.receive_event(item, sender))
        except Exception:
            log.exception("socket %s: writing its backlog failed", session.socket_id)
        finally:
            conn.drainer = None

    async def _write_frame(self, conn: Connection, data: bytes, sender: str) -> None:
        """Write a frame from NATS to the client if it comes from the session's current peer."""
        if conn.session.accepts_frame_from(sender):
            try:
                await conn.ws.send(data, text=True)
            except ConnectionClosed:
                pass

    def _shed(self, conn: Connection, passed: str) -> None:
        """The connection shed its socket for what it `passed` (pings or pongs past its rate
        limit, or bytes past its byte rate limit): it has answered 1008 and discards what
        follows, and what it sent before is not acted on either."""
        log.warning("socket %s in room %s: %s; closed 1008", conn.session.socket_id, conn.session.room_id, passed)
        conn.session.leave_reason = DisconnectReason.CLIENT_LEFT  # as for too many messages
        conn.closing = True
        conn.ws.drop_messages = True

    def _check_outgoing(self, conn: Connection) -> None:
        """After a read while the socket's write buffer is over its high-water mark: what
        waits to be written to it (its backlog, and the write buffer, where websockets puts
        its pongs) must stay within RELAY_SOCKET_QUEUE_MAX_BYTES. Past it the connection is
        dropped at once, not closed: a client that lets that much pile up does not read,
        and would not read a close frame either; the buffer's memory comes back now."""
        ws = conn.ws
        waiting = conn.backlog_bytes + ws.transport.get_write_buffer_size()
        if waiting <= self.settings.socket_queue_max_bytes:
            return
        log.warning(
            "socket %s in room %s: %d bytes wait to be written to it, over RELAY_SOCKET_QUEUE_MAX_BYTES; dropped",
            conn.session.socket_id, conn.session.room_id, waiting,
        )
        ws.check_outgoing = None
        conn.closing = conn.closing_slow = True
        conn.backlog.clear()
        conn.backlog_bytes = 0
        conn.session.leave_reason = DisconnectReason.TIMEOUT  # as for a slow reader
        ws.transport.abort()

    def _take_message_now(self, conn: Connection, can_answer_now: Callable[[], bool], data: bytes) -> bool:
        """A whole text message, as it arrives, while the socket's handler waits with
        nothing queued: a `relay` or `relay_batch` for a present peer is published here and
        now, a `heartbeat` answered here and now when the answer can be written at once (no
        wake-up of the handler, no task); anything else is declined, for the handler.
        """
        if len(data) > self._max_forward_bytes or self._tg is None or not self._nc.is_connected:
            return False  # the handler's way says why (1009), or waits for NATS
        try:
            text = data.decode()  # as websockets would for the handler: text frames are UTF-8
        except UnicodeDecodeError:
            return False  # the handler's `recv` fails the connection with 1007
        try:
            taken = conn.session.take_now(text, time.monotonic(), can_answer_now)
            if taken is None:
                return False
            conn.last_message_ms = now_ms()
            if type(taken) is Send:
                self._write_now(conn, taken.data)
                self.heartbeats_answered_at_once += 1
                return True
            waiting = run_eagerly(self._forward(conn, taken, at_once=True), self._spawn_publish)
        except Exception:
            # As the handler does with what it raises: this socket ends (1011), nothing else.
            # Raised out of websockets' data callback, it would abort the connection (1006)
            # and lose the rest of what arrived with it.
            log.exception("socket %s in room %s failed", conn.session.socket_id, conn.session.room_id)
            conn.ws.take_message_now = None
            self._spawn(self._close(conn, CloseCode.INTERNAL, "Internal error"), "close a failed socket")
            return True
        if waiting is not None:
            # nats-py's buffer is full: the frame is in it, in order, but the publish waits
            # for the flush. Like the handler's own wait, this socket's next message goes
            # to the handler, which waits too: what a fast sender floods stays bounded.
            conn.ws.take_message_now = None
        return True

    def _spawn_publish(self, publish: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Finish a publish that waits for nats-py's flush; shutdown bounds the wait."""
        task = self._spawn(publish, "publish a frame")
        if task is not None:
            self._waiting_publishes.add(task)
            task.add_done_callback(self._waiting_publishes.discard)
        return task

    async def _settle_waiting_publishes(self) -> None:
        """At shutdown: publishes still waiting for NATS get the close timeout, then end.
        (With NATS gone, nats-py's flush waits for the reconnect, which may never come.)"""
        if self._waiting_publishes:
            _, late = await asyncio.wait(set(self._waiting_publishes), timeout=self._close_timeout_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("%d frames not confirmed published at shutdown", len(late))

    async def _forward(self, conn: Connection, action: Forward, at_once: bool = False) -> None:
        """Publish a frame for the peer; does not wait unless nats-py's buffer is full."""
        session = conn.session
        to = action.to.socket_id
        if to != conn.forward_to:  # the subjects change only with the peer
            conn.forward_to = to
            conn.forward_subject = addressed_subject(
                conn.subjects[session.peer_role], action.to.edge_id, to, session.socket_id, KIND_FRAME
            )
            conn.forward_reply = undelivered_reply_prefix(self.settings.edge_id, session.socket_id, to) + "1"
        credits = action.payloads if self._charge_per_payload else 1
        # With a reply subject, which nobody answers while the frame is delivered: NATS answers
        # it at once (503) when nobody subscribes for the addressee, and so does its edge if
        # it has no such socket (`_undelivered`). No request, no wait, a few bytes more.
        reply = conn.forward_reply if credits == 1 else conn.forward_reply[:-1] + str(credits)
        await self._nc.publish(conn.forward_subject, action.data, reply)
        if at_once:
            self.frames_forwarded_at_once += 1
        else:
            self.frames_forwarded_by_handler += 1
        if self._metering_on:  # charged once it is on its way, and only when a peer was there (§12 item 18)
            self.meter.charge_messages(session.user_id, credits)

    async def _undelivered(self, msg: Msg) -> None:
        """A frame one of our sockets forwarded reached nobody: NATS answered its reply subject
        "no responders" (nobody subscribes for the addressee: its edge crashed, or lost NATS),
        or the addressee's edge said it has no such socket. The frame's credits are taken back,
        and the session decides, in order with what else comes for the socket, what its client
        hears (`Session.receive_event`, `Undelivered`): `NO_PEER`, and when the peer's edge is
        gone `peer_disconnected` first, without waiting for that edge's lease to expire."""
        edge_gone = msg.headers is not None and msg.headers.get("Status") == _NO_RESPONDERS
        if not edge_gone and msg.data != _NO_SUCH_SOCKET:
            return
        try:
            sender, to, credits = sender_addressee_and_credits(msg.subject)
        except ValueError:
            return
        conn = self.connections.get(sender)
        if conn is None:
            return  # gone too, its user charged for it: rare, and no one left to tell
        self.frames_undelivered += 1
        if self._metering_on:
            self.meter.refund_messages(conn.session.user_id, credits)
        self._enqueue(conn, Undelivered(to, edge_gone), to, 0)

    async def _carry_out(self, conn: Connection, actions: list[Action]) -> None:
        session = conn.session
        for action in actions:
            if type(action) is Forward:  # by far the most common: first, and lean
                if len(action.data) > self._max_forward_bytes:
                    log.warning(
                        "room %s: a %d-byte frame exceeds what NATS carries (max_payload %d); closing 1009",
                        session.room_id, len(action.data), self._nc.max_payload,
                    )
                    await self._close(conn, CloseCode.TOO_BIG, "frame too large for this relay")
                    return
                await self._forward(conn, action)
            elif isinstance(action, Send):
                with contextlib.suppress(ConnectionClosed):
                    await conn.ws.send(action.data, text=True)
            elif isinstance(action, RoomRequest):
                await self._carry_out_room_request(conn, action.message)
            elif isinstance(action, Notify):
                await self._publish_event(session, action.to, action.role, action.event)
            elif isinstance(action, Close):
                await self._close(conn, action.code, action.reason, action.farewell)

    async def _carry_out_room_request(self, conn: Connection, message: RegisterRoom | JoinRoom) -> None:
        """Run a register/join against the room's record, then what the session makes of it."""
        session = conn.session
        if not session.in_room:
            # A user locked out for guessing room credentials tries nothing (issue 16 item 7).
            # A socket in its room already has proven itself (a secret rotation goes on).
            wait = self._access.room_guesses.user_retry_after(session.user_id, time.monotonic())
            if wait > 0:
                await self._decide_in_order(conn, functools.partial(session.apply, guessing.locked_out(wait)))
                return
        claimed = False
        if isinstance(message, RegisterRoom) and not session.in_room and not conn.target.room_settled:
            # The room limit holds at the first register, not only at the upgrade: sockets
            # opened side by side all passed the upgrade's count before any of them
            # registered (and a socket without `role` was not checked there at all). The
            # room is claimed by compare-and-set on the user's claims (issue 16 item 4),
            # so registers at once, on any edges, cannot pass the limit together. A room
            # found registered at the upgrade (a reconnection) needs no second look.
            try:
                claimed = await self._access.claim_room(conn.target.principal, session.room_id)
            except Refusal as refusal:
                if refusal.status == 503:
                    await self._decide_in_order(conn, session.request_failed)
                    return
                farewell = encode(Error(code=ErrorCode.ROOM_LIMIT, message=refusal.message))
                await self._decide_in_order(conn, lambda: [Close(CloseCode.POLICY, "room limit reached", farewell)])
                return
        try:
            outcome, revision = await self._room_request_with_retries(conn, message)
        except (nats.errors.Error, asyncio.TimeoutError, StorageConflict):
            log.exception("room %s: request failed", session.room_id)
            if claimed:
                await self._give_back_claim(conn)
            await self._decide_in_order(conn, session.request_failed)
            return
        if claimed and not outcome.accepted:
            await self._give_back_claim(conn)  # a refused register holds no place
        if guessing.guessed_wrong(outcome):
            outcome = self._count_wrong_guess(conn, outcome)
        if outcome.notice:
            log.info("room %s: %s", session.room_id, outcome.notice)
        mismatch = None
        if outcome.accepted and isinstance(message, JoinRoom) and outcome.owner_user_id != session.user_id:
            # The slot is ours already: should anything below fail, it is released on leave.
            session.uncertain = True
            mismatch = await self._account_mismatch_error(outcome.owner_user_id, conn)

        def decide() -> list[Action]:
            actions = session.apply(outcome, revision)
            if mismatch is not None:
                actions.insert(len(outcome.replies), mismatch)
            return actions

        if outcome.accepted and isinstance(message, RegisterRoom):
            # Registered before the Mac hears room_registered: a GET /api/rooms it makes
            # next must list the room (and the room limit counts it the sooner).
            if conn.registered_at is None:
                conn.registered_at = now_ms()
            await self._refresh_registration(conn)
        await self._decide_in_order(conn, decide)

    def _count_wrong_guess(self, conn: Connection, outcome: rooms.Outcome) -> rooms.Outcome:
        """Count a register/join refused for a wrong secret or pairing token against its user
        and (another account's) room; log a lock-out it starts, once (ids and counts, never
        a secret). Once locked out, the socket that failed is closed too (1008): one socket
        cannot go on guessing (a failed register leaves it open otherwise)."""
        session, s, now = conn.session, self.settings, time.monotonic()
        guesses, owner = self._access.room_guesses, outcome.owner_user_id
        for started in guesses.failed(session.room_id, owner, session.user_id, now):
            what = f"user {session.user_id}" if started == guessing.USER else f"room {session.room_id} (from other accounts than its owner's)"
            log.warning(
                "%s: %d failed room authentications (wrong secret or pairing token) within %d s on this edge; "
                "further joins and registers refused (RATE_LIMITED, close 1008) until they age out",
                what, s.room_auth_failure_limit, s.room_auth_failure_window_s,
            )
        if guesses.user_retry_after(session.user_id, now) > 0 or guesses.room_retry_after(session.room_id, owner, session.user_id, now) > 0:
            return guessing.with_lock_out_close(outcome)
        return outcome

    async def _give_back_claim(self, conn: Connection) -> None:
        """Free the room-limit claim a register took and did not use (best effort: a claim
        left behind lapses with ROOM_REG_TTL)."""
        try:
            await self._access.release_room(conn.session.user_id, conn.session.room_id)
        except STORAGE_ERRORS as exc:
            log.warning("room %s: its room-limit claim not given back (%s); it lapses by itself", conn.session.room_id, exc)

    async def _account_mismatch_error(self, owner_user_id: str | None, conn: Connection) -> Send:
        """`error ACCOUNT_MISMATCH` for an iPhone of another account than the Mac's (§12 item 15)."""
        ios_user = conn.target.principal.user
        mac_email, ios_email = None, ios_user.email if ios_user is not None else None
        try:
            owner = await self._access.store.get_user(owner_user_id) if owner_user_id else None
            mac_email = owner.email if owner is not None else None
        except Exception as exc:  # the flag matters more than the addresses in it
            log.warning("room owner %s: e-mail not read (%s)", owner_user_id, type(exc).__name__)
        return Send(
            encode(
                Error(
                    code=ErrorCode.ACCOUNT_MISMATCH,
                    message="This iPhone and the Mac are signed in to different accounts",
                    mac_email=mac_email,
                    ios_email=ios_email,
                )
            )
        )

    @staticmethod
    def _holds_registered_room(conn: Connection) -> bool:
        session = conn.session
        return session.role == "mac" and session.in_room and not session.replaced and not conn.closing

    async def _refresh_registration(self, conn: Connection) -> None:
        """Keep a registered Mac's room registration alive (ROOM_REG_TTL); a failure is retried by the loop."""
        try:
            await self._access.register_room(conn.session.user_id, conn.session.room_id, conn.registered_at)
        except STORAGE_ERRORS as exc:
            log.warning("room %s: registration not written (%s); the refresh loop retries", conn.session.room_id, exc)

    async def _decide_in_order(self, conn: Connection, decide: Callable[[], list[Action]]) -> None:
        """Let the session decide (`decide()`) and carry out its decision, both under the socket's
        write lock: a delivered frame checks the session's peer without the lock when nobody
        holds it, so the peer may change only while what it changed is being written."""
        async with conn.write_lock:
            await self._carry_out(conn, decide())

    async def _close(self, conn: Connection, code: int, reason: str, farewell: bytes | None = None) -> None:
        """Close a socket within the close timeout, whatever the client does."""
        if conn.closing:
            return
        conn.closing = True
        # What the client sends from now on is not acted on: drop it as it comes, and read on
        # if a full queue had stopped reading (the handler may be the one waiting here).
        conn.ws.drop_messages = True
        conn.ws.transport.resume_reading()
        try:
            if farewell is not None:
                await asyncio.wait_for(conn.ws.send(farewell, text=True), self._close_timeout_s)
            await asyncio.wait_for(conn.ws.close(code, reason), self._close_timeout_s)
        except asyncio.TimeoutError:
            # A client that reads nothing cannot take a close frame either (websockets
            # waits for the write buffer to drain before it starts its own timer).
            conn.ws.transport.abort()
        except Exception:
            log.debug("closing socket %s failed", conn.session.socket_id, exc_info=True)

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None] | None:
        """Run `work` in the edge's TaskGroup; a failure is logged, never fatal to the edge."""

        async def supervised() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", what)

        if self._tg is None:
            work.close()  # shutting down: nothing runs any more
            return None
        return self._tg.create_task(supervised())

    async def _close_all(self, code: int, reason: str, leave_reason: str, unless_boot: str | None = None) -> None:
        """Close every socket (but those of incarnation `unless_boot`) at once; peers hear `leave_reason`."""
        conns = [c for c in self.connections.values() if c.session.boot_id != unless_boot]
        for conn in conns:
            conn.session.leave_reason = leave_reason
        async with asyncio.TaskGroup() as tg:
            for conn in conns:
                tg.create_task(self._close(conn, code, reason))

    @property
    def _close_timeout_s(self) -> float:
        return max(self.settings.close_timeout_ms / 1000, 0.05)

    async def _publish_event(self, session: Session, to: SlotHolder, role: str, event: Any) -> None:
        """Send a control event to the socket `to`, until its edge has it.

        Core NATS delivers at most once, and a lost `peer_left` or `peer_joined` would leave
        a client believing in a peer that is gone (or never hearing of one that came). So
        control events are requests that the addressee's edge acknowledges on receipt; a
        repeat is harmless (sessions ignore news they already have). Frames are not: a
        lost frame is handled by restarting the session (see `_nats_reconnected`).
        """
        data = msgspec.json.encode(event)
        subject = addressed_subject(
            room_subject(session.room_id, role), to.edge_id, to.socket_id, session.socket_id, KIND_EVENT
        )
        for _ in range(_EVENT_ATTEMPTS):
            try:
                reply = await self._nc.request(subject, data, timeout=_EVENT_ACK_TIMEOUT_S)
            except nats.errors.NoRespondersError:
                reply = None  # that edge is gone
            except nats.errors.TimeoutError:
                continue
            if reply is None or reply.data == _NO_SUCH_SOCKET:
                # Nobody holds that socket any more: there is no one to tell.
                log.info("room %s: no %s socket to take a %s event", session.room_id, role, type(event).__name__)
            return
        log.warning("room %s: a %s event to a %s socket went unacknowledged", session.room_id, type(event).__name__, role)

    async def _room_request_with_retries(
        self, conn: Connection, message: RegisterRoom | JoinRoom
    ) -> tuple[rooms.Outcome, int]:
        """A room request, retried through brief storage trouble (a leader election) for up to
        `storage_retry_budget_ms`, inside the Mac's 10 s register timer. Failing costs more
        than waiting: the client reconnects, and a rotation that never landed would turn
        into an AUTH_FAILED on its next register."""
        deadline = asyncio.get_running_loop().time() + self.settings.storage_retry_budget_ms / 1000
        delay, session = 0.1, conn.session
        while True:
            try:
                return await self._room_request(conn, message)
            except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                if asyncio.get_running_loop().time() + delay >= deadline:
                    raise
                log.warning("room %s: storage did not answer (%s); retrying", session.room_id, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _room_request(self, conn: Connection, message: RegisterRoom | JoinRoom) -> tuple[rooms.Outcome, int]:
        session, settings = conn.session, self.settings
        holder, now, max_sessions = session.holder, now_ms(), conn.target.principal.tier.max_sessions
        registered_before = session.in_room
        guesses, now_s = self._access.room_guesses, time.monotonic()

        def decide(stored: RoomRecord | None, seen: tuple[int | None, ...]) -> tuple[RoomRecord | None, rooms.Outcome]:
            record = stored
            if stored is not None:
                record = rooms.expire_idle(stored, now, settings.room_idle_timeout_ms, self._is_alive, seen)
                # Another account's guesses on this room are locked out (issue 16 item 7).
                wait = 0.0 if registered_before else guesses.room_retry_after(record.room_id, record.owner_user_id, session.user_id, now_s)
                if wait > 0:
                    return (None if record is stored else record), guessing.locked_out(wait)
            if isinstance(message, RegisterRoom):
                outcome = rooms.register(record, message, holder, now, self._is_alive, max_sessions, registered_before)
            else:
                outcome = rooms.join(record, message, holder, now, self._is_alive, settings.refuse_cross_account)
            if record is not None and guessing.guessed_wrong(outcome):
                outcome = dataclasses.replace(outcome, owner_user_id=record.owner_user_id)  # whom it was guessed on
            if outcome.record is None and record is not stored:
                return record, outcome  # a refused request still stores the idle cleanup it saw
            return outcome.record, outcome

        return await self._rooms.transact(session.room_id, decide, self._seen_when_idle(now))

    def _seen_when_idle(self, now: int) -> Callable[[RoomRecord], Awaitable[tuple[int | None, ...]]]:
        async def seen(record: RoomRecord) -> tuple[int | None, ...]:
            # lastSeen only matters to a room that looks idle by its record alone.
            if rooms.expire_idle(record, now, self.settings.room_idle_timeout_ms, self._is_alive) is record:
                return ()
            return await self._presence.get_room_last_seen(record.room_id)

        return seen

    def _is_alive(self, holder: SlotHolder) -> bool:
        if holder.edge_id == self.settings.edge_id and holder.boot_id == self.boot_id:
            return holder.socket_id in self.connections  # ours: we know for sure
        return self.live_edges.get(holder.edge_id) == holder.boot_id

    # --- background work ---------------------------------------------------------

    @property
    def _seen_ttl_s(self) -> float:
        return max(1.0, self.settings.room_idle_timeout_ms / 1000)

    async def _take_lease(self) -> None:
        """Take this edge id's lease for this incarnation: at start, and when starting over.

        Two processes must never serve one edge id: they would take the lease from each other
        in turn, each time closing all their sockets. So a lease another incarnation holds
        is taken only once that one is known to be gone. Each incarnation answers on its own
        subject (`edge_incarnation_subject`), subscribed before its lease names it; asked there:
        - it answers that it runs: CannotServe, and this process ends (at start, it refuses
          to start; later, it lost its id to a newer process while it could not renew);
        - NATS answers "no responders": its process is gone (crashed, or cut off from NATS,
          unable to renew; should it come back, it finds the id taken and stops). Taken at
          once, so an edge restarted after a crash does not wait for its old lease (logged);
        - it answers that it is stopping, or not at all (stalled, or a host gone whose TCP
          connection NATS has not dropped yet): waited for, until its lease is gone (taken)
          or, from a silent one, renewed (it runs after all: CannotServe). Logged.
        Every write is a compare-and-set on what was read: of two processes starting at
        once, one takes the lease and the other finds it held.
        """
        edge_id, ttl_s = self.settings.edge_id, self.settings.edge_lease_ttl_ms / 1000
        await self._answer_as_incarnation(self.boot_id)
        waited_for: tuple[str, int] | None = None  # (boot id, revision) of the holder waited for
        while True:
            holder, revision = await self._presence.read_lease(edge_id)
            if holder is not None and holder.boot_id not in self._incarnations:
                answer = await self._ask_incarnation(holder.boot_id)
                renewed = waited_for is not None and waited_for[0] == holder.boot_id and waited_for[1] != revision
                if answer == _RUNNING or (answer is None and renewed):
                    raise await self._id_in_use(holder.boot_id)
                if answer != b"":  # stopping, or silent: wait for its lease to go
                    if waited_for is None or waited_for[0] != holder.boot_id:
                        log.warning(
                            "edge %s: its incarnation %s holds the lease and %s; waiting for the lease "
                            "to go (up to %.0fs)", edge_id, holder.boot_id,
                            "is stopping" if answer == _STOPPING else "does not answer", ttl_s,
                        )  # fmt: skip
                    if answer != _STOPPING:
                        waited_for = (holder.boot_id, revision)
                    await asyncio.sleep(min(1.0, ttl_s / 5))
                    continue
                log.warning(
                    "edge %s: its incarnation %s holds the lease but is gone from NATS (crashed?); "
                    "taking the lease over", edge_id, holder.boot_id,
                )  # fmt: skip
            lease = EdgeLease(edge_id=edge_id, boot_id=self.boot_id, started_at=now_ms())
            try:  # a compare-and-set on what was read (revision 0: nothing there)
                self._lease_revision = await self._presence.renew_lease(lease, ttl_s, revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # taken, renewed or gone meanwhile: look again
            break
        self.live_edges[edge_id] = self.boot_id
        for boot_id in [b for b in self._incarnations if b != self.boot_id]:
            with contextlib.suppress(nats.errors.Error):
                await self._incarnations.pop(boot_id).unsubscribe()

    async def _answer_as_incarnation(self, boot_id: str) -> None:
        """Answer on incarnation `boot_id`'s subject from now on; the server has it on return."""
        if boot_id in self._incarnations:
            return

        async def answer(msg: Msg) -> None:
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(_STOPPING if self._stopping.is_set() else _RUNNING)

        self._incarnations[boot_id] = await self._nc.subscribe(
            edge_incarnation_subject(self.settings.edge_id, boot_id), cb=answer
        )
        await self._nc.flush()

    async def _ask_incarnation(self, boot_id: str) -> bytes | None:
        """What incarnation `boot_id` of our edge id answers: `_RUNNING`, `_STOPPING`; None
        if it does not answer in time; b"" if nobody subscribes for it (it is gone)."""
        try:
            subject = edge_incarnation_subject(self.settings.edge_id, boot_id)
        except ValueError:
            return b""  # not a boot id any edge makes: no process answers to it
        try:
            return (await self._nc.request(subject, b"", timeout=_INCARNATION_PROBE_TIMEOUT_S)).data
        except nats.errors.NoRespondersError:
            return b""
        except nats.errors.TimeoutError:
            return None

    async def _id_in_use(self, holder: str) -> CannotServe:
        """Why this process cannot serve its edge id; a serving edge first closes its sockets
        (1001: they reconnect elsewhere; their peers were told `timeout` when the lease changed)."""
        edge_id = self.settings.edge_id
        if not self._accepted:
            line = (
                f"edge id {edge_id} is in use by a running edge (its incarnation {holder} holds the lease "
                f"and answers); give this edge its own --edge-id / RELAY_EDGE_ID, or stop the other first"
            )
        else:  # logged: this ends a serving edge
            line = (
                f"edge id {edge_id} was taken by another running edge (incarnation {holder}) while this one "
                f"could not renew its lease; this process stops (give each edge its own --edge-id / RELAY_EDGE_ID)"
            )
            log.error("%s", line)
            await self._close_all(CloseCode.GOING_AWAY, "relay edge stopping", DisconnectReason.TIMEOUT)
        return CannotServe(line)

    async def _renew_lease_loop(self) -> None:
        """Renew our lease every third of its TTL, until the shutdown drops it.

        Busy or slow moments must not cost the lease of a live edge, and with it every
        socket here: a renewal that fails (NATS slow or away, or this event loop too busy to
        read the answer in time) is retried within a second, not a third of the TTL later;
        and a renewal refused for a wrong revision is read back before the lease is taken
        for lost: if the key still holds this incarnation's lease, one of our own renewals
        landed unseen (its answer timed out), the lease never lapsed, and no other edge was
        told anything. Only a lease that is really gone (expired, or taken) starts the edge
        over.
        """
        interval = self.settings.edge_lease_renew_interval_s
        retry = min(1.0, interval / 5)
        lease_ttl = self.settings.edge_lease_ttl_ms / 1000
        lost = False
        delay = interval
        loop = asyncio.get_running_loop()
        # Renewed through the shutdown too, until it drops the lease: releasing the slots
        # may outlast the lease, and then other edges would tell our peers `timeout`.
        while True:
            due = loop.time() + delay
            if await self._sleep(delay, until=self._lease_dropping):
                return
            late = loop.time() - due
            if late > interval / 2:
                log.warning("lease renewal ran %.1fs late: the event loop was busy", late)
            delay = interval
            try:
                if not lost:
                    lease = EdgeLease(edge_id=self.settings.edge_id, boot_id=self.boot_id, started_at=now_ms())
                    try:
                        self._lease_revision = await self._presence.renew_lease(lease, lease_ttl, self._lease_revision)
                        continue
                    except nats.js.errors.KeyWrongLastSequenceError:
                        if await self._lease_still_ours():
                            log.warning("edge %s: a lease renewal landed unseen; renewing again", self.settings.edge_id)
                            delay = 0.0
                            continue
                        # Our lease expired (a stall or a partition): other edges have told
                        # our sockets' peers that we are gone. Start over as a new incarnation,
                        # accepting no socket until then (it would belong to the dead one).
                        if self._stopping.is_set():
                            return  # its sockets are being closed anyway
                        log.error("edge %s lost its lease; closing its sockets and starting over", self.settings.edge_id)
                        lost = True
                        self.ready.clear()
                await self._reincarnate()
                lost = False
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("lease renewal failed (%s); retrying in %.2fs", type(exc).__name__, retry)
                delay = retry

    async def _lease_still_ours(self) -> bool:
        """Whether our lease key still holds this incarnation's lease (then its revision is
        adopted). A lease that expired is never ours again: a new one has a new boot id."""
        entry = await get_present(self._presence_kv, edge_lease_key(self.settings.edge_id))
        lease = Presence.decode_lease(entry) if entry is not None else None
        if lease is None or lease.boot_id != self.boot_id:
            return False
        self._lease_revision = entry.revision
        return True

    async def _reincarnate(self) -> None:
        """Take a lease under a new boot id, then close the sockets of every older one."""
        self.boot_id = secrets.token_hex(8)
        await self._take_lease()  # may find the id taken by a newer process: then this one ends
        if not self._stopping.is_set():
            self.ready.set()
        # 1001 makes clients reconnect at once; their peers already heard `timeout`.
        await self._close_all(
            CloseCode.GOING_AWAY, "relay edge restarting", DisconnectReason.TIMEOUT, unless_boot=self.boot_id
        )

    async def _watch_leases(self, watching: asyncio.Event) -> None:
        """Keep `live_edges` current and tell our sockets when their peer's edge dies.

        Each (re)start of the watcher rebuilds the whole view from the current leases, so
        an edge that died while we were not watching (its expiry marker long gone) is
        noticed too. The watcher is restarted after every NATS reconnect.
        """

        async def watch_once() -> None:
            self._lease_watcher = watcher = await self._presence.watch_leases()
            fresh: dict[str, str] | None = {}  # the initial view, until it is complete
            async for entry in watcher:
                if entry is None:  # the initial values are all in
                    self._set_live_edges(fresh or {})
                    fresh = None
                    watching.set()
                    continue
                edge_id, lease = edge_id_of_lease_key(entry.key), Presence.decode_lease(entry)
                view = dict(self.live_edges) if fresh is None else fresh
                if lease is None:
                    view.pop(edge_id, None)
                else:
                    view[edge_id] = lease.boot_id
                if fresh is None:
                    self._set_live_edges(view)

        await self._keep_running("lease watcher", watch_once)

    async def _keep_running(self, what: str, run_once: Callable[[], Awaitable[None]]) -> None:
        """Run `run_once` again each time it returns, until the edge stops; after a failure,
        wait first (0.1 s, doubling up to 5 s while failures follow each other: a failure
        after a run of `_FAILURES_APART_S` or more starts again at 0.1 s)."""
        backoff = 0.1
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                await run_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:
                if time.monotonic() - began >= _FAILURES_APART_S:
                    backoff = 0.1
                log.warning("%s failed; recreating it in %.1fs", what, backoff, exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _set_live_edges(self, view: dict[str, str]) -> None:
        """Adopt `view` (edge_id → boot_id of live leases); the incarnations it lost are dead."""
        own = self.settings.edge_id
        view = {**view, own: self.live_edges.get(own, self.boot_id)}  # our own lease is the renewal loop's business
        for edge_id, boot_id in edges_gone(self.live_edges, view):
            log.warning("edge %s (%s) is gone; telling the peers of its sockets", edge_id, boot_id)
            for conn in list(self.connections.values()):
                if conn.session.depends_on_edge(edge_id, boot_id):
                    self._spawn(
                        self._decide_in_order(conn, functools.partial(conn.session.edge_died, edge_id, boot_id)),
                        "tell a socket its peer's edge died",
                    )
        self.live_edges = view

    async def _liveness_loop(self) -> None:
        threshold = self.settings.heartbeat_dead_threshold_ms / 1000
        while not await self._sleep(self.settings.liveness_sweep_interval_s):
            now = time.monotonic()
            for n, conn in enumerate(list(self.connections.values())):
                try:
                    if not conn.closing and not conn.timed_out and conn.session.is_silent(now, threshold):
                        conn.timed_out = True  # one time-out per socket, however long its close takes
                        self._spawn(self._carry_out(conn, conn.session.time_out()), "time out a silent socket")
                except Exception:  # one socket's trouble must not keep the sweep from the rest
                    log.exception("liveness check of socket %s failed", conn.session.socket_id)
                if n % (_SLICE * 8) == _SLICE * 8 - 1:  # a check is cheap: larger slices
                    await asyncio.sleep(0)

    async def _last_seen_loop(self) -> None:
        """Write lastSeen of sockets that spoke since their last write: at most one write
        per socket per interval, spread over half of it (after a pause of the other half).

        Spread, not in one go: 2000 sockets' writes at once are 2000 JetStream stores on
        the NATS server that also routes every frame, felt as a blip in frame latency.
        """
        interval_s = self.settings.last_seen_interval_ms / 1000
        while not await self._sleep(interval_s / 2):
            if not self._nc.is_connected:
                continue  # nats-py would buffer these ahead of what matters at the reconnect
            try:
                if await self._spread(list(self.connections), interval_s / 2, self._write_last_seen, self._last_seen_due):
                    return
            except STORAGE_ERRORS as exc:
                log.warning("lastSeen flush stopped (%s); the next one retries", type(exc).__name__)

    @staticmethod
    def _last_seen_due(conn: Connection) -> bool:
        return conn.session.in_room and conn.last_message_ms > conn.last_seen_written_ms

    async def _write_last_seen(self, conn: Connection) -> None:
        await self._presence.put_last_seen_unacknowledged(
            conn.session.room_id, conn.session.role, conn.last_message_ms, self._seen_ttl_s
        )
        conn.last_seen_written_ms = conn.last_message_ms

    async def _spread(
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
        deleted must not register it again). And no pass walks every socket in one go: with
        2000 sockets, passes that began with such a walk began with 20-30 ms in which no
        frame moved (README, Performance). Ids, not sockets: a pass lasts up to minutes,
        and must not keep the sockets that left meanwhile in memory.
        """
        size, gap_s = spread_plan(len(socket_ids), over_s)
        for start in range(0, len(socket_ids), size):
            here = [
                conn
                for socket_id in socket_ids[start : start + size]
                if (conn := self.connections.get(socket_id)) is not None and not conn.closing and self._is_due(due, conn)
            ]
            results = await asyncio.gather(*(work(conn) for conn in here), return_exceptions=True)
            for conn, result in zip(here, results, strict=True):
                if result is None:
                    continue
                if isinstance(result, STORAGE_ERRORS) or not isinstance(result, Exception):
                    raise result  # storage trouble: the caller's to wait out; or a cancellation
                # One socket's trouble (a bug) must not keep the pass from the others.
                log.error("socket %s: %s", conn.session.socket_id, result, exc_info=result)
            if start + size < len(socket_ids) and await self._sleep(gap_s):
                return True
        return False

    @staticmethod
    def _is_due(due: Callable[[Connection], bool], conn: Connection) -> bool:
        try:
            return due(conn)
        except Exception:
            log.exception("socket %s: cannot tell whether it is due", conn.session.socket_id)
            return False

    async def _registration_loop(self) -> None:
        """Refresh the room registrations of our registered Mac sockets well inside
        ROOM_REG_TTL, spread over half the refresh interval (like lastSeen, not in a burst)."""
        interval_s = self.settings.room_reg_refresh_interval_s
        while not await self._sleep(interval_s / 2):
            if await self._registration_pass(list(self.connections), interval_s / 2):
                return

    async def _registration_pass(self, socket_ids: list[str], over_s: float) -> bool:
        return await self._spread(socket_ids, over_s, self._refresh_registration, self._holds_registered_room)

    # --- lastSeen of connected sockets ---------------------------------------------------

    async def _answer_last_seen(self, msg: Msg) -> None:
        """Another edge asks when our sockets last sent something (for /status, /api/rooms)."""
        try:
            query = last_seen_query_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        seen = {}
        for socket_id in query.socket_ids:
            conn = self.connections.get(socket_id)
            if conn is not None and conn.last_message_ms:
                seen[socket_id] = conn.last_message_ms
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(msgspec.json.encode(LastSeenAnswer(last_seen=seen)))

    async def _live_last_seen(self, record: RoomRecord) -> tuple[int | None, int | None]:
        """lastSeen of the room's connected sockets, from the edges that hold them: KV has it
        only every RELAY_LAST_SEEN_INTERVAL_MS (writing it more often for every socket costs
        the latency of every frame). None for a socket not connected or an edge that does not
        answer in time (the caller then has KV's)."""
        holders = [h if h is not None and self._is_alive(h) else None for h in (record.mac, record.ios)]
        by_edge: dict[str, list[str]] = {}
        for holder in holders:
            if holder is not None and holder.edge_id != self.settings.edge_id:
                by_edge.setdefault(holder.edge_id, []).append(holder.socket_id)

        async def ask(edge_id: str, socket_ids: list[str]) -> dict[str, int]:
            try:
                reply = await self._nc.request(
                    edge_last_seen_subject(edge_id),
                    msgspec.json.encode(LastSeenQuery(socket_ids=socket_ids)),
                    timeout=_LAST_SEEN_QUERY_TIMEOUT_S,
                )
                return last_seen_answer_decoder.decode(reply.data).last_seen
            except (nats.errors.Error, TimeoutError, msgspec.DecodeError):
                return {}

        answers: dict[str, int] = {}
        for found in await asyncio.gather(*(ask(e, ids) for e, ids in by_edge.items())):
            answers.update(found)
        for holder in holders:
            if holder is not None and holder.edge_id == self.settings.edge_id:
                conn = self.connections.get(holder.socket_id)
                if conn is not None and conn.last_message_ms:
                    answers[holder.socket_id] = conn.last_message_ms
        mac, ios = (answers.get(h.socket_id) if h is not None else None for h in holders)
        return mac, ios

    # --- metering --------------------------------------------------------------------

    def _count_session_time(self, conn: Connection, now: float, ending: bool = False) -> None:
        """Session time (§12 item 19) of a Mac socket, charged to the room's owner.

        Sampled: at each flush, and when the socket goes. A session that starts or ends
        between two samples counts from the next sample or up to the previous one (less
        than one flush interval each time).
        """
        if not self._metering_on:
            return
        session = conn.session
        if conn.in_session_since is not None:
            self.meter.add_session_time(session.owner_user_id or session.user_id, (now - conn.in_session_since) * 1000)
        conn.in_session_since = now if session.in_session and not ending else None

    async def _tick_meter(self) -> None:
        """Session time up to now, then close the meter's interval (frames go on meanwhile)."""
        for n, conn in enumerate(list(self.connections.values())):
            if conn.in_session_since is not None or conn.session.in_session:
                self._count_session_time(conn, time.monotonic())
            if n % (_SLICE * 4) == _SLICE * 4 - 1:
                await asyncio.sleep(0)
        self.meter.tick(now_ms())

    async def _usage_loop(self) -> None:
        """Every flush interval (and at each window boundary), hand the usage to the stream."""
        interval_ms = self.settings.usage_flush_interval_ms
        while True:
            now = now_ms()
            to_boundary = WINDOW_MS - now % WINDOW_MS
            await asyncio.sleep(min(interval_ms, to_boundary) / 1000)
            await self._tick_meter()
            while (batch := self.meter.next_batch(now_ms())) is not None:
                await self._metering.publish_until_acked(batch, self._tick_meter)
                self.meter.acknowledged(batch)

    async def _flush_usage_at_exit(self) -> None:
        """At shutdown, after every socket left: the last usage to the stream, within a bound."""
        if self._usage_task is None:
            return
        self._usage_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._usage_task
        await self._tick_meter()
        try:
            async with asyncio.timeout(_SHUTDOWN_USAGE_S):
                while (batch := self.meter.next_batch(now_ms())) is not None:
                    await self._metering.publish_until_acked(batch, self._tick_meter)
                    self.meter.acknowledged(batch)
        except TimeoutError:
            log.error("usage not handed to metering at shutdown: %d credits lost", self.meter.unpublished_credits())

    async def _over_limit(self, msg: Msg) -> None:
        """Metering says a user is past the quota (§12 item 20): close that user's sockets here."""
        try:
            notice = over_limit_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable over-limit notice")
            return
        farewell = encode(notice.exceeded)
        for conn in list(self.connections.values()):
            if conn.session.user_id == notice.user_id and not conn.closing:
                self._spawn(
                    self._decide_in_order(conn, functools.partial(conn.session.quota_exceeded, farewell)),
                    "close a socket past its quota",
                )

    async def _watch_accounts(self, watching: asyncio.Event) -> None:
        """Close the sockets of accounts deleted while they are connected (§12 item 16).

        Follows changes of account records from now on (the stream's new messages only):
        an upgrade checks the deleted flag itself. Recreated after every NATS reconnect,
        since an ordered consumer would otherwise notice its gap only after missed
        heartbeats (and every socket was closed at the reconnect anyway).
        """

        async def watch_once() -> None:
            self._account_watch_wake.clear()
            js = self._nc.jetstream(timeout=_JETSTREAM_TIMEOUT_S)
            subscription = await js.subscribe(
                f"$KV.{ACCOUNTS_BUCKET}.{USER_FILTER}",
                cb=self._account_changed,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )
            watching.set()
            waits = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self._account_watch_wake.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

        await self._keep_running("account watcher", watch_once)

    async def _account_changed(self, msg: Msg) -> None:
        if not msg.data:
            return
        try:
            user = user_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable account record on %s", msg.subject)
            return
        if not user.deleted:
            return
        self._deleted_users[user.user_id] = None
        while len(self._deleted_users) > _DELETED_USERS_KEPT:
            self._deleted_users.popitem(last=False)
        for conn in list(self.connections.values()):
            if conn.session.user_id == user.user_id and not conn.closing:
                conn.session.leave_reason = DisconnectReason.CLIENT_LEFT
                self._spawn(self._decide_in_order(conn, conn.session.account_deleted), "close a deleted account's socket")

    async def _sleep(self, seconds: float, until: asyncio.Event | None = None) -> bool:
        """Sleep, or return True at once when the edge is stopping (or `until` is set)."""
        try:
            await asyncio.wait_for((until or self._stopping).wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    # --- NATS callbacks ----------------------------------------------------------

    async def _nats_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # Only an edge that has run out of CPU for a long while: messages were dropped.
            log.error("NATS dropped messages for this edge's sockets: the edge cannot keep up (%s)", exc.subject)
            return
        log.error("NATS error (%s): %s", redact_urls(self.settings.nats_url), exc or type(exc).__name__)

    async def _nats_disconnected(self) -> None:
        if not self._stopping.is_set():
            log.warning("disconnected from NATS; reconnecting")

    async def _nats_reconnected(self) -> None:
        self._learn_max_payload()
        # Core NATS delivers at most once: frames to or from our sockets may have been
        # lost while we were away, and an encrypted session with a gap is broken. Close
        # every socket with 1001 so both sides reconnect at once and start a fresh session.
        log.warning("reconnected to NATS; closing %d sockets so their sessions restart", len(self.connections))
        if self.connections:
            self._spawn(
                self._close_all(CloseCode.GOING_AWAY, "relay reconnected to NATS", DisconnectReason.SERVER_RESTART),
                "restart sessions after a NATS reconnect",
            )
        if self._lease_watcher is not None:
            # Leases may have come and gone unseen: rebuild the view from scratch.
            self._spawn(self._lease_watcher.stop(), "restart the lease watcher")
        self._account_watch_wake.set()


async def _never_upgraded(ws: ServerConnection) -> None:
    """The metrics port's connection handler: never called (every request is answered before)."""


def edges_gone(before: dict[str, str], after: dict[str, str]) -> list[tuple[str, str]]:
    """Edge incarnations (edge_id, boot_id) alive in `before` and not in `after`."""
    return [(edge_id, boot_id) for edge_id, boot_id in before.items() if after.get(edge_id) != boot_id]


def _released(release: rooms.Release) -> tuple[RoomRecord | None, rooms.Release]:
    return release.record, release


def _reply(reply: HttpReply) -> Response:
    """The handshake's HTTP response for `reply`; the connection closes after it."""
    headers = Headers(
        [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Connection", "close"),
            *reply.headers.items(),
        ]
    )
    return Response(reply.status, http.HTTPStatus(reply.status).phrase, headers, reply.body)
