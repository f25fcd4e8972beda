"""What a metering process tells Prometheus (`/metrics`, on RELAY_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from runtime.metrics import service_registry


class MeteringMetrics:
    """The registry of one metering process and what it counts."""

    def __init__(self) -> None:
        self.registry = r = service_registry("metering")
        self.batches_applied = Counter("relay_metering_batches_applied", "Usage batches applied to the ledgers and acknowledged", registry=r)
        self.batches_dropped = Counter("relay_metering_batches_dropped", "Usage batches that could not be read or applied (logged, dropped)", registry=r)
        self.ledger_updates = Counter(
            "relay_metering_ledger_updates", "Ledger writes (one per user per group of batches; a redelivered group writes none)", registry=r
        )
        self.user_batches_applied = Counter(
            "relay_metering_user_batches_applied",
            "A user's usage in one batch, applied to the user's ledger (several per ledger write when batches come in groups)",
            registry=r,
        )
        self.partitions_owned = Gauge("relay_metering_partitions_owned", "Usage partitions this process owns now", registry=r)
        self.partition_changes = Counter(
            "relay_metering_partition_changes",
            "Usage partitions claimed, released (handed over) and lost (a claim expired before it was renewed)",
            ["event"],
            registry=r,
        )
        self.batch_apply_seconds = Histogram(
            "relay_metering_batch_apply_seconds",
            "Time to apply one group of usage batches to its users' ledgers, storage retries included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.quota_checks = Counter(
            "relay_metering_quota_checks", "Quota checks, by answer: allowed, exceeded, unanswered (storage or a bad check)", ["result"], registry=r
        )
        self.over_limit_announcements = Counter(
            "relay_metering_over_limit_announcements", "Announcements to the edges that a user is over the limit", registry=r
        )
        self.usage_pending = Gauge(
            "relay_metering_usage_pending",
            "Usage batches in the stream not yet applied and acknowledged (the consumer's pending and in-flight)",
            registry=r,
        )
        self.nats_events = Counter(
            "relay_nats_events", "Events of the NATS connection: disconnected, reconnected, error", ["event"], registry=r
        )
        for result in ("allowed", "exceeded", "unanswered"):
            self.quota_checks.labels(result=result)
        for change in ("claimed", "released", "lost"):
            self.partition_changes.labels(event=change)
        for event in ("disconnected", "reconnected", "error"):
            self.nats_events.labels(event=event)
