"""Reading JetStream KV the same way everywhere: absent keys, expiry markers, listings.

Shared by the edge's stores, `accounts.store` (relay-admin) and `metering.usage`.
"""

from __future__ import annotations

import logging

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

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
