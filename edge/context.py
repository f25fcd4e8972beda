"""What every part of one edge process shares: its identity, NATS, stores, sockets, task group.

One `EdgeContext` per process, made by `edge.server.Edge`; the parts (`edge.carrier`,
`edge.delivery`, `edge.leases`, …) each hold it and nothing of each other's but what they
are handed at wiring.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS

from edge import internals
from edge.access import Access, Principal
from edge.admission import Gate, Gates
from edge.api import HttpApi
from edge.front import HttpConnection
from edge.metering_link import MeteringLink
from edge.metrics import EdgeMetrics
from edge.protocol.meter import UsageMeter
from edge.protocol.parts import FrameParts
from edge.protocol.session import Session
from edge.settings import EdgeSettings
from edge.store import Presence, RoomStore
from runtime.clock import now_ms
from schemas.records import SlotHolder
from schemas.tiers import Tier

log = logging.getLogger("edge")

#: Edge incarnations remembered as gone: a few per edge restart; far more than a fleet
#: goes through between two restarts of one edge.
GONE_INCARNATIONS_KEPT = 4096


@dataclass(frozen=True)
class WsTarget:
    """What the upgrade request asked for, validated and authenticated before the 101."""

    room_id: str
    role: str | None
    principal: Principal
    # The room limit needs no look at the first register: the room was registered already
    # (a reconnection) or the tier has no limit.
    room_settled: bool = False
    address: str = ""  # the client's, as the per-address limits saw it (for the log)

    @property
    def user_id(self) -> str:
        return self.principal.user_id


class Ending(enum.Enum):
    """How near a socket is to its end on the edge's side (its place in the protocol is
    `Session.state`): each step only ever goes forward."""

    OPEN = "open"
    TIMING_OUT = "timing_out"  # silent past the threshold: its time-out is decided, once
    TOO_SLOW = "too_slow"  # its backlog passed its bounds: frames for it are dropped until the close
    CLOSING = "closing"  # its close has begun (or it was dropped): nothing more is done for it


@dataclass(eq=False, slots=True)
class Connection:
    """A live client socket on this edge: the socket, its protocol state, what waits to be written to it."""

    ws: HttpConnection
    session: Session
    target: WsTarget
    # role → the room subject of that role, built once (the room id was validated at the
    # upgrade; re-validating it per forwarded frame would be work on the hot path).
    subjects: dict[str, str] = field(default_factory=dict)
    last_message_ms: int = 0  # wall clock of the last inbound frame, for lastSeen
    received_at: float = 0.0  # monotonic s of the message being handled (the frame-path timings)
    opened_at: float = field(default_factory=time.monotonic)  # for the closed line's duration
    frames_in: int = 0  # frames from the client forwarded to its peer
    frames_out: int = 0  # frames from its peer written to it
    last_seen_written_ms: int = 0
    ending: Ending = Ending.OPEN
    registered_at: int | None = None  # epoch ms of this Mac socket's first room registration
    in_session_since: float | None = None  # monotonic s: session time counted up to here (Mac sockets)
    forward_to: str = ""  # the peer socket that `forward_subject` addresses
    forward_subject: str = ""
    # Its frames' reply subjects but for credits and sequence number (`undelivered_reply_prefix`).
    forward_reply: str = ""
    sent: int = 0  # sequence number of its last message on the frame path (`frame_reply`)
    # Held while writing what the session decided about its peer, and while writing a
    # frame from NATS, so that the client never sees a peer's frame before its peer_joined.
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What arrived from NATS for this socket and could not be written at once (the socket
    # is slow, or news about the peer is being written), in arrival order: a frame's bytes
    # or a control event, each with its sender, when a timed frame arrived (0.0: not
    # timed) and a frame's reply subject. Written by `drainer`; bounded.
    backlog: deque[tuple[bytes | Any, str, float, str]] = field(default_factory=deque)
    backlog_bytes: int = 0
    drainer: asyncio.Task[None] | None = None
    # The frame being received in parts for this socket (`edge.protocol.parts`), made at its
    # first part: most sockets never see a frame over NATS's max_payload.
    parts: FrameParts | None = None

    @property
    def closing(self) -> bool:
        return self.ending is Ending.CLOSING

    @property
    def takes_frames(self) -> bool:
        """Whether frames from NATS are still queued for it."""
        return self.ending is Ending.OPEN or self.ending is Ending.TIMING_OUT

    def clear_backlog(self) -> None:
        self.backlog.clear()
        self.backlog_bytes = 0


@dataclass
class FrameCounters:
    """What /metrics counts of the edge's work: the frame path, moves, its lease."""

    forwarded_at_once: int = 0  # taken as they arrived (`edge.fastpath`)
    heartbeats_answered_at_once: int = 0
    forwarded_by_handler: int = 0
    bytes_forwarded: int = 0
    undelivered: int = 0  # NATS or the addressee's edge said nobody got them; not charged
    forwarded_in_parts: int = 0  # over NATS's max_payload: cut into parts (of those forwarded by handler)
    received_in_parts: int = 0  # put together from parts, for this edge's sockets
    parts_dropped: int = 0  # frames missing a part (lost, or their edge died): never delivered
    not_from_peer: int = 0  # frames for a socket from one that is not its peer: answered as for a socket gone
    nats_moves: int = 0  # moves off a NATS node in lame-duck mode without closing a socket
    leases_lost: int = 0  # this edge's lease expired under it: it started over (issue 18: never under load)
    lease_renewals_failed: int = 0  # renewals storage did not answer in time (retried within a second)


