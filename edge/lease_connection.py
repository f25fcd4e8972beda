"""The NATS connection this edge's lease is read and renewed on.

Its own connection, so that a renewal never waits behind the main connection's traffic: in
a reconnect storm 15 MB of frames and events queued on the main connection ahead of the
renewal, its answer came too late, and the edge lost its lease to client work (issue 18).

On the main connection's node, and only while the main connection is up: a renewed lease
tells the other edges that this edge serves its sockets. Through another node it would
go on being renewed while the main connection is away, or while its node is cut off from
the cluster (its frames going nowhere, its storage not answering), and the other edges
would keep counting its sockets as connected; on the main connection's node the renewals
fail with it and the edge fences itself as before (`edge.leases`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlunparse

import nats
import nats.errors
from nats.aio.client import Client as NATS

from edge.settings import EdgeSettings
from edge.store import Presence
from runtime.connection import liveness_options, where
from schemas.subjects import PRESENCE_BUCKET

log = logging.getLogger("edge")


class MainConnectionAway(nats.errors.ConnectionClosedError):
    """The main connection is not connected: the lease is not renewed meanwhile (a storage
    error to its callers, waited out and counted as a failed renewal)."""


class LeaseConnection:
    """Opens, and moves after the main connection, the connection of `Leases`' storage calls."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self._presence: Presence | None = None

    async def presence_beside(self, main: NATS) -> Presence:
        """The presence bucket over a lease connection on `main`'s node, opened (again) when
        there is none there. Raises `MainConnectionAway` while `main` is not connected, and
        what connecting raises (storage errors all: the caller retries)."""
        here = main.connected_url if main.is_connected else None
        if here is None:
            raise MainConnectionAway()
        nc = self.nc
        if nc is not None and nc.is_connected and nc.connected_url is not None and nc.connected_url.netloc == here.netloc:
            assert self._presence is not None
            return self._presence
        new = await nats.connect(
            servers=[urlunparse(here)],
            name=f"relay-edge {self.settings.edge_id} (lease)",
            error_cb=self._error,
            connect_timeout=max(0.5, self.settings.jetstream_timeout_ms / 1000),
            # Not reconnected by nats-py: it would pick any node. A lost one is opened
            # again, on the main connection's node, at the next call.
            allow_reconnect=False,
            **liveness_options(self.settings.nats_ping_interval_ms),
        )
        try:
            js = new.jetstream(timeout=self.settings.jetstream_timeout_ms / 1000)
            presence = Presence(js, await js.key_value(PRESENCE_BUCKET), new)
        except BaseException:
            await self._close(new)
            raise
        if nc is not None:
            log.info("lease connection moved to NATS at %s, beside the main connection", where(new))
            await self._close(nc)
        self.nc, self._presence = new, presence
        return presence

    async def close(self) -> None:
        """At the edge's exit, after the lease is dropped."""
        nc, self.nc, self._presence = self.nc, None, None
        if nc is not None:
            await self._close(nc)

    @staticmethod
    async def _close(nc: NATS) -> None:
        # Bounded: a close on a connection whose node went away without a word would wait
        # for its socket (nats.py #671); the process must not wait with it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await nc.close()

    async def _error(self, exc: Exception) -> None:
        # Its failures show as failed renewals (counted, and logged by `Leases`); this says why.
        log.info("lease connection: %s", exc or type(exc).__name__)
