"""Reading JetStream KV the same way everywhere: absent keys, expiry markers, listings.

Shared by the edge's stores, `accounts.store` (relay-admin) and `metering.usage`.
"""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue

#: What nats-py raises for a key that is not there (never written, deleted or purged).
NOT_FOUND = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.NotFoundError)


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


async def present_values(kv: KeyValue, key_filter: str) -> dict[str, bytes]:
    """key → value of every key matching `key_filter` that holds a value.

    One short-lived watcher (a server-side consumer); a key delivered twice (after a
    consumer reset) counts once.
    """
    found: dict[str, bytes] = {}
    watcher = await kv.watch(key_filter, ignore_deletes=True)
    try:
        async for entry in watcher:
            if entry is None:  # the current values are all in
                break
            if present(entry):
                found[entry.key] = entry.value
    finally:
        await watcher.stop()
    return found
