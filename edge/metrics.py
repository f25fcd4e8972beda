"""What an edge tells Prometheus (`/metrics`, on RELAY_METRICS_PORT only).

The frame path counts in plain integers (`FrameCounters`), read at scrape time: a
prometheus_client counter takes a lock per increment, too much per frame. Its timings
are sampled, one frame in `FRAME_SAMPLE`. Everything else (upgrades, closes, NATS events)
is rare enough for prometheus_client's own counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.metrics import service_registry
from schemas.client import CloseCode

if TYPE_CHECKING:
    from edge.context import EdgeContext

# One frame in this many has its timings observed (a power of two: a mask, not a modulo).
FRAME_SAMPLE = 64
FRAME_SAMPLE_MASK = FRAME_SAMPLE - 1

# The edge's own time per frame: microseconds when all is well, milliseconds when busy.
_FRAME_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Close codes get a label of their own; any other a client sends is "other" (a label must
# not take thousands of values).
_KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1005, 1006, 1007, *(value for name, value in vars(CloseCode).items() if name.isupper())}
)


def close_code_label(code: int | None) -> str:
    if code is None:
        return "1006"
    return str(code) if code in _KNOWN_CLOSE_CODES else "other"


class EdgeMetrics:
    """The registry of one edge, and the counters its parts increment."""

    def __init__(self, ctx: EdgeContext) -> None:
        self.registry: CollectorRegistry = service_registry("edge")
        r = self.registry
        self.upgrades = Counter("relay_upgrades", "WebSocket upgrade requests on /ws, by the status answered (101: upgraded)", ["status"], registry=r)
        self.closes = Counter("relay_closes", "Client sockets closed, by close code (1006: dropped without a close frame)", ["code"], registry=r)
        self.nats_events = Counter(
            "relay_nats_events",
            "Events of the edge's NATS connection: disconnected, reconnected, slow_consumer (messages dropped), lame_duck (its node is stopping), error",
            ["event"],
            registry=r,
        )
        for event in ("disconnected", "reconnected", "slow_consumer", "lame_duck", "error"):
            self.nats_events.labels(event=event)  # present at 0 from the start, for rate()
        self.frame_publish_seconds = Histogram(
            "relay_frame_publish_seconds",
            f"The edge's time from a frame read from a client to its publish to NATS (one frame in {FRAME_SAMPLE})",
            buckets=_FRAME_BUCKETS,
            registry=r,
        )
        self.frame_write_seconds = Histogram(
            "relay_frame_write_seconds",
            f"The edge's time from a frame delivered by NATS to its write to the client's socket, queueing included (one frame in {FRAME_SAMPLE})",
            buckets=_FRAME_BUCKETS,
            registry=r,
        )
        self.quota_check_seconds = Histogram(
            "relay_quota_check_seconds",
            "Time metering took to answer a quota check at connect (unanswered ones at the timeout)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        r.register(_EdgeState(ctx))


class _EdgeState(Collector):
    """What is read from the edge's state at scrape time."""

    def __init__(self, ctx: EdgeContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        ctx, counters = self.ctx, self.ctx.counters
        by_role, paired = ctx.socket_counts()
        connections = GaugeMetricFamily("relay_connections", "Client sockets open on this edge, by role (unknown: before its first register or join)", labels=["role"])
        for role, count in by_role.items():
            connections.add_metric([role], count)
        yield connections
        yield GaugeMetricFamily("relay_paired_rooms", "Rooms whose Mac socket is on this edge and has a peer", value=paired)
        yield GaugeMetricFamily("relay_live_edges", "Edges whose lease this edge sees alive (itself included)", value=len(ctx.live_edges))
        yield GaugeMetricFamily("relay_ready", "1 while this edge takes new connections (/readyz 200)", value=int(ctx.ready.is_set()))
        draining = ctx.stopping.is_set() and ctx.accepted
        yield GaugeMetricFamily("relay_draining", "1 while this edge drains (after SIGTERM or relay-admin edges drain)", value=int(draining))
        yield GaugeMetricFamily("relay_drain_sockets_left", "Sockets a draining edge has still to close (0 when not draining)", value=len(ctx.connections) if draining else 0)
        for name, help_text, value in (
            ("relay_frames_forwarded", "Frames published to a peer", counters.forwarded_at_once + counters.forwarded_by_handler),
            ("relay_frames_forwarded_at_once", "Of those, taken as they arrived, without waking the socket's handler", counters.forwarded_at_once),
            ("relay_bytes_forwarded", "Bytes of the frames published to a peer", counters.bytes_forwarded),
            ("relay_heartbeats_answered_at_once", "Heartbeats answered as they arrived", counters.heartbeats_answered_at_once),
            ("relay_frames_undelivered", "Frames that reached nobody (not charged)", counters.undelivered),
            ("relay_frames_forwarded_in_parts", "Frames over NATS's max_payload, sent in parts", counters.forwarded_in_parts),
            ("relay_frames_received_in_parts", "Frames put together from parts, for this edge's sockets", counters.received_in_parts),
            ("relay_frames_dropped_incomplete", "Frames missing a part, never delivered", counters.parts_dropped),
            ("relay_frames_not_from_peer", "Frames for a socket from one that is not its peer (its sender told NO_PEER)", counters.not_from_peer),
            ("relay_nats_moves", "Moves off a NATS node in lame-duck mode without closing a socket", counters.nats_moves),
            ("relay_leases_lost", "Times this edge's lease expired under it, so it closed its sockets and started over", counters.leases_lost),
            ("relay_lease_renewals_failed", "Lease renewals storage did not answer in time (retried within a second)", counters.lease_renewals_failed),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        link = ctx.metering
        for name, help_text, value in (
            ("relay_quota_checks_unanswered", "Quota checks metering did not answer in time (the connection was let in)", link.quota_checks_unanswered if link else 0),
            ("relay_usage_batches_published", "Usage batches stored in the usage stream", link.usage_batches_published if link else 0),
            ("relay_usage_publish_failures", "Usage batch publishes that failed (retried)", link.usage_publish_failures if link else 0),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("relay_usage_unpublished_credits", "Credits counted but not yet stored in the usage stream", value=ctx.meter.unpublished_credits())
        # Admission (edge.admission): how much client work waits for storage, and how
        # much was refused (503 / close 1013) so the edge could keep up.
        admitted = CounterMetricFamily("relay_admission_admitted", "Client work given a place to talk to storage, by gate (upgrades, room_requests, departures)", labels=["gate"])
        refused = CounterMetricFamily("relay_admission_refused", "Client work refused because storage was saturated (upgrades: 503; room_requests: close 1013), by gate", labels=["gate"])
        in_flight = GaugeMetricFamily("relay_admission_in_flight", "Client work talking to storage now, by gate", labels=["gate"])
        waiting = GaugeMetricFamily("relay_admission_waiting", "Client work waiting for a place, by gate", labels=["gate"])
        for gate in ctx.gates:
            admitted.add_metric([gate.name], gate.counts.admitted)
            refused.add_metric([gate.name], gate.counts.refused)
            in_flight.add_metric([gate.name], gate.holders)
            waiting.add_metric([gate.name], gate.waiting)
        yield from (admitted, refused, in_flight, waiting)
