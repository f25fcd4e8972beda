"""JetStream KV: room records (compare-and-set), edge leases and lastSeen.

Buckets:
- `relay_rooms`: one `RoomRecord` per room id. Every write names the revision it
  replaces, so two edges racing on a room cannot both win; writes and deletes go
  through `runtime.kv.write` and `runtime.kv.remove`, so a deleted room stays deleted
  across crashes of the NATS servers (see `runtime.kv`).
- `relay_presence`: `edge.<id>` leases and `seen.<room>.<role>` times, both written
  with a per-message TTL. Expired keys leave a marker, which is how watchers learn
  that an edge died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from runtime import kv
from runtime.kv import NOT_FOUND, ValuesWatch, get_entry, get_present, open_bucket, present
from runtime.metrics import timed_storage
from schemas.records import (
    EdgeLease,
    RoomRecord,
    edge_lease_decoder,
    room_record_decoder,
)
from schemas.subjects import (
    EDGE_LEASE_FILTER,
    PRESENCE_BUCKET,
    ROOMS_BUCKET,
    edge_lease_key,
    kv_subject,
    last_seen_key,
    room_key,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_CAS_ATTEMPTS = 50


#: A compare-and-set on a room kept losing; the caller gives up on this request.
StorageConflict = kv.CompareAndSetLost

async def open_buckets(js: JetStreamContext, replicas: int) -> tuple[KeyValue, KeyValue]:
    """Create (or open) the rooms and presence buckets."""
    rooms = await open_bucket(js, kv.durable_bucket(ROOMS_BUCKET, replicas))
    # The marker TTL makes an expired lease visible to watchers as a delete.
    presence = await open_bucket(
        js, KeyValueConfig(bucket=PRESENCE_BUCKET, history=1, replicas=replicas, limit_marker_ttl=1)
    )
    return rooms, presence


class RoomStore:
    """Room records with compare-and-set updates."""

    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self._kv = kv
        self._js = js

    @timed_storage("rooms.get")
    async def get(self, room_id: str) -> tuple[RoomRecord | None, int]:
        """The room's record and its revision (0 when the room does not exist)."""
        try:
            entry = await get_entry(self._kv, room_key(room_id))
        except NOT_FOUND as exc:
            # A deleted key still has a revision; a create must name it.
            entry = getattr(exc, "entry", None)
            return None, (entry.revision if entry is not None else 0)
        if not present(entry):
            return None, entry.revision
        return room_record_decoder.decode(entry.value), entry.revision

    @timed_storage("rooms.write")
    async def write(self, room_id: str, record: RoomRecord, revision: int) -> int:
        """Write `record` if the room is still at `revision`; raises KeyWrongLastSequenceError if not."""
        return await kv.write(self._js, ROOMS_BUCKET, room_key(room_id), msgspec.json.encode(record), last=revision)

    @timed_storage("rooms.delete")
    async def delete(self, room_id: str, revision: int) -> None:
        """Delete the room's record if it is still at `revision` (KeyWrongLastSequenceError if not).

        Nothing stays behind: the purge marker expires after a second.
        """
        await kv.remove(self._js, ROOMS_BUCKET, room_key(room_id), last=revision)

    @timed_storage("rooms.transact")
    async def transact(
        self,
        room_id: str,
        decide: Callable[[RoomRecord | None, tuple[int | None, ...]], tuple[RoomRecord | None, T]],
        extra: Callable[[RoomRecord], Awaitable[tuple[int | None, ...]]] | None = None,
    ) -> tuple[T, int]:
        """Read, decide, compare-and-set; on a lost race read again and decide again.

        `decide(record, extra)` returns the record to write (None: write nothing) and a
        result. Returns the result and the revision it holds for (the written one, or the
        one read), once the write (if any) has won. `extra(record)`, if given, is awaited
        first to fetch what else the decision needs (lastSeen times).
        """

        async def attempt() -> tuple[T, int]:
            record, revision = await self.get(room_id)
            more = await extra(record) if extra is not None and record is not None else ()
            new, result = decide(record, more)
            if new is None:
                return result, revision
            return result, await self.write(room_id, new, revision)

        return await kv.compare_and_set(attempt, _MAX_CAS_ATTEMPTS, f"room {room_id}")


