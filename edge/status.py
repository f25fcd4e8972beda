"""The operator's status page: this edge describes itself over NATS, and gathers the fleet.

Every edge answers on `FLEET_EDGES_SUBJECT` and every metering process on
`FLEET_METERING_SUBJECT`; the edge a browser asks (`GET /admin/status.json`) asks them
all at once and lays their answers beside the leases, so that an edge whose lease is
alive but that does not answer shows as such. The page itself (`edge/static/`) is plain
HTML and a script that polls; `edge.http_front` checks the operator before any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.msg import Msg

from edge.api import HttpReply
from edge.context import EdgeContext
from runtime.clock import now_ms
from runtime.connection import where
from runtime.fleet import gather_answers
from runtime.metrics import storage_errors, total
from runtime.recent_problems import recent_problems
from schemas.status import EdgeEntry, EdgeStats, FleetStatus, MeteringStats, Problem
from schemas.subjects import FLEET_EDGES_SUBJECT, FLEET_METERING_SUBJECT

log = logging.getLogger("edge.status")

T = TypeVar("T")

# The page's files, read once: (content type, bytes).
_FILES = {
    "/admin/status": ("status.html", "text/html; charset=utf-8"),
    "/admin/status.js": ("status.js", "text/javascript; charset=utf-8"),
}
PATHS = frozenset({*_FILES, "/admin/status.json"})

# No framing, no inline script, nothing fetched from elsewhere; the answers are the operator's.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_decode_edge = msgspec.json.Decoder(EdgeStats).decode
_decode_metering = msgspec.json.Decoder(MeteringStats).decode


class StatusPage:
    """This edge's own stats, its answers to the fleet question, and the fleet view."""

    def __init__(self, ctx: EdgeContext) -> None:
        self.ctx = ctx
        self.problems = recent_problems("edge")
        self._files: dict[str, HttpReply] = {}

    def stats(self) -> EdgeStats:
        ctx, counters = self.ctx, self.ctx.counters
        sockets, paired = ctx.socket_counts()
        nc = ctx.nc
        return EdgeStats(
            edge_id=ctx.settings.edge_id,
            boot_id=ctx.boot_id,
            started_at_ms=ctx.started_at_ms,
            at_ms=now_ms(),
            ready=ctx.ready.is_set(),
            draining=ctx.stopping.is_set() and ctx.accepted,
            sockets=sockets,
            paired_rooms=paired,
            frames_forwarded=counters.forwarded_at_once + counters.forwarded_by_handler,
            bytes_forwarded=counters.bytes_forwarded,
            frames_undelivered=counters.undelivered,
            storage_errors=int(total(storage_errors)),
            nats_server=where(nc) if nc is not None and nc.is_connected else "",
            nats_reconnects=int(total(ctx.metrics.nats_events.labels(event="reconnected"))),
            problems=self.problems.newest_first(ctx.settings.edge_id),
        )

    async def answer(self, msg: Msg) -> None:
        """`FLEET_EDGES_SUBJECT`: describe this edge to whoever asks."""
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(msgspec.json.encode(self.stats()))

    async def fleet(self) -> FleetStatus:
        """Every edge with a live lease and what it answered, every metering process, and
        the last problems of all of them (newest first)."""
        ctx = self.ctx
        gather_s = ctx.settings.status_gather_ms / 1000
        edge_answers, metering_answers = await asyncio.gather(
            gather_answers(ctx.nc, FLEET_EDGES_SUBJECT, gather_s, expected=len(ctx.live_edges)),
            gather_answers(ctx.nc, FLEET_METERING_SUBJECT, gather_s),
        )
        answered = {stats.edge_id: stats for stats in _decoded(edge_answers, _decode_edge)}
        edges = [
            EdgeEntry(edge_id=edge_id, boot_id=boot_id, stats=answered.pop(edge_id, None))
            for edge_id, boot_id in sorted(ctx.live_edges.items())
        ]
        metering = sorted(_decoded(metering_answers, _decode_metering), key=lambda m: m.process)
        problems: list[Problem] = [p for e in edges if e.stats for p in e.stats.problems]
        problems += [p for m in metering for p in m.problems]
        problems += [p for stats in answered.values() for p in stats.problems]
        problems.sort(key=lambda p: p.at_ms, reverse=True)
        return FleetStatus(
            at_ms=now_ms(),
            answered_by=ctx.settings.edge_id,
            refresh_ms=ctx.settings.status_refresh_ms,
            edges=edges,
            metering=metering,
            problems=_unique(problems)[:50],
            unleased=sorted(answered.values(), key=lambda s: s.edge_id),
        )

    async def reply(self, path: str) -> HttpReply:
        """The answer to GET `path` (one of `PATHS`), the operator already checked."""
        if path == "/admin/status.json":
            if self.ctx.nc is None or not self.ctx.nc.is_connected:
                return HttpReply.text(503, "this edge is not connected to NATS; try again")
            return HttpReply(200, msgspec.json.encode(await self.fleet()), "application/json", {"Cache-Control": "no-store"})
        cached = self._files.get(path)
        if cached is None:
            name, content_type = _FILES[path]
            body = resources.files("edge").joinpath("static", name).read_bytes()
            cached = self._files[path] = HttpReply(200, body, content_type, _PAGE_HEADERS)
        return cached


def _decoded(answers: list[bytes], decode: Callable[[bytes], T]) -> list[T]:
    """The answers that decode; another version's, or garbage, is left out (and logged)."""
    out: list[T] = []
    for raw in answers:
        try:
            out.append(decode(raw))
        except msgspec.DecodeError as exc:
            log.warning("a fleet answer did not decode (%s); left out of the status page", exc)
    return out


def _unique(problems: list[Problem]) -> list[Problem]:
    """Several edges in one process share one list of problems (tests): each once."""
    seen: set[tuple[int, str, str]] = set()
    out = []
    for problem in problems:
        key = (problem.at_ms, problem.logger, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out
