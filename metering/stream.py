"""The usage stream: edges publish usage batches to it, metering consumes them. One
definition, used by both sides (whichever starts first creates it)."""

from __future__ import annotations

import logging
import time

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from schemas.subjects import METERING_CONSUMER, USAGE_EVENTS_FILTER, USAGE_STREAM

log = logging.getLogger(__name__)

# A batch nobody consumed for this long is dropped: metering was down for a week.
USAGE_STREAM_MAX_AGE_S = 7 * 86_400
# An edge retries an unacknowledged publish with the same Nats-Msg-Id; the server stores
# it once if the retry comes within this window (an edge cut off from NATS for longer
# retries after the window: the batch may then count twice, see the README).
USAGE_DEDUP_WINDOW_S = 3_600


async def open_usage_stream(js: JetStreamContext, replicas: int) -> None:
    """Create the usage stream, or use it as it is if it exists with another configuration.

    A stream created now starts its sequence at the current time in microseconds. Ledgers
    record the sequence of the last batch applied to them; a stream deleted and created
    again (by an operator, or re-created by an edge or metering that finds it gone) must
    start above any sequence the old one reached, or metering would skip its batches as
    applied. It does, unless the old one stored more than a million batches a second.
    """
    config = StreamConfig(
        name=USAGE_STREAM,
        subjects=[USAGE_EVENTS_FILTER],
        # Each batch is for metering alone and goes once acknowledged.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=USAGE_STREAM_MAX_AGE_S,
        duplicate_window=USAGE_DEDUP_WINDOW_S,
        first_seq=time.time_ns() // 1000,
    )
    try:
        await js.stream_info(USAGE_STREAM)
        return  # there: used as it is (its replicas or limits may be the operator's choice)
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(config)
        log.info("created the usage stream %s (first sequence %d)", USAGE_STREAM, config.first_seq)
    except nats.js.errors.BadRequestError:
        pass  # created meanwhile by another edge or metering process


def metering_consumer_config(ack_wait_s: float) -> ConsumerConfig:
    """Metering's durable consumer, shared by every metering process.

    One batch at a time (`max_ack_pending=1`), in stream order: a user's ledger records
    the sequence of the last batch applied to it, which detects a redelivered batch only
    if batches are applied in order. Several metering processes take turns; whoever
    holds a batch past `ack_wait` without a sign of progress loses it to another.
    """
    return ConsumerConfig(
        durable_name=METERING_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=USAGE_EVENTS_FILTER,
        max_ack_pending=1,
        ack_wait=ack_wait_s,
    )
