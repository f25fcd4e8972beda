"""Reading JetStream KV the same way everywhere: absent keys, expiry markers, listings.

Shared by the edge's stores, `accounts.store` (relay-admin) and `metering.usage`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

#: How long a `ValuesWatch` waits for values it counted at its start once nats-py says it
#: has delivered them all.
MARKER_GRACE_S = 2.0

#: What nats-py raises for a key that is not there (never written, deleted or purged).
NOT_FOUND = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.NotFoundError)


async def open_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Create the bucket, or open it as it is if it exists with another configuration
    (say, other replicas: an operator's choice we do not undo)."""
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        log.warning("bucket %s exists with another configuration; using it as is", config.bucket)
        return await js.key_value(config.bucket)


def present(entry: KeyValue.Entry | None) -> bool:
    """Whether `entry` holds a value. An expiry or purge marker can come back from get()
    as an empty value: it counts as absent."""
    return entry is not None and bool(entry.value) and entry.operation is None


async def get_present(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    """The entry under `key`, or None if there is no value."""
    try:
        entry = await kv.get(key)
    except NOT_FOUND:
        return None
    return entry if present(entry) else None


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

    def __init__(self, watcher: KeyValue.KeyWatcher, initial: int) -> None:
        self._watcher, self._initial = watcher, initial

    @classmethod
    async def start(cls, kv: KeyValue, key_filter: str) -> ValuesWatch:
        watcher = await kv.watch(key_filter)  # deletions too: every message is counted
        try:
            info = await watcher._sub.consumer_info()  # the subscription nats-py's own keys() asks
        except BaseException:
            await watcher.stop()
            raise
        return cls(watcher, (info.num_pending or 0) + (info.delivered.consumer_seq if info.delivered else 0))

    async def stop(self) -> None:
        await self._watcher.stop()

    def __aiter__(self) -> AsyncIterator[KeyValue.Entry | None]:
        return self._entries()

    async def _entries(self) -> AsyncIterator[KeyValue.Entry | None]:
        marked = self._initial == 0
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
                    entry = await asyncio.wait_for(anext(self._watcher), MARKER_GRACE_S)
                else:
                    entry = await anext(self._watcher)
            except StopAsyncIteration:
                return
            except TimeoutError:
                log.warning("a KV watcher got %d of the %d values it started with; going on", seen, self._initial)
                marked = True
                yield None
                continue
            if entry is None:
                nats_marked = True  # maybe early: not ours to trust
                continue
            seen += 1
            yield entry
            if not marked and seen >= self._initial:
                marked = True
                yield None


async def present_values(kv: KeyValue, key_filter: str) -> dict[str, bytes]:
    """key → value of every key matching `key_filter` that holds a value.

    One short-lived watcher (a server-side consumer); a key delivered twice (after a
    consumer reset) counts once.
    """
    found: dict[str, bytes] = {}
    watch = await ValuesWatch.start(kv, key_filter)
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
