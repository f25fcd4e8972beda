"""Connecting to NATS the same way in every service, and what a storage failure looks like."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS

#: What a NATS or JetStream call raises when the servers do not answer or refuse: the
#: errors a caller waits out or reports as "storage unavailable", never a bug.
STORAGE_ERRORS = (nats.errors.Error, asyncio.TimeoutError)


def server_list(urls: str) -> list[str]:
    """The servers of a comma-separated `nats_url` setting."""
    return [u.strip() for u in urls.split(",")]


async def connect_for_service(urls: str, name: str, error_cb: Callable[[Exception], Awaitable[None]], **callbacks: Any) -> NATS:
    """A connection for a long-running service: it retries for ever, also at start (a
    service may well start before its NATS cluster)."""
    return await nats.connect(
        servers=server_list(urls), name=name, error_cb=error_cb, max_reconnect_attempts=-1, connect_timeout=5, **callbacks
    )


async def connect_once(urls: str, name: str) -> NATS:
    """A connection for a command that runs and ends (relay-admin): one attempt per
    server, errors raised to the caller rather than logged per attempt."""

    async def ignore(exc: Exception) -> None:
        pass  # the caller reports the failure once

    return await nats.connect(
        servers=server_list(urls),
        name=name,
        connect_timeout=5,
        allow_reconnect=False,
        max_reconnect_attempts=1,  # 0 would mean "for ever" in nats-py
        reconnect_time_wait=0.5,
        error_cb=ignore,
    )
