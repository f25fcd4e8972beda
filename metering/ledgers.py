"""Writing usage into the ledgers: a group of batches, one compare-and-set per user.

`LedgerBook.apply` takes batches of one consumer of the usage stream, in stream order,
sums them per user (`metering.ledger.apply_usage`, batch by batch, so the welcome bonus
and the windows come out as if applied one at a time) and writes each user's ledger once.
A batch a ledger has already (its sequence at or below the ledger's high-water mark for
that partition) is skipped for that user: applying a group again after a crash or a
handover counts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from metering.ledger import apply_batches, quota_answer
from metering.metrics import MeteringMetrics
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS
from runtime.kv import get_present
from runtime.metrics import timed_storage
from schemas.metering import QuotaAnswer, UsageBatch, UsageEntry
from schemas.records import UsageLedger, User, usage_ledger_decoder, user_decoder
from schemas.subjects import usage_ledger_key, user_key
from schemas.tiers import Tier

log = logging.getLogger("metering")

# Ledgers kept in memory (with their KV revision) to skip a read per user per group.
_LEDGERS_CACHED = 20_000
# Accounts read while applying batches are reused this long: a tier, override or bonus
# change reaches the announcements within it (quota checks at connect always read afresh).
_USERS_CACHED_S = 5.0


class StorageTrouble(Exception):
    """Storage failed while a group was applied: wait it out and apply the group again."""


@dataclass(frozen=True)
class Stored:
    """A usage batch as the stream holds it: its sequence and what it says."""

    seq: int
    batch: UsageBatch


class LedgerBook:
    """The usage ledgers of one metering process, and the copies it last read or wrote."""

    def __init__(
        self, usage: KeyValue, accounts: KeyValue, tiers: dict[str, Tier], metrics: MeteringMetrics, concurrency: int
    ) -> None:
        self._usage = usage
        self._accounts = accounts  # read only: accounts are written by relay-admin and the edges
        self._tiers = tiers
        self._metrics = metrics
        self._concurrency = concurrency
        # user → (ledger, its KV revision; 0: no record yet), as this process last wrote or read it.
        self._ledgers: OrderedDict[str, tuple[UsageLedger, int]] = OrderedDict()
        self._users: dict[str, tuple[User | None, float]] = {}  # user → (record, monotonic expiry)

    async def apply(self, group: list[Stored], partition: int | None) -> dict[str, QuotaAnswer]:
        """Apply `group` (batches of `partition`'s consumer, in stream order) to each user's
        ledger; each user's quota after it. StorageTrouble if storage failed: nothing is
        half-applied to any one ledger, and applying the group again is harmless."""
        # user → [(sequence, sealed at, the user's entries in that batch)], in stream order
        by_user: dict[str, list[tuple[int, int, list[UsageEntry]]]] = {}
        for stored in group:
            seq, at_ms = stored.seq, stored.batch.at_ms
            for entry in stored.batch.entries:
                batches = by_user.get(entry.user_id)
                if batches is None:
                    by_user[entry.user_id] = [(seq, at_ms, [entry])]
                elif batches[-1][0] == seq:
                    batches[-1][2].append(entry)
                else:
                    batches.append((seq, at_ms, [entry]))
        limit = asyncio.Semaphore(self._concurrency)

        async def apply_one(user_id: str, batches: list[tuple[int, int, list[UsageEntry]]]) -> tuple[str, QuotaAnswer]:
            async with limit:
                return user_id, await self._apply_to_user(user_id, batches, partition)

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(apply_one(user_id, batches)) for user_id, batches in by_user.items()]
        except ExceptionGroup as group_error:
            storage, other = group_error.split(STORAGE_ERRORS)
            if other is not None:
                raise other
            assert storage is not None
            raise StorageTrouble(type(storage.exceptions[0]).__name__) from group_error
        return dict(task.result() for task in tasks)

    async def _apply_to_user(
        self, user_id: str, batches: list[tuple[int, int, list[UsageEntry]]], partition: int | None
    ) -> QuotaAnswer:
        user = await self._user(user_id)
        key = usage_ledger_key(user_id)
        while True:
            ledger, revision = await self._ledger(user_id)
            applied = apply_batches(ledger, user, batches, partition=partition)
            if not applied:
                break  # applied before a crash, or by the partition's previous owner
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
            self._metrics.ledger_updates.inc()
            self._metrics.user_batches_applied.inc(applied)
            break
        tier = self._tiers.get(user.tier) if user is not None else None
        return quota_answer(ledger, user, tier, now_ms())

    async def quota(self, user_id: str) -> QuotaAnswer:
        """The user's quota now, read afresh (a quota check at connect)."""
        user, entry = await asyncio.gather(self.read_user(user_id), self._read_ledger(user_id))
        ledger = usage_ledger_decoder.decode(entry.value) if entry is not None else UsageLedger(user_id=user_id)
        tier = self._tiers.get(user.tier) if user is not None else None
        return quota_answer(ledger, user, tier, now_ms())

    async def _user(self, user_id: str) -> User | None:
        now = time.monotonic()
        cached = self._users.get(user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        if len(self._users) > _LEDGERS_CACHED:
            self._users = {u: c for u, c in self._users.items() if c[1] > now}
        try:
            user = await self.read_user(user_id)
        except msgspec.DecodeError:
            # Usage still counts; the quota of an account metering cannot read is not judged.
            log.error("account %s cannot be read; its usage counts without bonus or quota", user_id)
            user = None
        self._users[user_id] = (user, now + _USERS_CACHED_S)
        return user

    @timed_storage("accounts.get_user")
    async def read_user(self, user_id: str) -> User | None:
        entry = await get_present(self._accounts, user_key(user_id))
        return None if entry is None else user_decoder.decode(entry.value)

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
