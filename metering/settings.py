"""The settings of a metering process (`RELAY_*` variables and flags, README's table)."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.settings import NatsSettings


@dataclass(frozen=True, kw_only=True)
class MeteringSettings(NatsSettings):
    """Everything a metering process can be told. See the README's settings table."""

    ack_wait_ms: int = field(
        default=10_000,
        metadata={"help": "a batch of the consumer `metering` (edges from before partitions) held this long by a process that died goes to another"},
    )
    partition_lease_ms: int = field(
        default=10_000,
        metadata={"help": "a usage partition whose owner died goes to another metering process after this long (its claim's TTL)"},
    )
    group_batches: int = field(
        default=256,
        metadata={"help": "usage batches of a partition taken and applied at once (one ledger write per user per group)"},
    )
    apply_concurrency: int = field(default=64, metadata={"help": "ledgers written at once while applying a group"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address for GET /metrics (Prometheus' text format); 0.0.0.0 to let a scraper on another host in"})
    metrics_port: int = field(default=-1, metadata={"min": -1, "help": "port for GET /metrics on metrics_host; -1: not served; 0: a free one"})
    uvloop: bool = field(default=True, metadata={"help": "run on uvloop when it is installed"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ack_wait_ms < 1_000:
            raise ValueError("ack_wait_ms must be at least 1000")
        if self.partition_lease_ms < 1_000:
            raise ValueError("partition_lease_ms must be at least 1000")
        if self.group_batches < 1:
            raise ValueError("group_batches must be at least 1")
        if self.apply_concurrency < 1:
            raise ValueError("apply_concurrency must be at least 1")
