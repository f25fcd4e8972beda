"""The usage stream's consumers in one metering process: each partition it owns, and `metering`.

A partition's consumer is made afresh when this process takes the partition (it then
starts at the first batch not acknowledged, in stream order: `metering.partitions`), takes
up to RELAY_GROUP_BATCHES batches at a time, applies them as one group
(`metering.ledgers`), announces the users the group put over the limit and acknowledges
the group. It takes no more groups once the partition's claim may have lapsed. The
consumer `metering` (edges from before partitions) takes one batch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from metering.ledgers import LedgerBook, StorageTrouble, Stored
from metering.metrics import MeteringMetrics
from metering.partitions import fetch_wait_s
from metering.settings import MeteringSettings
from metering.stream import legacy_consumer_config, open_usage_stream, partition_consumer_config
from runtime.backoff import Backoff
from runtime.connection import STORAGE_ERRORS
from schemas.metering import OverLimit, QuotaAnswer, usage_batch_decoder
from schemas.subjects import LEGACY_METERING_CONSUMER, OVER_LIMIT_SUBJECT, USAGE_STREAM, partition_consumer

log = logging.getLogger("metering")

PullSubscription = JetStreamContext.PullSubscription

# After the first batch of a group, how long to wait for more if none is there already
# (those there come at once).
_MORE_WAIT_S = 0.02


class UsageConsumers:
    """Runs the consumers (in `tg`, set before the first one starts) until `stopping`."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        book: LedgerBook,
        settings: MeteringSettings,
        metrics: MeteringMetrics,
        owns: Callable[[int], bool],
        holds: Callable[[int], bool],
        stopping: asyncio.Event,
    ) -> None:
        self._nc = nc
        self._js = js
        self._book = book
        self.settings = settings
        self.metrics = metrics
        self._owns = owns  # whether a partition is this process's (its consumer runs)
        self._holds = holds  # whether its consumer may take batches now
        self._fetch_wait_s = fetch_wait_s(settings.partition_lease_ms / 1000)
        self._stopping = stopping
        self.tg: asyncio.TaskGroup | None = None
        self.batches_applied = 0
        self._consumers: dict[int, asyncio.Task[None]] = {}  # partition → its consumer's task
        self._in_hand: set[int | None] = set()  # consumers applying a group (None: `metering`)

    def cancel_all(self) -> None:
        for task in self._consumers.values():
            task.cancel()

    def applying(self, partition: int | None) -> bool:
        """Whether that consumer is applying a group now (None: the consumer `metering`)."""
        return partition in self._in_hand

    def start_partition(self, partition: int) -> None:
        """Our claim on `partition` is new: run its consumer (after the previous one of this
        process ended, if it is still finishing a group)."""
        assert self.tg is not None
        previous = self._consumers.get(partition)
        self._consumers[partition] = self.tg.create_task(self._own_partition(partition, previous))

    async def consumer_ended(self, partition: int) -> None:
        """Once the partition's consumer ended: at once if it is waiting for batches (what
        it might have fetched goes to the next owner), else after its group in hand."""
        task = self._consumers.get(partition)
        if task is None:
            return
        if partition not in self._in_hand:
            task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(task)

    async def _own_partition(self, partition: int, previous: asyncio.Task[None] | None) -> None:
        """Consume `partition` while this process holds it."""
        if previous is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await previous

        def owns() -> bool:
            return self._owns(partition) and not self._stopping.is_set()

        def holds() -> bool:
            return self._holds(partition) and not self._stopping.is_set()

        async def fresh_consumer() -> PullSubscription:
            # Made afresh: it then starts at the partition's first batch not acknowledged,
            # in stream order, whatever the previous owner still held (metering.partitions).
            js = self._js
            name = partition_consumer(partition)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(USAGE_STREAM, name)
            s = self.settings
            await js.add_consumer(USAGE_STREAM, partition_consumer_config(partition, s.ack_wait_ms / 1000, s.group_batches))
            return await js.pull_subscribe_bind(name, stream=USAGE_STREAM)

        backoff = Backoff(0.2, 5.0)
        while owns():
            try:
                await self._consume(fresh_consumer, partition, self.settings.group_batches, owns, holds)
            except STORAGE_ERRORS as exc:
                log.warning("usage partition %d: its consumer failed (%s); making it again", partition, type(exc).__name__)
                await asyncio.sleep(backoff.next())
            except Exception:  # a bug must not leave an owned partition without a consumer
                log.exception("usage partition %d: its consumer failed; making it again", partition)
                await asyncio.sleep(backoff.next())

    async def consume_legacy(self) -> None:
        """The consumer `metering`: batches of edges from before partitions, one at a time."""

        async def consumer() -> PullSubscription:
            js = self._js
            await js.add_consumer(USAGE_STREAM, legacy_consumer_config(self.settings.ack_wait_ms / 1000))
            return await js.pull_subscribe_bind(LEGACY_METERING_CONSUMER, stream=USAGE_STREAM)

        def running() -> bool:
            return not self._stopping.is_set()

        await self._consume(consumer, None, 1, running, running)

    async def _consume(
        self,
        open_consumer: Callable[[], Awaitable[PullSubscription]],
        partition: int | None,
        group_batches: int,
        owns: Callable[[], bool],
        holds: Callable[[], bool],
    ) -> None:
        """Take groups of batches and apply them while `owns()`, each taken only while
        `holds()` (a claim renewed late is waited for); the consumer is made again if it is
        gone (deleted by hand, or the stream with it)."""
        subscription = await open_consumer()
        outage = False
        try:
            while owns():
                if not holds():
                    await asyncio.sleep(0.05)
                    continue
                try:
                    msgs = await self._fetch_group(subscription, group_batches)
                except asyncio.TimeoutError:  # nats-py's own TimeoutError is one too
                    outage = False
                    continue  # no batch came
                except STORAGE_ERRORS as exc:
                    if not outage:
                        log.warning("cannot fetch usage batches (%s); retrying", str(exc) or type(exc).__name__)
                        outage = True
                    await asyncio.sleep(0.5)
                    if isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError)):
                        # The consumer (or the stream, or its leader) is gone: made again by
                        # the caller, with back-off, until it opens. Fetching on from here
                        # would time out silently for ever (found by the fault tests: a NATS
                        # node SIGKILLed left partitions owned and never applied).
                        with contextlib.suppress(*STORAGE_ERRORS):
                            await open_usage_stream(self._js, self.settings.kv_replicas)
                        raise
                    continue
                outage = False
                if not owns():
                    return  # lost or given up while fetching, or a stop: the next owner takes these
                self._in_hand.add(partition)
                try:
                    await self._process(msgs, partition)
                finally:
                    self._in_hand.discard(partition)
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone: nothing to undo then
                await subscription.unsubscribe()

    async def _fetch_group(self, subscription: PullSubscription, group_batches: int) -> list[Msg]:
        """The next batch as soon as it is there, with what else is there already, up to
        `group_batches`. (nats-py's fetch of n waits until n came or its wait ran out: a
        lone batch would wait that long.) TimeoutError when no batch came in the wait."""
        msgs = await subscription.fetch(1, timeout=self._fetch_wait_s)
        if group_batches > 1:
            with contextlib.suppress(asyncio.TimeoutError):
                msgs += await subscription.fetch(group_batches - 1, timeout=_MORE_WAIT_S)
        return msgs

    async def _process(self, msgs: list[Msg], partition: int | None) -> None:
        """Apply one group of batches to every ledger it names, then acknowledge them.

        Storage trouble is waited out (the group stays ours meanwhile). A batch that cannot
        be read, or names what no ledger can take, is dropped with an error in the log: it
        would fail again at every delivery, and hold up every batch behind it.
        """
        group: list[tuple[Msg, Stored]] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                group.append((msg, Stored(seq, usage_batch_decoder.decode(msg.data))))
            except msgspec.DecodeError as exc:  # ValidationError included
                log.error("usage batch %d cannot be read (%s); dropped", seq, exc)
                self.metrics.batches_dropped.inc()
                await msg.term()
        if not group:
            return
        progress = asyncio.create_task(self._keep_in_progress([msg for msg, _ in group]))
        started = time.perf_counter()
        try:
            answers = await self._apply(group, partition)
        finally:
            progress.cancel()
        if answers is None:
            return  # stopping during a storage outage: not acknowledged, the next owner applies it
        self.metrics.batch_apply_seconds.observe(time.perf_counter() - started)
        for user_id, answer in answers.items():
            if not answer.allowed and answer.exceeded is not None:
                await self._nc.publish(OVER_LIMIT_SUBJECT, msgspec.json.encode(OverLimit(user_id=user_id, exceeded=answer.exceeded)))
                self.metrics.over_limit_announcements.inc()

    async def _apply(self, group: list[tuple[Msg, Stored]], partition: int | None) -> dict[str, QuotaAnswer] | None:
        """Apply and acknowledge `group`; each user's quota after it (None: stopped before).

        A group that fails for anything but storage is applied again one batch at a time,
        so that only the batch that cannot be applied is dropped (what the group applied
        before failing is skipped by the ledgers that have it)."""
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                answers = await self._book.apply([stored for _, stored in group], partition)
                break
            except StorageTrouble as exc:
                if self._stopping.is_set():
                    return None
                first, last = group[0][1].seq, group[-1][1].seq
                log.warning("usage batches %d-%d: storage error (%s); retrying", first, last, exc)
                await asyncio.sleep(backoff.next())
            except Exception:
                if len(group) > 1:
                    answers = {}
                    for one in group:
                        answers.update(await self._apply([one], partition) or {})
                    return answers
                msg, stored = group[0]
                log.exception("usage batch %d from %s cannot be applied; dropped", stored.seq, stored.batch.msg_id)
                self.metrics.batches_dropped.inc()
                await msg.term()
                return {}
        # A lost acknowledgement only means a redelivery, which the ledgers skip.
        for msg, _ in group:
            await msg.ack()
        self.batches_applied += len(group)
        self.metrics.batches_applied.inc(len(group))
        return answers

    async def _keep_in_progress(self, msgs: list[Msg]) -> None:
        """While a large group is being applied, tell the server it is not abandoned."""
        while True:
            await asyncio.sleep(self.settings.ack_wait_ms / 3000)
            for msg in msgs:
                with contextlib.suppress(*STORAGE_ERRORS):
                    await msg.in_progress()
