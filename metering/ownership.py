"""This metering process's membership and the usage partitions it owns (bucket `relay_metering`).

Every third of the claim TTL: renew the member key, list the members, renew the claims
of the partitions that stay ours, give back those that are no longer our share (once
their group in hand is applied) and claim the free ones of our share. What to do is
`metering.partitions`'s; this module talks to NATS and starts and stops the partitions'
consumers through the callbacks it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from metering.partitions import Claim, fair_share, plan, valid_until
from runtime import kv
from runtime.connection import STORAGE_ERRORS
from runtime.kv import NOT_FOUND, get_entry, present, present_values
from schemas.records import MeteringMember, PartitionClaim, partition_claim_decoder
from schemas.subjects import (
    MEMBER_FILTER,
    METERING_BUCKET,
    USAGE_PARTITIONS,
    member_id_of_key,
    metering_member_key,
    partition_claim_key,
)

log = logging.getLogger("metering")


async def open_metering_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    """Members and claims, each with a per-message TTL (the marker makes an expiry a deletion
    to watchers)."""
    return await kv.open_bucket(js, KeyValueConfig(bucket=METERING_BUCKET, history=1, replicas=replicas, limit_marker_ttl=1))


class Ownership:
    """Keeps this process a member and its share of the partitions owned.

    `start_partition(p)` is called once a claim on `p` is ours: it runs the partition's
    consumer, which asks `holds(p)` before each group and ends once it no longer `owns(p)`;
    `consumer_ended(p)` waits for that. A claim whose renewal is late is not held
    meanwhile (its consumer takes no batches) and is owned again once renewed; one that
    expired is lost.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: KeyValue,
        member: MeteringMember,
        ttl_s: float,
        start_partition: Callable[[int], None],
        consumer_ended: Callable[[int], Awaitable[None]],
        on_change: Callable[[str, int], None],
        no_storage: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._js = js
        self._kv = bucket
        self.member = member
        self._ttl_s = ttl_s
        self._start_partition = start_partition
        self._consumer_ended = consumer_ended
        self._on_change = on_change  # ("claimed" | "released" | "lost", partition): for /metrics
        # Called when rounds have failed for a TTL (and every TTL after): storage does not
        # answer through this connection's node (the service tries another node).
        self._no_storage = no_storage
        self.claims: dict[int, Claim] = {}
        self.members: list[str] = []
        self._round_changes: dict[str, list[int]] = {}  # what this round did, for its log line
        self._loop = asyncio.get_running_loop()

    def owns(self, partition: int) -> bool:
        """Whether the partition is ours and staying ours (its consumer keeps running)."""
        claim = self.claims.get(partition)
        return claim is not None and not claim.releasing

    def holds(self, partition: int) -> bool:
        """Whether the partition's consumer may take batches now (`Claim.holds`)."""
        claim = self.claims.get(partition)
        return claim is not None and claim.holds(self._loop.time())

    def owned(self) -> list[int]:
        return sorted(self.claims)

    async def run(self, stopping: asyncio.Event) -> None:
        """Rounds every third of the TTL until `stopping`; then give everything back."""
        interval = self._ttl_s / 3
        succeeded_at = self._loop.time()
        try:
            while not stopping.is_set():
                try:
                    # Bounded as a whole: on a connection that died without a word a publish
                    # waits for a buffer nobody reads, past any reply timeout.
                    async with asyncio.timeout(self._ttl_s / 2):
                        await self._round()
                except STORAGE_ERRORS as exc:
                    log.warning("metering membership round failed (%s); retrying", type(exc).__name__ or exc)
                    interval_now = min(1.0, interval)
                    if self._no_storage is not None and self._loop.time() - succeeded_at >= self._ttl_s:
                        succeeded_at = self._loop.time()  # the next try a TTL from now
                        await self._no_storage()
                else:
                    succeeded_at = self._loop.time()
                    interval_now = interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), interval_now)
        finally:
            await self._give_everything_back()

    async def _round(self) -> None:
        me = self.member.member_id
        await kv.put_with_ttl(self._js, METERING_BUCKET, metering_member_key(me), msgspec.json.encode(self.member), self._ttl_s)
        members = await present_values(self._kv, MEMBER_FILTER)
        self.members = sorted({member_id_of_key(key) for key in members} | {me})
        share = fair_share(self.members, me)
        holders = await self._holders()
        steps = plan(share, frozenset(self.claims), holders, me)
        await asyncio.gather(*(self._renew(partition) for partition in sorted(steps.renew)))
        for partition in sorted(steps.release):
            await self._release(partition)
        for partition in sorted(steps.claim):
            await self._claim(partition)
        self._log_changes()

    def _changed(self, change: str, partition: int) -> None:
        self._round_changes.setdefault(change, []).append(partition)
        self._on_change(change, partition)

    def _log_changes(self) -> None:
        """One line per round that changed something (not one per partition)."""
        if self._round_changes:
            done = "; ".join(f"{change} {sorted(ps)}" for change, ps in sorted(self._round_changes.items()))
            owned = self.owned()
            log.info(
                "usage partitions %s; this process owns %d of %d: %s (%d metering processes running)",
                done, len(owned), USAGE_PARTITIONS, owned or "none", len(self.members),
            )  # fmt: skip
            self._round_changes = {}

    async def _holders(self) -> dict[int, str | None]:
        """Who holds each partition's claim now (None: nobody)."""
        entries = await asyncio.gather(*(self._read_claim(p) for p in range(USAGE_PARTITIONS)))
        return {p: (claim.member_id if claim is not None else None) for p, (claim, _) in enumerate(entries)}

    async def _read_claim(self, partition: int) -> tuple[PartitionClaim | None, int]:
        """The partition's claim (None if none lives) and the key's revision (0: never written)."""
        try:
            entry = await get_entry(self._kv, partition_claim_key(partition))
        except NOT_FOUND as exc:
            entry = getattr(exc, "entry", None)  # a deletion has a revision too
            return None, entry.revision if entry is not None else 0
        if not present(entry):
            return None, entry.revision
        try:
            return partition_claim_decoder.decode(entry.value), entry.revision
        except msgspec.DecodeError:
            log.error("the claim on usage partition %d cannot be read; it is left to expire", partition)
            return PartitionClaim(member_id="?"), entry.revision

    async def _write_claim(self, partition: int, last: int) -> int:
        value = msgspec.json.encode(PartitionClaim(member_id=self.member.member_id))
        return await kv.put_with_ttl(self._js, METERING_BUCKET, partition_claim_key(partition), value, self._ttl_s, last=last)

    async def _claim(self, partition: int) -> None:
        claim, revision = await self._read_claim(partition)
        if claim is not None and claim.member_id != self.member.member_id:
            return  # taken meanwhile
        sent = self._loop.time()
        try:
            revision = await self._write_claim(partition, revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # another process was faster: looked at again next round
        self.claims[partition] = Claim(partition, revision, valid_until(sent, self._ttl_s))
        self._changed("claimed", partition)
        self._start_partition(partition)

    async def _renew(self, partition: int) -> None:
        claim = self.claims[partition]
        sent = self._loop.time()
        try:
            claim.revision = await self._write_claim(partition, claim.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            # Expired (this process was cut off or stalled for a TTL) and maybe taken: its
            # consumer takes no more batches; the new owner starts where we were.
            del self.claims[partition]
            log.warning("usage partition %d: its claim expired before it was renewed; let go", partition)
            self._changed("lost", partition)
            return
        claim.valid_until = valid_until(sent, self._ttl_s)

    async def _release(self, partition: int) -> None:
        """Finish the group in hand, then let the partition go, its claim deleted so that the
        next owner need not wait for it to expire. A group that takes longer than a third of
        the TTL is left to finish, and the claim to expire: the round must go on renewing
        the other claims."""
        claim = self.claims[partition]
        claim.releasing = True
        try:
            await asyncio.wait_for(self._consumer_ended(partition), self._ttl_s / 3)
        except TimeoutError:
            del self.claims[partition]
            self._changed("released", partition)
            return
        del self.claims[partition]
        with contextlib.suppress(*STORAGE_ERRORS):
            await self._kv.delete(partition_claim_key(partition), last=claim.revision)
        self._changed("released", partition)

    async def _give_everything_back(self) -> None:
        """At a stop: every partition released, the member key deleted, so that the others
        take over at their next round instead of after the TTL."""
        for partition in list(self.claims):
            await self._release(partition)
        self._log_changes()
        with contextlib.suppress(*STORAGE_ERRORS):
            await self._kv.delete(metering_member_key(self.member.member_id))