class Presence:
    """Edge leases and per-socket lastSeen in the presence bucket."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, nc: NATS) -> None:
        self._js = js
        self._kv = kv
        self._nc = nc

    @timed_storage("presence.put_lease")
    async def put_lease(self, lease: EdgeLease, ttl_s: float) -> int:
        """Write an edge's lease unconditionally (startup). Returns its revision."""
        return await kv.put_with_ttl(self._js, PRESENCE_BUCKET, edge_lease_key(lease.edge_id), msgspec.json.encode(lease), ttl_s)

    @timed_storage("presence.renew_lease")
    async def renew_lease(self, lease: EdgeLease, ttl_s: float, revision: int) -> int:
        """Renew a lease still at `revision`, keeping its TTL (update() would drop it).

        Raises KeyWrongLastSequenceError when the lease expired or was taken meanwhile.
        """
        return await kv.put_with_ttl(
            self._js, PRESENCE_BUCKET, edge_lease_key(lease.edge_id), msgspec.json.encode(lease), ttl_s, last=revision
        )

    @timed_storage("presence.read_lease")
    async def read_lease(self, edge_id: str) -> tuple[EdgeLease | None, int]:
        """An edge id's lease (None if none lives) and the key's revision, for a
        compare-and-set (0: nothing there, ever or any more)."""
        try:
            entry = await get_entry(self._kv, edge_lease_key(edge_id))
        except NOT_FOUND as exc:
            entry = getattr(exc, "entry", None)  # a deletion has a revision too
            return None, entry.revision if entry is not None else 0
        return self.decode_lease(entry), entry.revision

    @timed_storage("presence.drop_lease")
    async def drop_lease(self, edge_id: str, boot_id: str) -> None:
        """Delete the edge's lease if it is still incarnation `boot_id`'s: another one may
        hold the id by now, and its lease is not ours to drop."""
        lease, revision = await self.read_lease(edge_id)
        if lease is not None and lease.boot_id == boot_id:
            await self._kv.delete(edge_lease_key(edge_id), last=revision)

    async def watch_leases(self) -> ValuesWatch:
        """A watcher over all edge leases (one per edge: each watcher is a server-side consumer)."""
        return await ValuesWatch.start(self._kv, EDGE_LEASE_FILTER)

    @staticmethod
    def decode_lease(entry: KeyValue.Entry) -> EdgeLease | None:
        if not present(entry):
            return None
        try:
            return edge_lease_decoder.decode(entry.value)
        except msgspec.DecodeError:
            log.warning("undecodable lease under %s", entry.key)
            return None

    @timed_storage("presence.put_last_seen")
    async def put_last_seen(self, room_id: str, role: str, at_ms: int, ttl_s: float) -> None:
        """Record when a room's `role` socket last sent anything. Expires with the room's idleness."""
        await kv.put_with_ttl(self._js, PRESENCE_BUCKET, last_seen_key(room_id, role), str(at_ms).encode(), ttl_s)

    async def put_last_seen_unacknowledged(self, room_id: str, role: str, at_ms: int, ttl_s: float) -> None:
        """`put_last_seen` without waiting for JetStream's acknowledgement, for the periodic
        flush: thousands of acknowledged writes at once hold the event loop for a quarter
        of a second (every frame waits), and a lost one only leaves lastSeen one interval old."""
        subject = kv_subject(PRESENCE_BUCKET, last_seen_key(room_id, role))
        await self._nc.publish(subject, str(at_ms).encode(), headers={"Nats-TTL": str(int(max(1.0, ttl_s)))})

    async def get_room_last_seen(self, room_id: str) -> tuple[int | None, int | None]:
        """lastSeen of a room's Mac and iOS sockets (epoch ms, or None)."""
        mac, ios = await asyncio.gather(self.get_last_seen(room_id, "mac"), self.get_last_seen(room_id, "ios"))
        return mac, ios

    @timed_storage("presence.get_last_seen")
    async def get_last_seen(self, room_id: str, role: str) -> int | None:
        entry = await get_present(self._kv, last_seen_key(room_id, role))
        if entry is None:
            return None
        try:
            return int(entry.value)
        except ValueError:
            return None
