"""The metering service: usage batches in, ledgers and quota answers out.

- Consumes the usage stream with the durable consumer `metering`, one batch at a time,
  and applies each batch to the ledgers of its users (`metering.ledger`), each with a
  compare-and-set. A batch is acknowledged after every ledger has it; a batch
  redelivered after a crash is skipped by the ledgers that have it already.
- Answers quota checks (`relay.metering.quota`, a queue group: any metering process).
- Announces users past the limit (`relay.metering.over_limit`) after each batch that
  charged them, so a missed announcement is repeated while they still use the relay.

Any number of metering processes may run: they take turns on the stream and share the
quota checks. Stopping, killing or restarting one loses nothing and counts nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from metering.ledger import apply_usage, quota_answer
from metering.metrics import MeteringMetrics
from metering.stream import metering_consumer_config, open_usage_stream
from metering.usage import open_usage_bucket
from runtime import kv
from runtime.backoff import Backoff, until_storage_opens
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS, connect_for_service
from runtime.kv import get_present, open_bucket
from runtime.metrics import serve_metrics, timed_storage, total
from runtime.recent_problems import recent_problems
from runtime.service import StartError, keep_running
from runtime.settings import NatsSettings, redact_urls
from schemas.metering import (
    OverLimit,
    QuotaAnswer,
    UsageBatch,
    UsageEntry,
    quota_check_decoder,
    usage_batch_decoder,
)
from schemas.records import UsageLedger, User, usage_ledger_decoder, user_decoder
from schemas.subjects import (
    FLEET_METERING_SUBJECT,
    ACCOUNTS_BUCKET,
    METERING_CONSUMER,
    METERING_QUEUE,
    OVER_LIMIT_SUBJECT,
    QUOTA_CHECK_SUBJECT,
    USAGE_STREAM,
    usage_ledger_key,
    user_key,
)
from schemas.status import MeteringStats
from schemas.tiers import load_tiers

log = logging.getLogger("metering")

_JETSTREAM_TIMEOUT_S = 2.0
# How long one fetch waits for a batch; also how soon a stop is noticed when idle.
_FETCH_WAIT_S = 1.0
# Ledgers kept in memory (with their KV revision) to skip a read per user per batch.
_LEDGERS_CACHED = 20_000
# Accounts read while applying batches are reused this long: a tier, override or bonus
# change reaches the announcements within it (quota checks at connect always read afresh).
_USERS_CACHED_S = 5.0
# How often the usage stream's lag is read for /metrics.
_LAG_POLL_S = 5.0


class _StorageTrouble(Exception):
    """Storage failed while a batch was applied: wait it out and apply the batch again."""


@dataclass(frozen=True, kw_only=True)
class MeteringSettings(NatsSettings):
    """Everything a metering process can be told. See the README's settings table."""

    ack_wait_ms: int = field(
        default=10_000,
        metadata={"help": "a batch held this long by a metering process that died goes to another (the pause after a crash)"},
    )
    apply_concurrency: int = field(default=64, metadata={"help": "ledgers written at once while applying a batch"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address for GET /metrics (Prometheus' text format); 0.0.0.0 to let a scraper on another host in"})
    metrics_port: int = field(default=-1, metadata={"min": -1, "help": "port for GET /metrics on metrics_host; -1: not served; 0: a free one"})
    uvloop: bool = field(default=True, metadata={"help": "run on uvloop when it is installed"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ack_wait_ms < 1_000:
            raise ValueError("ack_wait_ms must be at least 1000")
        if self.apply_concurrency < 1:
            raise ValueError("apply_concurrency must be at least 1")


class Metering:
    """One metering process. `await Metering(settings).run()` serves until `stop()`."""

    def __init__(self, settings: MeteringSettings) -> None:
        self.settings = settings
        self.tiers = load_tiers(settings.tiers_file)
        self.ready = asyncio.Event()
        self.batches_applied = 0
        self.metrics = MeteringMetrics()
        self.metrics_port: int | None = None  # where /metrics is served, once it is
        # What the status page calls this process (a suffix: several may share a process in tests).
        self.process = f"{socket.gethostname()}:{os.getpid()}-{secrets.token_hex(2)}"
        self.started_at_ms = now_ms()
        self._problems = recent_problems("metering")
        self._stopping = asyncio.Event()
        self._nc: NATS | None = None
        self._usage: KeyValue | None = None
        self._accounts: KeyValue | None = None  # read only: accounts are written by relay-admin and the edges
        self._tg: asyncio.TaskGroup | None = None
        # user → (ledger, its KV revision; 0: no record yet), as this process last wrote or read it.
        self._ledgers: OrderedDict[str, tuple[UsageLedger, int]] = OrderedDict()
        self._batch_in_hand = False
        self._users: dict[str, tuple[User | None, float]] = {}  # user → (record, monotonic expiry)

    @property
    def serving(self) -> bool:
        """Whether it is consuming and answering (and so has a batch to finish at a stop)."""
        return self.ready.is_set()

    def stop(self) -> None:
        """Finish the batch in hand, then stop."""
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
            s.nats_url, "relay-metering", self._nats_error, disconnected_cb=disconnected, reconnected_cb=reconnected
        )
        try:
            js = self._nc.jetstream(timeout=_JETSTREAM_TIMEOUT_S)
            await self._open_storage(js)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                checks = await self._nc.subscribe(QUOTA_CHECK_SUBJECT, queue=METERING_QUEUE, cb=self._on_quota_check)
                described = await self._nc.subscribe(FLEET_METERING_SUBJECT, cb=self._describe)
                consumer = await js.pull_subscribe_bind(METERING_CONSUMER, stream=USAGE_STREAM)
                consuming = tg.create_task(self._consume(js, consumer))
                watching_lag = tg.create_task(keep_running("usage lag", lambda: self._watch_lag(js), self._stopping))
                self.ready.set()
                log.info("metering ready")
                await self._stopping.wait()
                self.ready.clear()
                watching_lag.cancel()
                await checks.unsubscribe()
                await described.unsubscribe()
                if not self._batch_in_hand:
                    consuming.cancel()  # waiting for a batch: nothing to finish
                with contextlib.suppress(asyncio.CancelledError):
                    await consuming  # else it ends after the batch in hand
        finally:
            self._tg = None
            if metrics_server is not None:
                metrics_server.close()
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)  # the last acknowledgement
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

    async def _watch_lag(self, js: nats.js.JetStreamContext) -> None:
        """Keep `relay_metering_usage_pending` current: batches in the stream not yet applied."""
        while not self._stopping.is_set():
            try:
                info = await js.consumer_info(USAGE_STREAM, METERING_CONSUMER)
                self.metrics.usage_pending.set(info.num_pending + info.num_ack_pending)
            except STORAGE_ERRORS:
                pass  # the gauge keeps its last value; the storage errors are counted elsewhere
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _LAG_POLL_S)

    async def _open_storage(self, js: nats.js.JetStreamContext) -> None:
        """Open the stream, the consumer and the buckets, waiting out a JetStream not ready yet."""

        async def open_once() -> None:
            await open_usage_stream(js, self.settings.kv_replicas)
            # Created, or updated to this process's ack wait.
            await js.add_consumer(USAGE_STREAM, metering_consumer_config(self.settings.ack_wait_ms / 1000))
            self._usage = await open_usage_bucket(js, self.settings.kv_replicas)
            self._accounts = await open_bucket(js, kv.durable_bucket(ACCOUNTS_BUCKET, self.settings.kv_replicas))

        await until_storage_opens(open_once, log)

    # --- the usage stream ----------------------------------------------------------------

    async def _consume(self, js: nats.js.JetStreamContext, consumer: nats.js.JetStreamContext.PullSubscription) -> None:
        outage = False
        while not self._stopping.is_set():
            try:
                msgs = await consumer.fetch(1, timeout=_FETCH_WAIT_S)
            except nats.errors.TimeoutError:
                outage = False
                continue
            except STORAGE_ERRORS as exc:
                if not outage:
                    log.warning("cannot fetch usage batches (%s); retrying", exc or type(exc).__name__)
                    outage = True
                await asyncio.sleep(0.5)
                if isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError)):
                    await self._recreate_consumer(js)
                continue
            outage = False
            self._batch_in_hand = True
            try:
                for msg in msgs:
                    await self._process(msg)
            finally:
                self._batch_in_hand = False

    async def _recreate_consumer(self, js: nats.js.JetStreamContext) -> None:
        """The stream or the consumer is gone (deleted by hand): make them again, as at start."""
        try:
            await open_usage_stream(js, self.settings.kv_replicas)
            await js.add_consumer(USAGE_STREAM, metering_consumer_config(self.settings.ack_wait_ms / 1000))
        except STORAGE_ERRORS as exc:
            log.debug("usage stream or consumer not re-created yet (%s)", type(exc).__name__)

    async def _process(self, msg: Msg) -> None:
        """Apply one batch to every ledger it names, then acknowledge it.

        Storage trouble is waited out (the batch stays ours meanwhile). A batch that cannot
        be read, or names what no ledger can take, is dropped with an error in the log: it
        would fail again at every delivery, and hold up every batch behind it.
        """
        seq = msg.metadata.sequence.stream
        try:
            batch = usage_batch_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:  # ValidationError included
            log.error("usage batch %d cannot be read (%s); dropped", seq, exc)
            self.metrics.batches_dropped.inc()
            await msg.term()
            return
        progress = asyncio.create_task(self._keep_in_progress(msg))
        started = time.perf_counter()
        try:
            backoff = Backoff(0.2, 5.0)
            while True:
                try:
                    answers = await self._apply(batch, seq)
                    break
                except _StorageTrouble as exc:
                    if self._stopping.is_set():
                        return  # not acknowledged: redelivered to whoever runs next
                    log.warning("usage batch %d: storage error (%s); retrying", seq, exc)
                    await asyncio.sleep(backoff.next())
                except Exception:
                    log.exception("usage batch %d from %s cannot be applied; dropped", seq, batch.msg_id)
                    self.metrics.batches_dropped.inc()
                    await msg.term()
                    return
        finally:
            progress.cancel()
        self.metrics.batch_apply_seconds.observe(time.perf_counter() - started)
        for user_id, answer in answers.items():
            if not answer.allowed and answer.exceeded is not None:
                await self._nc.publish(OVER_LIMIT_SUBJECT, msgspec.json.encode(OverLimit(user_id=user_id, exceeded=answer.exceeded)))
                self.metrics.over_limit_announcements.inc()
        # A lost acknowledgement only means a redelivery, which the ledgers skip.
        await msg.ack()
        self.batches_applied += 1
        self.metrics.batches_applied.inc()

    async def _keep_in_progress(self, msg: Msg) -> None:
        """While a large batch is being applied, tell the server it is not abandoned."""
        while True:
            await asyncio.sleep(self.settings.ack_wait_ms / 3000)
            with contextlib.suppress(*STORAGE_ERRORS):
                await msg.in_progress()

    async def _apply(self, batch: UsageBatch, seq: int) -> dict[str, QuotaAnswer]:
        """Apply `batch` (stream sequence `seq`) to each user's ledger; each user's quota after it."""
        by_user: dict[str, list[UsageEntry]] = defaultdict(list)
        for entry in batch.entries:
            by_user[entry.user_id].append(entry)
        limit = asyncio.Semaphore(self.settings.apply_concurrency)

        async def apply_one(user_id: str, entries: list[UsageEntry]) -> tuple[str, QuotaAnswer]:
            async with limit:
                return user_id, await self._apply_to_user(user_id, entries, seq, batch.at_ms)

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(apply_one(user_id, entries)) for user_id, entries in by_user.items()]
        except ExceptionGroup as group:
            storage, other = group.split(STORAGE_ERRORS)
            if other is not None:
                raise other
            raise _StorageTrouble(type(storage.exceptions[0]).__name__) from group
        return dict(task.result() for task in tasks)

    async def _user(self, user_id: str) -> User | None:
        now = time.monotonic()
        cached = self._users.get(user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        if len(self._users) > _LEDGERS_CACHED:
            self._users = {u: c for u, c in self._users.items() if c[1] > now}
        try:
            user = await self._read_user(user_id)
        except msgspec.DecodeError:
            # Usage still counts; the quota of an account metering cannot read is not judged.
            log.error("account %s cannot be read; its usage counts without bonus or quota", user_id)
            user = None
        self._users[user_id] = (user, now + _USERS_CACHED_S)
        return user

    @timed_storage("accounts.get_user")
    async def _read_user(self, user_id: str) -> User | None:
        entry = await get_present(self._accounts, user_key(user_id))
        return None if entry is None else user_decoder.decode(entry.value)

    async def _apply_to_user(self, user_id: str, entries: list[UsageEntry], seq: int, at_ms: int) -> QuotaAnswer:
        user = await self._user(user_id)
        key = usage_ledger_key(user_id)
        while True:
            ledger, revision = await self._ledger(user_id)
            if not apply_usage(ledger, user, seq, at_ms, entries):
                break  # applied before a crash or by another metering process
            value = msgspec.json.encode(ledger)
            try:
                revision = await self._write_ledger(key, value, revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._ledgers.pop(user_id, None)  # another process wrote it: read it again
                continue
            except BaseException:
                self._ledgers.pop(user_id, None)  # the in-memory copy is ahead of the record
                raise
            self._remember(user_id, ledger, revision)
            self.metrics.ledger_updates.inc()
            break
        tier = self.tiers.get(user.tier) if user is not None else None
        return quota_answer(ledger, user, tier, now_ms())

    @timed_storage("usage.write_ledger")
    async def _write_ledger(self, key: str, value: bytes, revision: int) -> int:
        """Write a ledger still at `revision` (0: create it); KeyWrongLastSequenceError if not."""
        return await (self._usage.update(key, value, last=revision) if revision else self._usage.create(key, value))

    @timed_storage("usage.read_ledger")
    async def _read_ledger(self, user_id: str) -> KeyValue.Entry | None:
        return await get_present(self._usage, usage_ledger_key(user_id))

    async def _ledger(self, user_id: str) -> tuple[UsageLedger, int]:
        cached = self._ledgers.get(user_id)
        if cached is not None:
            self._ledgers.move_to_end(user_id)
            return cached
        entry = await self._read_ledger(user_id)
        if entry is None:
            return UsageLedger(user_id=user_id), 0
        return usage_ledger_decoder.decode(entry.value), entry.revision

    def _remember(self, user_id: str, ledger: UsageLedger, revision: int) -> None:
        self._ledgers[user_id] = (ledger, revision)
        self._ledgers.move_to_end(user_id)
        while len(self._ledgers) > _LEDGERS_CACHED:
            self._ledgers.popitem(last=False)

    # --- quota checks --------------------------------------------------------------------

    async def _on_quota_check(self, msg: Msg) -> None:
        # Answered side by side: a reconnect storm asks thousands of times at once.
        if self._tg is not None:
            self._tg.create_task(self._answer_quota_check(msg))

    async def _answer_quota_check(self, msg: Msg) -> None:
        """Answer one quota check. Never raises: no answer lets the user in after the edge's
        timeout, as with metering down, and one bad check must not stop the service."""
        try:
            check = quota_check_decoder.decode(msg.data)
            user, entry = await asyncio.gather(self._read_user(check.user_id), self._read_ledger(check.user_id))
            ledger = usage_ledger_decoder.decode(entry.value) if entry is not None else UsageLedger(user_id=check.user_id)
            tier = self.tiers.get(user.tier) if user is not None else None
            answer = quota_answer(ledger, user, tier, now_ms())
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
