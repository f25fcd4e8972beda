"""The metering service: usage batches in, ledgers and quota answers out.

- Usage is partitioned by user (`schemas.subjects.usage_partition`). Each partition has a
  durable consumer, owned by one metering process at a time (`metering.ownership`): the
  running processes share the partitions out and hand them over when one stops or dies.
  The owner takes a partition's batches in groups, in stream order, and applies each
  group with one compare-and-set per user's ledger (`metering.ledgers`); the group is
  acknowledged once every ledger has it. A group applied again (after a crash or a
  handover) is skipped by the ledgers that have it already.
- Batches of edges from before partitions go to the consumer `metering`, taken one at a
  time by any metering process, as before.
- Answers quota checks (`relay.metering.quota`, a queue group: any metering process).
- Announces users past the limit (`relay.metering.over_limit`) after each group that
  charged them, so a missed announcement is repeated while they still use the relay.

Stopping, killing or restarting a process loses nothing and counts nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from metering.consumers import UsageConsumers
from metering.ledgers import LedgerBook
from metering.metrics import MeteringMetrics
from metering.ownership import Ownership, open_metering_bucket
from metering.settings import MeteringSettings
from metering.stream import legacy_consumer_config, open_usage_stream
from metering.usage import open_usage_bucket
from runtime import kv
from runtime.backoff import until_storage_opens
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS, connect_for_service, try_another_node
from runtime.kv import open_bucket
from runtime.metrics import serve_metrics, total
from runtime.recent_problems import recent_problems
from runtime.service import StartError, keep_running
from runtime.settings import redact_urls
from schemas.metering import quota_check_decoder
from schemas.records import MeteringMember
from schemas.subjects import (
    ACCOUNTS_BUCKET,
    FLEET_METERING_SUBJECT,
    LEGACY_METERING_CONSUMER,
    METERING_QUEUE,
    QUOTA_CHECK_SUBJECT,
    USAGE_STREAM,
    partition_consumer,
)
from schemas.status import MeteringStats
from schemas.tiers import load_tiers

log = logging.getLogger("metering")

_JETSTREAM_TIMEOUT_S = 2.0
# How often the usage stream's lag is read for /metrics.
_LAG_POLL_S = 5.0

__all__ = ["Metering", "MeteringSettings"]


class Metering:
    """One metering process. `await Metering(settings).run()` serves until `stop()`."""

    def __init__(self, settings: MeteringSettings) -> None:
        self.settings = settings
        self.tiers = load_tiers(settings.tiers_file)
        self.ready = asyncio.Event()
        self.metrics = MeteringMetrics()
        self.metrics_port: int | None = None  # where /metrics is served, once it is
        # What the status page calls this process (a suffix: several may share a process in tests).
        self.process = f"{socket.gethostname()}:{os.getpid()}-{secrets.token_hex(2)}"
        self.member_id = secrets.token_hex(8)  # its member key and claims
        self.started_at_ms = now_ms()
        self._problems = recent_problems("metering")
        self._stopping = asyncio.Event()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._book: LedgerBook | None = None
        self._ownership: Ownership | None = None
        self._consumers: UsageConsumers | None = None
        self._tg: asyncio.TaskGroup | None = None

    @property
    def batches_applied(self) -> int:
        """Usage batches this process applied and acknowledged."""
        return self._consumers.batches_applied if self._consumers is not None else 0

    @property
    def serving(self) -> bool:
        """Whether it is consuming and answering (and so has a group to finish at a stop)."""
        return self.ready.is_set()

    def partitions(self) -> list[int]:
        """The usage partitions this process owns now."""
        return self._ownership.owned() if self._ownership is not None else []

    def stop(self) -> None:
        """Finish the groups in hand, give the partitions back, then stop."""
        self._stopping.set()

    async def run(self) -> None:
        s = self.settings
        log.info("metering connecting to NATS at %s", redact_urls(s.nats_url))
        metrics_server = await self._serve_metrics()
        events = self.metrics.nats_events

        async def disconnected() -> None:
            events.labels(event="disconnected").inc()

        async def reconnected() -> None:
            events.labels(event="reconnected").inc()

        self._nc = await connect_for_service(
            s.nats_url, "relay-metering", self._nats_error, s.nats_ping_interval_ms, disconnected_cb=disconnected, reconnected_cb=reconnected
        )
        try:
            self._js = js = self._nc.jetstream(timeout=_JETSTREAM_TIMEOUT_S)
            bucket = await self._open_storage(js)
            assert self._book is not None
            self._consumers = consumers = UsageConsumers(
                self._nc, js, self._book, s, self.metrics, self._owns, self._holds, self._stopping
            )
            member = MeteringMember(member_id=self.member_id, process=self.process, started_at=self.started_at_ms)
            self._ownership = ownership = Ownership(
                js, bucket, member, s.partition_lease_ms / 1000,
                consumers.start_partition, consumers.consumer_ended, self._partition_changed,
                functools.partial(try_another_node, self._nc, f"metering {member.member_id}", log),
            )  # fmt: skip
            async with asyncio.TaskGroup() as tg:
                self._tg = consumers.tg = tg
                checks = await self._nc.subscribe(QUOTA_CHECK_SUBJECT, queue=METERING_QUEUE, cb=self._on_quota_check)
                described = await self._nc.subscribe(FLEET_METERING_SUBJECT, cb=self._describe)
                legacy = tg.create_task(keep_running("usage consumer metering", consumers.consume_legacy, self._stopping))
                owning = tg.create_task(ownership.run(self._stopping))
                watching_lag = tg.create_task(keep_running("usage lag", lambda: self._watch_lag(js), self._stopping))
                self.ready.set()
                log.info("metering ready (member %s)", self.member_id)
                await self._stopping.wait()
                self.ready.clear()
                watching_lag.cancel()
                await checks.unsubscribe()
                await described.unsubscribe()
                # The partitions are given back once their groups in hand are applied; the
                # consumer `metering` ends after its batch in hand (or at once, waiting for one).
                if not consumers.applying(None):
                    legacy.cancel()
                await owning
                with contextlib.suppress(asyncio.CancelledError):
                    await legacy
                consumers.cancel_all()  # each ended, or past the wait its release allowed
        finally:
            self._tg = None
            if metrics_server is not None:
                metrics_server.close()
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)  # the last acknowledgements
            await self._nc.close()
            log.info("metering stopped")

    def stats(self) -> MeteringStats:
        """What the status page shows of this process."""
        m = self.metrics
        return MeteringStats(
            process=self.process,
            started_at_ms=self.started_at_ms,
            at_ms=now_ms(),
            ready=self.ready.is_set(),
            usage_pending=int(total(m.usage_pending)),
            batches_applied=int(total(m.batches_applied)),
            ledger_updates=int(total(m.ledger_updates)),
            partitions=self.partitions(),
            problems=self._problems.newest_first(self.process),
        )

    async def _describe(self, msg: Msg) -> None:
        """`FLEET_METERING_SUBJECT`: the status page asks every metering process."""
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(msgspec.json.encode(self.stats()))

    async def _serve_metrics(self) -> asyncio.Server | None:
        s = self.settings
        if s.metrics_port < 0:
            return None
        try:
            server = await serve_metrics(self.metrics.registry, s.metrics_host, s.metrics_port)
        except OSError as exc:
            raise StartError(
                f"cannot serve /metrics on {s.metrics_host}:{s.metrics_port} ({exc.strerror or exc}); "
                "choose another --metrics-port / RELAY_METRICS_PORT (-1: not served) or --metrics-host"
            ) from exc
        self.metrics_port = server.sockets[0].getsockname()[1]
        log.info("metering serves /metrics on %s:%d", s.metrics_host, self.metrics_port)
        return server

    async def _watch_lag(self, js: JetStreamContext) -> None:
        """Keep `relay_metering_usage_pending` current: batches not yet applied in the
        partitions this process owns, and in the consumer `metering` if it owns partition
        0 (so that the processes' lags add up to the fleet's)."""
        while not self._stopping.is_set():
            pending = 0
            owned = self.partitions()
            consumers = [partition_consumer(p) for p in owned] + ([LEGACY_METERING_CONSUMER] if 0 in owned else [])
            try:
                for consumer in consumers:
                    info = await js.consumer_info(USAGE_STREAM, consumer)
                    pending += info.num_pending + info.num_ack_pending
                self.metrics.usage_pending.set(pending)
            except STORAGE_ERRORS:
                pass  # the gauge keeps its last value; the storage errors are counted elsewhere
            self.metrics.partitions_owned.set(len(self.partitions()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _LAG_POLL_S)

    async def _open_storage(self, js: JetStreamContext) -> KeyValue:
        """Open the stream, the consumer `metering` and the buckets, waiting out a JetStream
        not ready yet. Returns the bucket of members and claims."""
        opened: list[KeyValue] = []

        async def open_once() -> None:
            await open_usage_stream(js, self.settings.kv_replicas)
            # Created, or updated to this process's ack wait.
            await js.add_consumer(USAGE_STREAM, legacy_consumer_config(self.settings.ack_wait_ms / 1000))
            usage = await open_usage_bucket(js, self.settings.kv_replicas)
            accounts = await open_bucket(js, kv.durable_bucket(ACCOUNTS_BUCKET, self.settings.kv_replicas))
            self._book = LedgerBook(usage, accounts, self.tiers, self.metrics, self.settings.apply_concurrency)
            opened[:] = [await open_metering_bucket(js, self.settings.kv_replicas)]

        await until_storage_opens(open_once, log)
        return opened[0]

    # --- the usage stream ----------------------------------------------------------------

    def _owns(self, partition: int) -> bool:
        return self._ownership is not None and self._ownership.owns(partition)

    def _holds(self, partition: int) -> bool:
        return self._ownership is not None and self._ownership.holds(partition)

    def _partition_changed(self, change: str, partition: int) -> None:
        self.metrics.partition_changes.labels(event=change).inc()
        self.metrics.partitions_owned.set(len(self.partitions()))

    # --- quota checks --------------------------------------------------------------------

    async def _on_quota_check(self, msg: Msg) -> None:
        # Answered side by side: a reconnect storm asks thousands of times at once.
        if self._tg is not None:
            self._tg.create_task(self._answer_quota_check(msg))

    async def _answer_quota_check(self, msg: Msg) -> None:
        """Answer one quota check. Never raises: no answer lets the user in after the edge's
        timeout, as with metering down, and one bad check must not stop the service."""
        assert self._book is not None
        try:
            check = quota_check_decoder.decode(msg.data)
            answer = await self._book.quota(check.user_id)
            await msg.respond(msgspec.json.encode(answer))
            self.metrics.quota_checks.labels(result="allowed" if answer.allowed else "exceeded").inc()
        except STORAGE_ERRORS as exc:
            self.metrics.quota_checks.labels(result="unanswered").inc()
            log.warning("a quota check was not answered: storage error (%s)", type(exc).__name__)
        except Exception as exc:  # an unreadable check, account or ledger
            self.metrics.quota_checks.labels(result="unanswered").inc()
            log.error("a quota check was not answered: %s: %s", type(exc).__name__, exc)

    async def _nats_error(self, exc: Exception) -> None:
        self.metrics.nats_events.labels(event="error").inc()
        log.warning("NATS: %s", exc or type(exc).__name__)
