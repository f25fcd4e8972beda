"""The operator's status page: what each edge and metering process tells about itself over
NATS (`FLEET_EDGES_SUBJECT`, `FLEET_METERING_SUBJECT`), and the fleet view an edge serves
at `GET /admin/status.json` (the page at `/admin/status` draws it).

No room, user or key is named anywhere in it: the page is counts and the services' own
warnings, which are written without secrets (tests/integration/test_logs.py).
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class Problem(Struct, frozen=True, kw_only=True):
    """One of the last warnings or errors a process logged."""

    at_ms: int  # epoch ms
    level: Literal["WARNING", "ERROR", "CRITICAL"]
    logger: str
    message: str
    source: str = ""  # the edge id, or the metering process, that logged it


class EdgeStats(Struct, kw_only=True):
    """One edge's answer on `FLEET_EDGES_SUBJECT`."""

    edge_id: str
    boot_id: str
    started_at_ms: int
    at_ms: int  # when this answer was made: frames/s is the difference of two answers over this
    ready: bool
    draining: bool
    sockets: dict[str, int]  # by role: mac, ios, unknown (before the first register or join)
    paired_rooms: int  # rooms whose Mac socket is on this edge and has a peer
    frames_forwarded: int  # since the start
    bytes_forwarded: int
    frames_undelivered: int
    storage_errors: int  # KV and JetStream operations that failed, since the start
    nats_server: str  # host:port of the NATS node it is connected to ("" while away)
    nats_reconnects: int
    problems: list[Problem] = []


class MeteringStats(Struct, kw_only=True):
    """One metering process's answer on `FLEET_METERING_SUBJECT`."""

    process: str  # host:pid
    started_at_ms: int
    at_ms: int
    ready: bool
    usage_pending: int  # batches in the usage stream not yet applied and acknowledged (the lag)
    batches_applied: int
    ledger_updates: int
    partitions: list[int] = []  # the usage partitions it owns
    problems: list[Problem] = []


class EdgeEntry(Struct, kw_only=True):
    """An edge whose lease is alive, and what it answered (None: it did not answer in time)."""

    edge_id: str
    boot_id: str
    stats: EdgeStats | None = None


class FleetStatus(Struct, kw_only=True):
    """`GET /admin/status.json`: the whole fleet as the answering edge sees it."""

    at_ms: int
    answered_by: str  # the edge id that gathered it
    refresh_ms: int  # how often the page asks again
    edges: list[EdgeEntry]
    metering: list[MeteringStats]
    problems: list[Problem]  # the last ones of every process, newest first
    # Edges that answered but hold no live lease (stopping, or just started over).
    unleased: list[EdgeStats] = []
