"""JetStream KV the same way everywhere: absent keys, expiry markers, listings, and
writes and removals that stay done across crashes.

Shared by the edge's stores, `accounts.store` (relay-admin) and `metering`.

Why writes and removals go through `write` and `remove` here (issue 16, item 1):
nats-server's file store records a removed message with a tombstone, so that a store
rebuilt from its block files after a crash (SIGKILL or power loss, with `index.db`
missing or older than the last change) still knows it is gone. One removal gets no
tombstone: the eviction of a key's older value by the bucket's history limit
(`max_msgs_per_subject`), which every overwrite in a history-1 bucket does, a purge
marker's own write included. A rebuilt store has every evicted value again. The key's
newest message hides them while it exists; once it goes (a purge marker's TTL, a newer
value that expires sooner, a marker cleaned up by hand), an older value is the key's
value again, and its TTL may never fire. Measured on nats-server 2.15.1: 100 % of
values purged with a 1 s marker came back after a SIGKILL, single node and R3 cluster.

So buckets whose keys are ever removed keep two messages per key (`DURABLE_HISTORY`),
and every write to them is a subject rollup (`Nats-Rollup: sub`): the new message is
stored next to the old one, then the rollup removes the old one as a purge does, with
a tombstone. Nothing is ever evicted by the limit. A removal is a purge marker, a
rollup too; the marker expires after `REMOVAL_MARKER_TTL_S`, and that expiry is
tombstoned as well: nothing is left behind, nothing accumulates, and no later cleanup
of markers can bring a value back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, PubAck
from nats.js.kv import KeyValue

from schemas.subjects import kv_stream, kv_subject

log = logging.getLogger(__name__)

#: How long a `ValuesWatch` waits for values it counted at its start once nats-py says it
#: has delivered them all.
MARKER_GRACE_S = 2.0

#: What nats-py raises for a key that is not there (never written, deleted or purged).
NOT_FOUND = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.NotFoundError)


#: Messages kept per key in a bucket whose keys are removed: the old value and the new one
#: for the moment between a write and its rollup (see the module's docstring).
DURABLE_HISTORY = 2

#: How long a removal's purge marker lives. The value it removed is gone for good already
#: (the rollup's tombstone); the marker only tells a reader "removed" meanwhile.
REMOVAL_MARKER_TTL_S = 1

#: JetStream's "wrong last sequence" error codes (a compare-and-set lost).
_WRONG_LAST = (10071, 10164)

T = TypeVar("T")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class CompareAndSetLost(Exception):
    """A compare-and-set kept losing to other writers; the caller gives up on this request."""


async def compare_and_set(attempt: Callable[[], Awaitable[T]], attempts: int, what: str) -> T:
    """Run `attempt` (read, decide, write with `last=` the revision read) until its write
    wins: a lost race (KeyWrongLastSequenceError) waits a little, jittered so that the
    losers do not collide again, and reads again. CompareAndSetLost after `attempts`."""
    for n in range(attempts):
        try:
            return await attempt()
        except nats.js.errors.KeyWrongLastSequenceError:
            await asyncio.sleep(random.uniform(0, min(0.002 * 2**n, 0.05)))
    raise CompareAndSetLost(f"{what}: {attempts} compare-and-set attempts lost")


def is_lost_race(exc: nats.js.errors.APIError) -> bool:
    """Whether a JetStream publish with an expected last sequence lost: nats-py raises a bare
    APIError for JetStream's codes where KeyValue's own calls raise KeyWrongLastSequenceError."""
    return exc.err_code in _WRONG_LAST


def durable_bucket(bucket: str, replicas: int) -> KeyValueConfig:
    """The configuration of a bucket whose keys are written with `write` and removed with `remove`."""
    return KeyValueConfig(bucket=bucket, history=DURABLE_HISTORY, replicas=replicas)


async def open_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Create the bucket, or open it as it is if it exists with another configuration
    (say, other replicas: an operator's choice we do not undo). A bucket that keeps fewer
    messages per key than `config.history` (one made before `DURABLE_HISTORY`) is raised
    to it: with one, removals do not survive a crash."""
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        log.warning("bucket %s exists with another configuration; using it as is", config.bucket)
        kv = await js.key_value(config.bucket)
    info = await js.stream_info(kv_stream(config.bucket))
    kept = info.config.max_msgs_per_subject
    if kept is not None and 0 < kept < config.history:
        info.config.max_msgs_per_subject = config.history
        await js.update_stream(info.config)
        log.warning("bucket %s kept %d message(s) per key; now %d", config.bucket, kept, config.history)
    return kv


