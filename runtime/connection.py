"""Connecting to NATS the same way in every service, and what a storage failure looks like."""

from __future__ import annotations

import asyncio
import logging
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


async def connect_for_service(
    urls: str, name: str, error_cb: Callable[[Exception], Awaitable[None]], ping_interval_ms: int, **callbacks: Any
) -> NATS:
    """A connection for a long-running service: it retries for ever, also at start (a
    service may well start before its NATS cluster).

    Pinged every `ping_interval_ms`: a server that vanished without a word (its host cut
    off: no FIN, no RST) is noticed after two unanswered pings. nats-py's default, 2 min,
    let an edge hold sockets on a dead connection for minutes (issue 15), its publishes
    filling a buffer nobody reads.
    """
    return await nats.connect(
        servers=server_list(urls), name=name, error_cb=error_cb, max_reconnect_attempts=-1, connect_timeout=5,
        **liveness_options(ping_interval_ms), **callbacks,
    )  # fmt: skip


def liveness_options(ping_interval_ms: int) -> dict[str, Any]:
    """nats-py's options for noticing a dead connection: a ping every interval, and the
    connection taken for dead after two unanswered (see `connect_for_service`)."""
    return {"ping_interval": ping_interval_ms / 1000, "max_outstanding_pings": 2}


def where(nc: NATS | None) -> str:
    """The node a connection is on, for logs: host and port (never the URL's credentials)."""
    url = nc.connected_url if nc is not None else None
    return f"{url.hostname}:{url.port}" if url is not None else "(none)"


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


async def try_another_node(nc: NATS | None, who: str, log: logging.Logger) -> None:
    """Storage does not answer through `nc`'s node (the node cut off from the cluster's
    routes, or without its JetStream, or cut off altogether without a word): reconnect to
    another node of the pool (nats-py subscribes again there). With every node alike, it
    comes back to this one; with one server known, nothing is done."""
    if nc is None or nc.is_closed or len(nc.servers) < 2:
        return
    log.warning("%s: storage does not answer through NATS at %s; reconnecting to another node", who, where(nc))
    # Also when nats-py is reconnecting already (it found the connection stale): its
    # reconnect may be the one stuck on the old socket.
    _abort_socket(nc)
    if nc.is_connected:
        await nc.force_reconnect()


def _abort_socket(nc: NATS) -> None:
    """Drop the connection's socket at once. nats-py's reconnect first waits for the old
    socket to close (nats.py issue #671): a connection to a node cut off without a word,
    with data it could not send, closes only when the kernel gives up (~15 min). Reaches
    into nats-py (its TCP transport's StreamWriter); if that is not there, nothing is done
    and the reconnect waits as before."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
