"""What edges and metering say to each other over NATS (architecture.md, issue "Metering").

- Usage batches: an edge → the usage stream (JetStream), every RELAY_USAGE_FLUSH_INTERVAL_MS.
- Quota checks: an edge asks (request/reply) whether a user may connect.
- Over-limit notices: metering → every edge, when a user is past the limit.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from schemas.client import QuotaExceeded
from schemas.subjects import PERIOD_PATTERN, USER_ID_PATTERN

# What a batch may name: checked when it is decoded, so that a batch metering cannot
# apply is refused whole (and dropped, logged) instead of failing halfway.
UserId = Annotated[str, Meta(pattern=f"^{USER_ID_PATTERN.pattern}$")]
Period = Annotated[str, Meta(pattern=f"^{PERIOD_PATTERN.pattern}$")]
Credits = Annotated[int, Meta(ge=0, le=2**53)]


class UsageEntry(Struct, array_like=True):
    """Credits one user incurred on one edge in one window since the last batch.

    `message_tokens`: forwarded frames (§12 item 18). `duration_tokens`: whole credits of
    session time (§12 item 19), the edge keeps the fraction of a credit for the next batch.
    """

    user_id: UserId
    period: Period  # "5h-N": the window the credits were incurred in
    message_tokens: Credits
    duration_tokens: Credits


class UsageBatch(Struct, kw_only=True):
    """One publish of an edge's usage. `Nats-Msg-Id` is `<edge_id>.<boot_id>.<seq>`:
    a retry of an unacknowledged publish is the same message, stored once."""

    edge_id: str
    boot_id: str
    seq: Annotated[int, Meta(ge=1)]  # 1, 2, … per edge incarnation
    at_ms: Annotated[int, Meta(ge=0)]  # epoch ms when the batch was sealed; decides the welcome bonus's expiry
    entries: list[UsageEntry]
    # The usage partition of every entry's user (`schemas.subjects.usage_partition`); None
    # from edges before partitions, whose batches mixed users of every partition.
    partition: Annotated[int, Meta(ge=0)] | None = None

    @property
    def msg_id(self) -> str:
        return f"{self.edge_id}.{self.boot_id}.{self.seq}"


class QuotaCheck(Struct, kw_only=True):
    """An edge's question at connect: may this user connect?"""

    user_id: str


class QuotaAnswer(Struct, kw_only=True, omit_defaults=True):
    """Metering's answer. When not allowed, `exceeded` is what the client is sent."""

    allowed: bool
    exceeded: QuotaExceeded | None = None


class OverLimit(Struct, kw_only=True):
    """Metering's announcement: close this user's open sockets with `exceeded`."""

    user_id: str
    exceeded: QuotaExceeded


usage_batch_decoder = msgspec.json.Decoder(UsageBatch)
quota_check_decoder = msgspec.json.Decoder(QuotaCheck)
quota_answer_decoder = msgspec.json.Decoder(QuotaAnswer)
over_limit_decoder = msgspec.json.Decoder(OverLimit)