async def write(
    js: JetStreamContext, bucket: str, key: str, value: bytes, *, last: int | None = None, ttl_s: float | None = None
) -> int:
    """Store `value` under `key` as a subject rollup: the value it replaces goes with a
    tombstone, and cannot come back after a crash. Returns the new revision.

    `last` makes it a compare-and-set on the key's revision (0: only if the key holds
    nothing); a lost one raises KeyWrongLastSequenceError. `ttl_s` is a per-message TTL
    (at least 1 s; nats-py's put() and update() cannot set one).
    """
    headers = {"Nats-Rollup": "sub"}
    if last is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
    return (await _publish(js, kv_subject(bucket, key), value, headers, ttl_s)).seq


async def put_with_ttl(
    js: JetStreamContext, bucket: str, key: str, value: bytes, ttl_s: float, *, last: int | None = None
) -> int:
    """Store `value` under `key` with a per-message TTL, as a plain write (no rollup: for
    keys that are never removed, only left to expire). `last` makes it a compare-and-set
    (KeyWrongLastSequenceError when lost). Returns the new revision."""
    headers = {} if last is None else {"Nats-Expected-Last-Subject-Sequence": str(last)}
    return (await _publish(js, kv_subject(bucket, key), value, headers or None, ttl_s)).seq


async def remove(js: JetStreamContext, bucket: str, key: str, *, last: int | None = None) -> None:
    """Remove `key` for good: a purge marker, as a subject rollup, that expires by itself.

    `last` makes it a compare-and-set on the key's revision (KeyWrongLastSequenceError if
    the key changed). Removing an absent key is harmless.
    """
    headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
    if last is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
    await _publish(js, kv_subject(bucket, key), b"", headers, REMOVAL_MARKER_TTL_S)


async def _publish(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str] | None, ttl_s: float | None
) -> PubAck:
    try:
        return await js.publish(subject, payload, headers=headers, msg_ttl=None if ttl_s is None else max(1.0, ttl_s))
    except nats.js.errors.APIError as exc:
        # Raised where it is made, never held in a local: that would be a reference cycle
        # keeping every caller's frame (thousands of decoded room claims) until a full GC.
        if is_lost_race(exc):
            raise nats.js.errors.KeyWrongLastSequenceError(description=exc.description) from exc
        raise


def present(entry: KeyValue.Entry | None) -> bool:
    """Whether `entry` holds a value. An expiry or purge marker can come back from get()
    as an empty value: it counts as absent."""
    return entry is not None and bool(entry.value) and entry.operation is None