class EdgeContext:
    """The state the parts of one edge share; the stores are there once NATS is."""

    def __init__(self, settings: EdgeSettings, tiers: dict[str, Tier]) -> None:
        self.settings = settings
        self.tiers = tiers
        self.boot_id = secrets.token_hex(8)  # this incarnation; a new one after a lost lease
        self.started_at_ms = now_ms()
        self.connections: dict[str, Connection] = {}
        self.live_edges: dict[str, str] = {}  # edge_id → boot_id of every incarnation whose lease is alive
        # (edge_id, boot_id) of incarnations the lease watcher saw go, newest last (bounded):
        # dead for good, their slots need no look at storage (`edge.slot_liveness`).
        self.gone_incarnations: dict[tuple[str, str], None] = {}
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()  # a second stop(): what the drain has left closes at once
        self.ready = asyncio.Event()
        self.accepted = False  # has been ready: has a graceful shutdown to run
        self.nc: NATS | None = None
        # The connection the frame path publishes on: `nc`, but for a move off a NATS node in
        # lame-duck mode (`edge.nats_move`), when it is the bridge; while it changes, frames
        # wait for `frames_paused`, so that none overtakes what went out before it.
        self.frame_nc: NATS | None = None
        self.frames_paused: asyncio.Event | None = None
        self.rooms: RoomStore | None = None
        self.presence: Presence | None = None
        self.access: Access | None = None
        self.api: HttpApi | None = None
        self.metering: MeteringLink | None = None  # with settings.metering, once NATS is there
        self.meter = UsageMeter(
            settings.edge_id, self.boot_id, settings.session_ms_per_credit, refund_window_ms=settings.usage_refund_window_ms
        )
        self.metering_on = settings.metering  # off: nothing is counted (nothing would take it)
        self.max_forward_bytes = 0  # see `Edge.learn_max_payload`
        self.counters = FrameCounters()
        self.gates = Gates(
            upgrades=Gate("upgrades", settings.upgrades_in_flight, settings.upgrades_waiting, settings.upgrade_wait_ms / 1000),
            room_requests=Gate(
                "room_requests", settings.room_requests_in_flight, settings.room_requests_waiting, settings.room_request_wait_ms / 1000
            ),
            departures=Gate("departures", settings.departures_in_flight, None, None),  # never refused
        )
        self.metrics = EdgeMetrics(self)
        # This edge's own: edges in one process may differ (RELAY_LIBRARY_SHORTCUTS).
        self.shortcuts = internals.shortcuts_for(settings.library_shortcuts)
        self.tg: asyncio.TaskGroup | None = None

    def socket_counts(self) -> tuple[dict[str, int], int]:
        """Sockets by role (unknown: before its first register or join), and the rooms whose
        Mac socket is here and has a peer: what /metrics and the status page show."""
        by_role = {"mac": 0, "ios": 0, "unknown": 0}
        paired = 0
        for conn in list(self.connections.values()):
            session = conn.session
            by_role[session.role or "unknown"] += 1
            if session.role == "mac" and session.peer is not None:
                paired += 1
        return by_role, paired

    def spawn(self, work: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None] | None:
        """Run `work` in the edge's TaskGroup; a failure is logged, never fatal to the edge."""

        async def supervised() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", what)

        if self.tg is None:
            work.close()  # shutting down: nothing runs any more
            return None
        return self.tg.create_task(supervised())

    async def sleep(self, seconds: float, until: asyncio.Event | None = None) -> bool:
        """Sleep, or return True at once when the edge is stopping (or `until` is set)."""
        try:
            await asyncio.wait_for((until or self.stopping).wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def note_gone(self, edge_id: str, boot_id: str) -> None:
        self.gone_incarnations[(edge_id, boot_id)] = None
        while len(self.gone_incarnations) > GONE_INCARNATIONS_KEPT:
            del self.gone_incarnations[next(iter(self.gone_incarnations))]

    def is_alive(self, holder: SlotHolder) -> bool:
        """Whether the socket `holder` names lives: ours we know for sure; another edge's
        lives while its incarnation's lease does."""
        if holder.edge_id == self.settings.edge_id and holder.boot_id == self.boot_id:
            return holder.socket_id in self.connections
        return self.live_edges.get(holder.edge_id) == holder.boot_id

    @property
    def close_timeout_s(self) -> float:
        return max(self.settings.close_timeout_ms / 1000, 0.05)

    @property
    def seen_ttl_s(self) -> float:
        """How long a lastSeen value lives in KV: as long as a room may look idle."""
        return max(1.0, self.settings.room_idle_timeout_ms / 1000)
