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

from schemas.subjects import (
    LEGACY_METERING_CONSUMER,
    LEGACY_USAGE_FILTER,
    USAGE_STREAM,
    USAGE_STREAM_SUBJECTS,
    partition_consumer,
    usage_partition_filter,
)

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
        subjects=[USAGE_STREAM_SUBJECTS],
        # Each batch is for metering alone and goes once acknowledged.
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=USAGE_STREAM_MAX_AGE_S,
        duplicate_window=USAGE_DEDUP_WINDOW_S,
        first_seq=time.time_ns() // 1000,
    )
    try:
        info = await js.stream_info(USAGE_STREAM)
    except nats.js.errors.NotFoundError:
        info = None
    if info is not None:
        # There: used as it is (its replicas or limits may be the operator's choice),
        # except that a stream made before partitions learns their subjects.
        if USAGE_STREAM_SUBJECTS not in (info.config.subjects or []):
            info.config.subjects = [USAGE_STREAM_SUBJECTS]
            await js.update_stream(info.config)
            log.info("the usage stream %s now takes %s", USAGE_STREAM, USAGE_STREAM_SUBJECTS)
        return
    try:
        await js.add_stream(config)
        log.info("created the usage stream %s (first sequence %d)", USAGE_STREAM, config.first_seq)
    except nats.js.errors.BadRequestError:
        pass  # created meanwhile by another edge or metering process


def legacy_consumer_config(ack_wait_s: float) -> ConsumerConfig:
    """The consumer of batches from edges before partitions, shared by every metering
    process (and by metering processes before partitions, during an upgrade).

    One batch at a time (`max_ack_pending=1`), in stream order: a ledger's `applied_seq`
    detects a redelivered batch only if batches are applied in order. Processes take
    turns; whoever holds a batch past `ack_wait` without a sign of progress loses it.
    """
    return ConsumerConfig(
        durable_name=LEGACY_METERING_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=LEGACY_USAGE_FILTER,
        max_ack_pending=1,
        ack_wait=ack_wait_s,
    )


def partition_consumer_config(partition: int, ack_wait_s: float, group_batches: int) -> ConsumerConfig:
    """The consumer of one usage partition, read by the one metering process owning it.

    Up to `group_batches` batches are handed out at once, applied as one group and then
    acknowledged. The owner made the consumer afresh when it took the partition, so it
    starts at the first batch not acknowledged, in stream order, whatever the previous
    owner was holding (`metering.partitions`).
    """
    return ConsumerConfig(
        durable_name=partition_consumer(partition),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=usage_partition_filter(partition),
        max_ack_pending=group_batches,
        ack_wait=ack_wait_s,
    )