async def get_present(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    """The entry under `key`, or None if there is no value."""
    try:
        entry = await get_entry(kv, key)
    except NOT_FOUND:
        return None
    return entry if present(entry) else None


class _StoredMessage(msgspec.Struct):
    subject: str
    seq: int
    data: bytes = b""  # base64 in the JSON: msgspec decodes it
    hdrs: bytes = b""


class _MessageGetReply(msgspec.Struct):
    message: _StoredMessage | None = None
    error: dict | None = None


_decode_message_get = msgspec.json.Decoder(_MessageGetReply).decode
_encode_message_get = msgspec.json.Encoder().encode
_KV_OPERATION = b"kv-operation:"


async def get_entry(kv: KeyValue, key: str) -> KeyValue.Entry:
    """`kv.get(key)`, with the same answers and errors, in a fraction of its time.

    nats-py's get asks the stream's leader for the key's last message (as this does: a
    direct get could be answered by a replica that lags) and then reads the reply's
    headers with the standard library's e-mail parser and builds it through dataclasses:
    in a reconnect storm that was a fifth of the edge's CPU. Here the reply is decoded by
    msgspec and the one header that matters is found by hand. Falls back to `kv.get` if
    nats-py's KeyValue no longer has the attributes read here (tests check it has)."""
    parts = _nats_py_parts(kv)
    if parts is None:
        return await kv.get(key)
    nc, prefix, timeout, stream, subject_prefix = parts
    subject = subject_prefix + key
    try:
        reply = await nc.request(f"{prefix}.STREAM.MSG.GET.{stream}", _encode_message_get({"last_by_subj": subject}), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise nats.js.errors.ServiceUnavailableError from None
    answer = _decode_message_get(reply.data)
    if answer.error is not None:
        if answer.error.get("code") == 404:
            raise nats.js.errors.KeyNotFoundError
        nats.js.errors.APIError.from_error(answer.error)  # raises the error nats-py would
    message = answer.message
    if message is None or message.subject != subject:
        raise nats.js.errors.KeyNotFoundError
    entry = KeyValue.Entry(bucket=kv._name, key=key, value=message.data or None, revision=message.seq, delta=None, created=None, operation=None)  # type: ignore[attr-defined]
    if message.hdrs:
        for line in message.hdrs.split(b"\r\n")[1:]:
            if line[: len(_KV_OPERATION)].lower() == _KV_OPERATION:
                operation = line[len(_KV_OPERATION) :].strip().decode()
                if operation in ("DEL", "PURGE"):
                    raise nats.js.errors.KeyNotFoundError(entry, operation)
    return entry


def _nats_py_parts(kv: KeyValue) -> tuple[Any, str, float, str, str] | None:
    """What `get_entry` needs of nats-py's KeyValue (its connection, API prefix, timeout,
    stream and key prefix), read from its private attributes; None if they are gone."""
    try:
        js = kv._js  # type: ignore[attr-defined]
        return js._nc, js._prefix, js._timeout, kv._stream, kv._pre  # type: ignore[attr-defined]
    except AttributeError:
        return None


def get_entry_is_fast(kv: KeyValue) -> bool:
    """Whether `get_entry` takes its own path on this nats-py (not the fallback)."""
    return _nats_py_parts(kv) is not None and hasattr(kv, "_name")


class ValuesWatch:
    """A KV watcher whose one `None` means for sure "the values there at the start are all in".

    nats-py 2.16's watcher can put its own start marker (None) ahead of entries already
    delivered to it (nats-io/nats.py#842, fixed after 2.16): a listing would then miss keys,
    and the edges' view of live leases would look empty for a moment, its edges "dead".
    This one counts instead. Right after the watcher starts, the consumer's delivered and
    pending messages are the values there at the start (and maybe a few changes since,
    which only make the marker a little later); the marker comes once that many entries
    (deletions included) came through. nats-py's own markers are dropped.
    Start it with `await ValuesWatch.start(kv, key_filter)`; `stop()` ends the iteration.
    """

    def __init__(self, watcher: KeyValue.KeyWatcher, initial: int | None, grace_s: float = MARKER_GRACE_S) -> None:
        """`initial`: how many messages make up the values at the start; None: unknown, so
        nats-py's own marker is trusted. `grace_s`: how long counted values may lag it."""
        self.watcher, self.initial, self.grace_s = watcher, initial, grace_s

    @classmethod
    async def start(cls, kv: KeyValue, key_filter: str, inactive_threshold_s: float | None = None) -> ValuesWatch:
        """`inactive_threshold_s`: how long the server keeps the watcher's consumer once it
        is stopped (nats-py's default: 5 minutes)."""
        # deletions too: every message is counted
        watcher = await kv.watch(key_filter, inactive_threshold=inactive_threshold_s)
        # nats-py's one internal used here: the watcher's subscription, which its own keys()
        # asks the same way. Without it (another release), its marker is trusted.
        subscription = getattr(watcher, "_sub", None)
        if subscription is None or not hasattr(subscription, "consumer_info"):
            _warn_once("nats-py's KV watcher has no _sub.consumer_info(); trusting its start marker (nats-io/nats.py#842)")
            return cls(watcher, None)
        try:
            info = await subscription.consumer_info()
        except BaseException:
            await watcher.stop()
            raise
        return cls(watcher, (info.num_pending or 0) + (info.delivered.consumer_seq if info.delivered else 0))

    async def stop(self) -> None:
        await self.watcher.stop()

    def __aiter__(self) -> AsyncIterator[KeyValue.Entry | None]:
        return self._entries() if self.initial is not None else aiter(self.watcher)  # its own marker

    async def _entries(self) -> AsyncIterator[KeyValue.Entry | None]:
        assert self.initial is not None
        marked = self.initial == 0
        if marked:
            yield None
        seen, nats_marked = 0, False
        while True:
            try:
                if nats_marked and not marked:
                    # nats-py says it is done and we have not seen them all: the rest come at
                    # once if they come at all (a message counted at the start can vanish
                    # before delivery, e.g. by its TTL, and nats-py skips markers it does
                    # not know). Waiting for ever would keep an edge from getting ready.
                    entry = await asyncio.wait_for(anext(self.watcher), self.grace_s)
                else:
                    entry = await anext(self.watcher)
            except StopAsyncIteration:
                return
            except TimeoutError:
                log.warning("a KV watcher got %d of the %d values it started with; going on", seen, self.initial)
                marked = True
                yield None
                continue
            if entry is None:
                nats_marked = True  # maybe early: not ours to trust
                continue
            seen += 1
            yield entry
            if not marked and seen >= self.initial:
                marked = True
                yield None


LISTING_CONSUMER_LINGER_S = 5.0


async def present_values(kv: KeyValue, key_filter: str) -> dict[str, bytes]:
    """key → value of every key matching `key_filter` that holds a value.

    One short-lived watcher (a server-side consumer); a key delivered twice (after a
    consumer reset) counts once.
    """
    found: dict[str, bytes] = {}
    # Its consumer goes 5 s after the listing, not nats-py's 5 minutes: a listing every few
    # seconds (metering's membership rounds) would otherwise keep dozens (fault tests).
    watch = await ValuesWatch.start(kv, key_filter, inactive_threshold_s=LISTING_CONSUMER_LINGER_S)
    try:
        async for entry in watch:
            if entry is None:  # the current values are all in
                break
            if present(entry):
                found[entry.key] = entry.value
            else:
                found.pop(entry.key, None)
    finally:
        await watch.stop()
    return found
