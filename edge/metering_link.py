"""The edge's side of metering (architecture.md): quota checks at connect, usage batches
to the usage stream. The counting itself is `edge.protocol.meter`; the decisions are metering's."""

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
from nats.js import JetStreamContext
from prometheus_client import Histogram

from metering.stream import open_usage_stream
from runtime.backoff import Backoff
from runtime.connection import STORAGE_ERRORS
from runtime.metrics import timed_storage
from schemas.client import QuotaExceeded
from schemas.metering import QuotaCheck, UsageBatch, quota_answer_decoder
from schemas.subjects import QUOTA_CHECK_SUBJECT, usage_events_subject

log = logging.getLogger("edge.metering")

_PUBLISH_TIMEOUT_S = 2.0


class MeteringLink:
    """Quota checks and usage publishing for one edge. Counts what went wrong, for /metrics."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, edge_id: str, quota_check_timeout_s: float, replicas: int, quota_check_seconds: Histogram
    ) -> None:
        self._quota_check_seconds = quota_check_seconds  # /metrics
        self._nc = nc
        self._js = js
        self._replicas = replicas
        self._edge_id = edge_id
        self._check_timeout_s = quota_check_timeout_s
        self.quota_checks_unanswered = 0
        self.usage_batches_published = 0
        self.usage_publish_failures = 0
        self._metering_away = False  # logged once per outage, not per connection

    async def check_quota(self, user_id: str) -> QuotaExceeded | None:
        """What to tell the user if metering says they are past the quota; None to let them in.

        A metering outage must not take the relay down: no answer in time lets the
        connection in (logged once per outage, counted every time).
        """
        started = time.perf_counter()
        try:
            try:
                reply = await self._nc.request(
                    QUOTA_CHECK_SUBJECT, msgspec.json.encode(QuotaCheck(user_id=user_id)), timeout=self._check_timeout_s
                )
            finally:
                self._quota_check_seconds.observe(time.perf_counter() - started)
            answer = quota_answer_decoder.decode(reply.data)
        except (TimeoutError, nats.errors.Error, msgspec.DecodeError) as exc:
            self.quota_checks_unanswered += 1
            if not self._metering_away:
                self._metering_away = True
                log.warning(
                    "metering did not answer a quota check (%s): connections are let in unchecked until it does",
                    type(exc).__name__,
                )
            return None
        if self._metering_away:
            self._metering_away = False
            log.info("metering answers quota checks again")
        return None if answer.allowed else answer.exceeded

    @timed_storage("usage.publish")
    async def publish(self, batch: UsageBatch) -> None:
        """One attempt to store `batch` in the usage stream; raises if it is not acknowledged."""
        assert batch.partition is not None  # this edge's meter cuts batches by partition
        await self._js.publish(
            usage_events_subject(self._edge_id, batch.partition),
            msgspec.json.encode(batch),
            timeout=_PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": batch.msg_id},
        )
        self.usage_batches_published += 1

    async def publish_until_acked(self, batch: UsageBatch, between_attempts: Callable[[], Awaitable[None]]) -> None:
        """Publish `batch` until the stream acknowledges it (the caller bounds the time, if at all).

        `between_attempts` runs while waiting to retry (the edge keeps its meter ticking).
        """
        backoff, failing = Backoff(0.1, 2.0), False
        while True:
            try:
                await self.publish(batch)
                if failing:
                    log.info("usage batch %s published after retries", batch.msg_id)
                return
            except STORAGE_ERRORS as exc:
                self.usage_publish_failures += 1
                if not failing:
                    log.warning("usage batch %s not acknowledged (%s); retrying", batch.msg_id, type(exc).__name__ or exc)
                    failing = True
                if isinstance(exc, nats.js.errors.NoStreamResponseError):
                    # The stream is gone (deleted by hand): make it again, as at start.
                    with contextlib.suppress(*STORAGE_ERRORS):
                        await open_usage_stream(self._js, self._replicas)
            await between_attempts()
            await asyncio.sleep(backoff.next())
